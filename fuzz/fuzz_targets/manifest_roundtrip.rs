//! cargo-fuzz target `manifest_roundtrip`: the check in `fuzz/checks/manifest_roundtrip.rs` (also replayed over the
//! seeds by the host tests, `tests/tests/fuzz_checks.rs`).
#![no_main]

#[path = "../checks/manifest_roundtrip.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|v: check::ValidManifest| check::run(v));
