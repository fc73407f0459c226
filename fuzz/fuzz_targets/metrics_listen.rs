//! cargo-fuzz target `metrics_listen`: the check in `fuzz/checks/metrics_listen.rs` (also replayed over the
//! seeds by the host tests, `tests/tests/fuzz_checks.rs`).
#![no_main]

#[path = "../checks/metrics_listen.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
