//! cargo-fuzz target `host_limit`: the check in `fuzz/checks/host_limit.rs` (also replayed over
//! the seeds by the host tests, `tests/tests/fuzz_checks.rs`).
#![no_main]

#[path = "../checks/host_limit.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
