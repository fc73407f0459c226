//! The host-wide chunk index: two images in one cache root, served by one nginx that counts
//! the bytes it sends for each blob. A chunk the other cache holds (durably) is copied and
//! verified, never fetched again; a stale copy or one its bitmap does not vouch for is not
//! used.

use super::*;
use std::collections::{BTreeSet, HashSet};

/// Two images `a` and `b` built into `www/a` and `www/b`, one nginx over `www`.
pub(crate) struct Two {
    _dir: tempfile::TempDir,
    pub(crate) root: PathBuf,
    pub(crate) ng: Nginx,
    pub(crate) a: Vec<u8>,
    pub(crate) b: Vec<u8>,
    pub(crate) ma: Manifest,
    pub(crate) mb: Manifest,
}

fn two_images(a: Vec<u8>, b: Vec<u8>, build: &BuildOptions) -> Two {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let www = root.join("www");
    let mut ms = Vec::new();
    for (name, img) in [("a", &a), ("b", &b)] {
        let raw = root.join(format!("{name}.img"));
        std::fs::write(&raw, img).unwrap();
        build_image(&raw, &www.join(name), build, |_| {}).unwrap();
        ms.push(
            Manifest::decode(&std::fs::read(www.join(name).join("manifest")).unwrap()).unwrap(),
        );
    }
    let ng = Nginx::start(&www, &root.join("nginx"));
    let mb = ms.pop().unwrap();
    let ma = ms.pop().unwrap();
    Two {
        _dir: dir,
        root,
        ng,
        a,
        b,
        ma,
        mb,
    }
}

impl Two {
    pub(crate) fn opts(&self, host_index: bool) -> StoreOptions {
        StoreOptions {
            cache_root: self.root.join("cache"),
            http: HttpOptions {
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_secs(5),
                ..Default::default()
            },
            io_deadline: Some(Duration::from_secs(20)),
            host_index,
            ..Default::default()
        }
    }

    fn open(&self, name: &str, host_index: bool) -> ChunkStore {
        let loc = Location::parse(&self.ng.url(&format!("{name}/manifest")));
        ChunkStore::open(&loc, self.opts(host_index)).unwrap()
    }

    /// Bytes nginx sent for `name`'s blob so far.
    fn blob_bytes(&self, name: &str) -> u64 {
        self.ng.served_matching(&format!("/{name}/blob")).1
    }
}

/// Open `name` again right after its store was dropped. Another test of this process may be
/// spawning a child (nginx, mkfs.erofs) just then: until it execs, the child holds a copy of
/// every descriptor, the cache's lock too, so "in use" is retried for a moment.
fn reopen(t: &Two, name: &str) -> ChunkStore {
    let loc = Location::parse(&t.ng.url(&format!("{name}/manifest")));
    let t0 = std::time::Instant::now();
    loop {
        match ChunkStore::open(&loc, t.opts(true)) {
            Err(Error::Cache { detail, .. })
                if detail.contains("in use") && t0.elapsed() < Duration::from_secs(10) =>
            {
                std::thread::sleep(Duration::from_millis(50))
            }
            r => return r.unwrap(),
        }
    }
}

/// What the second image shares with the first: the chunks of `b` whose digest `a` stores,
/// and the stored bytes of the entries of `b` whose digest `a` does not store (what `b` alone
/// must fetch).
struct Sharing {
    shared_chunks: u64,
    new_bytes: u64,
    stored_chunks: u64,
}

fn sharing(a: &Manifest, b: &Manifest) -> Sharing {
    let in_a: HashSet<[u8; 32]> = (0..a.chunk_count())
        .filter_map(|i| match a.chunk(i) {
            ChunkRef::Stored(e) => Some(e.digest),
            ChunkRef::Zero => None,
        })
        .collect();
    let mut s = Sharing {
        shared_chunks: 0,
        new_bytes: 0,
        stored_chunks: 0,
    };
    let mut new_entries = BTreeSet::new();
    for i in 0..b.chunk_count() {
        if let ChunkRef::Stored(e) = b.chunk(i) {
            s.stored_chunks += 1;
            if in_a.contains(&e.digest) {
                s.shared_chunks += 1;
            } else if new_entries.insert(e.blob_offset) {
                s.new_bytes += u64::from(e.stored_len);
            }
        }
    }
    s
}

