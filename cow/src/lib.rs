//! A persistent, crash-consistent, block-granular copy-on-write layer over any [`BlockSource`].
//!
//! [`Cow`] wraps a (typically read-only, lazily fetched) base source and is itself a writable
//! [`BlockSource`], so every frontend (ublk, vhost-user-blk) gets writable disks for free. The
//! base is never written. It depends on `lazyblk-blocksource` only: it knows nothing of where
//! the base's blocks come from. (One file of ~800 lines, its tests in `tests.rs`: the layer's
//! write ordering is one argument, easier to check in one place.)
//!
//! A layer is a directory with three files:
//!
//! * `data`: a sparse file of the device size; block `b` (4 KiB) lives at `b * 4096`;
//! * `bitmap`: a 4 KiB header (geometry and the base's identity, written once at creation) and
//!   one presence bit per block; a set bit means "this block's content is in `data`" (written,
//!   discarded or zeroed by the guest, or copied up from the base);
//! * `lock`: `flock`ed while a process has the layer open.
//!
//! # Crash consistency
//!
//! The invariant is the chunk cache's: **an on-disk presence bit is only ever set for a block
//! whose data was durable in `data` before the bit was written.** A write goes `pwrite(data)`,
//! then the in-memory bit (reads now see it), then the request is acknowledged. A flush (the
//! guest's FLUSH, an fsync in the guest) takes the set of bitmap words changed since the last
//! flush and a snapshot of their values, `fdatasync`s `data` (`fsync` after hole punches), then
//! writes those words in place and `fdatasync`s `bitmap`. Every bit in the snapshot belongs to a
//! block whose `pwrite` finished before the bit was set, hence before the data sync.
//!
//! Bits only ever go from 0 to 1 (a discarded block stays present, as a hole that reads as
//! zeros), so a torn bitmap write is harmless: every bit in either version covers durable data.
//! After a crash the layer shows, for every block, either what it held at the last completed
//! flush or something written after it, which is what a disk with a volatile write cache
//! promises; nothing acknowledged before a completed flush is lost.
//!
//! # Reads
//!
//! [`BlockSource::locate`] answers from the layer when every block of the range is present in
//! it, from the base when none is, and `None` for a mixed range. [`BlockSource::fetch`] of a
//! mixed range copies the range's base blocks up into the layer (on a worker thread, after the
//! base has fetched them), so the range becomes locatable in one file; copied-up blocks are
//! persisted like writes (losing them in a crash only means reading the base again).

mod header;

pub use header::Header;
use header::HEADER_LEN;
use lazyblk_blocksource::{check_range, BlockError, BlockSource, Completion, Geometry, Located};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};

/// COW granularity.
pub const BLOCK_SIZE: u32 = 4096;
const BS: u64 = BLOCK_SIZE as u64;

