//! cargo-fuzz target `snapshot_filter`: the check in `fuzz/checks/snapshot_filter.rs` (also replayed over the
//! seeds by the host tests, `tests/tests/fuzz_checks.rs`).
#![no_main]

#[path = "../checks/snapshot_filter.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