/// The chunks of `b` with digest `d`.
pub(crate) fn chunks_with(m: &Manifest, d: &[u8; 32]) -> Vec<u64> {
    (0..m.chunk_count())
        .filter(|&i| matches!(m.chunk(i), ChunkRef::Stored(e) if e.digest == *d))
        .collect()
}

/// A chunk of `a` (index in `a`, the digest) that `b` shares, in one chunk of each image.
fn a_shared_chunk(t: &Two) -> (u64, [u8; 32]) {
    (0..t.ma.chunk_count())
        .filter_map(|i| match t.ma.chunk(i) {
            ChunkRef::Stored(e) => Some((i, e.digest)),
            ChunkRef::Zero => None,
        })
        .find(|(_, d)| chunks_with(&t.ma, d).len() == 1 && chunks_with(&t.mb, d).len() == 1)
        .expect("a chunk shared once")
}

/// `a` opened (host index on) and read whole, its bytes checked.
fn read_first(t: &Two) -> ChunkStore {
    let sa = t.open("a", true);
    assert!(
        read_all(&sa, t.a.len()) == t.a,
        "the first image's bytes differ"
    );
    sa
}

/// `a` read whole (and its bits durable), then `b` opened with the index built.
fn first_read_then_second(t: &Two, host_index: bool) -> (ChunkStore, ChunkStore) {
    let sa = read_first(t);
    sa.flush().unwrap();
    let sb = t.open("b", host_index);
    if host_index {
        wait_for("the host index", || sb.host_index_peers() == Some(1));
    } else {
        assert_eq!(sb.host_index_peers(), None);
    }
    (sa, sb)
}

/// 4 MiB in 64 KiB chunks; the second image: 3 new chunks in front, then the first's bytes
/// shifted by them (same chunks at other offsets) with chunks 20..23 of it replaced.
pub(crate) fn shifted_pair(seed: u64) -> Two {
    let cs = 64 << 10;
    let a = sample_image(4 << 20, seed);
    let mut b = sample_image(3 * cs, seed + 1000);
    let mut rest = a.clone();
    rest[20 * cs..23 * cs].copy_from_slice(&sample_image(3 * cs, seed + 2000));
    b.extend_from_slice(&rest);
    let build = BuildOptions {
        chunk_size: cs as u32,
        metadata_pack: lazyblk_builder::PackBlocks::Off,
        ..Default::default()
    };
    two_images(a, b, &build)
}

fn check_second(t: &Two, sb: &ChunkStore, expect_copies: u64) {
    let before = t.blob_bytes("b");
    assert!(
        read_all(sb, t.b.len()) == t.b,
        "the second image's bytes differ"
    );
    let s = sb.stats();
    let share = sharing(&t.ma, &t.mb);
    let served = t.blob_bytes("b") - before;
    eprintln!(
        "second image: {} stored chunks, {} shared with the first; {} blob bytes served, {} bytes of new chunks; {s:?}",
        share.stored_chunks, share.shared_chunks, served, share.new_bytes
    );
    assert_eq!(s.local_copies, expect_copies, "{s:?}");
    assert_eq!(s.verify_failures, 0, "{s:?}");
}

/// `check_second`, every shared chunk copied, and the server sent no more of the second blob
/// than its new chunks.
fn check_only_new_fetched(t: &Two, sb: &ChunkStore, share: &Sharing) {
    let before = t.blob_bytes("b");
    check_second(t, sb, share.shared_chunks);
    let served = t.blob_bytes("b") - before;
    assert!(
        served <= share.new_bytes,
        "served {served} bytes of the second blob, its new chunks store {}",
        share.new_bytes
    );
}

/// A read right after open, before the index's first build has finished: its misses wait for
/// the build instead of fetching chunks the host already holds (`lazyblk cat` and a mount read
/// at once; before this, the first misses of a read went to the network).
#[test]
fn a_read_right_after_open_waits_for_the_index_and_fetches_no_shared_chunk() {
    let t = shifted_pair(23);
    let share = sharing(&t.ma, &t.mb);
    let sa = read_first(&t);
    sa.flush().unwrap();
    let sb = t.open("b", true);
    check_only_new_fetched(&t, &sb, &share);
}

