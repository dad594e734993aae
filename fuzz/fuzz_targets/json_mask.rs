//! See `portcullis::fuzzing` for what this target feeds and asserts.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis::fuzzing::run("json_mask", data);
});
