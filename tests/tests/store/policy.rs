//! Fetch policies: readahead, prefetch lists, hydration, eviction, traces, sealing.

use super::*;

#[test]
fn local_path_remote_works_offline_after_hydration() {
    let f = fixture(1 << 20, 64 << 10, 17);
    let loc = Location::parse(f.serve.join("manifest").to_str().unwrap());
    let store = ChunkStore::open(&loc, opts(&f)).unwrap();
    assert_eq!(read_all(&store, f.image.len()), f.image);
    drop(store);
    // Remote gone, cache complete: still serves.
    let moved = f.root.join("moved");
    std::fs::rename(f.serve.join("blob"), &moved).unwrap();
    let mut o = opts(&f);
    o.expected_id = Some(f.id);
    let e = ChunkStore::open(&loc, o.clone())
        .err()
        .map(|e| e.to_string());
    // A local path that is gone is a permanent error: say so.
    assert!(e.unwrap().contains("blob"));
    std::fs::rename(&moved, f.serve.join("blob")).unwrap();
    let store = ChunkStore::open(&loc, o).unwrap();
    assert_eq!(read_all(&store, f.image.len()), f.image);
}

#[test]
fn cache_limit_evicts_cold_chunks_and_reads_stay_correct() {
    use std::os::unix::fs::MetadataExt;
    let f = fixture(4 << 20, 64 << 10, 20);
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let limit = 1 << 20;
    let mut o = opts(&f);
    o.cache_limit = Some(limit);
    o.evict_grace = Duration::from_millis(200);
    o.readahead_bytes = 0;
    let store = ChunkStore::open(&loc, o.clone()).unwrap();
    for _ in 0..2 {
        assert_eq!(read_all(&store, f.image.len()), f.image);
    }
    wait_for("eviction under the limit", || {
        store.stats().cached_bytes <= limit
    });
    let s = store.stats();
    assert!(s.evicted_chunks > 0, "{s:?}");
    // Space is given back after the grace period.
    let data = store.data_path().to_path_buf();
    wait_for("punched space", || {
        std::fs::metadata(&data).unwrap().blocks() * 512 <= limit + (256 << 10)
    });
    drop(store);
    // Whatever the bitmap still claims is correct.
    let store = ChunkStore::open(&loc, o).unwrap();
    let bytes = std::fs::read(store.data_path()).unwrap();
    for i in 0..store.manifest().chunk_count() {
        if store.chunk_present(i) {
            let a = (i * 65536) as usize;
            let b = (a + 65536).min(f.image.len());
            assert_eq!(&bytes[a..b], &f.image[a..b], "chunk {i}");
        }
    }
    assert_eq!(read_all(&store, f.image.len()), f.image);
}

#[test]
fn gc_removes_unused_caches_only() {
    let f = fixture(512 << 10, 64 << 10, 21);
    let g = fixture(512 << 10, 64 << 10, 22);
    let root = f.root.join("gc-cache");
    let open = |x: &Fixture| {
        let mut o = opts(x);
        o.cache_root = root.clone();
        ChunkStore::open(
            &Location::parse(x.serve.join("manifest").to_str().unwrap()),
            o,
        )
        .unwrap()
    };
    let a = open(&f);
    drop(open(&g));
    let dry = lazyblk_chunkstore::gc(&root, &[], true).unwrap();
    assert_eq!(dry.len(), 2);
    assert!(dry.iter().all(|e| !e.removed));
    let done = lazyblk_chunkstore::gc(&root, &[], false).unwrap();
    let in_use: Vec<_> = done.iter().filter(|e| e.in_use).collect();
    assert_eq!(in_use.len(), 1);
    assert!(in_use[0].dir.ends_with(f.id.hex()) && !in_use[0].removed);
    assert!(!root.join(g.id.hex()).exists());
    assert!(root.join(f.id.hex()).exists());
    drop(a);
}

