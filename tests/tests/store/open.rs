//! Opening a store: what is refused, what is repaired, what is reused.

use super::*;

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
fn a_cache_in_use_is_refused() {
    let f = fixture(256 << 10, 64 << 10, 16);
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let _a = ChunkStore::open(&loc, opts(&f)).unwrap();
    let e = ChunkStore::open(&loc, opts(&f)).err().unwrap().to_string();
    assert!(e.contains("in use by another lazyblk process"), "{e}");
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
