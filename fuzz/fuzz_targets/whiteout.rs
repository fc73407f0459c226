//! cargo-fuzz target `whiteout`: the check in `fuzz/checks/whiteout.rs` (also replayed over the
//! seeds by the host tests, `tests/tests/fuzz_checks.rs`).
#![no_main]

#[path = "../checks/whiteout.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|input: check::Input| check::run(input));
