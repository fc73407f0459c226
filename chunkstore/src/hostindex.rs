//! The host-wide chunk index: copies of this image's chunks held by the *other* caches under
//! the same cache root, so a chunk any image on this host already has is copied locally
//! instead of fetched over the network again.
//!
//! What is trusted, and what is not:
//! * A peer's manifest only says where a copy *could* be: a map from this image's digests to a
//!   peer chunk (peer directory, chunk index, offset, length), kept only for digests this image
//!   has (at most one entry per distinct digest of this image).
//! * Whether the peer *holds* it is read, at copy time, from the peer's on-disk bitmap file:
//!   the durable bit, which that store sets only after the chunk's verified bytes were durable
//!   in its `data` ([`crate::persist`]). Never the peer's memory or its `meta.json`.
//! * The bytes read from the peer's `data` are hashed against **this** manifest's digest and
//!   then stored exactly like fetched bytes (write, in-memory bit, waiters, group commit), so a
//!   copied chunk is as verified and as crash-safe as a fetched one.
//! * An entry whose bytes are short or do not hash right, or whose peer files are gone, is
//!   *stale*: dropped (never tried from that peer again) and the chunk fetched from the network.
//!   An unset bit is not stale (the peer may fetch it later): that copy is just not taken.
//!
//! The index is built on a thread of its own after open (attach is not slowed). A miss that
//! arrives before the first build has finished waits for it, at most [`FIRST_BUILD_WAIT`]: the
//! build only reads local manifests and bitmaps (milliseconds), and a miss sent to the network
//! meanwhile would fetch a chunk the host already holds. It is refreshed with the cache
//! directories added since, when a lookup finds nothing and the cache root's mtime changed (checked at most
//! every [`REFRESH_EVERY`]). Caches already indexed are not read again: a manifest never
//! changes under its own digest.

use crate::prelude::*;
use std::collections::HashSet;
use std::ffi::OsString;
use std::time::SystemTime;

/// How often a lookup that finds nothing may look at the cache root for new caches.
pub(crate) const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// The longest a miss waits for the first build of the index before it goes to the network.
pub(crate) const FIRST_BUILD_WAIT: Duration = Duration::from_secs(2);

/// Where a copy of one of this image's chunks may be: chunk `chunk` of the cache `peer`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeerChunk {
    pub(crate) peer: u32,
    pub(crate) chunk: u64,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    /// The peer's durable bit was set when indexed (such copies are preferred).
    held: bool,
}

#[derive(Default)]
struct State {
    /// Cache directories indexed, by position.
    peers: Vec<PathBuf>,
    /// Directory names looked at for good (indexed, or not a usable cache).
    seen: HashSet<OsString>,
    /// Directory names without a manifest yet (a cache being created): looked at again.
    pending: HashSet<OsString>,
    /// Digest of a stored chunk of this image -> a peer's copy.
    entries: HashMap<[u8; 32], PeerChunk>,
    /// The cache root's mtime when it was last read.
    root_mtime: Option<SystemTime>,
}

/// The index of one store (see the module doc).
pub(crate) struct HostIndex {
    root: PathBuf,
    own: OsString,
    state: Mutex<State>,
    building: AtomicBool,
    last_check: Mutex<Option<Instant>>,
    /// Becomes true when the first build has finished (set under the `state` lock, after the
    /// entries; misses wait for it).
    built: tokio::sync::watch::Sender<bool>,
}

/// A peer's verified copy of a chunk: its bytes, and where they are (for a reflink).
pub(crate) struct PeerCopy {
    pub(crate) bytes: Vec<u8>,
    pub(crate) file: File,
    pub(crate) offset: u64,
}

/// Why a peer's copy could not be used.
pub(crate) enum Miss {
    /// No usable entry, or the peer does not hold the chunk (yet): fetch it.
    Absent,
    /// The entry was stale and is dropped: fetch it.
    Stale(String),
}

impl HostIndex {
    /// The index of the store whose cache is `dir` (its parent is the cache root).
    pub(crate) fn new(dir: &Path) -> HostIndex {
        HostIndex {
            root: dir.parent().unwrap_or(Path::new(".")).to_path_buf(),
            own: dir.file_name().unwrap_or_default().to_os_string(),
            state: Mutex::new(State::default()),
            building: AtomicBool::new(false),
            last_check: Mutex::new(None),
            built: tokio::sync::watch::Sender::new(false),
        }
    }

