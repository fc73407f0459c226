//! The chunk store against a real nginx and against the fault-injecting server.

use lazyblk_blocksource::{BlockError, BlockSource};
use lazyblk_builder::{build_image, build_prefetch_pack, BuildOptions, BuildSummary, PackBlocks};
use lazyblk_chunkstore::{ChunkStore, Error, ImageId, Location, Manifest, StoreOptions};
use lazyblk_format::{BlockList, ChunkRef, PACK_FILE};
use lazyblk_remote::HttpOptions;
use lazyblk_tests::fault::{Fault, FaultServer};
use lazyblk_tests::nginx::Nginx;
use lazyblk_tests::sample_image;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    serve: PathBuf,
    image: Vec<u8>,
    id: ImageId,
    chunk_size: u32,
}

fn fixture(size: usize, chunk_size: u32, seed: u64) -> Fixture {
    let build = BuildOptions {
        chunk_size,
        ..Default::default()
    };
    fixture_built(size, seed, &build).0
}

/// A sample image of `size` bytes built with `build` into `www/`.
fn fixture_built(size: usize, seed: u64, build: &BuildOptions) -> (Fixture, BuildSummary) {
    fixture_of(sample_image(size, seed), build)
}

/// `image` built with `build` into `www/`.
fn fixture_of(image: Vec<u8>, build: &BuildOptions) -> (Fixture, BuildSummary) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    std::fs::write(root.join("raw.img"), &image).unwrap();
    let serve = root.join("www");
    let s = build_image(&root.join("raw.img"), &serve, build, |_| {}).unwrap();
    let f = Fixture {
        _dir: dir,
        root,
        serve,
        image,
        id: s.id,
        chunk_size: build.chunk_size,
    };
    (f, s)
}

fn opts(f: &Fixture) -> StoreOptions {
    StoreOptions {
        cache_root: f.root.join("cache"),
        http: HttpOptions {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        },
        io_deadline: Some(Duration::from_secs(20)),
        ..Default::default()
    }
}

fn padded(image: &[u8]) -> Arc<Vec<u8>> {
    let mut v = image.to_vec();
    v.resize(image.len().div_ceil(4096) * 4096, 0);
    Arc::new(v)
}

fn read_all(store: &ChunkStore, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    for (i, c) in buf.chunks_mut(300_000).enumerate() {
        store.read_at(i as u64 * 300_000, c).unwrap();
    }
    buf
}

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
fn restart_does_not_refetch_present_chunks() {
    let f = fixture(4 << 20, 64 << 10, 2);
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let half = 2 << 20;
    {
        let store = ChunkStore::open(&loc, opts(&f)).unwrap();
        let mut buf = vec![0u8; half];
        store.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, f.image[..half]);
    }
    let before = srv.target_requests();
    let store = ChunkStore::open(&loc, opts(&f)).unwrap();
    assert!(!store.open_report().fresh);
    assert_eq!(
        store.open_report().reverified,
        0,
        "clean close must be trusted"
    );
    let probe_requests = srv.target_requests() - before;
    let mut buf = vec![0u8; half];
    store.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, f.image[..half]);
    assert_eq!(
        srv.target_requests() - before,
        probe_requests,
        "present chunks were fetched again"
    );
    // The rest still comes from the remote.
    let all = read_all(&store, f.image.len());
    assert_eq!(all, f.image);
    assert!(srv.target_requests() > before + probe_requests);
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
fn server_without_range_support_is_refused_at_open() {
    let f = fixture(256 << 10, 64 << 10, 5);
    let srv = FaultServer::start(&f.serve, "blob");
    srv.set_always(Some(Fault::IgnoreRange));
    let err = ChunkStore::open(&Location::parse(&srv.url("manifest")), opts(&f))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("does not support range requests"),
        "{err}"
    );
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
fn offhost_redirect_is_refused() {
    let f = fixture(256 << 10, 64 << 10, 7);
    let srv = FaultServer::start(&f.serve, "blob");
    srv.set_always(Some(Fault::RedirectOffHost));
    let err = ChunkStore::open(&Location::parse(&srv.url("manifest")), opts(&f))
        .err()
        .unwrap();
    assert!(err.to_string().contains("another host"), "{err}");
}

#[test]
fn blob_replaced_on_server_is_detected() {
    let f = fixture(512 << 10, 64 << 10, 8);
    let srv = FaultServer::start(&f.serve, "blob");
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), opts(&f)).unwrap();
    srv.set_etag("\"something-else\"");
    let stored = (0..store.manifest().chunk_count())
        .find(|&i| !store.chunk_present(i))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let err = store.read_at(stored * 65536, &mut buf).unwrap_err();
    assert!(err.to_string().contains("changed on the server"), "{err}");
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

