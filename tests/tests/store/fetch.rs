//! The fetch path: lazy reads, faults and retries, single flight, parallel misses, disk full.

use super::*;

#[test]
fn nginx_lazy_reads_equal_the_image_and_fetch_only_what_is_read() {
    let f = fixture(6 << 20, 64 << 10, 1);
    let ng = Nginx::start(&f.serve, &f.root.join("nginx"));
    let loc = Location::parse(&ng.url("manifest"));
    let store = ChunkStore::open(&loc, opts(&f)).unwrap();
    assert_eq!(store.id(), f.id);
    let (_, before) = ng.served();
    // A small read fetches a small part of the blob.
    let mut buf = vec![0u8; 4096];
    store.read_at(3 << 20, &mut buf).unwrap();
    assert_eq!(&buf[..], &f.image[3 << 20..(3 << 20) + 4096]);
    let (_, after_small) = ng.served();
    let blob = std::fs::metadata(f.serve.join("blob")).unwrap().len();
    assert!(
        after_small - before < blob / 4,
        "a 4 KiB read fetched {} of {blob} blob bytes",
        after_small - before
    );
    // Everything, concurrently, through the shared conformance suite.
    lazyblk_blocksource::testing::check_reads(
        Arc::new(store) as Arc<dyn BlockSource>,
        padded(&f.image),
        7,
        64,
    );
}

#[test]
fn transient_faults_are_retried_and_never_cached_bad() {
    for fault in [
        Fault::Status(500),
        Fault::Status(503),
        Fault::Reset,
        Fault::Truncate,
        Fault::FlipByte,
        Fault::WrongRange,
        Fault::TooLong,
        Fault::Huge,
        Fault::Hang,
    ] {
        let f = fixture(1 << 20, 64 << 10, 3);
        let srv = FaultServer::start(&f.serve, "blob");
        let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), opts(&f)).unwrap();
        srv.push(fault.clone());
        srv.push(fault.clone());
        let all = read_all(&store, f.image.len());
        assert_eq!(all, f.image, "{fault:?}");
        let s = store.stats();
        assert!(s.retries >= 2, "{fault:?}: {s:?}");
        if fault == Fault::FlipByte {
            assert!(s.verify_failures >= 2, "{s:?}");
        }
        drop(store);
        // Every chunk the bitmap claims is byte-identical to the source.
        let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), opts(&f)).unwrap();
        let data = std::fs::read(store.data_path()).unwrap();
        for i in 0..store.manifest().chunk_count() {
            if store.chunk_present(i) {
                let a = (i * 65536) as usize;
                let b = (a + 65536).min(f.image.len());
                assert_eq!(&data[a..b], &f.image[a..b], "{fault:?}: chunk {i}");
            }
        }
    }
}

/// The metrics' counters: bytes per origin (the server's `scheme://host:port`, nothing of the
/// path) add up to the bytes fetched, and the latency histogram counts every request, retries
/// included.
#[test]
fn bytes_per_origin_and_the_latency_histogram_count_every_request() {
    let f = fixture(1 << 20, 64 << 10, 3);
    let srv = FaultServer::start(&f.serve, "blob");
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), opts(&f)).unwrap();
    srv.push(Fault::Status(503));
    assert_eq!(read_all(&store, f.image.len()), f.image);
    // A request's chunks complete as their bytes arrive, before its latency is recorded: the
    // last one may still be finishing when the read returns.
    wait_for("the last request's latency", || {
        let s = store.stats();
        s.fetch_latency.count == s.requests
    });
    let s = store.stats();
    assert!(s.retries >= 1 && s.bytes_fetched > 0, "{s:?}");
    let origin = srv.url("").trim_end_matches('/').to_string();
    assert_eq!(
        s.fetched_by_origin,
        [lazyblk_chunkstore::OriginBytes {
            origin,
            mirror: false,
            bytes: s.bytes_fetched,
        }]
    );
    let h = &s.fetch_latency;
    assert_eq!(h.count, s.requests, "{h:?}");
    assert_eq!(h.counts.iter().sum::<u64>(), h.count);
    assert_eq!(h.counts.len(), h.bounds_us.len() + 1);
    assert!(h.sum_us > 0);
    // The time split of `status`: the requests' time is the histogram's sum; the chunks were
    // verified and written, and made durable.
    store.flush().unwrap();
    let s = store.stats();
    assert_eq!(s.network_us_total, s.fetch_latency.sum_us, "{s:?}");
    assert!(s.verify_us_total > 0 && s.persist_us_total > 0, "{s:?}");
    assert_eq!(s.miss_wait_us_total, 0, "the frontend's to fill in");
}

