//! cargo-fuzz target `manifest`: the check in `fuzz/checks/manifest.rs` (also replayed over the
//! seeds by the host tests, `tests/tests/fuzz_checks.rs`).
#![no_main]

#[path = "../checks/manifest.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
