//! The fuzz targets' checks (`fuzz/checks/*.rs`, the bodies of the cargo-fuzz targets in
//! `fuzz/fuzz_targets/`) run over their committed seeds (`fuzz/seeds/<target>/`), every
//! crash input kept in `fuzz/regressions/<target>/`, and a fixed number of deterministic
//! mutations of them (bit flips, byte overwrites, truncations, splices), as ordinary tests.
//!
//! This is a regression test of every decoder and parser on inputs known to reach deep into it,
//! built with the rest of the tests; the coverage-guided search with AddressSanitizer is
//! `bash scripts/fuzz.sh` (libFuzzer through cargo-fuzz).

use std::path::{Path, PathBuf};

#[path = "../../fuzz/checks/bitmap.rs"]
mod bitmap;
#[path = "../../fuzz/checks/block_list.rs"]
mod block_list;
#[path = "../../fuzz/checks/erofs.rs"]
mod erofs;
#[path = "../../fuzz/checks/host_limit.rs"]
mod host_limit;
#[path = "../../fuzz/checks/manifest.rs"]
mod manifest;
#[path = "../../fuzz/checks/manifest_roundtrip.rs"]
mod manifest_roundtrip;
#[path = "../../fuzz/checks/metrics_http.rs"]
mod metrics_http;
#[path = "../../fuzz/checks/metrics_listen.rs"]
mod metrics_listen;
#[path = "../../fuzz/checks/oci_manifest.rs"]
mod oci_manifest;
#[path = "../../fuzz/checks/prefetch.rs"]
mod prefetch;
#[path = "../../fuzz/checks/prefetch_pack.rs"]
mod prefetch_pack;
#[path = "../../fuzz/checks/reference.rs"]
mod reference;
#[path = "../../fuzz/checks/snapshot_filter.rs"]
mod snapshot_filter;
#[path = "../../fuzz/checks/tar_layer.rs"]
mod tar_layer;
#[path = "../../fuzz/checks/whiteout.rs"]
mod whiteout;
#[path = "../../fuzz/checks/www_authenticate.rs"]
mod www_authenticate;

/// Mutated inputs per target, on top of its seeds.
const MUTATIONS: usize = 400;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted by name (none when it does not exist).
fn inputs_in(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<_> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| {
            let p = e.path();
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    v.sort();
    v
}

/// xorshift64*: deterministic, so a failing mutation is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// One mutation of `base` (or of `other`, spliced in).
fn mutate(rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0u8, 0xff, 0x7f, 0x80, 1][rng.below(5)];
            }
            2 => {
                let n = rng.below(v.len() + 1);
                v.truncate(n);
            }
            3 if !other.is_empty() => {
                let at = rng.below(v.len() + 1);
                let from = rng.below(other.len());
                let n = rng.below(other.len() - from + 1).min(256);
                v.splice(at..at, other[from..from + n].iter().copied());
            }
            4 => {
                let at = rng.below(v.len() + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(at..at, bytes);
            }
            _ if v.len() >= 8 => {
                // An 8-byte field set to an extreme value (lengths, counts, offsets).
                let i = rng.below(v.len() - 7);
                let x = [0u64, u64::MAX, u64::from(u32::MAX), 1 << 40][rng.below(4)];
                v[i..i + 8].copy_from_slice(&x.to_le_bytes());
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

/// Run `check` on every seed and regression input of `target`, then on mutations of them (of
/// random bytes when there are none). A panic names the input.
fn replay(target: &str, check: impl Fn(&[u8])) {
    let mut inputs = inputs_in(&fuzz_dir().join("seeds").join(target));
    inputs.extend(inputs_in(&fuzz_dir().join("regressions").join(target)));
    let run = |what: &str, data: &[u8]| {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(data)));
        if r.is_err() {
            panic!(
                "fuzz check {target} failed on {what} ({} bytes: {})",
                data.len(),
                hex_head(data)
            );
        }
    };
    for (name, data) in &inputs {
        run(&format!("seed {name}"), data);
    }
    let seed = target.bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = Rng(seed | 1);
    let empty = (String::new(), Vec::new());
    for i in 0..MUTATIONS {
        let base = if inputs.is_empty() {
            &empty
        } else {
            &inputs[rng.below(inputs.len())]
        };
        let other = if inputs.is_empty() {
            &empty
        } else {
            &inputs[rng.below(inputs.len())]
        };
        let data = mutate(&mut rng, &base.1, &other.1);
        run(&format!("mutation {i} of seed {:?}", base.0), &data);
    }
}

fn hex_head(d: &[u8]) -> String {
    let n = d.len().min(64);
    let mut s: String = d[..n].iter().map(|b| format!("{b:02x}")).collect();
    if d.len() > n {
        s.push_str("...");
    }
    s
}

/// A typed target: the input as libFuzzer's `fuzz_target!` gives it (`arbitrary_take_rest`).
fn typed<T: for<'a> arbitrary::Arbitrary<'a>>(data: &[u8], check: impl Fn(T)) {
    if let Ok(v) = T::arbitrary_take_rest(arbitrary::Unstructured::new(data)) {
        check(v);
    }
}

#[test]
fn every_target_has_a_check_here() {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut targets: Vec<String> = std::fs::read_dir(&dir)
        .expect("fuzz/fuzz_targets")
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix(".rs")
                .map(str::to_string)
        })
        .collect();
    targets.sort();
    let here = include_str!("fuzz_checks.rs");
    for t in &targets {
        assert!(
            here.contains(&format!("fn {t}_replays")),
            "fuzz target {t} has no replay test"
        );
        assert!(
            fuzz_dir().join("checks").join(format!("{t}.rs")).exists(),
            "fuzz target {t} has no fuzz/checks/{t}.rs"
        );
    }
}

#[test]
fn bitmap_replays() {
    replay("bitmap", bitmap::run);
}
#[test]
fn host_limit_replays() {
    replay("host_limit", host_limit::run);
}

#[test]
fn block_list_replays() {
    replay("block_list", block_list::run);
}
#[test]
fn erofs_replays() {
    replay("erofs", erofs::run);
}
#[test]
fn manifest_replays() {
    replay("manifest", manifest::run);
}
#[test]
fn manifest_roundtrip_replays() {
    replay("manifest_roundtrip", |d| typed(d, manifest_roundtrip::run));
}
#[test]
fn metrics_http_replays() {
    replay("metrics_http", metrics_http::run);
}
#[test]
fn metrics_listen_replays() {
    replay("metrics_listen", metrics_listen::run);
}
#[test]
fn oci_manifest_replays() {
    replay("oci_manifest", oci_manifest::run);
}
#[test]
fn prefetch_replays() {
    replay("prefetch", prefetch::run);
}
#[test]
fn prefetch_pack_replays() {
    replay("prefetch_pack", prefetch_pack::run);
}
#[test]
fn reference_replays() {
    replay("reference", reference::run);
}
#[test]
fn snapshot_filter_replays() {
    replay("snapshot_filter", snapshot_filter::run);
}
#[test]
fn tar_layer_replays() {
    replay("tar_layer", tar_layer::run);
}
#[test]
fn whiteout_replays() {
    replay("whiteout", |d| typed(d, whiteout::run));
}
#[test]
fn www_authenticate_replays() {
    replay("www_authenticate", www_authenticate::run);
}
