//! Test doubles for the agent's integration tests.
pub mod api_server;
