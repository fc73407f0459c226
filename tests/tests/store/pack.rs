//! Metadata packs and prefetch packs.

use super::*;

#[test]
fn metadata_pack_is_fetched_first_and_serves_metadata_reads_without_chunks() {
    let (f, blocks) = fixture_with_pack(40);
    let srv = FaultServer::start(&f.serve, "blob");
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), opts(&f)).unwrap();
    let zero_chunks = (0..store.manifest().chunk_count())
        .filter(|&c| store.manifest().chunk(c) == ChunkRef::Zero)
        .count() as u64;
    store.start_default_background();
    wait_for("the pack", || store.stats().background_done);
    let s = store.stats();
    assert_eq!((s.pack_frames, s.pack_frames_present), (2, 2), "{s:?}");
    assert_eq!(s.chunks_fetched, 0, "only the pack was fetched: {s:?}");
    assert_eq!(
        s.requests, 1,
        "two adjacent frames, one range request: {s:?}"
    );
    assert_eq!(s.present_chunks, zero_chunks);
    // Every pack block, and every run of adjacent pack blocks, is served locally.
    for &b in &blocks {
        assert!(store.locate(b * 4096, 4096).is_some(), "block {b}");
        assert_eq!(read_block(&store, b), image_block(&f, b), "block {b}");
    }
    let s = store.stats();
    assert_eq!((s.misses, s.requests, s.chunks_fetched), (0, 1, 0), "{s:?}");
    assert!(store.access_trace().is_empty(), "pack reads are not traced");
    // A read that also covers a block outside the pack needs the chunk.
    assert!(store.locate(7 * 4096, 8192).is_none());
    let mut buf = vec![0u8; 8192];
    store.read_at(7 * 4096, &mut buf).unwrap();
    assert_eq!(&buf[..], &f.image[7 * 4096..9 * 4096]);
    assert_eq!(store.stats().misses, 1);
    assert!(store.chunk_present(0));
    assert_eq!(read_all(&store, f.image.len()), f.image);
}

#[test]
fn pack_frames_are_fetched_on_demand_without_prefetch() {
    let (f, _) = fixture_with_pack(41);
    let srv = FaultServer::start(&f.serve, "blob");
    let mut o = opts(&f);
    o.prefetch_pack = false;
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), o).unwrap();
    store.start_default_background();
    assert_eq!(store.stats().requests, 0);
    // Block 7 * 20 = 140 is at position 20: frame 0. A metadata read fetches its frame, not
    // its chunk, and starts no readahead.
    assert_eq!(read_block(&store, 140), image_block(&f, 140));
    let s = store.stats();
    assert_eq!((s.misses, s.requests, s.chunks_fetched), (1, 1, 0), "{s:?}");
    assert_eq!(s.pack_frames_present, 1);
    assert!(!store.chunk_present(140 * 4096 / 65536));
    // Another block of frame 0 is present now; one of frame 1 (position 64: block 448) is not.
    assert_eq!(read_block(&store, 7), image_block(&f, 7));
    assert_eq!(store.stats().requests, 1);
    assert!(store.locate(448 * 4096, 4096).is_none());
    assert_eq!(read_block(&store, 448), image_block(&f, 448));
    assert_eq!(store.stats().pack_frames_present, 2);
}

#[test]
fn a_corrupt_pack_frame_is_refetched_then_fails_clearly_and_marks_nothing() {
    let (f, _) = fixture_with_pack(42);
    let srv = FaultServer::start(&f.serve, "blob");
    let mut o = opts(&f);
    o.prefetch_pack = false;
    o.corrupt_attempts = 2;
    o.readahead_bytes = 0;
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), o).unwrap();
    srv.push(Fault::FlipByte);
    assert_eq!(read_block(&store, 14), image_block(&f, 14));
    assert_eq!(store.stats().verify_failures, 1);
    srv.set_always(Some(Fault::FlipByte));
    let mut buf = vec![0u8; 4096];
    // The frame fails, then the read falls back to its chunk, which the server corrupts too.
    let e = store.read_at(448 * 4096, &mut buf).unwrap_err().to_string();
    assert!(e.contains("chunk 28 failed verification"), "{e}");
    assert_eq!(
        store.stats().verify_failures,
        1 + 2 + 2,
        "frame and chunk, twice each"
    );
    assert_eq!(store.stats().pack_frames_present, 1);
    assert!(!store.chunk_present(28));
    srv.set_always(None);
    assert_eq!(read_block(&store, 448), image_block(&f, 448));
}

