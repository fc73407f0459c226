//! cargo-fuzz target `www_authenticate`: the check in `fuzz/checks/www_authenticate.rs` (also replayed over the
//! seeds by the host tests, `tests/tests/fuzz_checks.rs`).
#![no_main]

#[path = "../checks/www_authenticate.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
