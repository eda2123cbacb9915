//! Test support for the mesh: the network-namespace lab (`lab`), used by
//! `cargo xtask lab|demo|test|bench` and by the integration tests in `tests/`; what a
//! process group costs (`measure`); what crosses the wire between nodes (`wire`); a mesh client driven by hand
//! (`hbone_client`); a Kubernetes API server double (`api_server`, with the built-in
//! kinds it serves in `kinds`), in-process for the agent's tests and as the lab's
//! `mesh-apiserver`.
#![forbid(unsafe_code)]

pub mod api_server;
pub mod delay;
pub mod grpc;
pub mod harness;
pub mod hbone_client;
pub mod kinds;
pub mod lab;
pub mod measure;
pub mod multicluster;
pub mod steady;
pub mod sys;
pub mod wire;