/// Errors opening a COW layer.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What happened.
        source: std::io::Error,
    },
    /// The layer belongs to another image or has another geometry. Never silently discarded:
    /// it holds the guest's writes.
    #[error("COW layer {path} does not fit this image: {detail}")]
    Mismatch {
        /// The layer directory.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The layer's files are damaged.
    #[error("COW layer {path} is damaged: {detail}")]
    Corrupt {
        /// The layer directory.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// Another process has the layer open.
    #[error("COW layer {0} is in use by another process")]
    Locked(PathBuf),
}

fn io_err(path: &Path, source: std::io::Error) -> CowError {
    CowError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Counters of a layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CowStats {
    /// Blocks present in the layer (written, discarded, zeroed or copied up).
    pub present_blocks: u64,
    /// Blocks of the device.
    pub total_blocks: u64,
    /// Bytes written by the frontend since open.
    pub bytes_written: u64,
    /// Write requests since open.
    pub writes: u64,
    /// Discard / write-zeroes requests since open.
    pub discards: u64,
    /// Flushes since open.
    pub flushes: u64,
    /// Blocks copied up from the base to make mixed ranges readable from one file.
    pub copied_up_blocks: u64,
}

#[derive(Default)]
struct Counters {
    bytes_written: AtomicU64,
    writes: AtomicU64,
    discards: AtomicU64,
    flushes: AtomicU64,
    copied_up: AtomicU64,
}

/// Where blocks of a range are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Coverage {
    All,
    None,
    Mixed,
}

type Job = (u64, u64, Completion);

struct Inner {
    base: Arc<dyn BlockSource>,
    dir: PathBuf,
    size: u64,
    blocks: u64,
    data: File,
    bitmap: File,
    bits: Vec<AtomicU64>,
    /// Bitmap words changed in memory since the last flush took them.
    dirty_words: Mutex<BTreeSet<usize>>,
    /// A data write happened since the last flush started.
    data_dirty: AtomicBool,
    /// A hole was punched since the last flush started (needs `fsync`, not `fdatasync`).
    punched: AtomicBool,
    /// Full-block writes and discards share it; read-modify-writes and copy-ups hold it alone.
    rw: RwLock<()>,
    /// Set (under `rw`) when the layer is closed: late copy-ups must not write any more.
    closed: AtomicBool,
    /// One flush at a time.
    flush_lock: Mutex<()>,
    counters: Counters,
    #[cfg(test)]
    log: Mutex<Option<Vec<tests::Ev>>>,
}

/// A copy-on-write layer over a base [`BlockSource`]; see the crate documentation.
pub struct Cow {
    inner: Arc<Inner>,
    jobs: Option<mpsc::Sender<Job>>,
    flush_on_drop: bool,
    _lock: File,
}

fn lock_dir(dir: &Path) -> Result<File, CowError> {
    let p = dir.join("lock");
    lazyblk_blocksource::fsutil::lock_exclusive(&p)
        .map_err(|e| io_err(&p, e))?
        .ok_or_else(|| CowError::Locked(dir.to_path_buf()))
}

fn sync_dir(dir: &Path) -> Result<(), CowError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

impl Cow {
    /// Open the layer in `dir` over `base`, creating it when `dir` has none. `identity` names
    /// the base image (e.g. its `sha256:...`); a layer made for another identity or size is
    /// refused, never discarded.
    pub fn open(dir: &Path, base: Arc<dyn BlockSource>, identity: &str) -> Result<Cow, CowError> {
        let geo = base.geometry();
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let lock = lock_dir(dir)?;
        let want = Header {
            block_size: BLOCK_SIZE,
            size: geo.size,
            blocks: geo.size.div_ceil(BS),
            identity: identity.to_string(),
        };
        let data_path = dir.join("data");
        let bitmap_path = dir.join("bitmap");
        if !bitmap_path.exists() {
            // New layer (or a creation that crashed before the bitmap existed: nothing in
            // `data` was ever committed). Data file first, then the bitmap appears atomically.
            let data = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&data_path)
                .map_err(|e| io_err(&data_path, e))?;
            data.set_len(0)
                .and_then(|_| data.set_len(want.blocks * BS))
                .and_then(|_| data.sync_all())
                .map_err(|e| io_err(&data_path, e))?;
            let tmp = dir.join("bitmap.tmp");
            let f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
            f.write_all_at(&want.encode(), 0)
                .and_then(|_| f.set_len(want.file_len()))
                .and_then(|_| f.sync_all())
                .map_err(|e| io_err(&tmp, e))?;
            std::fs::rename(&tmp, &bitmap_path).map_err(|e| io_err(&bitmap_path, e))?;
            sync_dir(dir)?;
        }
        let bitmap = File::options()
            .read(true)
            .write(true)
            .open(&bitmap_path)
            .map_err(|e| io_err(&bitmap_path, e))?;
        let mut hb = vec![0u8; HEADER_LEN as usize];
        bitmap
            .read_exact_at(&mut hb, 0)
            .map_err(|e| io_err(&bitmap_path, e))?;
        let have = Header::decode(&hb).map_err(|detail| CowError::Corrupt {
            path: dir.to_path_buf(),
            detail,
        })?;
        if have.identity != want.identity {
            return Err(CowError::Mismatch {
                path: dir.to_path_buf(),
                detail: format!(
                    "it was made for image {}, this is {}",
                    have.identity, want.identity
                ),
            });
        }
        if have != want {
            return Err(CowError::Mismatch {
                path: dir.to_path_buf(),
                detail: format!(
                    "it is {} bytes in {}-byte blocks, the image is {} bytes",
                    have.size, have.block_size, want.size
                ),
            });
        }
        let blen = bitmap
            .metadata()
            .map_err(|e| io_err(&bitmap_path, e))?
            .len();
        if blen != want.file_len() {
            return Err(CowError::Corrupt {
                path: dir.to_path_buf(),
                detail: format!("bitmap is {blen} bytes, expected {}", want.file_len()),
            });
        }
        let data = File::options()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(|e| io_err(&data_path, e))?;
        let dlen = data.metadata().map_err(|e| io_err(&data_path, e))?.len();
        if dlen != want.blocks * BS {
            return Err(CowError::Corrupt {
                path: dir.to_path_buf(),
                detail: format!("data is {dlen} bytes, expected {}", want.blocks * BS),
            });
        }
        let mut raw = vec![0u8; want.words() * 8];
        bitmap
            .read_exact_at(&mut raw, HEADER_LEN)
            .map_err(|e| io_err(&bitmap_path, e))?;
        let mut bits: Vec<AtomicU64> = raw
            .chunks_exact(8)
            .map(|w| AtomicU64::new(u64::from_le_bytes(w.try_into().expect("8 bytes"))))
            .collect();
        if !want.blocks.is_multiple_of(64) {
            if let Some(last) = bits.last_mut() {
                *last.get_mut() &= (1u64 << (want.blocks % 64)) - 1;
            }
        }
        let inner = Arc::new(Inner {
            base,
            dir: dir.to_path_buf(),
            size: geo.size,
            blocks: want.blocks,
            data,
            bitmap,
            bits,
            dirty_words: Mutex::new(BTreeSet::new()),
            data_dirty: AtomicBool::new(false),
            punched: AtomicBool::new(false),
            rw: RwLock::new(()),
            closed: AtomicBool::new(false),
            flush_lock: Mutex::new(()),
            counters: Counters::default(),
            #[cfg(test)]
            log: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..2 {
            let (inner, rx) = (inner.clone(), rx.clone());
            // Detached: a copy-up may wait for the base (an outage) long after the layer is
            // closed; it then finds `closed` set and writes nothing.
            std::thread::Builder::new()
                .name(format!("lazyblk-cow-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().expect("lock").recv();
                    match job {
                        Ok((off, len, done)) => done(inner.copy_up(off, len)),
                        Err(_) => return,
                    }
                })
                .map_err(|e| io_err(dir, e))?;
        }
        Ok(Cow {
            inner,
            jobs: Some(tx),
            flush_on_drop: true,
            _lock: lock,
        })
    }

    /// The layer directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The base source.
    pub fn base(&self) -> &Arc<dyn BlockSource> {
        &self.inner.base
    }

    /// Counters.
    pub fn stats(&self) -> CowStats {
        let c = &self.inner.counters;
        CowStats {
            present_blocks: self
                .inner
                .bits
                .iter()
                .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
                .sum(),
            total_blocks: self.inner.blocks,
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            discards: c.discards.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            copied_up_blocks: c.copied_up.load(Ordering::Relaxed),
        }
    }

    /// Whether block `b` is in the layer.
    pub fn block_present(&self, b: u64) -> bool {
        self.inner.present(b)
    }

    /// Close without flushing, as a crash would (for tests): whatever was not flushed may or may
    /// not be there when the layer is reopened.
    #[doc(hidden)]
    pub fn close_without_flush(mut self) {
        self.flush_on_drop = false;
    }
}

impl Drop for Cow {
    fn drop(&mut self) {
        self.jobs.take();
        {
            let _excl = self.inner.rw.write().expect("lock");
            self.inner.closed.store(true, Ordering::Release);
        }
        if self.flush_on_drop {
            if let Err(e) = self.inner.flush() {
                tracing::error!("COW layer {}: final flush: {e}", self.inner.dir.display());
            }
        }
    }
}

impl Inner {
    fn present(&self, b: u64) -> bool {
        self.bits[(b / 64) as usize].load(Ordering::Acquire) & (1 << (b % 64)) != 0
    }

    /// Masks of the words covering blocks `first..=last`: (word index, mask).
    fn word_masks(first: u64, last: u64) -> impl Iterator<Item = (usize, u64)> {
        let (fw, lw) = (first / 64, last / 64);
        (fw..=lw).map(move |w| {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            (w as usize, mask)
        })
    }

    fn coverage(&self, first: u64, last: u64) -> Coverage {
        let (mut any, mut all) = (false, true);
        for (w, mask) in Self::word_masks(first, last) {
            let v = self.bits[w].load(Ordering::Acquire) & mask;
            any |= v != 0;
            all &= v == mask;
            if any && !all {
                return Coverage::Mixed;
            }
        }
        if all {
            Coverage::All
        } else {
            Coverage::None
        }
    }

    /// Set the bits of `first..=last` (their data is in `data` already) and remember the words.
    fn mark(&self, first: u64, last: u64) {
        let mut changed = Vec::new();
        for (w, mask) in Self::word_masks(first, last) {
            let old = self.bits[w].fetch_or(mask, Ordering::AcqRel);
            if old & mask != mask {
                changed.push(w);
            }
        }
        if !changed.is_empty() {
            self.dirty_words.lock().expect("lock").extend(changed);
        }
    }

    fn blocks_of(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset / BS, (offset + len - 1) / BS)
    }

    // ---- logged file operations (the test log replays them to simulate power loss)

    fn data_write(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        #[cfg(test)]
        self.log_ev(tests::Ev::Write(tests::FileId::Data, off, buf.to_vec()));
        self.data.write_all_at(buf, off)
    }

    fn data_punch(&self, off: u64, len: u64) -> std::io::Result<()> {
        #[cfg(test)]
        self.log_ev(tests::Ev::Punch(off, len));
        match lazyblk_blocksource::fsutil::punch_hole(&self.data, off, len) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() != Some(libc::EOPNOTSUPP) => return Err(e),
            Err(_) => {}
        }
        // No hole punching here: write zeros.
        let zeros = vec![0u8; (1 << 20).min(len) as usize];
        let mut at = off;
        while at < off + len {
            let n = (off + len - at).min(zeros.len() as u64) as usize;
            self.data.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn data_sync(&self, full: bool) -> std::io::Result<()> {
        #[cfg(test)]
        self.log_ev(tests::Ev::Sync(tests::FileId::Data));
        if full {
            self.data.sync_all()
        } else {
            self.data.sync_data()
        }
    }

    fn bitmap_write(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        #[cfg(test)]
        self.log_ev(tests::Ev::Write(tests::FileId::Bitmap, off, buf.to_vec()));
        self.bitmap.write_all_at(buf, off)
    }

    fn bitmap_sync(&self) -> std::io::Result<()> {
        #[cfg(test)]
        self.log_ev(tests::Ev::Sync(tests::FileId::Bitmap));
        self.bitmap.sync_data()
    }

    #[cfg(test)]
    fn log_ev(&self, ev: tests::Ev) {
        if let Some(l) = self.log.lock().expect("lock").as_mut() {
            l.push(ev);
        }
    }

    // ---- operations

    /// Read `buf.len()` bytes at `offset`: blocks in the layer from `data`, the rest from the
    /// base. Never copies up.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        check_range(self.size, offset, len)?;
        let mut at = offset;
        while at < offset + len {
            let b = at / BS;
            let p = self.present(b);
            // Extend the run of blocks with the same presence.
            let mut end = ((b + 1) * BS).min(offset + len);
            while end < offset + len && self.present(end / BS) == p {
                end = ((end / BS + 1) * BS).min(offset + len);
            }
            let piece = &mut buf[(at - offset) as usize..(end - offset) as usize];
            if p {
                lazyblk_blocksource::pread_exact_or_zero(self.data.as_raw_fd(), piece, at)?;
            } else {
                self.base.read_at(at, piece)?;
            }
            at = end;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        let len = data.len() as u64;
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(len, Ordering::Relaxed);
        let end = offset + len;
        let full_first = offset.div_ceil(BS);
        let full_end = (end / BS).min(self.size / BS); // blocks wholly inside the write
        if full_first >= full_end {
            // No whole block: one or two partial ones.
            let mut at = offset;
            while at < end {
                let b = at / BS;
                let stop = ((b + 1) * BS).min(end);
                self.write_partial(
                    b,
                    at - b * BS,
                    &data[(at - offset) as usize..(stop - offset) as usize],
                )?;
                at = stop;
            }
            return Ok(());
        }
        let (a, z) = (full_first * BS, full_end * BS);
        if offset < a {
            self.write_partial(offset / BS, offset % BS, &data[..(a - offset) as usize])?;
        }
        {
            let _shared = self.rw.read().expect("lock");
            self.data_write(&data[(a - offset) as usize..(z - offset) as usize], a)?;
            self.data_dirty.store(true, Ordering::Release);
            self.mark(full_first, full_end - 1);
        }
        if z < end {
            self.write_partial(full_end, 0, &data[(z - offset) as usize..])?;
        }
        Ok(())
    }

    /// Write `bytes` at `at` inside block `b` (read-modify-write of the whole block).
    fn write_partial(&self, b: u64, at: u64, bytes: &[u8]) -> Result<(), BlockError> {
        let start = b * BS;
        let valid = (self.size - start).min(BS) as usize;
        // The base's block, read before taking the lock (it may need a fetch).
        let base_block = if self.present(b) {
            None
        } else {
            let mut v = vec![0u8; BS as usize];
            self.base.read_at(start, &mut v[..valid])?;
            Some(v)
        };
        let _excl = self.rw.write().expect("lock");
        let mut block = match base_block {
            // Bits never go back to 0: if it is present now, the layer has the newer content.
            Some(v) if !self.present(b) => v,
            _ => {
                let mut v = vec![0u8; BS as usize];
                lazyblk_blocksource::pread_exact_or_zero(self.data.as_raw_fd(), &mut v, start)?;
                v
            }
        };
        block[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        block[valid..].fill(0);
        self.data_write(&block, start)?;
        self.data_dirty.store(true, Ordering::Release);
        self.mark(b, b);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.counters.discards.fetch_add(1, Ordering::Relaxed);
        let end = offset + len;
        let full_first = offset.div_ceil(BS);
        let full_end = (end / BS).min(self.size / BS);
        if full_first >= full_end {
            let mut at = offset;
            while at < end {
                let b = at / BS;
                let stop = ((b + 1) * BS).min(end);
                self.write_partial(b, at - b * BS, &vec![0u8; (stop - at) as usize])?;
                at = stop;
            }
            return Ok(());
        }
        let (a, z) = (full_first * BS, full_end * BS);
        if offset < a {
            self.write_partial(offset / BS, offset % BS, &vec![0u8; (a - offset) as usize])?;
        }
        {
            let _shared = self.rw.read().expect("lock");
            self.data_punch(a, z - a)?;
            self.punched.store(true, Ordering::Release);
            self.data_dirty.store(true, Ordering::Release);
            self.mark(full_first, full_end - 1);
        }
        if z < end {
            self.write_partial(full_end, 0, &vec![0u8; (end - z) as usize])?;
        }
        Ok(())
    }

    /// Make every write acknowledged before this call durable (see the crate docs).
    fn flush(&self) -> Result<(), BlockError> {
        let _one = self.flush_lock.lock().expect("lock");
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        let words = std::mem::take(&mut *self.dirty_words.lock().expect("lock"));
        let data_dirty = self.data_dirty.swap(false, Ordering::AcqRel);
        let punched = self.punched.swap(false, Ordering::AcqRel);
        if words.is_empty() && !data_dirty {
            return Ok(());
        }
        // Snapshot before the data sync: each bit in it covers a pwrite already done.
        let snap: Vec<(usize, u64)> = words
            .iter()
            .map(|&w| (w, self.bits[w].load(Ordering::Acquire)))
            .collect();
        let r = (|| -> std::io::Result<()> {
            self.data_sync(punched)?;
            if snap.is_empty() {
                return Ok(());
            }
            // Runs of consecutive words, one pwrite each.
            let mut i = 0;
            while i < snap.len() {
                let mut j = i + 1;
                while j < snap.len() && snap[j].0 == snap[j - 1].0 + 1 {
                    j += 1;
                }
                let buf: Vec<u8> = snap[i..j]
                    .iter()
                    .flat_map(|(_, v)| v.to_le_bytes())
                    .collect();
                self.bitmap_write(&buf, HEADER_LEN + snap[i].0 as u64 * 8)?;
                i = j;
            }
            self.bitmap_sync()
        })();
        if let Err(e) = r {
            // Try again at the next flush.
            self.dirty_words.lock().expect("lock").extend(words);
            self.data_dirty.store(true, Ordering::Release);
            if punched {
                self.punched.store(true, Ordering::Release);
            }
            tracing::error!("COW layer {}: flush failed: {e}", self.dir.display());
            return Err(BlockError::Io(e));
        }
        Ok(())
    }

    /// Copy the base's blocks of a range into the layer where the layer has none, so the whole
    /// range can be read from `data`.
    fn copy_up(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let (first, last) = self.blocks_of(offset, len);
        let a = first * BS;
        let z = ((last + 1) * BS).min(self.size);
        let mut buf = vec![0u8; ((last + 1 - first) * BS) as usize];
        self.base.read_at(a, &mut buf[..(z - a) as usize])?;
        let _excl = self.rw.write().expect("lock");
        if self.closed.load(Ordering::Acquire) {
            return Err(BlockError::ShuttingDown);
        }
        let mut b = first;
        let mut copied = 0;
        while b <= last {
            if self.present(b) {
                b += 1;
                continue;
            }
            let mut e = b;
            while e < last && !self.present(e + 1) {
                e += 1;
            }
            let s = ((b - first) * BS) as usize;
            let t = ((e + 1 - first) * BS) as usize;
            self.data_write(&buf[s..t], b * BS)?;
            self.mark(b, e);
            copied += e + 1 - b;
            b = e + 1;
        }
        self.counters.copied_up.fetch_add(copied, Ordering::Relaxed);
        Ok(())
    }
}

impl BlockSource for Cow {
    fn geometry(&self) -> Geometry {
        let base = self.inner.base.geometry();
        Geometry {
            size: self.inner.size,
            block_size: if self.inner.size.is_multiple_of(BS) {
                base.block_size.max(BLOCK_SIZE)
            } else {
                base.block_size
            },
            read_only: false,
        }
    }

    fn files(&self) -> Vec<std::os::fd::RawFd> {
        let mut fds = vec![self.inner.data.as_raw_fd()];
        fds.extend(self.inner.base.files());
        fds
    }

    fn locate(&self, offset: u64, len: u64) -> Option<Located> {
        let inner = &self.inner;
        check_range(inner.size, offset, len).ok()?;
        if len == 0 {
            return inner.base.locate(offset, len);
        }
        let (first, last) = inner.blocks_of(offset, len);
        match inner.coverage(first, last) {
            // (Discards and zeroed blocks may leave holes in the layer: not vouched for.)
            Coverage::All => Some(Located {
                fd: inner.data.as_raw_fd(),
                offset,
                written: false,
            }),
            Coverage::None => inner.base.locate(offset, len),
            Coverage::Mixed => None,
        }
    }

    fn fetch(&self, offset: u64, len: u64, done: Completion) {
        let inner = &self.inner;
        if let Err(e) = check_range(inner.size, offset, len) {
            return done(Err(e));
        }
        if len == 0 {
            return done(Ok(()));
        }
        let (first, last) = inner.blocks_of(offset, len);
        let Some(jobs) = self.jobs.clone() else {
            return done(Err(BlockError::ShuttingDown));
        };
        let copy_up = move |done: Completion| {
            if let Err(mpsc::SendError((_, _, done))) = jobs.send((offset, len, done)) {
                done(Err(BlockError::ShuttingDown));
            }
        };
        match inner.coverage(first, last) {
            Coverage::All => done(Ok(())),
            Coverage::Mixed => copy_up(done),
            Coverage::None => {
                let inner2 = inner.clone();
                inner.base.fetch(
                    offset,
                    len,
                    Box::new(move |r| {
                        // A write may have landed in the range meanwhile.
                        if r.is_ok() && inner2.coverage(first, last) == Coverage::Mixed {
                            copy_up(done)
                        } else {
                            done(r)
                        }
                    }),
                );
            }
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.inner.read(offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        self.inner.write(offset, data)
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.discard(offset, len)
    }
}

#[cfg(test)]
mod tests;
