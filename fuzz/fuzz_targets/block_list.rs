//! cargo-fuzz target `block_list`: the check in `fuzz/checks/block_list.rs` (also replayed over the
//! seeds by the host tests, `tests/tests/fuzz_checks.rs`).
#![no_main]

#[path = "../checks/block_list.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