#[test]
fn persistent_corruption_fails_clearly_and_marks_nothing() {
    let f = fixture(1 << 20, 64 << 10, 4);
    let srv = FaultServer::start(&f.serve, "blob");
    // No readahead: the flipped byte must land in the chunk that is read.
    let store = open_with_readahead(&f, &srv, 0);
    for _ in 0..3 {
        srv.push(Fault::FlipByte);
    }
    let mut buf = vec![0u8; 4096];
    // Find a stored chunk.
    let stored = (0..store.manifest().chunk_count())
        .find(|&i| !store.chunk_present(i))
        .unwrap();
    let err = store.read_at(stored * 65536, &mut buf).unwrap_err();
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    assert_eq!(err.errno(), libc::EIO);
    assert!(!store.chunk_present(stored));
    // The server heals: the same read works.
    store.read_at(stored * 65536, &mut buf).unwrap();
    assert_eq!(&buf[..], &f.image[stored as usize * 65536..][..4096]);
}

#[test]
fn range_ignored_after_open_fails_the_read_without_retry_storm() {
    let f = fixture(512 << 10, 64 << 10, 6);
    let srv = FaultServer::start(&f.serve, "blob");
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), opts(&f)).unwrap();
    srv.push(Fault::IgnoreRange);
    let stored = (0..store.manifest().chunk_count())
        .find(|&i| !store.chunk_present(i))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let err = store.read_at(stored * 65536, &mut buf).unwrap_err();
    assert!(
        err.to_string().contains("ignored the Range header"),
        "{err}"
    );
    assert!(!store.chunk_present(stored));
}

#[test]
fn outage_blocks_then_completes_and_deadline_gives_eio() {
    let f = fixture(512 << 10, 64 << 10, 9);
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let store = Arc::new(ChunkStore::open(&loc, opts(&f)).unwrap());
    srv.set_down(true);
    let s2 = store.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 512 << 10];
        s2.read_at(0, &mut buf).map(|_| buf)
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !reader.is_finished(),
        "the read must wait during the outage"
    );
    srv.set_down(false);
    let buf = reader.join().unwrap().unwrap();
    assert_eq!(buf, f.image[..512 << 10]);
    drop(store);

    // A short deadline turns a long outage into EIO.
    let g = fixture(512 << 10, 64 << 10, 10);
    let srv = FaultServer::start(&g.serve, "blob");
    let mut o = opts(&g);
    o.io_deadline = Some(Duration::from_secs(1));
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), o).unwrap();
    srv.set_down(true);
    let stored = (0..store.manifest().chunk_count())
        .find(|&i| !store.chunk_present(i))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let err = store.read_at(stored * 65536, &mut buf).unwrap_err();
    assert!(matches!(err, BlockError::TimedOut(_)), "{err}");
    assert_eq!(err.errno(), libc::EIO);
}

fn mount_tmpfs(dir: &Path, size: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .expect("run mount");
    assert!(
        st.success(),
        "mounting a tmpfs for the disk-full test failed (run as root)"
    );
}

#[test]
fn disk_full_fails_reads_clearly_and_marks_nothing() {
    let f = fixture(4 << 20, 64 << 10, 12);
    let srv = FaultServer::start(&f.serve, "blob");
    let cache = f.root.join("smallcache");
    mount_tmpfs(&cache, "256k");
    let mut o = opts(&f);
    o.cache_root = cache.clone();
    let res = std::panic::catch_unwind(|| {
        let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), o.clone()).unwrap();
        let mut buf = vec![0u8; 4 << 20];
        let err = store.read_at(0, &mut buf).unwrap_err();
        assert!(
            err.to_string()
                .contains("disk full while writing the cache file"),
            "{err}"
        );
        let present: Vec<u64> = (0..store.manifest().chunk_count())
            .filter(|&i| store.chunk_present(i))
            .collect();
        let data = std::fs::read(store.data_path()).unwrap();
        for i in present {
            let a = (i * 65536) as usize;
            let b = (a + 65536).min(f.image.len());
            assert_eq!(&data[a..b], &f.image[a..b], "chunk {i}");
        }
    });
    let _ = std::process::Command::new("umount").arg(&cache).status();
    res.unwrap();
}

#[test]
fn same_chunk_misses_fetch_once() {
    let f = fixture(1 << 20, 1 << 20, 15);
    let srv = FaultServer::start(&f.serve, "blob");
    let store =
        Arc::new(ChunkStore::open(&Location::parse(&srv.url("manifest")), opts(&f)).unwrap());
    let before = srv.target_requests();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let s = store.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                s.read_at(t * 8192, &mut buf).unwrap();
                buf
            })
        })
        .collect();
    for (t, h) in threads.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), f.image[t * 8192..t * 8192 + 4096]);
    }
    assert_eq!(srv.target_requests() - before, 1, "one chunk, one request");
}

