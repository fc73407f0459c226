//! Verify and store what a run fetched: decompress (one reused zstd context per thread), check
//! the BLAKE3 digest against the manifest, write the bytes to the data file. Runs on the
//! blocking threads, never on the async workers.

use crate::prelude::*;

impl Inner {
    /// The units of `units` not present yet (another fetch or copy may have stored some).
    pub(crate) fn missing_units(&self, units: &[u64]) -> Vec<u64> {
        units
            .iter()
            .copied()
            .filter(|&c| !self.present.get(c))
            .collect()
    }

    /// [`Inner::store_part`], at a lower CPU priority when it is background work that no read
    /// waits for (a pack or list prefetch, hydration): on a busy host the workload's own
    /// processes run first (an `ls -lR` on 2 vCPUs lost a second to verifying data frames it
    /// never read, issue 19). A part that a read waits for when its bytes are in keeps the
    /// normal priority; one a read joins while it is being verified finishes at the lower one.
    pub(crate) fn store_part_ranked(&self, run: &Run, i: usize, stored: &[u8]) -> Result<()> {
        let nobody_waits = run.background && {
            let inflight = self.inflight.lock().expect("lock");
            run.parts[i]
                .1
                .iter()
                .all(|u| inflight.get(u).is_none_or(|w| w.is_empty()))
        };
        match nobody_waits {
            true => at_low_priority(|| self.store_part(run, i, stored)),
            false => self.store_part(run, i, stored),
        }
    }

    /// Verify part `i` of a run (its stored bytes), write it into the data file and complete
    /// its units. Runs on a blocking thread.
    pub(crate) fn store_part(&self, run: &Run, i: usize, stored: &[u8]) -> Result<()> {
        let (e, units) = &run.parts[i];
        let n = self.manifest.chunk_count();
        let missing = self.missing_units(units);
        let t0 = Instant::now();
        if let Some(&first) = missing.first() {
            let (want, corrupt): (usize, Box<dyn Fn(String) -> Error>) = if first >= n {
                let f = first - n;
                let p = self
                    .manifest
                    .pack
                    .as_ref()
                    .expect("units past the chunks are frames");
                (
                    p.frame_raw_len(f as usize, self.manifest.image_size) as usize,
                    Box::new(move |detail| Error::PackCorrupt { frame: f, detail }),
                )
            } else {
                (
                    self.manifest.chunk_len(first) as usize,
                    Box::new(move |detail| Error::ChunkCorrupt {
                        index: first,
                        detail,
                    }),
                )
            };
            with_plain(e.encoding, stored, want, |plain| {
                let plain = plain.map_err(|err| corrupt(format!("zstd: {err}")))?;
                if plain.len() != want {
                    return Err(corrupt(format!("{} bytes, expected {want}", plain.len())));
                }
                let got = blake3::hash(plain);
                if *got.as_bytes() != e.digest {
                    return Err(corrupt(format!(
                        "digest mismatch: expected blake3:{}, got blake3:{}",
                        hex::encode(e.digest),
                        got.to_hex()
                    )));
                }
                for &c in &missing {
                    if c >= n {
                        self.write_frame(c - n, plain)?;
                    } else {
                        self.data
                            .write_all_at(plain, self.manifest.chunk_offset(c))
                            .map_err(|err| Error::io(&self.data_path, err))?;
                    }
                }
                Ok(())
            })?;
        }
        self.stats
            .verify_micros
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        if run.background {
            let chunks = units.iter().filter(|&&u| u < n).count();
            self.stats
                .background_chunks
                .fetch_add(chunks as u64, Ordering::Relaxed);
        }
        self.complete(units, None);
        Ok(())
    }

    /// Write the verified raw bytes of pack frame `f` to its blocks' places in the data file,
    /// one write per run of adjacent blocks.
    pub(crate) fn write_frame(&self, f: u64, raw: &[u8]) -> Result<()> {
        let p = self.manifest.pack.as_ref().expect("a pack");
        let blocks = p.frame_members(f as usize);
        let size = self.manifest.image_size;
        let mut at = 0usize;
        let mut k = 0;
        while k < blocks.len() {
            let mut j = k + 1;
            while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 {
                j += 1;
            }
            let off = u64::from(blocks[k]) * PACK_BLOCK;
            let len = ((u64::from(blocks[j - 1]) + 1) * PACK_BLOCK).min(size) - off;
            self.data
                .write_all_at(&raw[at..at + len as usize], off)
                .map_err(|err| Error::io(&self.data_path, err))?;
            at += len as usize;
            k = j;
        }
        Ok(())
    }
}

/// Nice value added while [`at_low_priority`] runs (the scheduler's weight drops about tenfold).
const LOW_PRIORITY_NICE: i32 = 10;

/// Cleared when a thread could not return to its priority (no `CAP_SYS_NICE` to lower its
/// nice value again): from then on background work runs at the normal priority.
static LOW_PRIORITY_USABLE: AtomicBool = AtomicBool::new(true);

