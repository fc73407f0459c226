//! One cache limit for the whole cache root (`--host-cache-limit`): least recently used
//! across every image's cache, a chunk that several caches hold counted once.
//!
//! Every device is its own process, so the limit is shared through the file system, like the
//! host-wide chunk index:
//! * `<root>/host-limit` holds the limit in bytes (written by `add --host-cache-limit`,
//!   `gc --host-cache-limit`); every store under that root honours it, whatever its own flags.
//! * Each store tracks when each of its chunks was last used (read, or stored), in
//!   milliseconds of a coarse clock, and, while a limit is set, publishes it every round in
//!   `<cache>/atime` (advisory: a lost or torn file only makes the order approximate; it is
//!   never trusted for anything but the order).
//! * One store at a time (the one holding `<root>/host-limit.lock`) runs a *pass* at most every
//!   round: it sums the bytes the caches hold by their durable bits, a digest held by several
//!   caches once, at its most recent use; over the limit, it picks the least recently used
//!   digests to drop until the root is at 90% of it and publishes them as a *cutoff*
//!   (`<root>/host-evict`: a generation, the most recent use among them, and the digests).
//!   Caches no store holds are evicted by the pass itself (durable bits cleared and fsynced,
//!   then the bytes punched); every running store evicts its own chunks of those digests, by
//!   the same path as `--cache-limit` (memory bit, durable bit, punch after the grace period),
//!   unless it used them after the cutoff's time (its atimes are up to a round newer than
//!   the ones the pass read).
//! * A digest is dropped only when it is cold in *every* cache that holds it (its age is its
//!   most recent use anywhere), and then from all of them: a chunk counted once is kept or
//!   dropped once. A digest not picked is dropped from no cache.
//! * Never touched: a hydrating store's chunks (`--hydrate`: it wants the whole image, e.g. for
//!   a hand-over), caches a loop device serves (handed over to the kernel), caches the caller
//!   keeps (`gc`'s hand-over records), the metadata pack's blocks. They count, and are
//!   never picked.
//!
//! Digests are compared by their first 8 bytes: this is accounting, never data (a collision
//! would count two chunks as one; every byte read is still verified against its own digest).

use crate::prelude::*;

/// The limit file in the cache root.
pub const LIMIT_FILE: &str = "host-limit";
/// The cutoff of the last pass, in the cache root.
pub const CUTOFF_FILE: &str = "host-evict";
/// Held by the store running a pass.
pub const LOCK_FILE: &str = "host-limit.lock";
/// Last use of each chunk, in each cache directory.
pub const ATIME_FILE: &str = "atime";

const ATIME_MAGIC: &[u8; 8] = b"LZBLKATM";
const ATIME_HEADER: usize = 24;
const ATIME_PINNED: u32 = 1;
const CUTOFF_MAGIC: &[u8; 8] = b"LZBLKCUT";
const CUTOFF_HEADER: usize = 32;

/// The host cache limit set for `root`, if any.
pub fn host_limit(root: &Path) -> Result<Option<u64>> {
    let p = root.join(LIMIT_FILE);
    match std::fs::read_to_string(&p) {
        Ok(s) => s.trim().parse::<u64>().map(Some).map_err(|_| Error::Cache {
            path: p,
            detail: format!("not a byte count: {:?}", s.trim()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&p, e)),
    }
}

/// Set (or, with `None`, remove) the host cache limit of `root`.
pub fn set_host_limit(root: &Path, limit: Option<u64>) -> Result<()> {
    let p = root.join(LIMIT_FILE);
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    match limit {
        Some(l) => write_atomic(&p, format!("{l}\n").as_bytes()),
        None => match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&p, e)),
            _ => Ok(()),
        },
    }
}

/// The chunks a pass drops: those of the digests it picked, unless used after `atime_ms`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cutoff {
    /// Increases with every pass that publishes a cutoff.
    pub generation: u64,
    /// The most recent use (milliseconds since the Unix epoch) among the digests picked.
    pub atime_ms: u64,
    /// The digests picked (first 8 bytes, little endian), sorted.
    pub ties: Vec<u64>,
}

impl Cutoff {
    /// Whether a chunk with digest tie-break `tie` last used at `atime_ms` is dropped.
    pub fn covers(&self, atime_ms: u64, tie: u64) -> bool {
        atime_ms <= self.atime_ms && self.ties.binary_search(&tie).is_ok()
    }