/// Unmounts on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// With the cache root on XFS (a file system in a file, mounted on a loop device), the local
/// copies are reflinks: the second cache's chunks share the first's extents on disk, and
/// still read back as the source's bytes.
#[test]
fn on_xfs_local_copies_are_reflinks_sharing_the_extents() {
    let t = shifted_pair(25);
    let share = sharing(&t.ma, &t.mb);
    let img = t.root.join("xfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(320 << 20)
        .unwrap();
    let st = std::process::Command::new("mkfs.xfs")
        .args(["-q", "-m", "reflink=1"])
        .arg(&img)
        .status()
        .expect("run mkfs.xfs (xfsprogs; bash scripts/setup installs it)");
    assert!(st.success(), "mkfs.xfs failed");
    let cache = t.root.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&cache)
        .status()
        .expect("run mount");
    assert!(st.success(), "mounting the XFS image failed (run as root)");
    let _m = Unmount(cache.clone());
    let (sa, sb) = first_read_then_second(&t, true);
    check_only_new_fetched(&t, &sb, &share);
    let s = sb.stats();
    assert_eq!(s.local_reflinks, s.local_copies, "{s:?}");
    sb.flush().unwrap();
    // The file system's view: the second cache's data file has shared extents.
    let out = std::process::Command::new("filefrag")
        .arg("-v")
        .arg(sb.data_path())
        .output()
        .expect("run filefrag");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("shared"), "no shared extent:\n{text}");
    // And the bytes are the source's after a reopen.
    drop((sa, sb));
    let sb = reopen(&t, "b");
    assert_eq!(sb.stats().present_chunks, t.mb.chunk_count());
    assert!(
        read_all(&sb, t.b.len()) == t.b,
        "the reflinked cache's bytes differ"
    );
    drop(sb);
}

#[test]
fn shared_chunks_are_copied_not_fetched_at_other_offsets() {
    let t = shifted_pair(21);
    let share = sharing(&t.ma, &t.mb);
    assert!(
        share.shared_chunks * 10 >= share.stored_chunks * 8,
        "the pair shares too little to test: {} of {}",
        share.shared_chunks,
        share.stored_chunks
    );
    let (_sa, sb) = first_read_then_second(&t, true);
    check_only_new_fetched(&t, &sb, &share);
    let s = sb.stats();
    assert_eq!(s.local_copy_stale, 0);
    let raw: u64 = (0..t.mb.chunk_count())
        .filter(|&i| {
            matches!(t.mb.chunk(i), ChunkRef::Stored(e) if !chunks_with(&t.ma, &e.digest).is_empty())
        })
        .map(|i| u64::from(t.mb.chunk_len(i)))
        .sum();
    assert_eq!(s.local_copy_bytes, raw);
    // The copies are as durable as fetched chunks: after a clean close every chunk is
    // present without the network and still the source's bytes.
    drop(sb);
    let sb = reopen(&t, "b");
    assert_eq!(sb.stats().present_chunks, t.mb.chunk_count());
    let data = std::fs::read(sb.data_path()).unwrap();
    assert!(
        data[..t.b.len()] == t.b[..],
        "the copies in the data file differ"
    );
}

#[test]
fn a_stale_peer_copy_is_dropped_and_fetched() {
    let t = shifted_pair(22);
    let share = sharing(&t.ma, &t.mb);
    let (sa, sb) = first_read_then_second(&t, true);
    // Corrupt the first cache's bytes of a chunk its bitmap holds.
    let (k, d) = a_shared_chunk(&t);
    assert!(sa.chunk_present(k));
    let data = std::fs::OpenOptions::new()
        .write(true)
        .open(sa.data_path())
        .unwrap();
    use std::os::unix::fs::FileExt;
    let at = k * u64::from(t.ma.chunk_size) + 100;
    let mut byte = [0u8; 1];
    std::fs::File::open(sa.data_path())
        .unwrap()
        .read_exact_at(&mut byte, at)
        .unwrap();
    data.write_all_at(&[byte[0] ^ 0x55], at).unwrap();
    let before = t.blob_bytes("b");
    check_second(&t, &sb, share.shared_chunks - 1);
    let s = sb.stats();
    assert_eq!(s.local_copy_stale, 1, "{s:?}");
    // That chunk came from the network, and nothing else the first holds.
    let kb = chunks_with(&t.mb, &d)[0];
    let ChunkRef::Stored(e) = t.mb.chunk(kb) else {
        unreachable!()
    };
    let served = t.blob_bytes("b") - before;
    assert!(
        served >= u64::from(e.stored_len) && served <= share.new_bytes + u64::from(e.stored_len),
        "served {served}, new chunks {}, the stale one {}",
        share.new_bytes,
        e.stored_len
    );
}