#[test]
fn bad_input_gets_one_clear_line() {
    let f = fixture(256 << 10, 64 << 10, 11);
    let srv = FaultServer::start(&f.serve, "blob");
    let msg = |r: Result<ChunkStore, Error>| {
        let e = r.err().expect("must fail").to_string();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    };
    // Missing manifest.
    let e = msg(ChunkStore::open(
        &Location::parse(&srv.url("nope")),
        opts(&f),
    ));
    assert!(
        e.contains("cannot read the manifest") && e.contains("404"),
        "{e}"
    );
    // Corrupt manifest.
    std::fs::write(f.serve.join("corrupt"), b"LZBLKMAN garbage").unwrap();
    let e = msg(ChunkStore::open(
        &Location::parse(&srv.url("corrupt")),
        opts(&f),
    ));
    assert!(e.starts_with("malformed manifest"), "{e}");
    // Unknown version.
    let mut m = std::fs::read(f.serve.join("manifest")).unwrap();
    m[8] = 9;
    std::fs::write(f.serve.join("v9"), &m).unwrap();
    let e = msg(ChunkStore::open(&Location::parse(&srv.url("v9")), opts(&f)));
    assert!(e.contains("unsupported manifest version 9"), "{e}");
    // Wrong pinned digest.
    let mut o = opts(&f);
    o.expected_id = Some(ImageId([1; 32]));
    let e = msg(ChunkStore::open(&Location::parse(&srv.url("manifest")), o));
    assert!(e.contains("manifest digest mismatch"), "{e}");
    // Blob size mismatch.
    let blob = std::fs::read(f.serve.join("blob")).unwrap();
    std::fs::write(f.serve.join("blob"), &blob[..blob.len() - 1]).unwrap();
    let e = msg(ChunkStore::open(
        &Location::parse(&srv.url("manifest")),
        opts(&f),
    ));
    assert!(
        e.contains("does not match the manifest") && e.contains("size"),
        "{e}"
    );
    std::fs::write(f.serve.join("blob"), &blob).unwrap();
    // Unreachable host.
    let port = lazyblk_tests::free_port();
    let e = msg(ChunkStore::open(
        &Location::parse(&format!("http://127.0.0.1:{port}/manifest")),
        opts(&f),
    ));
    assert!(
        e.contains("cannot read the manifest") && e.contains("127.0.0.1"),
        "{e}"
    );
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
fn bad_local_state_is_repaired_not_trusted() {
    let f = fixture(1 << 20, 64 << 10, 13);
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let cache_dir = {
        let store = ChunkStore::open(&loc, opts(&f)).unwrap();
        assert_eq!(read_all(&store, f.image.len()), f.image);
        store.cache_dir().to_path_buf()
    };
    // Corrupt cached data: a clean bitmap says present, but the checksum still matches, so
    // flip data AND mark the bitmap dirty (as after a crash): re-verification must catch it.
    let data_path = cache_dir.join("data");
    let mut data = std::fs::read(&data_path).unwrap();
    let victim = (0..16)
        .find(|i| f.image[i * 65536..(i + 1) * 65536].iter().any(|&b| b != 0))
        .unwrap();
    data[victim * 65536 + 100] ^= 0xff;
    std::fs::write(&data_path, &data).unwrap();
    let mut bm = std::fs::read(cache_dir.join("bitmap")).unwrap();
    bm[12] = 0; // clear the clean flag
    std::fs::write(cache_dir.join("bitmap"), &bm).unwrap();
    {
        let store = ChunkStore::open(&loc, opts(&f)).unwrap();
        assert_eq!(store.open_report().dropped, 1, "{:?}", store.open_report());
        assert!(!store.chunk_present(victim as u64));
        assert_eq!(read_all(&store, f.image.len()), f.image);
    }
    // Truncated bitmap: discarded with a reason, then everything still reads right.
    let bm = std::fs::read(cache_dir.join("bitmap")).unwrap();
    std::fs::write(cache_dir.join("bitmap"), &bm[..bm.len() / 2]).unwrap();
    {
        let store = ChunkStore::open(&loc, opts(&f)).unwrap();
        let why = store.open_report().discarded.clone().unwrap();
        assert!(why.contains("bitmap"), "{why}");
        assert_eq!(read_all(&store, f.image.len()), f.image);
    }
    // Truncated data file.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data_path)
        .unwrap()
        .set_len(1000)
        .unwrap();
    {
        let store = ChunkStore::open(&loc, opts(&f)).unwrap();
        assert!(store.open_report().discarded.is_some());
        assert_eq!(read_all(&store, f.image.len()), f.image);
    }
    // A bitmap from another image.
    let g = fixture(1 << 20, 64 << 10, 14);
    let other = opts(&g).cache_root.join(g.id.hex());
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(cache_dir.join("bitmap"), other.join("bitmap")).unwrap();
    std::fs::copy(cache_dir.join("data"), other.join("data")).unwrap();
    std::fs::write(
        other.join("manifest"),
        std::fs::read(g.serve.join("manifest")).unwrap(),
    )
    .unwrap();
    let srv2 = FaultServer::start(&g.serve, "blob");
    let store = ChunkStore::open(&Location::parse(&srv2.url("manifest")), opts(&g)).unwrap();
    let why = store.open_report().discarded.clone().unwrap();
    assert!(why.contains("another image"), "{why}");
    assert_eq!(read_all(&store, g.image.len()), g.image);
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
fn a_cache_in_use_is_refused() {
    let f = fixture(256 << 10, 64 << 10, 16);
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let _a = ChunkStore::open(&loc, opts(&f)).unwrap();
    let e = ChunkStore::open(&loc, opts(&f)).err().unwrap().to_string();
    assert!(e.contains("in use by another lazyblk process"), "{e}");
}

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

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
fn an_all_zero_image_has_an_empty_blob_and_opens_over_http() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("raw"), vec![0u8; 300_000]).unwrap();
    let serve = dir.path().join("www");
    build_image(
        &dir.path().join("raw"),
        &serve,
        &BuildOptions::default(),
        |_| {},
    )
    .unwrap();
    assert_eq!(std::fs::metadata(serve.join("blob")).unwrap().len(), 0);
    let ng = Nginx::start(&serve, &dir.path().join("nginx"));
    let store = ChunkStore::open(
        &Location::parse(&ng.url("manifest")),
        StoreOptions {
            cache_root: dir.path().join("cache"),
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![1u8; 300_000];
    store.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

/// A store over `srv` with the test options and a readahead window of `chunks`.
fn open_with_readahead(f: &Fixture, srv: &FaultServer, chunks: u64) -> ChunkStore {
    let o = StoreOptions {
        readahead_bytes: chunks * u64::from(f.chunk_size),
        ..opts(f)
    };
    ChunkStore::open(&Location::parse(&srv.url("manifest")), o).unwrap()
}

/// First stored chunk at or after `from` whose next `n` chunks are stored too (so a miss there
/// with readahead is one multi-chunk request).
fn stored_run_start(store: &ChunkStore, from: u64, n: u64) -> u64 {
    let m = store.manifest();
    (from..m.chunk_count() - n)
        .find(|&i| (i..i + n).all(|c| matches!(m.chunk(c), ChunkRef::Stored(_))))
        .expect("a run of stored chunks")
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

// ---- metadata pack ----------------------------------------------------------------------

/// A 2 MiB image in 64 KiB chunks whose every 7th 4 KiB block (74 blocks, spread over all 32
/// chunks, blocks 0 to 511) is in the metadata pack, in frames of 64 blocks (frame 1: blocks
/// 448 to 511).
fn fixture_with_pack(seed: u64) -> (Fixture, Vec<u64>) {
    let blocks: Vec<u64> = (0..512).step_by(7).collect();
    let build = BuildOptions {
        chunk_size: 64 << 10,
        metadata_pack: PackBlocks::Blocks(blocks.clone()),
        ..Default::default()
    };
    let (f, s) = fixture_built(2 << 20, seed, &build);
    assert_eq!(s.pack_blocks, 74);
    (f, blocks)
}

fn read_block(store: &ChunkStore, b: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    store.read_at(b * 4096, &mut buf).unwrap();
    buf
}

fn image_block(f: &Fixture, b: u64) -> &[u8] {
    &f.image[b as usize * 4096..(b as usize + 1) * 4096]
}

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
fn open_fetches_manifest_probe_and_list_over_one_connection() {
    let f = fixture(1 << 20, 64 << 10, 27);
    // A published list, so open makes four requests: manifest, then together the probe, the
    // list and the look for a prefetch pack (none here: a 404).
    let list = lazyblk_format::PrefetchList {
        image: f.id,
        chunks: vec![3],
    };
    std::fs::write(f.serve.join("prefetch"), list.encode()).unwrap();
    let srv = FaultServer::start(&f.serve, "blob");
    let mut o = opts(&f);
    o.readahead_bytes = 0;
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), o).unwrap();
    assert_eq!(store.prefetch_list(), Some(&[3u32][..]));
    assert_eq!(srv.requests(), 4);
    // Those three go out together, so three connections at most; then reads reuse them (a
    // fresh connection per request would make this 6).
    let mut buf = vec![0u8; 4096];
    store.read_at(0, &mut buf).unwrap();
    store.read_at(10 * 65536, &mut buf).unwrap();
    assert_eq!(srv.requests(), 6);
    assert!(srv.connections() <= 3, "{} connections", srv.connections());
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

// ---- prefetch pack ------------------------------------------------------------------------

/// Publish next to `f`'s manifest a prefetch pack of `blocks` (plus the image's metadata pack
/// blocks), read from the raw image; its digest.
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
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), opts(&f)).unwrap();
    assert_eq!(store.open_report().prefetch_pack, Some(pid.to_string()));
    assert_eq!(store.prefetch_list(), Some(&[0u32, 1, 4][..]));
    let probes = srv.target_requests();
    store.start_default_background();
    wait_for("the pack", || store.stats().background_done);
    let s = store.stats();
    // 74 + 7 blocks in frames of 64: two frames, from the pack's blob.
    assert_eq!((s.pack_frames, s.pack_frames_present), (2, 2), "{s:?}");
    assert_eq!(s.chunks_fetched, 0, "{s:?}");
    assert_eq!(
        srv.target_requests(),
        probes,
        "nothing from the image's blob"
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
    assert_eq!(read_all(&store, f.image.len()), f.image);
    assert!(srv.target_requests() > probes);
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
