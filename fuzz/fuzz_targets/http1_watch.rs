//! `mesh_agent::fuzzing::http1_watch` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mesh_agent::fuzzing::http1_watch(data);
});
