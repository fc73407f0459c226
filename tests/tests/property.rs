//! Property test: random reads through the lazy path equal the original image, across chunk
//! sizes, with concurrent readers, with and without a metadata pack (fetched ahead or on
//! demand) of scattered blocks; and with chunks copied from another image's cache (the
//! host-wide chunk index), some of whose bytes were corrupted after they were cached.

use lazyblk_blocksource::BlockSource;
use lazyblk_builder::{build_image, BuildOptions, PackBlocks};
use lazyblk_chunkstore::{ChunkStore, Location, StoreOptions};
use lazyblk_tests::fault::FaultServer;
use proptest::prelude::*;
use std::sync::Arc;

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]
    #[test]
    fn lazy_reads_equal_the_original(
        chunk_shift in 12u32..=18,
        size in 1usize..(3 << 20),
        seed in any::<u64>(),
        reads in prop::collection::vec((any::<u64>(), 1u64..300_000), 1..40),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let image = lazyblk_tests::sample_image(size, seed);
        std::fs::write(dir.path().join("raw"), &image).unwrap();
        let serve = dir.path().join("www");
        // A pack of pseudo-random scattered blocks for two seeds in three.
        let blocks = size.div_ceil(4096) as u64;
        let pack = match seed % 3 {
            0 => PackBlocks::Off,
            k => PackBlocks::Blocks((0..blocks).filter(|b| (b ^ seed).wrapping_mul(0x9E37_79B9) % 7 < k).collect()),
        };
        build_image(&dir.path().join("raw"), &serve,
            &BuildOptions { chunk_size: 1 << chunk_shift, metadata_pack: pack, ..Default::default() }, |_| {}).unwrap();
        let srv = FaultServer::start(&serve, "blob");
        let store = Arc::new(ChunkStore::open(&Location::parse(&srv.url("manifest")), StoreOptions {
            cache_root: dir.path().join("cache"),
            readahead_bytes: (seed % 5) << chunk_shift,
            prefetch_pack: seed % 2 == 0,
            ..Default::default()
        }).unwrap());
        store.start_default_background();
        let dev = store.geometry().size;
        let mut padded = image.clone();
        padded.resize(dev as usize, 0);
        let padded = Arc::new(padded);
        // Concurrent readers over the same random list, in different orders.
        let reads = Arc::new(reads);
        let hs: Vec<_> = (0..3).map(|t| {
            let (store, padded, reads) = (store.clone(), padded.clone(), reads.clone());
            std::thread::spawn(move || {
                for k in 0..reads.len() {
                    let (o, l) = reads[(k + t * 7) % reads.len()];
                    let len = l.min(dev);
                    let off = o % (dev - len + 1);
                    let mut buf = vec![0u8; len as usize];
                    store.read_at(off, &mut buf).unwrap();
                    assert!(buf == padded[off as usize..(off + len) as usize], "read {off}+{len}");
                }
            })
        }).collect();
        for h in hs { h.join().unwrap(); }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, .. ProptestConfig::default() })]
    #[test]
    fn reads_with_chunks_copied_from_another_cache_equal_the_original(
        chunk_shift in 12u32..=17,
        size in (64usize << 10)..(2 << 20),
        seed in any::<u64>(),
        shift in 0usize..4,
        first_reads in prop::collection::vec((any::<u64>(), 1u64..300_000), 0..20),
        reads in prop::collection::vec((any::<u64>(), 1u64..300_000), 1..30),
        corrupt_every in prop::option::of(1u64..5),
    ) {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let cs = 1usize << chunk_shift;
        // The second image: `shift` new chunks, then the first's bytes with a stretch changed.
        let a = lazyblk_tests::sample_image(size, seed);
        let mut b = lazyblk_tests::sample_image(shift * cs, seed ^ 1);
        let mut rest = a.clone();
        let mid = rest.len() / 2;
        let end = (mid + cs).min(rest.len());
        rest[mid..end].copy_from_slice(&lazyblk_tests::sample_image(end - mid, seed ^ 2));
        // Changed for sure: a sample stretch can equal the original (both all zero), and with
        // `shift` 0 the two images would then be one (found by proptest: the second open found
        // the cache in use, by the first).
        rest[mid] = a[mid] ^ 0x5a;
        b.extend_from_slice(&rest);
        let www = dir.path().join("www");
        for (name, img) in [("a", &a), ("b", &b)] {
            let raw = dir.path().join(name);
            std::fs::write(&raw, img).unwrap();
            build_image(&raw, &www.join(name), &BuildOptions {
                chunk_size: cs as u32, metadata_pack: PackBlocks::Off, ..Default::default()
            }, |_| {}).unwrap();
        }
        let srv = FaultServer::start(&www, "b/blob");
        let open = |name: &str| ChunkStore::open(&Location::parse(&srv.url(&format!("{name}/manifest"))), StoreOptions {
            cache_root: dir.path().join("cache"),
            readahead_bytes: (seed % 3) << chunk_shift,
            ..Default::default()
        }).unwrap();
        let read = |store: &ChunkStore, img: &[u8], o: u64, l: u64| {
            let dev = store.geometry().size;
            let len = l.min(dev);
            let off = o % (dev - len + 1);
            let mut buf = vec![0u8; len as usize];
            store.read_at(off, &mut buf).unwrap();
            let mut want = img[(off as usize).min(img.len())..((off + len) as usize).min(img.len())].to_vec();
            want.resize(len as usize, 0);
            buf == want
        };
        let sa = open("a");
        for &(o, l) in &first_reads {
            prop_assert!(read(&sa, &a, o, l), "first image, read {o}+{l}");
        }
        sa.flush().unwrap();
        // Bytes of the first cache changed behind its back (its bits still set).
        if let Some(k) = corrupt_every {
            let data = std::fs::OpenOptions::new().read(true).write(true).open(sa.data_path()).unwrap();
            for c in (0..sa.manifest().chunk_count()).filter(|c| c % k == 0 && sa.chunk_present(*c)) {
                let at = c * cs as u64;
                let mut byte = [0u8; 1];
                data.read_exact_at(&mut byte, at).unwrap();
                data.write_all_at(&[byte[0] ^ 0xa5], at).unwrap();
            }
        }
        let sb = open("b");
        let t0 = std::time::Instant::now();
        while sb.host_index_peers() != Some(1) {
            prop_assert!(t0.elapsed() < std::time::Duration::from_secs(30), "the host index");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for &(o, l) in &reads {
            prop_assert!(read(&sb, &b, o, l), "second image, read {o}+{l}");
        }
        prop_assert!(read(&sb, &b, 0, b.len() as u64), "second image, whole");
        prop_assert_eq!(sb.stats().verify_failures, 0);
    }
}
