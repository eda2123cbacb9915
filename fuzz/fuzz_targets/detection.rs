//! `mesh_agent::fuzzing::detection` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mesh_agent::fuzzing::detection(data);
});