#[test]
fn pack_frames_persist_and_are_reverified_after_a_crash() {
    let (f, blocks) = fixture_with_pack(43);
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let cache_dir = {
        let store = ChunkStore::open(&loc, opts(&f)).unwrap();
        store.start_default_background();
        wait_for("the pack", || store.stats().background_done);
        store.cache_dir().to_path_buf()
    };
    let before = srv.target_requests();
    {
        let store = ChunkStore::open(&loc, opts(&f)).unwrap();
        assert_eq!(
            store.open_report().reverified,
            0,
            "clean close must be trusted"
        );
        assert_eq!(store.stats().pack_frames_present, 2);
        for &b in &blocks {
            assert_eq!(read_block(&store, b), image_block(&f, b));
        }
        store.start_default_background();
        wait_for("background", || store.stats().background_done);
        assert_eq!(
            store.stats().requests,
            0,
            "nothing refetched after a clean restart"
        );
    }
    assert!(srv.target_requests() <= before + 1, "the open's probe only");
    // Damage a block of frame 1 and make the bitmap dirty (as after a crash).
    let data_path = cache_dir.join("data");
    let mut data = std::fs::read(&data_path).unwrap();
    data[448 * 4096 + 5] ^= 0x55;
    std::fs::write(&data_path, &data).unwrap();
    let mut bm = std::fs::read(cache_dir.join("bitmap")).unwrap();
    bm[12] = 0;
    std::fs::write(cache_dir.join("bitmap"), &bm).unwrap();
    let mut o = opts(&f);
    o.prefetch_pack = false;
    let store = ChunkStore::open(&loc, o).unwrap();
    let r = store.open_report();
    assert_eq!((r.reverified, r.dropped), (2, 1), "{r:?}");
    assert_eq!(store.stats().pack_frames_present, 1);
    assert_eq!(read_block(&store, 448), image_block(&f, 448));
    assert_eq!(read_all(&store, f.image.len()), f.image);
}

#[test]
fn eviction_never_punches_pack_blocks() {
    use std::os::unix::fs::MetadataExt;
    let (f, blocks) = fixture_with_pack(44);
    let srv = FaultServer::start(&f.serve, "blob");
    let mut o = opts(&f);
    let limit = 512 << 10;
    o.cache_limit = Some(limit);
    o.evict_grace = Duration::from_millis(100);
    o.readahead_bytes = 0;
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), o).unwrap();
    store.start_default_background();
    wait_for("the pack", || store.stats().background_done);
    assert_eq!(read_all(&store, f.image.len()), f.image);
    wait_for("eviction", || store.stats().cached_bytes <= limit);
    let data = store.data_path().to_path_buf();
    wait_for("punched space", || {
        std::fs::metadata(&data).unwrap().blocks() * 512 <= limit + (74 + 64) * 4096
    });
    let misses = store.stats().misses;
    for &b in &blocks {
        assert_eq!(read_block(&store, b), image_block(&f, b), "block {b}");
    }
    assert_eq!(store.stats().misses, misses, "pack blocks stay present");
    assert_eq!(read_all(&store, f.image.len()), f.image);
}

#[test]
fn pack_frames_held_by_present_chunks_are_not_fetched() {
    let (f, blocks) = fixture_with_pack(45);
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let mut o = opts(&f);
    o.prefetch_pack = false;
    {
        let store = ChunkStore::open(&loc, o).unwrap();
        // Reads that span non-pack blocks fetch chunks only.
        assert_eq!(read_all(&store, f.image.len()), f.image);
        assert_eq!(store.stats().pack_frames_present, 0);
    }
    let store = ChunkStore::open(&loc, opts(&f)).unwrap();
    store.start_default_background();
    wait_for("background", || store.stats().background_done);
    let s = store.stats();
    assert_eq!((s.pack_frames_present, s.requests), (2, 0), "{s:?}");
    drop(store);
    // Recorded like fetched frames: present after a restart.
    let mut o = opts(&f);
    o.prefetch_pack = false;
    let store = ChunkStore::open(&loc, o).unwrap();
    assert_eq!(store.stats().pack_frames_present, 2);
    for &b in &blocks {
        assert_eq!(read_block(&store, b), image_block(&f, b));
    }
}

