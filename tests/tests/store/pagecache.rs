//! No double caching (issue 17): on a disk, what the store wrote or read in bulk does not stay in
//! the page cache (the kernel caches the device's blocks above the frontend already).

use super::*;
use lazyblk_blocksource::fsutil::{self, PageCachePolicy};
use std::os::fd::AsRawFd;

/// The store's cache directory is on a disk file system here (else the test says so and stops:
/// on tmpfs the page cache is the cache).
fn on_disk(f: &Fixture) -> bool {
    std::fs::create_dir_all(f.root.join("cache")).unwrap();
    let d = std::fs::File::open(f.root.join("cache")).unwrap();
    let disk = fsutil::page_cache_policy(d.as_raw_fd()) != PageCachePolicy::InMemory;
    if !disk {
        eprintln!("the temporary directory is in memory: nothing to check");
    }
    disk
}

#[test]
fn fetched_chunks_leave_the_page_cache_once_durable() {
    let f = fixture(4 << 20, 64 << 10, 17);
    if !on_disk(&f) {
        return;
    }
    let srv = FaultServer::start(&f.serve, "blob");
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), opts(&f)).unwrap();
    let len = f.image.len() as u64;
    // Fetch everything without reading it back (a read would be the frontend's business).
    let (tx, rx) = std::sync::mpsc::channel();
    store.fetch(0, len, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    assert!(
        rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        "fetch failed"
    );
    store.flush().unwrap();
    let data = std::fs::File::open(store.data_path()).unwrap();
    let stored: u64 = (0..store.manifest().chunk_count())
        .filter(|&c| matches!(store.manifest().chunk(c), ChunkRef::Stored(_)))
        .map(|c| u64::from(store.manifest().chunk_len(c)))
        .sum();
    assert!(stored > 2 << 20, "the sample image stores most chunks");
    let resident = fsutil::resident_bytes(&data, 0, len).unwrap();
    assert_eq!(
        resident, 0,
        "{resident} bytes of the {stored} written stayed in the page cache after the flush"
    );
    // And the data is there (read back from the disk).
    assert_eq!(read_all(&store, f.image.len()), f.image);
}

#[test]
fn export_keeps_no_copy_in_the_page_cache() {
    let f = fixture(4 << 20, 64 << 10, 18);
    if !on_disk(&f) {
        return;
    }
    let srv = FaultServer::start(&f.serve, "blob");
    let store = ChunkStore::open(&Location::parse(&srv.url("manifest")), opts(&f)).unwrap();
    // Everything fetched and durable first (the persister dropped it): what the export reads
    // back is then its own to drop.
    let (tx, rx) = std::sync::mpsc::channel();
    let len = f.image.len() as u64;
    store.fetch(0, len, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    assert!(
        rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        "fetch failed"
    );
    store.flush().unwrap();
    let out = f.root.join("exported.img");
    store.export(&out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), f.image);
    // (the read just now filled the export's page cache again: drop it to look at the store's)
    let out_file = std::fs::File::open(&out).unwrap();
    fsutil::drop_cached(out_file.as_raw_fd(), 0, 0).unwrap();
    let data = std::fs::File::open(store.data_path()).unwrap();
    let resident = fsutil::resident_bytes(&data, 0, len).unwrap();
    assert_eq!(
        resident, 0,
        "export left {resident} bytes of the cache file in the page cache"
    );
}

#[test]
fn reverification_keeps_no_copy_in_the_page_cache() {
    let f = fixture(4 << 20, 64 << 10, 19);
    if !on_disk(&f) {
        return;
    }
    let srv = FaultServer::start(&f.serve, "blob");
    let loc = Location::parse(&srv.url("manifest"));
    let dir = {
        let store = ChunkStore::open(&loc, opts(&f)).unwrap();
        assert_eq!(read_all(&store, f.image.len()), f.image);
        store.data_path().parent().unwrap().to_path_buf()
    };
    // A bitmap not closed cleanly: the next open re-hashes every chunk it claims.
    let bm = dir.join("bitmap");
    let mut b = std::fs::read(&bm).unwrap();
    b[12] = 0; // the clean flag (as the reliability suite damages it)
    std::fs::write(&bm, &b).unwrap();
    let store = ChunkStore::open(&loc, opts(&f)).unwrap();
    assert!(
        store.open_report().reverified > 0,
        "the open did not re-verify"
    );
    let data = std::fs::File::open(store.data_path()).unwrap();
    let resident = fsutil::resident_bytes(&data, 0, f.image.len() as u64).unwrap();
    assert_eq!(
        resident, 0,
        "re-verification left {resident} bytes in the page cache"
    );
}