#[test]
fn misses_on_different_chunks_run_in_parallel() {
    let f = fixture(4 << 20, 64 << 10, 24);
    let srv = FaultServer::start(&f.serve, "blob");
    let mut o = opts(&f);
    o.readahead_bytes = 0;
    let store = Arc::new(ChunkStore::open(&Location::parse(&srv.url("manifest")), o).unwrap());
    let stored: Vec<u64> = (0..store.manifest().chunk_count())
        .filter(|&i| !store.chunk_present(i))
        .step_by(3)
        .take(8)
        .collect();
    assert_eq!(stored.len(), 8);
    srv.set_always(Some(Fault::Delay(300)));
    let hs: Vec<_> = stored
        .iter()
        .map(|&c| {
            let s = store.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                s.read_at(c * 65536, &mut buf).unwrap();
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    assert!(
        srv.max_in_flight() >= 4,
        "8 misses on different chunks reached the server {} at a time",
        srv.max_in_flight()
    );
}

#[test]
fn a_truncated_range_is_resumed_not_refetched() {
    let f = fixture(2 << 20, 64 << 10, 23);
    let srv = FaultServer::start(&f.serve, "blob");
    // No readahead: the read below is the whole (7-chunk) range.
    let store = open_with_readahead(&f, &srv, 0);
    let c = stored_run_start(&store, 0, 7);
    let m = store.manifest();
    let range: u64 = (c..c + 7)
        .map(|i| match m.chunk(i) {
            ChunkRef::Stored(e) => u64::from(e.stored_len),
            ChunkRef::Zero => 0,
        })
        .sum();
    srv.push(Fault::Truncate);
    let mut all = vec![0u8; 7 * 65536];
    store.read_at(c * 65536, &mut all).unwrap();
    assert_eq!(&all[..], &f.image[c as usize * 65536..][..7 * 65536]);
    let s = store.stats();
    assert_eq!(s.requests, 2, "{s:?}");
    assert_eq!(s.retries, 1, "{s:?}");
    // The retry asked only for the parts the truncated body did not deliver whole.
    assert!(
        s.bytes_fetched < range + range / 2 + 70_000,
        "fetched {} bytes for a {range}-byte range",
        s.bytes_fetched
    );
}

#[test]
fn located_ranges_are_vouched_written_only_where_the_cache_file_has_data() {
    // 16 KiB chunks; 2, 3 and 7 all zeros; the image ends 1000 bytes into its 11th chunk, so the
    // device's last 4 KiB block runs past it.
    let cs = 16usize << 10;
    let mut image = sample_image(10 * cs + 1000, 48);
    for c in [2usize, 3, 7] {
        image[c * cs..(c + 1) * cs].fill(0);
    }
    image[cs - 1] = 1; // chunk 0 is not all zeros whatever the sample holds
    let build = BuildOptions {
        chunk_size: cs as u32,
        ..Default::default()
    };
    let (f, _) = fixture_of(image, &build);
    let srv = FaultServer::start(&f.serve, "blob");
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), opts(&f)).unwrap();
    let m = store.manifest();
    let zero = |c: u64| m.chunk(c) == ChunkRef::Zero;
    assert!(zero(2) && zero(3) && zero(7) && !zero(0) && !zero(10));
    assert_eq!(read_all(&store, f.image.len()), f.image);
    let dev = store.geometry().size;
    let hole_free = |fd: i32, off: u64, len: u64| {
        // SAFETY: `fd` is the store's open data file; lseek only reads its extent map.
        let h = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_HOLE) };
        h < 0 || h as u64 >= off + len
    };
    let mut vouched = 0;
    for b in 0..dev / 4096 {
        let loc = store
            .locate(b * 4096, 4096)
            .expect("all present after reading it all");
        let c = b * 4096 / cs as u64;
        let in_image = (b + 1) * 4096 <= f.image.len() as u64;
        assert_eq!(loc.written, !zero(c) && in_image, "block {b}");
        if loc.written {
            vouched += 1;
            assert!(
                hole_free(loc.fd, loc.offset, 4096),
                "block {b} is vouched for but has a hole"
            );
        }
    }
    // Every full block of every stored chunk (the sample may hold more zero chunks than 3).
    assert_eq!(vouched, 4 * (0..10).filter(|&c| !zero(c)).count());
    assert!(vouched >= 4 * 5, "{vouched}");
    // A range across a zero chunk is not vouched for, nor one that is not all present.
    assert!(!store.locate(cs as u64, 2 * cs as u64).unwrap().written);
    assert!(store.locate(4 * cs as u64, 3 * cs as u64).unwrap().written);
}
