//! cargo-fuzz target `oci_manifest`: the check in `fuzz/checks/oci_manifest.rs` (also replayed over the
//! seeds by the host tests, `tests/tests/fuzz_checks.rs`).
#![no_main]

#[path = "../checks/oci_manifest.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check::run(data));