#[test]
fn trace_prefetch_list_and_hydration() {
    use lazyblk_format::{PrefetchList, PREFETCH_FILE};
    let f = fixture(2 << 20, 64 << 10, 23);
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let mut o = opts(&f);
    o.readahead_bytes = 0;
    let stored: Vec<u64>;
    let trace = {
        let store = ChunkStore::open(&loc, o.clone()).unwrap();
        stored = (0..store.manifest().chunk_count())
            .filter(|&i| !store.chunk_present(i))
            .collect();
        assert!(stored.len() >= 6);
        let mut buf = vec![0u8; 100];
        for &c in [stored[4], stored[1], stored[5], stored[1]].iter() {
            store.read_at(c * 65536 + 10, &mut buf).unwrap();
        }
        store.access_trace()
    };
    let want: Vec<u32> = [stored[4], stored[1], stored[5]]
        .iter()
        .map(|&c| c as u32)
        .collect();
    assert_eq!(trace, want, "first-access order, no duplicates");
    // Publish the list next to the manifest; a fresh cache picks it up.
    let list = PrefetchList {
        image: f.id,
        chunks: trace.clone(),
    };
    std::fs::write(f.serve.join(PREFETCH_FILE), list.encode()).unwrap();
    let mut o2 = o.clone();
    o2.cache_root = f.root.join("cache2");
    let store = ChunkStore::open(&loc, o2).unwrap();
    assert_eq!(store.prefetch_list(), Some(&trace[..]));
    let order: Vec<u64> = trace.iter().map(|&c| u64::from(c)).collect();
    store.start_background(order.clone(), false, None);
    wait_for("prefetch", || store.stats().background_done);
    for &c in &order {
        assert!(store.chunk_present(c), "prefetched chunk {c}");
    }
    assert!(
        !store.chunk_present(stored[0]),
        "only the list is prefetched"
    );
    // Hydration: everything, then no network is needed.
    store.start_background(vec![], true, None);
    wait_for("hydration", || {
        let s = store.stats();
        s.present_chunks == s.total_chunks
    });
    srv.set_down(true);
    assert_eq!(read_all(&store, f.image.len()), f.image);
    // A list for another image is ignored with a warning, not trusted.
    let other = PrefetchList {
        image: ImageId([9; 32]),
        chunks: vec![0],
    };
    std::fs::write(f.serve.join(PREFETCH_FILE), other.encode()).unwrap();
    srv.set_down(false);
    let mut o3 = o;
    o3.cache_root = f.root.join("cache3");
    let s3 = ChunkStore::open(&loc, o3).unwrap();
    assert_eq!(s3.prefetch_list(), None);
}

#[test]
fn a_miss_completes_before_its_readahead_arrives() {
    let f = fixture(2 << 20, 64 << 10, 21);
    let srv = FaultServer::start(&f.serve, "blob");
    let store = open_with_readahead(&f, &srv, 6);
    let c = stored_run_start(&store, 0, 7);
    // The server sends the first half of the (7-chunk) range, then stalls for 5 s.
    srv.push(Fault::Stall(5000));
    let mut buf = vec![0u8; 4096];
    store.read_at(c * 65536, &mut buf).unwrap();
    assert_eq!(&buf[..], &f.image[c as usize * 65536..][..4096]);
    // The read returned while the response was still stalled: the readahead is not in yet.
    assert_eq!(srv.max_in_flight(), 1);
    assert!(
        !store.chunk_present(c + 6),
        "the read waited for the whole range"
    );
    let s = store.stats();
    assert_eq!(s.requests, 1, "{s:?}");
}

#[test]
fn a_corrupt_readahead_chunk_does_not_fail_the_read() {
    let f = fixture(2 << 20, 64 << 10, 22);
    let srv = FaultServer::start(&f.serve, "blob");
    let store = open_with_readahead(&f, &srv, 6);
    let c = stored_run_start(&store, 0, 7);
    // The flipped byte is in the middle of the 7-chunk range: a readahead chunk.
    srv.push(Fault::FlipByte);
    let mut buf = vec![0u8; 4096];
    store.read_at(c * 65536, &mut buf).unwrap();
    assert_eq!(&buf[..], &f.image[c as usize * 65536..][..4096]);
    store.flush().unwrap();
    // The corrupt chunk was fetched again (only the parts not yet stored) and is right now.
    let t0 = std::time::Instant::now();
    while !(c..c + 7).all(|i| store.chunk_present(i)) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "readahead never completed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut all = vec![0u8; 7 * 65536];
    store.read_at(c * 65536, &mut all).unwrap();
    assert_eq!(&all[..], &f.image[c as usize * 65536..][..7 * 65536]);
    let s = store.stats();
    assert_eq!(s.verify_failures, 1, "{s:?}");
    assert_eq!(s.failed_ios, 0, "{s:?}");
}