    /// The number of caches indexed, once the first build has finished.
    pub(crate) fn peers(&self) -> Option<usize> {
        let s = self.state.lock().expect("lock");
        self.built.borrow().then_some(s.peers.len())
    }

    /// Wait until the first build has finished, at most `limit`: whether it has.
    pub(crate) async fn wait_first_build(&self, limit: Duration) -> bool {
        if *self.built.borrow() {
            return true;
        }
        let mut rx = self.built.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|b| *b))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether the index has a copy of `digest` in some peer.
    pub(crate) fn has(&self, digest: &[u8; 32]) -> bool {
        self.state
            .lock()
            .expect("lock")
            .entries
            .contains_key(digest)
    }

    fn lookup(&self, digest: &[u8; 32]) -> Option<(PeerChunk, PathBuf)> {
        let s = self.state.lock().expect("lock");
        let e = *s.entries.get(digest)?;
        Some((e, s.peers[e.peer as usize].clone()))
    }

    fn drop_entry(&self, digest: &[u8; 32], e: PeerChunk) {
        let mut s = self.state.lock().expect("lock");
        if s.entries
            .get(digest)
            .is_some_and(|x| x.peer == e.peer && x.chunk == e.chunk)
        {
            s.entries.remove(digest);
        }
    }

    /// The bytes of a copy of `digest` (`len` raw bytes) held by a peer, verified against
    /// `digest`. Runs on a blocking thread.
    pub(crate) fn read_copy(
        &self,
        digest: &[u8; 32],
        len: usize,
    ) -> std::result::Result<PeerCopy, Miss> {
        let Some((e, dir)) = self.lookup(digest) else {
            return Err(Miss::Absent);
        };
        let stale = |why: String| {
            self.drop_entry(digest, e);
            Miss::Stale(format!(
                "copy of chunk {} in {}: {why}",
                e.chunk,
                dir.display()
            ))
        };
        if e.len as usize != len {
            return Err(stale(format!("{} bytes, expected {len}", e.len)));
        }
        match crate::bitmap::durable_bit(&dir.join("bitmap"), e.chunk) {
            Ok(true) => {}
            Ok(false) => return Err(Miss::Absent),
            Err(why) => return Err(stale(format!("bitmap: {why}"))),
        }
        let mut buf = vec![0u8; len];
        let file = match File::open(dir.join("data")) {
            Ok(f) => f,
            Err(err) => return Err(stale(format!("data: {err}"))),
        };
        if let Err(err) = file.read_exact_at(&mut buf, e.offset) {
            return Err(stale(format!("data: {err}")));
        }
        let got = blake3::hash(&buf);
        if got.as_bytes() != digest {
            return Err(stale(format!(
                "digest mismatch: expected blake3:{}, got blake3:{}",
                hex::encode(digest),
                got.to_hex()
            )));
        }
        Ok(PeerCopy {
            bytes: buf,
            file,
            offset: e.offset,
        })
    }

    /// Whether a refresh is due: at most every [`REFRESH_EVERY`], when the cache root's mtime
    /// changed since the last build or a cache seen then had no manifest yet.
    fn refresh_due(&self) -> bool {
        {
            let mut last = self.last_check.lock().expect("lock");
            if last.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
                return false;
            }
            *last = Some(Instant::now());
        }
        let mtime = std::fs::metadata(&self.root)
            .and_then(|m| m.modified())
            .ok();
        let s = self.state.lock().expect("lock");
        *self.built.borrow() && (mtime != s.root_mtime || !s.pending.is_empty())
    }

    /// Index the caches under the root not indexed yet, for the stored chunks of `m`.
    fn build(&self, m: &Manifest, shutdown: &AtomicBool) {
        let t0 = Instant::now();
        let mtime = std::fs::metadata(&self.root)
            .and_then(|m| m.modified())
            .ok();
        // The digests this image needs, with their lengths (transient: one entry per chunk).
        let mut wanted: HashMap<[u8; 32], u32> = HashMap::new();
        for c in 0..m.chunk_count() {
            if let ChunkRef::Stored(e) = m.chunk(c) {
                wanted.insert(e.digest, m.chunk_len(c));
            }
        }
        let (seen, pending_before) = {
            let s = self.state.lock().expect("lock");
            (s.seen.clone(), s.pending.clone())
        };
        let mut names: Vec<OsString> = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name())
                .filter(|n| *n != self.own && !seen.contains(n))
                .collect(),
            Err(e) => {
                tracing::warn!("host index: reading {}: {e}", self.root.display());
                Vec::new()
            }
        };
        names.sort();
        let mut pending = HashSet::new();
        let mut added = 0usize;
        for name in names {
            if shutdown.load(Ordering::Relaxed) {
                return;
            }
            let dir = self.root.join(&name);
            let peer = match read_peer(&dir, &name) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    // Not a cache (a file, another kind of directory), or one being created.
                    if dir.is_dir() && ImageId::parse(&name.to_string_lossy()).is_ok() {
                        pending.insert(name);
                    } else {
                        self.state.lock().expect("lock").seen.insert(name);
                    }
                    continue;
                }
                Err(why) => {
                    tracing::warn!("host index: skipping the cache {}: {why}", dir.display());
                    self.state.lock().expect("lock").seen.insert(name);
                    continue;
                }
            };
            let mut s = self.state.lock().expect("lock");
            let p = s.peers.len() as u32;
            let mut used = false;
            for i in 0..peer.manifest.chunk_count() {
                let ChunkRef::Stored(e) = peer.manifest.chunk(i) else {
                    continue;
                };
                let len = peer.manifest.chunk_len(i);
                if wanted.get(&e.digest) != Some(&len) {
                    continue;
                }
                let held = peer
                    .bits
                    .as_ref()
                    .is_some_and(|b| b.get(i as usize).is_some_and(|x| *x));
                let better = match s.entries.get(&e.digest) {
                    None => true,
                    Some(old) => held && !old.held,
                };
                if better {
                    s.entries.insert(
                        e.digest,
                        PeerChunk {
                            peer: p,
                            chunk: i,
                            offset: peer.manifest.chunk_offset(i),
                            len,
                            held,
                        },
                    );
                    used = true;
                }
            }
            if used {
                s.peers.push(dir);
                added += 1;
            }
            s.seen.insert(name);
        }
        let mut s = self.state.lock().expect("lock");
        // A cache still without a manifest is looked at again; one that was pending and is
        // now seen or gone is not.
        s.pending = pending;
        s.root_mtime = mtime;
        self.built.send_replace(true);
        tracing::debug!(
            "host index of {}: {added} new caches with copies ({} pending before), {} of {} digests indexed, in {:?}",
            self.own.to_string_lossy(),
            pending_before.len(),
            s.entries.len(),
            wanted.len(),
            t0.elapsed()
        );
    }
}

