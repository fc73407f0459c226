//! Tests of the COW layer: random operations against a model, concurrency, the conformance
//! suite, reopening, and simulated power loss at every point of the IO log.

use super::*;
use lazyblk_blocksource::FileSource;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;

/// Which file of the layer an event touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FileId {
    Data,
    Bitmap,
}

/// One file operation of the layer, as logged for the power-loss simulation.
#[derive(Clone, Debug)]
pub(crate) enum Ev {
    Write(FileId, u64, Vec<u8>),
    Punch(u64, u64),
    Sync(FileId),
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// A base image file with random contents, served by `FileSource` with `block_size`.
fn base_file(
    dir: &Path,
    len: usize,
    block_size: u32,
    seed: u64,
) -> (Arc<dyn BlockSource>, Vec<u8>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let bytes = random_bytes(&mut rng, len);
    let p = dir.join("base.img");
    std::fs::write(&p, &bytes).unwrap();
    let src = FileSource::open(&p, block_size, false).unwrap();
    let size = src.geometry().size as usize;
    let mut model = bytes;
    model.resize(size, 0);
    (Arc::new(src), model)
}

/// A base whose ranges are missing until fetched (on another thread), like a chunk store.
struct LazySource {
    file: FileSource,
    present: Arc<Mutex<Vec<bool>>>,
    fetches: AtomicU64,
}

const LAZY_CHUNK: u64 = 16384;

impl LazySource {
    fn new(file: FileSource) -> Self {
        let n = file.geometry().size.div_ceil(LAZY_CHUNK) as usize;
        LazySource {
            file,
            present: Arc::new(Mutex::new(vec![false; n])),
            fetches: AtomicU64::new(0),
        }
    }
    fn chunks(offset: u64, len: u64) -> std::ops::RangeInclusive<usize> {
        (offset / LAZY_CHUNK) as usize..=((offset + len.max(1) - 1) / LAZY_CHUNK) as usize
    }
}

impl BlockSource for LazySource {
    fn geometry(&self) -> Geometry {
        self.file.geometry()
    }
    fn locate(&self, offset: u64, len: u64) -> Option<Located> {
        let p = self.present.lock().unwrap();
        if Self::chunks(offset, len).all(|c| p[c]) {
            self.file.locate(offset, len)
        } else {
            None
        }
    }
    fn fetch(&self, offset: u64, len: u64, done: Completion) {
        if let Err(e) = check_range(self.geometry().size, offset, len) {
            return done(Err(e));
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let present = self.present.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(1));
            let mut p = present.lock().unwrap();
            for c in Self::chunks(offset, len) {
                p[c] = true;
            }
            drop(p);
            done(Ok(()));
        });
    }
}

/// Read through `fetch` + `locate` + pread, as a frontend does.
fn frontend_read(src: &dyn BlockSource, offset: u64, buf: &mut [u8]) {
    let len = buf.len() as u64;
    let loc = match src.locate(offset, len) {
        Some(l) => l,
        None => {
            let (tx, rx) = mpsc::channel();
            src.fetch(offset, len, Box::new(move |r| tx.send(r).unwrap()));
            rx.recv().unwrap().expect("fetch");
            src.locate(offset, len).expect("locatable after fetch")
        }
    };
    lazyblk_blocksource::pread_exact_or_zero(loc.fd, buf, loc.offset).unwrap();
}

fn check_all(src: &dyn BlockSource, model: &[u8], what: &str) {
    let mut buf = vec![0u8; model.len()];
    src.read_at(0, &mut buf).unwrap();
    if buf != model {
        let i = buf.iter().zip(model).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: device differs from the model at byte {i} (block {})",
            i / 4096
        );
    }
}

enum Op {
    Write(u64, Vec<u8>),
    Discard(u64, u64),
    Flush,
    Read(u64, u64),
}

fn random_op(rng: &mut StdRng, size: u64) -> Op {
    let pick = rng.gen_range(0..100);
    let (off, len) = if rng.gen_bool(0.6) {
        // block aligned
        let blocks = size / BS;
        let b = rng.gen_range(0..blocks);
        let n = rng.gen_range(1..=(blocks - b).min(9));
        (b * BS, n * BS)
    } else {
        let off = rng.gen_range(0..size);
        let len = rng.gen_range(1..=(size - off).min(20000));
        (off, len)
    };
    match pick {
        0..=49 => Op::Write(off, random_bytes(rng, len as usize)),
        50..=59 => Op::Discard(off, len),
        60..=69 => Op::Flush,
        _ => Op::Read(off, len),
    }
}