#[test]
fn a_peer_chunk_without_its_durable_bit_is_never_copied() {
    let t = shifted_pair(23);
    let share = sharing(&t.ma, &t.mb);
    let sa = read_first(&t);
    let dir = sa.cache_dir().to_path_buf();
    drop(sa);
    // The data file still has the chunk's bytes; its bitmap says absent.
    let (k, d) = a_shared_chunk(&t);
    let bm = dir.join("bitmap");
    let mut bytes = std::fs::read(&bm).unwrap();
    let at = lazyblk_chunkstore::bitmap::HEADER_LEN + k as usize / 8;
    assert!(bytes[at] & (1 << (k % 8)) != 0);
    bytes[at] &= !(1 << (k % 8));
    std::fs::write(&bm, &bytes).unwrap();
    let sb = t.open("b", true);
    wait_for("the host index", || sb.host_index_peers() == Some(1));
    check_second(&t, &sb, share.shared_chunks - 1);
    let s = sb.stats();
    assert_eq!(s.local_copy_stale, 0, "an unset bit is not stale: {s:?}");
    let kb = chunks_with(&t.mb, &d)[0];
    assert!(sb.chunk_present(kb));
}

#[test]
fn with_the_index_off_everything_comes_from_the_network() {
    let t = shifted_pair(24);
    let (_sa, sb) = first_read_then_second(&t, false);
    let before = t.blob_bytes("b");
    check_second(&t, &sb, 0);
    let served = t.blob_bytes("b") - before;
    let stored: u64 = (0..t.mb.chunk_count())
        .filter_map(|i| match t.mb.chunk(i) {
            ChunkRef::Stored(e) => Some((e.blob_offset, e.stored_len)),
            ChunkRef::Zero => None,
        })
        .collect::<std::collections::BTreeMap<_, _>>()
        .values()
        .map(|&l| u64::from(l))
        .sum();
    assert!(served >= stored, "served {served} of {stored}");
    assert_eq!(sb.stats().local_copy_stale, 0);
}

#[test]
fn two_stores_copying_from_each_other_at_once_stay_correct() {
    let t = shifted_pair(25);
    // Each cache sees the other: b is opened after a's directory exists, a again after b's.
    drop(t.open("a", true));
    let sb = Arc::new(t.open("b", true));
    let sa = Arc::new(reopen(&t, "a"));
    wait_for("both indexes", || {
        sa.host_index_peers() == Some(1) && sb.host_index_peers() == Some(1)
    });
    // Each holds half of what they share, then both read everything, twice over, at once.
    let half_a = t.a.len() / 2;
    let mut buf = vec![0u8; half_a];
    sa.read_at(0, &mut buf).unwrap();
    let mut buf = vec![0u8; t.b.len() - t.b.len() / 2];
    sb.read_at((t.b.len() / 2) as u64, &mut buf).unwrap();
    sa.flush().unwrap();
    sb.flush().unwrap();
    let mut hs = Vec::new();
    for (store, img) in [(sa.clone(), t.a.clone()), (sb.clone(), t.b.clone())] {
        let img = Arc::new(img);
        for k in 0..2 {
            let (store, img) = (store.clone(), img.clone());
            hs.push(std::thread::spawn(move || {
                // Different orders: front to back, back to front, 64 KiB at a time.
                let n = img.len().div_ceil(65536);
                for j in 0..n {
                    let j = if k == 0 { j } else { n - 1 - j };
                    let lo = j * 65536;
                    let hi = (lo + 65536).min(img.len());
                    let mut b = vec![0u8; hi - lo];
                    store.read_at(lo as u64, &mut b).unwrap();
                    assert!(b == img[lo..hi], "read at {lo}");
                }
            }));
        }
    }
    for h in hs {
        h.join().unwrap();
    }
    let (a, b) = (sa.stats(), sb.stats());
    eprintln!("a: {a:?}\nb: {b:?}");
    assert!(a.local_copies > 0 && b.local_copies > 0, "{a:?} {b:?}");
    assert_eq!(a.verify_failures + b.verify_failures, 0);
    assert_eq!(a.local_copy_stale + b.local_copy_stale, 0);
}