/// A peer cache as read for the index: its manifest, and its durable bits if readable.
struct Peer {
    manifest: Manifest,
    bits: Option<BitVec<u8, Lsb0>>,
}

/// Read the cache in `dir` (named `name`): `None` when it is not a lazyblk cache (its name is
/// no image id) or has no manifest yet; an error when its manifest is not its image's or does
/// not decode.
fn read_peer(dir: &Path, name: &std::ffi::OsStr) -> std::result::Result<Option<Peer>, String> {
    let Ok(id) = ImageId::parse(&name.to_string_lossy()) else {
        return Ok(None);
    };
    let path = dir.join("manifest");
    let bytes = match read_capped(&path, MAX_MANIFEST_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("manifest: {e}")),
    };
    if ImageId::of(&bytes) != id {
        return Err(format!("its manifest is not image {id}'s"));
    }
    let manifest = Manifest::decode(&bytes).map_err(|e| format!("manifest: {e}"))?;
    let bits = std::fs::read(dir.join("bitmap"))
        .ok()
        .and_then(|b| crate::bitmap::peek(&b).ok());
    Ok(Some(Peer { manifest, bits }))
}

fn read_capped(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut v = Vec::new();
    File::open(path)?.take(cap + 1).read_to_end(&mut v)?;
    if v.len() as u64 > cap {
        return Err(std::io::Error::other(format!("larger than {cap} bytes")));
    }
    Ok(v)
}

impl Inner {
    /// Start a build of the host index on a thread of its own (none when one runs).
    pub(crate) fn start_index_build(self: &Arc<Self>) {
        let Some(idx) = &self.host_index else {
            return;
        };
        if idx.building.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = self.clone();
        // On the store's blocking pool: a thread only while it reads.
        drop(self.handle.spawn_blocking(move || {
            let idx = inner.host_index.as_ref().expect("checked");
            idx.build(&inner.manifest, &inner.shutdown);
            idx.building.store(false, Ordering::SeqCst);
        }));
    }

    /// A lookup found nothing: index the caches added since, if any (not more than every
    /// [`REFRESH_EVERY`]).
    pub(crate) fn maybe_refresh_index(self: &Arc<Self>) {
        if self.host_index.as_ref().is_some_and(|i| i.refresh_due()) {
            self.start_index_build();
        }
    }

