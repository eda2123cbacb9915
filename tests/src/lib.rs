//! Test support for the mesh: the network-namespace lab (`lab`), used by
//! `cargo xtask lab|demo|test` and by the integration tests in `tests/`.
#![forbid(unsafe_code)]

pub mod lab;
pub mod sys;