#[test]
fn sequential_reads_grow_the_readahead_window() {
    let f = fixture(8 << 20, 64 << 10, 24);
    let requests = |max: u64| {
        let srv = FaultServer::start(&f.serve, "blob");
        let o = StoreOptions {
            cache_root: f.root.join(format!("cache-{max}")),
            readahead_bytes: 2 * 65536,
            readahead_max_bytes: max * 65536,
            ..opts(&f)
        };
        let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), o).unwrap();
        let n = store.manifest().chunk_count();
        let mut buf = vec![0u8; 65536];
        for i in 0..n {
            store.read_at(i * 65536, &mut buf).unwrap();
            assert_eq!(&buf[..], &f.image[i as usize * 65536..][..65536]);
        }
        store.flush().unwrap();
        store.stats()
    };
    let fixed = requests(2);
    let grown = requests(16);
    // A fixed 2-chunk window is one request per 3 chunks or so; growing windows (2, 4, 8, 16,
    // 16, ...), each requested when the reader enters the previous one, need far fewer, and the
    // reader waits less often.
    assert!(
        grown.requests * 2 <= fixed.requests,
        "growing window: {grown:?}\nfixed window: {fixed:?}"
    );
    assert!(grown.misses < fixed.misses, "{grown:?}\n{fixed:?}");
}

#[test]
fn sparse_reads_do_not_grow_the_readahead_window() {
    let f = fixture(8 << 20, 64 << 10, 25);
    let run = |stride: u64| {
        let srv = FaultServer::start(&f.serve, "blob");
        let o = StoreOptions {
            cache_root: f.root.join(format!("cache-sparse-{stride}")),
            readahead_bytes: 2 * 65536,
            readahead_max_bytes: 32 * 65536,
            ..opts(&f)
        };
        let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), o).unwrap();
        let n = store.manifest().chunk_count();
        let mut buf = vec![0u8; 4096];
        let mut read = 0;
        for i in (0..n).step_by(stride as usize) {
            store.read_at(i * 65536, &mut buf).unwrap();
            assert_eq!(&buf[..], &f.image[i as usize * 65536..][..4096]);
            read += 1;
        }
        store.flush().unwrap();
        (read, store.stats())
    };
    // Reading one chunk in 3 passes each stream's window with a third of it read: the window
    // stays at its first size, so the store fetches about (1 + 2) chunks per read, not the
    // whole image as doubling windows would.
    let (read, s) = run(3);
    let n = 128;
    assert!(
        s.chunks_fetched <= 3 * read + 4 && s.chunks_fetched < n,
        "{read} reads: {s:?}"
    );
    // Sequential reads still grow it: a miss (or a wait for a chunk in flight) every few
    // windows, not one per chunk.
    let (read, s) = run(1);
    assert_eq!(read, n);
    assert!(s.misses * 4 <= n && s.requests * 4 <= n, "{s:?}");
}