    /// Copy the part `(e, units)` of a run from a peer cache, if one holds it: read, verify
    /// against this manifest, write and complete like fetched bytes. Whether it was stored (the
    /// units are then complete). Runs on a blocking thread.
    pub(crate) fn copy_part(&self, e: &Entry, units: &[u64], background: bool) -> bool {
        let Some(idx) = &self.host_index else {
            return false;
        };
        let n = self.manifest.chunk_count();
        if units.iter().any(|&u| u >= n) {
            return false; // pack frames are never copied
        }
        let missing = self.missing_units(units);
        if let Some(&first) = missing.first() {
            let len = self.manifest.chunk_len(first) as usize;
            let copy = match idx.read_copy(&e.digest, len) {
                Ok(c) => c,
                Err(Miss::Absent) => return false,
                Err(Miss::Stale(why)) => {
                    self.stats.local_copy_stale.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("host index: {why}; dropped, fetching the chunk instead");
                    return false;
                }
            };
            for &c in &missing {
                let at = self.manifest.chunk_offset(c);
                if self.reflink(&copy, at) {
                    self.stats.local_reflinks.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Err(err) = self.data.write_all_at(&copy.bytes, at) {
                    // The network path writes the same file and reports the error.
                    tracing::warn!(
                        "host index: writing chunk {c} to {}: {err}",
                        self.data_path.display()
                    );
                    return false;
                }
            }
            self.stats
                .local_copies
                .fetch_add(missing.len() as u64, Ordering::Relaxed);
            self.stats
                .local_copy_bytes
                .fetch_add((len * missing.len()) as u64, Ordering::Relaxed);
        }
        if background {
            self.stats
                .background_chunks
                .fetch_add(units.len() as u64, Ordering::Relaxed);
        }
        self.complete_as(units, None, false);
        true
    }

    /// Put the verified `copy` at `at` in this cache's data file as a reflink of the peer's
    /// extents (`FICLONERANGE`: XFS, btrfs), then read it back and compare, since the peer may
    /// have evicted or rewritten the range since it was read. Whether it is there; `false`
    /// (write the bytes instead) when the file system cannot (then never tried again by this
    /// store), for a chunk that is not whole file-system blocks, or when the read-back differs.
    fn reflink(&self, copy: &PeerCopy, at: u64) -> bool {
        let len = copy.bytes.len() as u64;
        let whole_blocks = len.is_multiple_of(u64::from(crate::store::BLOCK_SIZE));
        if !self.reflinks.load(Ordering::Relaxed) || !whole_blocks {
            return false;
        }
        if let Err(err) = clone_range(&copy.file, copy.offset, len, &self.data, at) {
            if matches!(
                err.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EXDEV | libc::ENOTTY | libc::EINVAL | libc::ENOSYS)
            ) {
                tracing::debug!(
                    "host index: no reflinks into {} ({err}); copying",
                    self.data_path.display()
                );
                self.reflinks.store(false, Ordering::Relaxed);
            } else {
                tracing::warn!(
                    "host index: reflink into {}: {err}; copying",
                    self.data_path.display()
                );
            }
            return false;
        }
        let mut back = vec![0u8; copy.bytes.len()];
        match self.data.read_exact_at(&mut back, at) {
            Ok(()) if back == copy.bytes => true,
            Ok(()) => {
                tracing::warn!("host index: a reflinked chunk changed under it; copying");
                false
            }
            Err(err) => {
                tracing::warn!("host index: reading back a reflinked chunk: {err}; copying");
                false
            }
        }
    }