    /// The file form (see [`CUTOFF_FILE`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(CUTOFF_HEADER + 8 * self.ties.len());
        b.extend_from_slice(CUTOFF_MAGIC);
        for v in [self.generation, self.atime_ms, self.ties.len() as u64] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for t in &self.ties {
            b.extend_from_slice(&t.to_le_bytes());
        }
        b
    }

    /// Decode the file form; `header_only` leaves `ties` empty (a store reads the whole file
    /// only when the generation is new).
    pub fn decode(b: &[u8], header_only: bool) -> std::result::Result<Cutoff, String> {
        if b.len() < CUTOFF_HEADER || &b[..8] != CUTOFF_MAGIC {
            return Err("not a cutoff file".into());
        }
        let word = |i: usize| u64::from_le_bytes(b[8 + 8 * i..16 + 8 * i].try_into().expect("8"));
        let mut c = Cutoff {
            generation: word(0),
            atime_ms: word(1),
            ties: Vec::new(),
        };
        if header_only {
            return Ok(c);
        }
        let n = word(2);
        if (b.len() - CUTOFF_HEADER) as u64 != n.saturating_mul(8) {
            return Err(format!("is {} bytes for {n} digests", b.len()));
        }
        c.ties = b[CUTOFF_HEADER..]
            .chunks_exact(8)
            .map(|x| u64::from_le_bytes(x.try_into().expect("8")))
            .collect();
        if c.ties.windows(2).any(|w| w[0] >= w[1]) {
            return Err("digests not sorted".into());
        }
        Ok(c)
    }
}

/// The cutoff published last under `root`: none (generation 0) without a readable file; with
/// `header_only`, without its digests.
pub fn last_cutoff(root: &Path, header_only: bool) -> Cutoff {
    let p = root.join(CUTOFF_FILE);
    let bytes = if header_only {
        File::open(&p).ok().and_then(|f| {
            let mut h = [0u8; CUTOFF_HEADER];
            f.read_exact_at(&mut h, 0).ok().map(|_| h.to_vec())
        })
    } else {
        std::fs::read(&p).ok()
    };
    match bytes.map(|b| Cutoff::decode(&b, header_only)) {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            tracing::warn!("{}: {e}", p.display());
            Cutoff::default()
        }
        None => Cutoff::default(),
    }
}

/// What the caches under a root hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostUsage {
    /// Cache directories read.
    pub caches: usize,
    /// Bytes of stored chunks every cache holds (durable bit), summed over caches.
    pub held_bytes: u64,
    /// The same with each digest counted once: what the limit bounds.
    pub unique_bytes: u64,
    /// Of `unique_bytes`, what no pass may drop (hydrating stores, handed-over caches).
    pub pinned_bytes: u64,
}

/// What [`enforce`] did.
#[derive(Clone, Debug, Default)]
pub struct HostPass {
    /// The root before the pass.
    pub usage: HostUsage,
    /// The cutoff published, if the root was over the limit.
    pub cutoff: Option<Cutoff>,
    /// Chunks (and their bytes) dropped from caches no store holds.
    pub idle_chunks: u64,
    /// Bytes of those chunks.
    pub idle_bytes: u64,
    /// Digests the cutoff drops from the root (counted once), and their bytes.
    pub dropped_unique_bytes: u64,
}