/// Run `f` on this thread with its nice value raised by [`LOW_PRIORITY_NICE`], then put it
/// back. Where it cannot be put back, this thread stays lower and no other is lowered again.
fn at_low_priority<T>(f: impl FnOnce() -> T) -> T {
    if !LOW_PRIORITY_USABLE.load(Ordering::Relaxed) {
        return f();
    }
    // SAFETY: getpriority and setpriority take no pointers; with PRIO_PROCESS and who 0 they
    // act on the calling thread only (on Linux each thread has its own nice value).
    let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    // SAFETY: as above.
    let lowered =
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, (before + LOW_PRIORITY_NICE).min(19)) }
            == 0;
    let r = f();
    // SAFETY: as above.
    if lowered && unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, before) } != 0 {
        LOW_PRIORITY_USABLE.store(false, Ordering::Relaxed);
        tracing::debug!(
            "background verification stays at the normal priority: cannot lower a nice value again"
        );
    }
    r
}

thread_local! {
    /// This thread's zstd decompression context and output buffer, reused for every chunk it
    /// verifies: creating a context per chunk cost ~10% of the CPU of reading a whole image at
    /// 32 KiB chunks (it allocates and initialises ~100 KiB), and a fresh 128 KiB output buffer
    /// per chunk is an mmap plus page faults.
    static PLAIN: std::cell::RefCell<Option<(zstd::bulk::Decompressor<'static>, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Call `f` with the raw bytes of a stored chunk or frame of `want` bytes: `stored` itself when
/// it is raw, else its decompression into this thread's buffer (an error when the zstd frame is
/// malformed or holds more than `want` bytes). `f` must not decompress in turn.
pub(crate) fn with_plain<R>(
    encoding: Encoding,
    stored: &[u8],
    want: usize,
    f: impl FnOnce(std::io::Result<&[u8]>) -> R,
) -> R {
    if encoding == Encoding::Raw {
        return f(Ok(stored));
    }
    PLAIN.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            match zstd::bulk::Decompressor::new() {
                Ok(d) => *slot = Some((d, Vec::new())),
                Err(err) => return f(Err(err)),
            }
        }
        let (ctx, buf) = slot.as_mut().expect("set above");
        buf.clear();
        buf.reserve(want);
        match ctx.decompress_to_buffer(stored, buf) {
            Ok(_) => f(Ok(buf)),
            Err(err) => f(Err(err)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain_of(encoding: Encoding, stored: &[u8], want: usize) -> std::io::Result<Vec<u8>> {
        with_plain(encoding, stored, want, |p| p.map(<[u8]>::to_vec))
    }

    #[test]
    fn background_work_runs_at_a_lower_priority_and_the_thread_gets_its_own_back() {
        // On a thread of its own: the test harness's threads keep their priority.
        std::thread::spawn(|| {
            let nice = || {
                // SAFETY: no pointers; the calling thread's nice value.
                unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
            };
            let before = nice();
            let during = at_low_priority(nice);
            assert_eq!(during, (before + LOW_PRIORITY_NICE).min(19));
            if LOW_PRIORITY_USABLE.load(Ordering::Relaxed) {
                assert_eq!(nice(), before, "the priority is given back");
            } else {
                // Without CAP_SYS_NICE the thread stays lower, and nothing is lowered again.
                assert_eq!(at_low_priority(nice), during);
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_reused_decompressor_checks_every_frame_on_its_own() {
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let small = &big[..5000];
        let z_big = zstd::bulk::compress(&big, 3).unwrap();
        let z_small = zstd::bulk::compress(small, 3).unwrap();
        // Raw bytes pass through untouched.
        assert_eq!(plain_of(Encoding::Raw, small, 5000).unwrap(), small);
        // A large frame first leaves a large buffer behind...
        assert_eq!(plain_of(Encoding::Zstd, &z_big, big.len()).unwrap(), big);
        // ...which must not let a frame larger than `want` through as `want` bytes: it either
        // fails or comes back at its real length (which the caller rejects).
        if let Ok(p) = plain_of(Encoding::Zstd, &z_big, 5000) {
            assert_eq!(p.len(), big.len());
        }
        // A malformed frame is an error, and the context still works afterwards.
        let mut broken = z_small.clone();
        broken.truncate(broken.len() / 2);
        assert!(plain_of(Encoding::Zstd, &broken, 5000).is_err());
        assert!(plain_of(Encoding::Zstd, b"not zstd at all", 5000).is_err());
        assert_eq!(plain_of(Encoding::Zstd, &z_small, 5000).unwrap(), small);
        // A frame shorter than `want` comes back short (the caller rejects the length).
        assert_eq!(
            plain_of(Encoding::Zstd, &z_small, 9000).unwrap().len(),
            5000
        );
    }
}