/// Publish next to `f`'s manifest a prefetch pack of `blocks` (without the image's metadata
/// pack blocks: it extends that pack), read from the raw image; its digest.
fn publish_pack(f: &Fixture, blocks: &[u64]) -> ImageId {
    use std::os::unix::fs::FileExt;
    let m = Manifest::decode(&std::fs::read(f.serve.join("manifest")).unwrap()).unwrap();
    let raw = std::fs::File::open(f.root.join("raw.img")).unwrap();
    let mut read = |at: u64, buf: &mut [u8]| raw.read_exact_at(buf, at);
    let s = build_prefetch_pack(f.id, &m, blocks, &mut read, &f.serve.join(PACK_FILE), 3).unwrap();
    assert!(s.blob_path.ends_with("prefetch.pack.blob"));
    s.id
}

#[test]
fn a_prefetch_pack_leaves_out_the_metadata_pack_blocks() {
    use std::os::unix::fs::FileExt;
    let (f, meta) = fixture_with_pack(54);
    let m = Manifest::decode(&std::fs::read(f.serve.join("manifest")).unwrap()).unwrap();
    let raw = std::fs::File::open(f.root.join("raw.img")).unwrap();
    let mut read = |at: u64, buf: &mut [u8]| raw.read_exact_at(buf, at);
    let out = f.root.join("pack").join(PACK_FILE);
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    // Metadata blocks 0 and 7 read with blocks 3 and 300: the pack holds 3 and 300.
    let s = build_prefetch_pack(f.id, &m, &[300, 0, 3, 7, 3], &mut read, &out, 3).unwrap();
    assert!(s.pack.extends);
    assert_eq!(s.pack.pack.blocks, vec![3, 300]);
    let p =
        lazyblk_format::PrefetchPack::decode(&std::fs::read(&out).unwrap(), &f.id, m.image_size)
            .unwrap();
    assert_eq!(p, s.pack);
    // Nothing but metadata read: no pack, one line saying why.
    let e = build_prefetch_pack(f.id, &m, &meta[..3], &mut read, &out, 3)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "no blocks for a prefetch pack: every block read is in the image's metadata pack already"
    );
}

#[test]
fn a_prefetch_pack_serves_the_traced_reads_without_chunks() {
    let (f, meta) = fixture_with_pack(50);
    // Blocks outside the metadata pack (every 7th block), spread over 4 chunks.
    let traced: Vec<u64> = vec![3, 4, 5, 100, 101, 300, 500];
    let pid = publish_pack(&f, &traced);
    // A chunk list published too is not fetched ahead: the pack has the blocks.
    let list = lazyblk_format::PrefetchList {
        image: f.id,
        chunks: vec![0, 1, 4],
    };
    std::fs::write(f.serve.join("prefetch"), list.encode()).unwrap();
    let srv = FaultServer::start(&f.serve, "blob");
    // One pack request at a time: the order of the frames on the wire is the order asked.
    let mut o = opts(&f);
    o.pack_requests = 1;
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), o).unwrap();
    assert_eq!(store.open_report().prefetch_pack, Some(pid.to_string()));
    assert_eq!(store.prefetch_list(), Some(&[0u32, 1, 4][..]));
    let probed = srv.log().len();
    store.start_default_background();
    wait_for("the pack", || store.stats().background_done);
    let s = store.stats();
    // The pack extends the metadata pack: its 74 blocks in 2 frames of 64 from the image's
    // blob, then the 7 traced blocks in 1 frame from the pack's blob. No chunk.
    assert_eq!((s.pack_frames, s.pack_frames_present), (3, 3), "{s:?}");
    assert_eq!(s.chunks_fetched, 0, "{s:?}");
    let sent = srv.log()[probed..].to_vec();
    let first_pack = sent.iter().position(|r| r.path == "/prefetch.pack.blob");
    let from_image = sent.iter().filter(|r| r.path == "/blob").count();
    assert!(
        from_image > 0 && first_pack == Some(from_image),
        "the metadata frames come first, then the pack's: {sent:?}"
    );
    for &b in traced.iter().chain(&meta) {
        assert!(store.locate(b * 4096, 4096).is_some(), "block {b}");
        assert_eq!(read_block(&store, b), image_block(&f, b), "block {b}");
    }
    // Adjacent traced blocks in one read.
    let mut buf = vec![0u8; 3 * 4096];
    store.read_at(3 * 4096, &mut buf).unwrap();
    assert_eq!(&buf[..], &f.image[3 * 4096..6 * 4096]);
    let s = store.stats();
    assert_eq!((s.misses, s.chunks_fetched), (0, 0), "{s:?}");
    // The rest still comes from the chunks.
    let before = srv.target_requests();
    assert_eq!(read_all(&store, f.image.len()), f.image);
    assert!(srv.target_requests() > before);
}

