//! The cache directory of one image and its validation at open: the layout a cache was written
//! with (which prefetch pack decided its bitmap), the lock, the `meta.json` record, the
//! re-verification of a cache that was not closed cleanly, and carrying presence bits over
//! when the prefetch pack changes. Nothing here fetches.

use crate::prelude::*;

#[derive(Serialize, Deserialize, Default)]
pub(crate) struct Meta {
    pub(crate) manifest: String,
    pub(crate) blob: String,
    pub(crate) etag: Option<String>,
}

/// [`lock_dir`] for a store opening its cache: a lock taken for a moment by `gc` or a host
/// limit pass over this cache (which take it to know whether a store holds it, or while they
/// evict from an idle cache) is waited for, at most `patience`.
pub(crate) fn lock_dir_waiting(dir: &Path, patience: Duration) -> Result<File> {
    let t0 = Instant::now();
    loop {
        match lock_dir(dir) {
            Err(Error::Cache { .. }) if t0.elapsed() < patience => {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => return r,
        }
    }
}

pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    let p = dir.join("lock");
    lazyblk_blocksource::fsutil::lock_exclusive(&p)
        .map_err(|e| Error::io(&p, e))?
        .ok_or_else(|| Error::Cache {
            path: dir.to_path_buf(),
            detail: "in use by another lazyblk process".into(),
        })
}

/// Re-hash every unit (chunk or pack frame) `claimed` says is present; return the bits that
/// hold, checked, bad.
pub(crate) fn reverify(
    m: &Manifest,
    data: &File,
    claimed: &BitSlice<u8, Lsb0>,
) -> (BitVec<u8, Lsb0>, u64, u64) {
    let list: Vec<u64> = claimed.iter_ones().map(|i| i as u64).collect();
    let good = Mutex::new(bitvec![u8, Lsb0; 0; claimed.len()]);
    let bad = AtomicU64::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    std::thread::scope(|s| {
        for part in list.chunks(list.len().div_ceil(threads).max(1)) {
            let (good, bad) = (&good, &bad);
            s.spawn(move || {
                let mut buf = vec![0u8; m.chunk_size as usize];
                let n = m.chunk_count();
                for &i in part {
                    let ok = if i >= n {
                        frame_intact(m, data, (i - n) as usize)
                    } else {
                        match m.chunk(i) {
                            ChunkRef::Zero => true,
                            ChunkRef::Stored(e) => {
                                let len = m.chunk_len(i) as usize;
                                data.read_exact_at(&mut buf[..len], m.chunk_offset(i))
                                    .is_ok()
                                    && *blake3::hash(&buf[..len]).as_bytes() == e.digest
                            }
                        }
                    };
                    if ok {
                        good.lock().expect("lock").set(i as usize, true);
                    } else {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    // What was read to check it is a second copy of blocks the device serves (on a disk: the
    // frontend reads `data` around the page cache); nothing is dirty before the store serves.
    if lazyblk_blocksource::fsutil::page_cache_policy(data.as_raw_fd()).drops() {
        let _ = lazyblk_blocksource::fsutil::drop_cached(data.as_raw_fd(), 0, 0);
    }
    (
        good.into_inner().expect("lock"),
        list.len() as u64,
        bad.into_inner(),
    )
}

/// Whether the blocks of metadata pack frame `f` in the data file `data` of a cache hash to the
/// frame's digest (false for a frame the manifest does not have, or a short read).
pub fn frame_intact(m: &Manifest, data: &File, f: usize) -> bool {
    let Some(p) = m.pack.as_ref().filter(|p| f < p.frames.len()) else {
        return false;
    };
    let mut h = blake3::Hasher::new();
    let mut block = vec![0u8; PACK_BLOCK as usize];
    for &b in p.frame_members(f) {
        let at = u64::from(b) * PACK_BLOCK;
        let len = (m.image_size - at).min(PACK_BLOCK) as usize;
        if data.read_exact_at(&mut block[..len], at).is_err() {
            return false;
        }
        h.update(&block[..len]);
    }
    *h.finalize().as_bytes() == p.frames[f].digest
}

/// How the cache directory of an image is laid out.
pub struct CacheLayout {
    /// The manifest as the store used it: with the prefetch pack it kept a copy of (in place
    /// of the metadata pack), if any. Its [`Manifest::unit_count`] is the bitmap's bit count.
    pub manifest: Manifest,
    /// The id the bitmap is bound to.
    pub bitmap_id: ImageId,
    /// The copy of the prefetch pack, as kept.
    pub pack: Option<Vec<u8>>,
}

impl CacheLayout {
    /// The layout of the cache in `dir` of the image `id` with manifest `m` (a pack copy that
    /// does not decode or apply for this image counts as none: the bitmap, bound to the pack's
    /// digest, then no longer matches, and the store discards it).
    pub fn of(dir: &Path, id: ImageId, m: &Manifest) -> CacheLayout {
        let pack = std::fs::read(dir.join(PACK_FILE)).ok();
        let applied = pack.as_deref().and_then(|b| {
            let p = PrefetchPack::decode(b, &id, m.image_size).ok()?;
            Some((ImageId::of(b), p.apply(m).ok()?))
        });
        let (manifest, pack_id) = match applied {
            Some((pid, applied)) => (applied, Some(pid)),
            None => (m.clone(), None),
        };
        CacheLayout {
            manifest,
            bitmap_id: cache_bitmap_id(id, pack_id),
            pack,
        }
    }
}

/// The id a cache's bitmap is bound to: the image's, or with a prefetch pack in use (which
/// adds units and decides what the frame bits mean) a digest of both.
pub(crate) fn cache_bitmap_id(image: ImageId, pack: Option<ImageId>) -> ImageId {
    match pack {
        None => image,
        Some(p) => ImageId::of(&[image.0, p.0].concat()),
    }
}

/// Presence bits of a cache kept with the manifest `old` carried over to `new`, the same
/// image with another pack: chunk bits as they are; a frame of `new` is present when each of
/// its blocks lies in a present chunk or in a present frame of `old`.
pub(crate) fn carry_bits(
    old: &Manifest,
    old_bits: &BitSlice<u8, Lsb0>,
    new: &Manifest,
) -> BitVec<u8, Lsb0> {
    let n = new.chunk_count() as usize;
    let mut bits = bitvec![u8, Lsb0; 0; new.unit_count() as usize];
    bits[..n].copy_from_bitslice(&old_bits[..n]);
    let Some(p) = &new.pack else {
        return bits;
    };
    let cs = u64::from(new.chunk_size);
    let block_present = |b: u32| {
        let b = u64::from(b);
        old_bits[(b * PACK_BLOCK / cs) as usize]
            || old.pack.as_ref().is_some_and(|op| {
                op.covers(b, b)
                    .is_some_and(|pos| old_bits[n + op.frame_of(pos.start)])
            })
    };
    for f in 0..p.frames.len() {
        if p.frame_members(f).iter().all(|&b| block_present(b)) {
            bits.set(n + f, true);
        }
    }
    bits
}

/// Write a small file of the cache atomically.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    lazyblk_blocksource::fsutil::write_atomic(path, bytes).map_err(|e| Error::io(path, e))
}