fn apply(cow: &Cow, model: &mut [u8], op: &Op) {
    match op {
        Op::Write(off, data) => {
            cow.write_at(*off, data).unwrap();
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        Op::Discard(off, len) => {
            cow.discard(*off, *len).unwrap();
            model[*off as usize..(*off + *len) as usize].fill(0);
        }
        Op::Flush => cow.flush().unwrap(),
        Op::Read(off, len) => {
            let mut buf = vec![0u8; *len as usize];
            if off % 2 == 0 {
                cow.read_at(*off, &mut buf).unwrap();
            } else {
                frontend_read(cow, *off, &mut buf);
            }
            assert!(
                buf == model[*off as usize..(*off + *len) as usize],
                "read {off}+{len} differs from the model"
            );
        }
    }
}

#[test]
fn random_ops_match_model_and_survive_reopen() {
    for (seed, block_size, len) in [
        (1u64, 4096u32, 1 << 20),
        (2, 512, (256 << 10) + 1536), // size not a multiple of 4 KiB: partial last block
        (3, 4096, 300 << 10),
    ] {
        let t = tempfile::tempdir().unwrap();
        let (base, mut model) = base_file(t.path(), len, block_size, seed);
        let base_copy = std::fs::read(t.path().join("base.img")).unwrap();
        let size = base.geometry().size;
        let dir = t.path().join("cow");
        let mut rng = StdRng::seed_from_u64(seed * 77);
        {
            let cow = Cow::open(&dir, base.clone(), "img").unwrap();
            assert_eq!(cow.geometry().size, size);
            assert!(!cow.geometry().read_only);
            check_all(&cow, &model, "fresh layer");
            for _ in 0..400 {
                let op = random_op(&mut rng, size);
                apply(&cow, &mut model, &op);
            }
            check_all(&cow, &model, "after random ops");
            let st = cow.stats();
            assert!(st.present_blocks > 0 && st.writes > 0 && st.flushes > 0);
        }
        // Clean close flushes: everything is there after reopen.
        let cow = Cow::open(&dir, base.clone(), "img").unwrap();
        check_all(&cow, &model, "after reopen");
        for _ in 0..100 {
            let op = random_op(&mut rng, size);
            apply(&cow, &mut model, &op);
        }
        check_all(&cow, &model, "after more ops");
        drop(cow);
        // The base is never modified.
        assert!(std::fs::read(t.path().join("base.img")).unwrap() == base_copy);
    }
}

#[test]
fn lazy_base_mixed_ranges_are_copied_up() {
    let t = tempfile::tempdir().unwrap();
    let (file_base, mut model) = base_file(t.path(), 1 << 20, 4096, 9);
    drop(file_base);
    let lazy = Arc::new(LazySource::new(
        FileSource::open(&t.path().join("base.img"), 4096, false).unwrap(),
    ));
    let cow = Cow::open(&t.path().join("cow"), lazy.clone(), "img").unwrap();
    // Nothing present anywhere: locate is None, fetch goes to the base.
    assert!(cow.locate(0, 8192).is_none());
    // A write into the middle of a range makes it mixed.
    let w = vec![7u8; 4096];
    cow.write_at(5 * 4096, &w).unwrap();
    model[5 * 4096..6 * 4096].copy_from_slice(&w);
    assert!(cow.locate(5 * 4096, 4096).is_some(), "written block local");
    assert!(cow.locate(4 * 4096, 3 * 4096).is_none(), "mixed range");
    let mut buf = vec![0u8; 3 * 4096];
    frontend_read(&cow, 4 * 4096, &mut buf);
    assert!(buf == model[4 * 4096..7 * 4096]);
    assert_eq!(cow.stats().copied_up_blocks, 2);
    let loc = cow
        .locate(4 * 4096, 3 * 4096)
        .expect("whole range local now");
    assert_eq!(loc.offset, 4 * 4096);
    // Unaligned mixed reads, lots of them, and writes on a lazy base (read-modify-write).
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..300 {
        let op = random_op(&mut rng, 1 << 20);
        apply(&cow, &mut model, &op);
    }
    check_all(&cow, &model, "lazy base");
    assert!(lazy.fetches.load(Ordering::Relaxed) > 0);
}

#[test]
fn conformance_suite_with_writes() {
    let t = tempfile::tempdir().unwrap();
    let (base, mut model) = base_file(t.path(), 4 << 20, 4096, 11);
    let lazy: Arc<dyn BlockSource> = Arc::new(LazySource::new(
        FileSource::open(&t.path().join("base.img"), 4096, false).unwrap(),
    ));
    drop(base);
    let cow = Cow::open(&t.path().join("cow"), lazy, "img").unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..200 {
        if let op @ (Op::Write(..) | Op::Discard(..)) = random_op(&mut rng, 4 << 20) {
            apply(&cow, &mut model, &op);
        }
    }
    lazyblk_blocksource::testing::check_reads(Arc::new(cow), Arc::new(model), 7, 200);
}

#[test]
fn concurrent_writers_and_readers() {
    let t = tempfile::tempdir().unwrap();
    let (base, model) = base_file(t.path(), 2 << 20, 4096, 13);
    let cow = Arc::new(Cow::open(&t.path().join("cow"), base, "img").unwrap());
    let model = Arc::new(Mutex::new(model));
    let threads = 4u64;
    let region = (2u64 << 20) / threads;
    let hs: Vec<_> = (0..threads)
        .map(|i| {
            let (cow, model) = (cow.clone(), model.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(100 + i);
                let lo = i * region;
                for n in 0..300 {
                    let off = lo + rng.gen_range(0..region - 9000);
                    let len = rng.gen_range(1..9000u64);
                    if n % 3 == 0 {
                        let mut buf = vec![0u8; len as usize];
                        frontend_read(&*cow, off, &mut buf);
                        let m = model.lock().unwrap();
                        assert!(buf == m[off as usize..(off + len) as usize]);
                    } else if n % 17 == 0 {
                        cow.flush().unwrap();
                    } else {
                        let data = random_bytes(&mut rng, len as usize);
                        // Hold the model lock across the write: regions differ per thread, but
                        // partial blocks at region edges are shared.
                        let mut m = model.lock().unwrap();
                        cow.write_at(off, &data).unwrap();
                        m[off as usize..(off + len) as usize].copy_from_slice(&data);
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    check_all(&*cow, &model.lock().unwrap(), "after concurrent ops");
}

#[test]
fn drop_without_flush_keeps_flushed_writes() {
    let t = tempfile::tempdir().unwrap();
    let (base, base_model) = base_file(t.path(), 1 << 20, 4096, 21);
    let dir = t.path().join("cow");
    let mut rng = StdRng::seed_from_u64(21);
    let mut model = base_model.clone();
    let cow = Cow::open(&dir, base.clone(), "img").unwrap();
    for _ in 0..100 {
        if let op @ (Op::Write(..) | Op::Discard(..)) = random_op(&mut rng, 1 << 20) {
            apply(&cow, &mut model, &op);
        }
    }
    cow.flush().unwrap();
    let flushed = model.clone();
    for _ in 0..100 {
        if let op @ (Op::Write(..) | Op::Discard(..)) = random_op(&mut rng, 1 << 20) {
            apply(&cow, &mut model, &op);
        }
    }
    cow.close_without_flush();
    // Each block holds what it held at the flush or what was written after it (the data of an
    // overwrite of a block already in the layer is in the page cache; a block new to the layer
    // has no bit on disk and shows the flushed version).
    let cow = Cow::open(&dir, base.clone(), "img").unwrap();
    let mut got = vec![0u8; 1 << 20];
    cow.read_at(0, &mut got).unwrap();
    let mut newer = 0;
    for (i, b) in got.chunks(4096).enumerate() {
        let r = i * 4096..(i + 1) * 4096;
        assert!(
            b == &flushed[r.clone()] || b == &model[r.clone()],
            "block {i}"
        );
        newer += usize::from(b != &flushed[r.clone()]);
    }
    assert!(
        newer > 0,
        "overwrites of present blocks reached the data file"
    );
    // After a flush and a clean close everything is there.
    for _ in 0..50 {
        if let op @ (Op::Write(..) | Op::Discard(..)) = random_op(&mut rng, 1 << 20) {
            apply(&cow, &mut got, &op);
        }
    }
    drop(cow);
    let cow = Cow::open(&dir, base, "img").unwrap();
    check_all(&cow, &got, "reopened after a clean close");
}

#[test]
fn discard_and_write_zeroes_persist() {
    let t = tempfile::tempdir().unwrap();
    let (base, mut model) = base_file(t.path(), 1 << 20, 4096, 31);
    let dir = t.path().join("cow");
    {
        let cow = Cow::open(&dir, base.clone(), "img").unwrap();
        cow.write_at(0, &vec![9u8; 65536]).unwrap();
        cow.discard(4096, 3 * 4096).unwrap(); // over written blocks
        cow.discard(100_000, 50_000).unwrap(); // over base blocks, unaligned
        cow.discard(1000, 10).unwrap(); // inside one block
        model[..65536].fill(9);
        model[4096..4 * 4096].fill(0);
        model[100_000..150_000].fill(0);
        model[1000..1010].fill(0);
        check_all(&cow, &model, "after discards");
        cow.flush().unwrap();
        cow.close_without_flush();
    }
    let cow = Cow::open(&dir, base, "img").unwrap();
    check_all(&cow, &model, "after reopen");
    // The discarded whole blocks are holes in the data file.
    let meta = std::fs::metadata(dir.join("data")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 1 << 20, "data file is sparse");
}

#[test]
fn refuses_other_images_and_second_opener() {
    let t = tempfile::tempdir().unwrap();
    let (base, _) = base_file(t.path(), 1 << 20, 4096, 41);
    let dir = t.path().join("cow");
    let cow = Cow::open(&dir, base.clone(), "sha256:aaa").unwrap();
    assert!(matches!(
        Cow::open(&dir, base.clone(), "sha256:aaa"),
        Err(CowError::Locked(_))
    ));
    cow.write_at(0, &[1u8; 4096]).unwrap();
    drop(cow);
    let e = Cow::open(&dir, base.clone(), "sha256:bbb").err().unwrap();
    assert!(matches!(e, CowError::Mismatch { .. }), "{e}");
    let p = t.path().join("other.img");
    std::fs::write(&p, vec![0u8; 2 << 20]).unwrap();
    let other: Arc<dyn BlockSource> = Arc::new(FileSource::open(&p, 4096, false).unwrap());
    let e = Cow::open(&dir, other, "sha256:aaa").err().unwrap();
    assert!(matches!(e, CowError::Mismatch { .. }), "{e}");
    // A damaged header is refused too.
    let bp = dir.join("bitmap");
    let mut b = std::fs::read(&bp).unwrap();
    b[40] ^= 0xff;
    std::fs::write(&bp, &b).unwrap();
    let e = Cow::open(&dir, base, "sha256:aaa").err().unwrap();
    assert!(matches!(e, CowError::Corrupt { .. }), "{e}");
}

#[test]
fn out_of_range_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (base, _) = base_file(t.path(), 1 << 20, 4096, 51);
    let cow = Cow::open(&t.path().join("cow"), base, "img").unwrap();
    assert!(matches!(
        cow.write_at((1 << 20) - 10, &[0u8; 20]),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        cow.discard(1 << 20, 1),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(cow.locate(1 << 20, 1).is_none());
}

// ---------------------------------------------------------------- power loss

/// One operation of a crash scenario with the log positions it spanned and the model after it.
struct Step {
    flush: bool,
    start: usize,
    end: usize,
    after: Vec<u8>,
}

/// Rebuild the layer's files as a power loss at log position `k` may leave them: every event
/// before the last sync of its file is there; later ones each may or may not be, sector by
/// sector (torn writes).
fn replay(
    init_data: &[u8],
    init_bitmap: &[u8],
    log: &[Ev],
    k: usize,
    rng: &mut StdRng,
) -> (Vec<u8>, Vec<u8>) {
    let (mut data, mut bitmap) = (init_data.to_vec(), init_bitmap.to_vec());
    let last_sync = |f: FileId| {
        log[..k]
            .iter()
            .rposition(|e| matches!(e, Ev::Sync(g) if *g == f))
            .map_or(0, |i| i + 1)
    };
    let (ds, bs) = (last_sync(FileId::Data), last_sync(FileId::Bitmap));
    for (i, e) in log[..k].iter().enumerate() {
        match e {
            Ev::Write(f, off, bytes) => {
                let (target, durable) = match f {
                    FileId::Data => (&mut data, i < ds),
                    FileId::Bitmap => (&mut bitmap, i < bs),
                };
                for (j, sector) in bytes.chunks(512).enumerate() {
                    if durable || rng.gen_bool(0.5) {
                        let at = *off as usize + j * 512;
                        target[at..at + sector.len()].copy_from_slice(sector);
                    }
                }
            }
            Ev::Punch(off, len) => {
                for b in (*off..off + len).step_by(4096) {
                    if i < ds || rng.gen_bool(0.5) {
                        data[b as usize..(b + 4096) as usize].fill(0);
                    }
                }
            }
            Ev::Sync(_) => {}
        }
    }
    (data, bitmap)
}

fn power_loss_scenario(seed: u64) {
    let t = tempfile::tempdir().unwrap();
    let (base, base_model) = base_file(t.path(), 64 * 4096, 4096, seed);
    let size = base.geometry().size;
    let dir = t.path().join("cow");
    let cow = Cow::open(&dir, base.clone(), "img").unwrap();
    let init_data = std::fs::read(dir.join("data")).unwrap();
    let init_bitmap = std::fs::read(dir.join("bitmap")).unwrap();
    *cow.inner.log.lock().unwrap() = Some(Vec::new());
    let log_len = || cow.inner.log.lock().unwrap().as_ref().unwrap().len();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = base_model.clone();
    let mut steps = Vec::new();
    for _ in 0..40 {
        let op = match random_op(&mut rng, size) {
            Op::Read(..) => Op::Flush,
            op => op,
        };
        let start = log_len();
        apply(&cow, &mut model, &op);
        steps.push(Step {
            flush: matches!(op, Op::Flush),
            start,
            end: log_len(),
            after: model.clone(),
        });
    }
    let log = cow.inner.log.lock().unwrap().take().unwrap();
    cow.close_without_flush();

    let replay_dir = t.path().join("replay");
    for k in 0..=log.len() {
        // The last flush that had completed at the crash, and what any later op could have left.
        let last_flush = steps.iter().rposition(|s| s.flush && s.end <= k);
        let durable = last_flush.map_or(&base_model, |i| &steps[i].after);
        let later: Vec<&Vec<u8>> = steps
            .iter()
            .enumerate()
            .filter(|(i, s)| last_flush.is_none_or(|f| *i > f) && s.start < k)
            .map(|(_, s)| &s.after)
            .collect();
        for attempt in 0..3 {
            let (d, b) = replay(&init_data, &init_bitmap, &log, k, &mut rng);
            let _ = std::fs::remove_dir_all(&replay_dir);
            std::fs::create_dir_all(&replay_dir).unwrap();
            std::fs::write(replay_dir.join("data"), &d).unwrap();
            std::fs::write(replay_dir.join("bitmap"), &b).unwrap();
            let re = Cow::open(&replay_dir, base.clone(), "img").unwrap();
            let mut got = vec![0u8; size as usize];
            re.read_at(0, &mut got).unwrap();
            for (s, sector) in got.chunks(512).enumerate() {
                let r = s * 512..(s + 1) * 512;
                let ok =
                    sector == &durable[r.clone()] || later.iter().any(|m| sector == &m[r.clone()]);
                assert!(
                    ok,
                    "seed {seed}, crash at log event {k} of {} (attempt {attempt}): sector {s} \
                     (block {}) holds neither the flushed data nor anything written after the flush",
                    log.len(),
                    s / 8
                );
            }
            // The recovered layer keeps working.
            re.write_at(0, &[5u8; 4096]).unwrap();
            re.flush().unwrap();
            re.close_without_flush();
        }
    }
}

#[test]
fn power_loss_at_every_log_point_loses_no_flushed_write() {
    for seed in 0..6 {
        power_loss_scenario(seed);
    }
}

#[test]
fn bitmap_words_only_gain_bits() {
    // The property the torn-write argument rests on: a flush writes words whose bits are a
    // superset of what is on disk.
    let t = tempfile::tempdir().unwrap();
    let (base, _) = base_file(t.path(), 256 * 4096, 4096, 61);
    let dir = t.path().join("cow");
    let cow = Cow::open(&dir, base, "img").unwrap();
    *cow.inner.log.lock().unwrap() = Some(Vec::new());
    let mut rng = StdRng::seed_from_u64(61);
    let mut seen: HashSet<u64> = HashSet::new();
    let mut disk = [0u64; 4];
    for _ in 0..200 {
        let op = random_op(&mut rng, 256 * 4096);
        match op {
            Op::Write(off, ref d) => cow.write_at(off, d).unwrap(),
            Op::Discard(off, len) => cow.discard(off, len).unwrap(),
            Op::Flush => cow.flush().unwrap(),
            Op::Read(..) => {}
        }
        for e in cow.inner.log.lock().unwrap().as_mut().unwrap().drain(..) {
            if let Ev::Write(FileId::Bitmap, off, bytes) = e {
                for (i, w) in bytes.chunks(8).enumerate() {
                    let idx = ((off - HEADER_LEN) / 8) as usize + i;
                    let v = u64::from_le_bytes(w.try_into().unwrap());
                    assert_eq!(v & disk[idx], disk[idx], "a bit went from 1 to 0");
                    disk[idx] = v;
                    seen.insert(v);
                }
            }
        }
    }
    assert!(seen.len() > 1);
}