#[test]
fn block_trace_records_every_block_read_and_feeds_a_rebuilt_pack() {
    let f = fixture(1 << 20, 64 << 10, 26);
    let srv = FaultServer::start(&f.serve, "blob");
    let mut o = opts(&f);
    o.readahead_bytes = 0;
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), o).unwrap();
    let mut buf = vec![0u8; 3 * 4096 + 10];
    store.read_at(5 * 4096 + 100, &mut buf).unwrap(); // blocks 5..=8, a miss
    store.read_at(6 * 4096, &mut buf[..4096]).unwrap(); // block 6 again, a hit
    store.read_at(200 * 4096, &mut buf[..1]).unwrap(); // block 200
    assert_eq!(store.block_trace(), vec![5, 6, 7, 8, 200]);
    let list = BlockList {
        image: store.id(),
        blocks: store.block_trace(),
    };
    drop(store);
    // Rebuilt with those blocks in its pack, the image serves the same reads from the pack.
    let list = BlockList::decode(&list.encode()).unwrap();
    let out = f.root.join("www-opt");
    build_image(
        &f.root.join("raw.img"),
        &out,
        &BuildOptions {
            chunk_size: 64 << 10,
            extra_pack_blocks: list.blocks.iter().map(|&b| u64::from(b)).collect(),
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
    let srv2 = FaultServer::start(&out, "blob");
    let store = ChunkStore::open(&Location::parse(&srv2.url("manifest")), opts(&f)).unwrap();
    store.start_default_background();
    wait_for("the pack", || store.stats().background_done);
    store.read_at(5 * 4096 + 100, &mut buf).unwrap();
    assert_eq!(&buf[..], &f.image[5 * 4096 + 100..][..buf.len()]);
    store.read_at(200 * 4096, &mut buf[..4096]).unwrap();
    assert_eq!(&buf[..4096], &f.image[200 * 4096..201 * 4096]);
    let s = store.stats();
    assert_eq!((s.misses, s.chunks_fetched, s.requests), (0, 0, 1), "{s:?}");
}

#[test]
fn a_sealed_cache_with_pack_frames_is_trusted_by_the_next_open() {
    let (f, _) = fixture_with_pack(46);
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let store = ChunkStore::open(&loc, opts(&f)).unwrap();
    store.start_default_background();
    wait_for("the pack", || store.stats().background_done);
    // A miss with its readahead (the default 512 KiB: 8 more chunks) still under way: seal
    // lets it land before it marks the bitmap clean.
    let mut buf = vec![0u8; 65536];
    store.read_at(3 * 65536, &mut buf).unwrap();
    assert_eq!(store.seal(Duration::from_secs(10)).unwrap(), 0);
    let fetched = store.stats().chunks_fetched;
    assert_eq!(fetched, 9, "{:?}", store.stats());
    // Sealed: present data reads, a miss fails and nothing more is fetched.
    store.read_at(3 * 65536, &mut buf).unwrap();
    let err = store.read_at(20 * 65536, &mut buf).unwrap_err();
    assert!(err.to_string().contains("shutting down"), "{err}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(store.stats().chunks_fetched, fetched);
    // Read while the store is still open, as the next daemon does after a detach (which
    // hands over with `_exit`, never closing): clean, chunks and frames alike.
    let dir = store.cache_dir().to_path_buf();
    let bits = std::fs::read(dir.join("bitmap")).unwrap();
    let units = store.manifest().unit_count();
    let d = lazyblk_chunkstore::bitmap::decode(&bits, &f.id, units).unwrap();
    assert_eq!(d.trust, lazyblk_chunkstore::bitmap::Trust::Clean);
    for u in 0..units {
        assert_eq!(d.bits[u as usize], store.chunk_present(u), "unit {u}");
    }
    assert!(d.bits[3] && d.bits[11] && !d.bits[12] && d.bits[units as usize - 1]);
}

#[test]
fn sealing_stops_hydration_and_eviction_and_the_next_open_trusts_the_cache() {
    let f = fixture(4 << 20, 64 << 10, 47);
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let mut o = opts(&f);
    // Hydration at 256 KiB/s (of ~22 KiB stored chunks: ~3 s for all 64) and a limit the
    // hydrated chunks soon exceed: the maintenance thread evicts while the store fetches,
    // until the seal.
    o.cache_limit = Some(512 << 10);
    o.evict_grace = Duration::ZERO;
    o.max_request_bytes = 64 << 10; // a chunk a request, so the rate paces every chunk
    let store = ChunkStore::open(&loc, o.clone()).unwrap();
    store.start_background(Vec::new(), true, Some(256 << 10));
    wait_for("an eviction", || store.stats().evicted_chunks > 0);
    store.seal(Duration::from_secs(10)).unwrap();
    let s = store.stats();
    std::thread::sleep(Duration::from_millis(500));
    let t = store.stats();
    assert_eq!(
        (t.chunks_fetched, t.evicted_chunks),
        (s.chunks_fetched, s.evicted_chunks),
        "nothing fetched or evicted after the seal"
    );
    let dir = store.cache_dir().to_path_buf();
    let bits = std::fs::read(dir.join("bitmap")).unwrap();
    let units = store.manifest().unit_count();
    let d = lazyblk_chunkstore::bitmap::decode(&bits, &f.id, units).unwrap();
    assert_eq!(d.trust, lazyblk_chunkstore::bitmap::Trust::Clean);
    let present: Vec<bool> = (0..units).map(|u| store.chunk_present(u)).collect();
    assert_eq!(d.bits.iter().by_vals().collect::<Vec<_>>(), present);
    // The next daemon trusts it and reads the image. (The old one hands over with `_exit`,
    // never dropping the store; here a copy of the cache as it is now stands in, since this
    // process keeps the original's lock.)
    let root2 = f.root.join("cache2");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&o.cache_root)
        .arg(&root2)
        .status()
        .unwrap();
    assert!(st.success());
    let mut o2 = opts(&f);
    o2.cache_root = root2;
    let next = ChunkStore::open(&loc, o2).unwrap();
    assert_eq!(next.open_report().reverified, 0, "{:?}", next.open_report());
    assert_eq!(read_all(&next, f.image.len()), f.image[..]);
}
