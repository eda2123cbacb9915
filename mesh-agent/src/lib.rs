//! The mesh node agent: captures enrolled pods' TCP through the kernel programs, carries it
//! over an mTLS HTTP/2 CONNECT (HBONE) tunnel between nodes, and serves the admin API.
//!
//! Start at [`app::run`]; `docs/ARCHITECTURE.md` has the map of modules and invariants.
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod authz;
pub mod ca_service;
pub mod cli;
pub mod cni;
pub mod code_pages;
pub mod config;
pub mod dataplane;
pub mod fuzzing;
pub mod gateway;
pub mod heap;
pub mod identity;
pub mod l7;
pub mod proxy;
pub mod settings;
pub mod snapshot;
pub mod state;
pub mod telemetry;
pub mod traffic;
pub mod transport;