/// The digest tie-break of a stored chunk.
pub(crate) fn tie(digest: &[u8; 32]) -> u64 {
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Milliseconds since the Unix epoch of the coarse realtime clock (a vDSO read, no syscall:
/// the read path asks it once per located range).
pub(crate) fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into memory we own.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if r != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Encode an atime file (the inverse of [`decode_atime`]).
pub fn encode_atime(times: impl ExactSizeIterator<Item = u64>, pinned: bool) -> Vec<u8> {
    let n = times.len();
    let mut b = Vec::with_capacity(ATIME_HEADER + 8 * n);
    b.extend_from_slice(ATIME_MAGIC);
    b.extend_from_slice(&u32::from(pinned).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(n as u64).to_le_bytes());
    for t in times {
        b.extend_from_slice(&t.to_le_bytes());
    }
    b
}

/// Decode an atime file of a cache of `chunks` chunks: the times and the pinned flag.
pub fn decode_atime(b: &[u8], chunks: u64) -> std::result::Result<(Vec<u64>, bool), String> {
    if b.len() < ATIME_HEADER || &b[..8] != ATIME_MAGIC {
        return Err("not an atime file".into());
    }
    let flags = u32::from_le_bytes(b[8..12].try_into().expect("4"));
    let n = u64::from_le_bytes(b[16..24].try_into().expect("8"));
    if n != chunks {
        return Err(format!("has {n} chunks, the image has {chunks}"));
    }
    if (b.len() - ATIME_HEADER) as u64 != 8 * n {
        return Err(format!("is {} bytes for {n} chunks", b.len()));
    }
    let times = b[ATIME_HEADER..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
        .collect();
    Ok((times, flags & ATIME_PINNED != 0))
}

/// The last-use times of the cache in `dir` (`chunks` chunks): its atime file, or, without a
/// readable one, the bitmap's mtime for every chunk. And whether the store marked it pinned.
pub(crate) fn read_atimes(dir: &Path, chunks: u64) -> (Vec<u64>, bool) {
    if let Ok(b) = std::fs::read(dir.join(ATIME_FILE)) {
        match decode_atime(&b, chunks) {
            Ok(t) => return t,
            Err(e) => tracing::debug!("{}: {e}", dir.join(ATIME_FILE).display()),
        }
    }
    let t = std::fs::metadata(dir.join("bitmap"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    (vec![t; chunks as usize], false)
}

/// One cache as a pass sees it.
struct Scanned {
    dir: PathBuf,
    /// (tie, last use, raw length) of each stored chunk its durable bits hold; last use
    /// `u64::MAX` when it may not be dropped.
    held: Vec<(u64, u64, u32)>,
    /// Whether no store holds it and the pass may evict it itself.
    idle: bool,
}

/// Read every cache under `root` (`keep`: images never dropped).
fn scan(root: &Path, keep: &[ImageId]) -> Vec<Scanned> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Ok(id) = ImageId::parse(&name) else {
            continue;
        };
        let dir = e.path();
        let Some((chunks, held)) = crate::gc::held_chunks(&dir) else {
            continue;
        };
        let (times, pinned) = read_atimes(&dir, chunks);
        let in_use = lock_dir(&dir).is_err();
        let protected = keep.contains(&id)
            || !lazyblk_blocksource::fsutil::loop_devices_serving(&dir.join("data")).is_empty();
        let fixed = protected || (pinned && in_use);
        let held = held
            .into_iter()
            .map(|(i, d, len)| {
                let t = if fixed { u64::MAX } else { times[i as usize] };
                (tie(&d), t, len)
            })
            .collect();
        out.push(Scanned {
            dir,
            held,
            idle: !in_use && !protected,
        });
    }
    out.sort_by(|a, b| a.dir.cmp(&b.dir));
    out
}

/// The bytes the caches under `root` occupy on disk.
fn allocated_bytes(root: &Path) -> u64 {
    std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter(|e| ImageId::parse(&e.file_name().to_string_lossy()).is_ok())
                .map(|e| crate::gc::disk_usage(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

/// Each digest once: (tie, most recent use, length), sorted by tie.
fn unique(caches: &[Scanned]) -> Vec<(u64, u64, u32)> {
    let mut all: Vec<(u64, u64, u32)> =
        caches.iter().flat_map(|c| c.held.iter().copied()).collect();
    all.sort_unstable_by_key(|&(t, a, _)| (t, std::cmp::Reverse(a)));
    all.dedup_by_key(|&mut (t, _, _)| t);
    all
}

fn usage_of(caches: &[Scanned], uniq: &[(u64, u64, u32)]) -> HostUsage {
    HostUsage {
        caches: caches.len(),
        held_bytes: caches
            .iter()
            .flat_map(|c| &c.held)
            .map(|&(_, _, l)| u64::from(l))
            .sum(),
        unique_bytes: uniq.iter().map(|&(_, _, l)| u64::from(l)).sum(),
        pinned_bytes: uniq
            .iter()
            .filter(|&&(_, a, _)| a == u64::MAX)
            .map(|&(_, _, l)| u64::from(l))
            .sum(),
    }
}

/// What the caches under `root` hold (`keep`: as [`enforce`]).
pub fn host_usage(root: &Path, keep: &[ImageId]) -> HostUsage {
    let caches = scan(root, keep);
    usage_of(&caches, &unique(&caches))
}

/// Run a pass over `root` with the limit `limit` (see the module doc): over it, publish the
/// cutoff that brings the root to 90% of the limit and evict the idle caches by it. Images in
/// `keep`, caches a loop device serves and hydrating stores are never dropped.
/// Passes run one at a time: this waits (at most 30 s) for the one under way, if any.
pub fn enforce(root: &Path, limit: u64, keep: &[ImageId]) -> Result<HostPass> {
    let p = root.join(LOCK_FILE);
    let t0 = Instant::now();
    let _lock = loop {
        match lazyblk_blocksource::fsutil::lock_exclusive(&p).map_err(|e| Error::io(&p, e))? {
            Some(f) => break f,
            None if t0.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            None => {
                return Err(Error::Cache {
                    path: p,
                    detail: "another host-limit pass has held it for 30 s".into(),
                })
            }
        }
    };
    enforce_locked(root, limit, keep)
}

/// [`enforce`], by a caller that holds [`LOCK_FILE`].
fn enforce_locked(root: &Path, limit: u64, keep: &[ImageId]) -> Result<HostPass> {
    let caches = scan(root, keep);
    let uniq = unique(&caches);
    let usage = usage_of(&caches, &uniq);
    let mut pass = HostPass {
        usage,
        ..HostPass::default()
    };
    if pass.usage.unique_bytes <= limit {
        return Ok(pass);
    }
    let target = limit - limit / 10;
    let mut order = uniq;
    order.sort_unstable_by_key(|&(t, a, _)| (a, t));
    let mut left = pass.usage.unique_bytes;
    let mut ties = Vec::new();
    let mut atime_ms = 0;
    for &(t, a, l) in &order {
        if left <= target || a == u64::MAX {
            break;
        }
        left -= u64::from(l);
        pass.dropped_unique_bytes += u64::from(l);
        ties.push(t);
        atime_ms = a;
    }
    if ties.is_empty() {
        return Ok(pass);
    }
    ties.sort_unstable();
    let cutoff = Cutoff {
        generation: last_cutoff(root, true).generation + 1,
        atime_ms,
        ties,
    };
    write_atomic(&root.join(CUTOFF_FILE), &cutoff.encode())?;
    tracing::info!(
        "host cache limit {limit}: {} bytes held ({} counted once); dropping {} bytes last used at or before {atime_ms} ms",
        pass.usage.held_bytes,
        pass.usage.unique_bytes,
        pass.dropped_unique_bytes
    );
    for c in caches.iter().filter(|c| c.idle) {
        match evict_idle(&c.dir, &cutoff) {
            Ok((chunks, bytes)) => {
                pass.idle_chunks += chunks;
                pass.idle_bytes += bytes;
            }
            Err(e) => tracing::warn!("host cache limit: {}: {e}", c.dir.display()),
        }
    }
    pass.cutoff = Some(cutoff);
    Ok(pass)
}

/// Drop the chunks `cutoff` covers from the cache in `dir`, which no store may hold (its lock
/// is taken, or nothing is done): clear their durable bits (fsynced), then punch their bytes.
/// A bitmap that was clean is marked clean again; one that was not stays dirty (its next open
/// re-verifies, as it would have).
fn evict_idle(dir: &Path, cutoff: &Cutoff) -> Result<(u64, u64)> {
    let Ok(_lock) = lock_dir(dir) else {
        return Ok((0, 0)); // opened meanwhile: its store applies the cutoff
    };
    if !lazyblk_blocksource::fsutil::loop_devices_serving(&dir.join("data")).is_empty() {
        return Ok((0, 0));
    }
    let mp = dir.join("manifest");
    let mb = std::fs::read(&mp).map_err(|e| Error::io(&mp, e))?;
    let id = ImageId::of(&mb);
    let m = Manifest::decode(&mb).map_err(|e| Error::Cache {
        path: mp.clone(),
        detail: e.to_string(),
    })?;
    let layout = CacheLayout::of(dir, id, &m);
    let used = &layout.manifest;
    // Before the bitmap is opened, which changes its mtime (the fallback of a missing atime
    // file).
    let (times, _) = read_atimes(dir, used.chunk_count());
    let (mut bitmap, trust) =
        BitmapFile::open(&dir.join("bitmap"), layout.bitmap_id, used.unit_count())?;
    let mut clear = Vec::new();
    let mut bytes = 0u64;
    for c in 0..used.chunk_count() {
        if !bitmap.bits()[c as usize] {
            continue;
        }
        if let ChunkRef::Stored(e) = used.chunk(c) {
            if cutoff.covers(times[c as usize], tie(&e.digest)) {
                clear.push(c);
                bytes += u64::from(used.chunk_len(c));
            }
        }
    }
    bitmap.update(&[], &clear)?;
    let dp = dir.join("data");
    let data = File::options()
        .write(true)
        .open(&dp)
        .map_err(|e| Error::io(&dp, e))?;
    for &c in &clear {
        for (off, len) in punchable(used, c) {
            lazyblk_blocksource::fsutil::punch_hole(&data, off, len)
                .map_err(|e| Error::io(&dp, e))?;
        }
    }
    if trust == Trust::Clean {
        data.sync_data().map_err(|e| Error::io(&dp, e))?;
        bitmap.close_clean()?;
    }
    Ok((clear.len() as u64, bytes))
}

/// What a running store keeps between its rounds.
#[derive(Default)]
pub(crate) struct Round {
    /// The generation of the last cutoff applied.
    applied: u64,
    /// Whether the atime file was written since open.
    published: bool,
}

impl Inner {
    /// The cache root (the parent of the cache directory).
    pub(crate) fn cache_root(&self) -> &Path {
        self.dir.parent().unwrap_or(Path::new("."))
    }

    /// Take part in the host limit: a task on the store's runtime wakes every
    /// `host_limit_period`, looks whether the root has a limit (one `stat`-sized read), and
    /// only then runs a round on the blocking pool. No thread of its own.
    pub(crate) fn start_host_rounds(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let period = self.opts.host_limit_period;
        self.handle.spawn(async move {
            let mut round = Round::default();
            loop {
                tokio::time::sleep(period).await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.shutdown.load(Ordering::Relaxed) {
                    return;
                }
                let limit = match host_limit(inner.cache_root()) {
                    Ok(Some(l)) => l,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!("host cache limit: {e}");
                        continue;
                    }
                };
                let r = tokio::task::spawn_blocking(move || {
                    inner.host_round(limit, &mut round);
                    round
                })
                .await;
                match r {
                    Ok(r) => round = r,
                    Err(_) => return,
                }
            }
        });
    }

    /// Record a use of chunk `c` now (`now`: [`now_ms`]), at most every quarter second.
    pub(crate) fn touch(&self, c: u64, now: u64) {
        if let Some(a) = self.atime.get(c as usize) {
            if a.load(Ordering::Relaxed) + 250 < now {
                a.store(now, Ordering::Relaxed);
                self.atime_dirty.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Whether the host limit may drop this store's chunks (not while it hydrates: it wants
    /// the whole image).
    fn pinned(&self) -> bool {
        self.opts.hydrate
    }

    /// Write the atime file when uses were recorded since the last time (or never yet).
    pub(crate) fn publish_atimes(&self, force: bool) {
        if !self.atime_dirty.swap(false, Ordering::Relaxed) && !force {
            return;
        }
        let b = encode_atime(
            self.atime.iter().map(|a| a.load(Ordering::Relaxed)),
            self.pinned(),
        );
        let p = self.dir.join(ATIME_FILE);
        let tmp = p.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, &b).and_then(|_| std::fs::rename(&tmp, &p)) {
            tracing::warn!("{}: {e}", p.display());
        }
    }

    /// One round of the host limit (on a blocking thread, while `limit` is set): publish the
    /// atimes, run a pass when no other store is running one and none ran within `period`,
    /// apply a new cutoff, punch what is due.
    pub(crate) fn host_round(&self, limit: u64, r: &mut Round) {
        self.publish_atimes(!r.published);
        r.published = true;
        let root = self.cache_root();
        let lock = root.join(LOCK_FILE);
        if let Ok(Some(f)) = lazyblk_blocksource::fsutil::lock_exclusive(&lock) {
            let recent = f
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|e| e < self.opts.host_limit_period * 4 / 5);
            // Cheap first: what the data files occupy (a reflinked extent counts in each) is
            // at least what the caches hold counted once; under the limit, nothing to read.
            if !recent && allocated_bytes(root) > limit {
                if let Err(e) = enforce_locked(root, limit, &[]) {
                    tracing::warn!("host cache limit: {e}");
                }
                let _ = f.set_modified(std::time::SystemTime::now());
            }
        }
        if last_cutoff(root, true).generation > r.applied {
            let cutoff = last_cutoff(root, false);
            r.applied = cutoff.generation;
            if !self.pinned() {
                self.evict_covered(&cutoff);
            }
        }
        self.punch_due();
    }

    /// Evict the present chunks `cutoff` covers by their last use in this store.
    fn evict_covered(&self, cutoff: &Cutoff) {
        let mut bm = self.bitmap.lock().expect("lock");
        if self.sealed.load(Ordering::SeqCst) {
            return;
        }
        let m = &self.manifest;
        let chosen: Vec<u64> = (0..m.chunk_count())
            .filter(|&c| self.present.get(c))
            .filter(|&c| match m.chunk(c) {
                ChunkRef::Stored(e) => cutoff.covers(
                    self.atime[c as usize].load(Ordering::Relaxed),
                    tie(&e.digest),
                ),
                ChunkRef::Zero => false,
            })
            .collect();
        let n = self.evict(&mut bm, chosen);
        self.stats.host_evicted.fetch_add(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoff_covers_its_digests_used_no_later_and_roundtrips() {
        let c = Cutoff {
            generation: 3,
            atime_ms: 100,
            ties: vec![2, 5, 9],
        };
        assert!(c.covers(99, 5) && c.covers(100, 2));
        assert!(!c.covers(101, 5), "used after the pass read it");
        assert!(!c.covers(1, 6), "not picked");
        let b = c.encode();
        assert_eq!(Cutoff::decode(&b, false).unwrap(), c);
        let h = Cutoff::decode(&b[..CUTOFF_HEADER], true).unwrap();
        assert_eq!((h.generation, h.atime_ms, h.ties.len()), (3, 100, 0));
        assert!(Cutoff::decode(&b[..b.len() - 8], false).is_err());
        assert!(Cutoff::decode(b"LZBLKCUT", true).is_err());
        let mut unsorted = c.clone();
        unsorted.ties = vec![5, 2];
        assert!(Cutoff::decode(&unsorted.encode(), false).is_err());
        let d = tempfile::tempdir().unwrap();
        assert_eq!(last_cutoff(d.path(), true), Cutoff::default());
        std::fs::write(d.path().join(CUTOFF_FILE), &b).unwrap();
        assert_eq!(last_cutoff(d.path(), false), c);
        assert_eq!(last_cutoff(d.path(), true).generation, 3);
    }

    #[test]
    fn atime_file_roundtrip_and_rejects() {
        let b = encode_atime([1u64, 2, 3].into_iter(), true);
        assert_eq!(decode_atime(&b, 3).unwrap(), (vec![1, 2, 3], true));
        assert!(decode_atime(&b, 4).unwrap_err().contains("3 chunks"));
        assert!(decode_atime(&b[..b.len() - 1], 3).is_err());
        assert!(decode_atime(b"garbage", 3).is_err());
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(decode_atime(&bad, 3).is_err());
    }

    #[test]
    fn limit_file_roundtrip_and_errors() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(host_limit(d.path()).unwrap(), None);
        set_host_limit(d.path(), Some(123)).unwrap();
        assert_eq!(host_limit(d.path()).unwrap(), Some(123));
        set_host_limit(d.path(), None).unwrap();
        assert_eq!(host_limit(d.path()).unwrap(), None);
        set_host_limit(d.path(), None).unwrap();
        std::fs::write(d.path().join(LIMIT_FILE), "lots").unwrap();
        let e = host_limit(d.path()).unwrap_err().to_string();
        assert!(e.contains(LIMIT_FILE) && e.contains("lots"), "{e}");
    }

    #[test]
    fn unique_counts_a_digest_once_at_its_latest_use() {
        let caches = vec![
            Scanned {
                dir: "a".into(),
                held: vec![(1, 10, 100), (2, 20, 100)],
                idle: true,
            },
            Scanned {
                dir: "b".into(),
                held: vec![(2, 30, 100), (3, 5, 50)],
                idle: false,
            },
        ];
        let u = unique(&caches);
        assert_eq!(u, vec![(1, 10, 100), (2, 30, 100), (3, 5, 50)]);
        let usage = usage_of(&caches, &u);
        assert_eq!(usage.held_bytes, 350);
        assert_eq!(usage.unique_bytes, 250);
    }
}