/// A tree built with `mkfs.erofs` (as `lazyblk convert` runs it).
fn erofs_of(tree: &Path, out: &Path) -> Vec<u8> {
    let o = std::process::Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(out)
        .arg(tree)
        .output()
        .expect("mkfs.erofs (erofs-utils)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

#[test]
fn two_builds_of_similar_trees_fetch_only_their_new_chunks() {
    let work = tempfile::tempdir().unwrap();
    let (t1, t2) = (work.path().join("t1"), work.path().join("t2"));
    lazyblk_tests::tree::generate(&t1, 31, 2).unwrap();
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&t1)
        .arg(&t2)
        .status()
        .unwrap();
    assert!(cp.success());
    // The second tree: a few files more, a directory fewer, one file changed.
    std::fs::remove_dir_all(t2.join("small/d5")).unwrap();
    std::fs::write(t2.join("added.bin"), sample_image(300 << 10, 77)).unwrap();
    std::fs::write(t2.join("small/d0/added.txt"), b"a new small file\n").unwrap();
    std::fs::write(t2.join("small/d1/f7.txt"), b"changed\n").unwrap();
    let a = erofs_of(&t1, &work.path().join("a.erofs"));
    let b = erofs_of(&t2, &work.path().join("b.erofs"));
    let build = BuildOptions {
        chunk_size: 64 << 10,
        metadata_pack: lazyblk_builder::PackBlocks::Off,
        ..Default::default()
    };
    let t = two_images(a, b, &build);
    let share = sharing(&t.ma, &t.mb);
    eprintln!(
        "two builds of similar trees (mkfs.erofs, 64 KiB chunks): the second has {} stored chunks, {} of them shared with the first ({:.0}%); new chunks store {} bytes",
        share.stored_chunks,
        share.shared_chunks,
        100.0 * share.shared_chunks as f64 / share.stored_chunks.max(1) as f64,
        share.new_bytes
    );
    let (_sa, sb) = first_read_then_second(&t, true);
    check_only_new_fetched(&t, &sb, &share);
}

#[test]
fn gc_says_what_another_cache_still_holds() {
    let t = shifted_pair(26);
    let (sa, sb) = first_read_then_second(&t, true);
    assert!(read_all(&sb, t.b.len()) == t.b);
    let (ida, idb) = (sa.id(), sb.id());
    drop((sa, sb));
    let root = t.root.join("cache");
    // A chunk of each that the other holds too: the 61 shared ones (each stored once in both).
    let share = sharing(&t.ma, &t.mb);
    let bytes_of = |m: &Manifest, other: &Manifest| -> u64 {
        (0..m.chunk_count())
            .filter(|&i| matches!(m.chunk(i), ChunkRef::Stored(e) if !chunks_with(other, &e.digest).is_empty()))
            .map(|i| u64::from(m.chunk_len(i)))
            .sum()
    };
    let report = |dry: bool, keep: &[ImageId]| {
        let mut r = lazyblk_chunkstore::gc(&root, keep, dry).unwrap();
        r.sort_by_key(|e| e.dir.ends_with(idb.hex()));
        r
    };
    let r = report(true, &[]);
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(|e| !e.removed && !e.in_use));
    // Dry run, nothing kept: both would go, so nothing stays to hold a copy.
    assert_eq!((r[0].shared_chunks, r[1].shared_chunks), (0, 0));
    // Keep b: removing a frees its bytes, but b still holds the shared chunks.
    let r = report(true, &[idb]);
    assert_eq!(r[0].shared_chunks, share.shared_chunks);
    assert_eq!(r[0].shared_bytes, bytes_of(&t.ma, &t.mb));
    assert_eq!(
        r[1].shared_chunks, 0,
        "a goes, so b shares with no cache that stays"
    );
    // Both kept (a running store holds a, b is pinned): each shares with the other.
    let held = reopen(&t, "a");
    let r = report(false, &[idb]);
    assert!(r[0].in_use && !r[0].removed && !r[1].removed);
    assert_eq!(r[0].shared_chunks, share.shared_chunks);
    assert_eq!(r[1].shared_chunks, share.shared_chunks);
    assert_eq!(r[1].shared_bytes, bytes_of(&t.mb, &t.ma));
    drop(held);
    // Now a really goes.
    let r = report(false, &[idb]);
    assert!(r[0].removed && !root.join(ida.hex()).exists());
    assert_eq!(r[0].shared_chunks, share.shared_chunks);
}