    /// The parts of `run` that peer caches hold are copied (each on a blocking thread); the
    /// rest come back as runs of blob-adjacent parts for the network.
    pub(crate) async fn copy_local(self: &Arc<Self>, run: Run) -> Vec<Run> {
        let Some(idx) = &self.host_index else {
            return vec![run];
        };
        if !idx.wait_first_build(FIRST_BUILD_WAIT).await {
            tracing::debug!("host index: not built after {FIRST_BUILD_WAIT:?}; fetching");
        }
        let n = self.manifest.chunk_count();
        let candidate: Vec<bool> = run
            .parts
            .iter()
            .map(|(e, units)| units.iter().all(|&u| u < n) && idx.has(&e.digest))
            .collect();
        if candidate.iter().any(|c| !c) {
            self.maybe_refresh_index();
        }
        if !candidate.iter().any(|c| *c) {
            return vec![run];
        }
        let mut jobs = Vec::new();
        for (i, (e, units)) in run.parts.iter().enumerate() {
            if candidate[i] {
                let (inner, e, units, bg) = (self.clone(), *e, units.clone(), run.background);
                jobs.push((
                    i,
                    self.handle
                        .spawn_blocking(move || inner.copy_part(&e, &units, bg)),
                ));
            }
        }
        let mut copied = vec![false; run.parts.len()];
        for (i, job) in jobs {
            copied[i] = job.await.unwrap_or(false);
        }
        let (deadline, background) = (run.deadline, run.background);
        let mut out: Vec<Run> = Vec::new();
        let mut joined = false;
        for (part, done) in run.parts.into_iter().zip(copied) {
            if done {
                joined = false;
                continue;
            }
            let len = u64::from(part.0.stored_len);
            match out.last_mut() {
                Some(r) if joined => {
                    r.len += len;
                    r.parts.push(part);
                }
                _ => out.push(Run {
                    blob_offset: part.0.blob_offset,
                    len,
                    parts: vec![part],
                    deadline,
                    background,
                }),
            }
            joined = true;
        }
        out
    }
}

impl ChunkStore {
    /// The number of other caches under the cache root the host index found copies in, once
    /// its first build (in the background, after open) has finished; `None` before, or with
    /// the index off ([`StoreOptions::host_index`]).
    pub fn host_index_peers(&self) -> Option<usize> {
        self.inner.host_index.as_ref().and_then(|i| i.peers())
    }
}

/// `FICLONERANGE`: the `len` bytes at `src_off` of `src` become the bytes at `dst_off` of
/// `dst`, sharing their extents (offsets and length in whole file-system blocks).
fn clone_range(
    src: &File,
    src_off: u64,
    len: u64,
    dst: &File,
    dst_off: u64,
) -> std::io::Result<()> {
    let arg = libc::file_clone_range {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: src_off,
        src_length: len,
        dest_offset: dst_off,
    };
    // SAFETY: `dst` is an open file for the duration of the call, and `arg` is a valid
    // `file_clone_range` the kernel only reads.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &arg) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_peer_skips_what_is_not_a_cache_of_its_own_image() {
        let root = tempfile::tempdir().unwrap();
        let other = root.path().join("not-a-cache");
        std::fs::create_dir(&other).unwrap();
        assert!(read_peer(&other, other.file_name().unwrap())
            .unwrap()
            .is_none());
        // A cache being created: an id as name, no manifest yet.
        let id = ImageId([7; 32]);
        let dir = root.path().join(id.hex());
        std::fs::create_dir(&dir).unwrap();
        assert!(read_peer(&dir, dir.file_name().unwrap()).unwrap().is_none());
        // A manifest that is not the directory's image.
        std::fs::write(dir.join("manifest"), b"garbage").unwrap();
        let err = read_peer(&dir, dir.file_name().unwrap())
            .err()
            .expect("refused");
        assert!(err.contains("not image"), "{err}");
        // The right name, bytes that do not decode.
        let dir2 = root.path().join(ImageId::of(b"garbage").hex());
        std::fs::create_dir(&dir2).unwrap();
        std::fs::write(dir2.join("manifest"), b"garbage").unwrap();
        let err = read_peer(&dir2, dir2.file_name().unwrap())
            .err()
            .expect("refused");
        assert!(err.starts_with("manifest:"), "{err}");
    }

    /// A miss waits for the first build (and no longer than the limit without one).
    #[test]
    fn a_miss_waits_for_the_first_build() {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join(ImageId([9; 32]).hex());
        let idx = Arc::new(HostIndex::new(&own));
        let m = Manifest {
            image_size: 0,
            chunk_size: 4096,
            blob_size: 0,
            blob_name: "blob".into(),
            shared: Vec::new(),
            map: Vec::new(),
            entries: Vec::new(),
            pack: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let t0 = Instant::now();
        assert!(!rt.block_on(idx.wait_first_build(Duration::from_millis(50))));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        let builder = {
            let idx = idx.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                idx.build(&m, &AtomicBool::new(false));
            })
        };
        let t0 = Instant::now();
        assert!(rt.block_on(idx.wait_first_build(Duration::from_secs(60))));
        assert!(
            t0.elapsed() >= Duration::from_millis(90),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(idx.peers(), Some(0));
        builder.join().unwrap();
        // Built: no wait at all.
        assert!(rt.block_on(idx.wait_first_build(Duration::ZERO)));
    }
}
