//! Property test: random reads through the lazy path equal the original image, across chunk
//! sizes, with concurrent readers, with and without a metadata pack (fetched ahead or on
//! demand) of scattered blocks.

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
