//! Test doubles for the agent's integration tests.
#![allow(dead_code, reason = "each test file uses the part it needs")]

pub mod api_server;