#[test]
fn a_prefetch_pack_is_trusted_only_as_far_as_the_manifest() {
    let f = fixture(1 << 20, 64 << 10, 51);
    let pid = publish_pack(&f, &[1, 2, 3]);
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let mut o = opts(&f);
    o.expected_id = Some(f.id);
    {
        // A pinned manifest with an unpinned pack: the pack is not used.
        let store = ChunkStore::open(&loc, o.clone()).unwrap();
        assert_eq!(store.open_report().prefetch_pack, None);
        assert_eq!(store.manifest().frame_count(), 0);
    }
    o.expected_pack = Some(pid);
    {
        let store = ChunkStore::open(&loc, o.clone()).unwrap();
        assert_eq!(store.open_report().prefetch_pack, Some(pid.to_string()));
        assert_eq!(read_block(&store, 2), image_block(&f, 2));
        assert_eq!(store.stats().chunks_fetched, 0);
    }
    // A pin that neither the published pack nor the cached copy has: one clear error.
    o.expected_pack = Some(ImageId([7; 32]));
    let e = ChunkStore::open(&loc, o.clone()).err().unwrap().to_string();
    assert!(
        e.contains("prefetch pack") && e.contains("--pack-digest asks for sha256:0707"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    // A malformed pack next to an unpinned manifest is ignored (a fresh cache: no copy).
    std::fs::write(f.serve.join(PACK_FILE), b"LZBLKPP1 garbage").unwrap();
    let mut o = opts(&f);
    o.cache_root = f.root.join("cache2");
    let store = ChunkStore::open(&loc, o).unwrap();
    assert_eq!(store.open_report().prefetch_pack, None);
    assert_eq!(read_all(&store, f.image.len()), f.image);
}

#[test]
fn a_pinned_pack_costs_no_round_trip_of_its_own_at_open() {
    let (f, _) = fixture_with_pack(53);
    let pid = publish_pack(&f, &[3, 4, 100]);
    let mut o = opts(&f);
    o.expected_id = Some(f.id);
    o.expected_pack = Some(pid);
    let loc = |srv: &FaultServer| Location::parse(&srv.url("manifest"));
    let first = |srv: &FaultServer, path: &str| {
        let log = srv.log();
        let r = log.iter().find(|r| r.path == path).cloned();
        r.unwrap_or_else(|| panic!("no request for {path}: {log:?}"))
    };
    // Cold, with every manifest request answered after 1 s: the pinned pack goes out
    // together with the manifest (it arrives before the manifest's answer is sent).
    {
        let srv = FaultServer::start(&f.serve, "manifest");
        srv.set_always(Some(Fault::Delay(1000)));
        let store = ChunkStore::open(&loc(&srv), o.clone()).unwrap();
        assert_eq!(store.open_report().prefetch_pack, Some(pid.to_string()));
        assert_eq!(
            first(&srv, "/prefetch.pack").target_answered,
            0,
            "{:?}",
            srv.log()
        );
    }
    // Warm (manifest and pack cached), with every request for the image's blob answered after
    // 1 s: the pack's blob is probed together with the image's, and neither the manifest nor
    // the pack is fetched again.
    let srv = FaultServer::start(&f.serve, "blob");
    srv.set_always(Some(Fault::Delay(1000)));
    let store = ChunkStore::open(&loc(&srv), o).unwrap();
    assert_eq!(store.open_report().prefetch_pack, Some(pid.to_string()));
    let probe = first(&srv, "/prefetch.pack.blob");
    assert_eq!(probe.range.as_deref(), Some("bytes=0-0"));
    assert_eq!(probe.target_answered, 0, "{:?}", srv.log());
    let log = srv.log();
    assert!(
        log.iter()
            .all(|r| r.path != "/manifest" && r.path != "/prefetch.pack"),
        "{log:?}"
    );
}

#[test]
fn another_prefetch_pack_keeps_the_cache_and_carries_its_frames() {
    // 1 MiB: 16 chunks of 16 blocks.
    let f = fixture(1 << 20, 64 << 10, 52);
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let mut o = opts(&f);
    o.readahead_bytes = 0;
    {
        let store = ChunkStore::open(&loc, o.clone()).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        store.read_at(0, &mut buf).unwrap(); // chunk 0
        assert!(store.chunk_present(0) && !store.chunk_present(12));
    }
    // A first pack: blocks 1 and 2 lie in the present chunk 0, block 200 in chunk 12.
    publish_pack(&f, &[1, 2, 200]);
    {
        let store = ChunkStore::open(&loc, o.clone()).unwrap();
        let r = store.open_report();
        assert!(r.discarded.is_none() && r.prefetch_pack.is_some(), "{r:?}");
        assert!(store.chunk_present(0), "chunk bits carried over");
        assert_eq!(store.stats().pack_frames_present, 0);
        let before = srv.target_requests();
        assert_eq!(read_block(&store, 200), image_block(&f, 200));
        assert_eq!(srv.target_requests(), before, "served by the pack's frame");
        assert!(!store.chunk_present(12));
        assert_eq!(store.stats().pack_frames_present, 1);
    }
    // Another pack: block 5 is in chunk 0, block 200 in the old pack's present frame.
    let pid = publish_pack(&f, &[5, 200]);
    let cache_dir = {
        let store = ChunkStore::open(&loc, o.clone()).unwrap();
        let r = store.open_report();
        assert_eq!(r.prefetch_pack, Some(pid.to_string()));
        assert!(r.discarded.is_none(), "{r:?}");
        assert_eq!(
            store.stats().pack_frames_present,
            1,
            "the new frame is present"
        );
        let before = store.stats().requests;
        assert_eq!(read_block(&store, 200), image_block(&f, 200));
        assert_eq!(read_block(&store, 5), image_block(&f, 5));
        assert_eq!(store.stats().requests, before);
        store.cache_dir().to_path_buf()
    };
    // After a crash (dirty bitmap), the frames are re-verified in the pack's layout.
    let mut bm = std::fs::read(cache_dir.join("bitmap")).unwrap();
    bm[12] = 0;
    std::fs::write(cache_dir.join("bitmap"), &bm).unwrap();
    let store = ChunkStore::open(&loc, o).unwrap();
    let r = store.open_report();
    assert_eq!(
        (r.reverified, r.dropped),
        (2, 0),
        "chunk 0 and the frame: {r:?}"
    );
    assert_eq!(store.stats().pack_frames_present, 1);
    assert_eq!(read_all(&store, f.image.len()), f.image);
}

#[test]
fn a_prefetch_pack_whose_blob_went_bad_falls_back_to_the_chunks() {
    let f = fixture(1 << 20, 64 << 10, 53);
    let pid = publish_pack(&f, &[20, 21, 200]);
    // Faults go to the pack's blob: every frame arrives corrupt.
    let srv = FaultServer::start(&f.serve, "prefetch.pack.blob");
    let mut o = opts(&f);
    o.expected_pack = Some(pid);
    o.corrupt_attempts = 2;
    o.readahead_bytes = 0;
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), o).unwrap();
    assert_eq!(store.open_report().prefetch_pack, Some(pid.to_string()));
    srv.set_always(Some(Fault::FlipByte));
    assert_eq!(read_block(&store, 200), image_block(&f, 200));
    let s = store.stats();
    assert_eq!((s.pack_frames_present, s.verify_failures), (0, 2), "{s:?}");
    assert!(
        store.chunk_present(200 * 4096 / 65536),
        "served by its chunk"
    );
    srv.set_always(None);
    assert_eq!(read_block(&store, 20), image_block(&f, 20));
    assert_eq!(store.stats().pack_frames_present, 1);
    assert_eq!(read_all(&store, f.image.len()), f.image);
}
