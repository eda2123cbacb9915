//! `mesh_agent::fuzzing::authz_path` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mesh_agent::fuzzing::authz_path(data);
});
