//! Any bytes as a condition's CEL expression: compiled (never a panic), and if it
//! compiles, evaluated against an object, an old object and a request.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis::policy::fuzz::condition(data);
});
