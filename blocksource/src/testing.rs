//! A conformance suite shared by every [`BlockSource`] implementation's tests.

use crate::{BlockError, BlockSource};
use rand::{Rng, SeedableRng};
use std::sync::mpsc;
use std::sync::Arc;

/// Random reads of `source` must equal `reference` (the device's expected contents, zero-padded
/// to the device size). Exercises `read_at`, `fetch` + `locate` (whose descriptors must be among
/// `files()` when that is not empty), out-of-range and concurrent readers. Panics with a
/// description on the first mismatch.
pub fn check_reads(source: Arc<dyn BlockSource>, reference: Arc<Vec<u8>>, seed: u64, reads: usize) {
    let geo = source.geometry();
    assert_eq!(geo.size, reference.len() as u64, "device size");
    assert!(geo.block_size.is_power_of_two() && geo.block_size >= 512);

    // Out of range is refused, not served.
    let mut one = [0u8; 1];
    assert!(matches!(
        source.read_at(geo.size, &mut one),
        Err(BlockError::OutOfRange { .. })
    ));

    let threads = 4;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let source = source.clone();
            let reference = reference.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (t as u64 * 0x9E37));
                for i in 0..reads / threads {
                    let size = reference.len() as u64;
                    let len = rng.gen_range(1..=(size.min(3 << 20)));
                    let off = rng.gen_range(0..=size - len);
                    let mut buf = vec![0u8; len as usize];
                    if i % 2 == 0 {
                        source.read_at(off, &mut buf).expect("read_at");
                    } else {
                        let (tx, rx) = mpsc::channel();
                        source.fetch(off, len, Box::new(move |r| tx.send(r).unwrap()));
                        rx.recv().unwrap().expect("fetch");
                        let loc = source.locate(off, len).expect("range local after fetch");
                        let files = source.files();
                        assert!(
                            files.is_empty() || files.contains(&loc.fd),
                            "locate returned fd {} that files() ({files:?}) does not name",
                            loc.fd
                        );
                        crate::pread_exact_or_zero(loc.fd, &mut buf, loc.offset).unwrap();
                    }
                    let want = &reference[off as usize..(off + len) as usize];
                    if buf != want {
                        let first = buf.iter().zip(want).position(|(a, b)| a != b).unwrap();
                        panic!("read {off}+{len} differs from the reference at byte {first}");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("reader thread");
    }
}
