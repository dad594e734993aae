//! Any bytes as an AgentPolicy document: parsed (never a panic), and if it parses,
//! every rule decided against a few requests with and without content.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    portcullis::policy::fuzz::document(data);
});
