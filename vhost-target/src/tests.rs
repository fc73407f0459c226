//! Tests of the vhost-user-blk backend on a mock split virtqueue in plain memory: request
//! parsing, config space, features, and misses that complete out of order without stalling the
//! queue.

use super::*;
use lazyblk_blocksource::{check_range, Completion, FileSource, Located};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::mock::MockSplitQueue;

const QSIZE: u16 = 16;
const DATA: u64 = 0x10_0000;

/// A file whose first 64 KiB are missing until the test releases them.
struct GatedSource {
    file: FileSource,
    released: AtomicBool,
    waiting: Mutex<Vec<Completion>>,
    /// Fetches that succeed while the range stays missing (fetched, then evicted at once).
    lost: std::sync::atomic::AtomicU32,
    fetches: AtomicUsize,
}

impl GatedSource {
    fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        for done in self.waiting.lock().unwrap().drain(..) {
            done(Ok(()));
        }
    }
}

impl BlockSource for GatedSource {
    fn geometry(&self) -> Geometry {
        self.file.geometry()
    }
    fn locate(&self, offset: u64, len: u64) -> Option<Located> {
        if offset < 65536 && !self.released.load(Ordering::SeqCst) {
            return None;
        }
        self.file.locate(offset, len)
    }
    fn fetch(&self, offset: u64, len: u64, done: Completion) {
        if let Err(e) = check_range(self.geometry().size, offset, len) {
            return done(Err(e));
        }
        self.fetches.fetch_add(1, Ordering::SeqCst);
        if self.locate(offset, len).is_some() {
            return done(Ok(()));
        }
        if self.lost.load(Ordering::SeqCst) > 0 {
            self.lost.fetch_sub(1, Ordering::SeqCst);
            return done(Ok(()));
        }
        self.waiting.lock().unwrap().push(done);
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        self.file.write_at(offset, data)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.file.flush()
    }
}

struct Rig {
    mem: Mem,
    backend: Arc<Backend>,
    vring: VringRwLock<Mem>,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    content: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn rig(writable: bool) -> (Rig, Arc<GatedSource>) {
    let dir = tempfile::tempdir().unwrap();
    let content: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31 % 253) as u8).collect();
    let p = dir.path().join("img");
    std::fs::write(&p, &content).unwrap();
    let src = Arc::new(GatedSource {
        file: FileSource::open(&p, 4096, writable).unwrap(),
        released: AtomicBool::new(false),
        waiting: Mutex::new(Vec::new()),
        lost: Default::default(),
        fetches: AtomicUsize::new(0),
    });
    let mem: Mem = GuestMemoryAtomic::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap(),
    );
    let m = mem.memory();
    let q = MockSplitQueue::new(&*m, QSIZE);
    let (desc, avail, used) = (q.desc_table_addr(), q.avail_addr(), q.used_addr());
    let vring = VringRwLock::new(mem.clone(), QSIZE).unwrap();
    vring.set_queue_info(desc.0, avail.0, used.0).unwrap();
    vring.set_queue_size(QSIZE);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let backend = Arc::new(Backend {
        source: src.clone(),
        geo: src.geometry(),
        queues: 1,
        queue_size: usize::from(QSIZE),
        serial: *b"lazyblk-test\0\0\0\0\0\0\0\0",
        mem: mem.clone(),
        event_idx: AtomicBool::new(false),
        workers: vec![Worker {
            notifier: Arc::new(Notifier::new().unwrap()),
            state: Mutex::new(QueueState::default()),
            inflight: AtomicUsize::new(0),
            exit: Mutex::new(None),
        }],
        stats: Arc::new(Stats::default()),
    });
    drop(m);
    (
        Rig {
            mem,
            backend,
            vring,
            desc,
            avail,
            used,
            next_desc: 0,
            content,
            _dir: dir,
        },
        src,
    )
}

impl Rig {
    /// Queue a request: header (type, sector), then `data` bytes (device-writable for reads),
    /// then a status byte. Returns (head index, data address, status address).
    fn push(
        &mut self,
        rtype: u32,
        sector: u64,
        data: &[u8],
        data_writable: bool,
    ) -> (u16, GuestAddress, GuestAddress) {
        let m = self.mem.memory();
        let head = self.next_desc;
        let base = DATA + u64::from(head) * 0x2_0000;
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&rtype.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&hdr, GuestAddress(base)).unwrap();
        let data_at = GuestAddress(base + 0x100);
        m.write_slice(data, data_at).unwrap();
        let status_at = GuestAddress(base + 0x100 + data.len() as u64);
        m.write_obj(0xffu8, status_at).unwrap();
        let mut descs = vec![(base, 16u32, 0u16)];
        if !data.is_empty() {
            let f = if data_writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            descs.push((data_at.0, data.len() as u32, f));
        }
        descs.push((status_at.0, 1, VRING_DESC_F_WRITE as u16));
        // Descriptor table entries, then one avail ring entry (the mock's layout, written by
        // hand: re-creating the mock would reset the rings).
        let n = descs.len();
        for (i, &(a, l, f)) in descs.iter().enumerate() {
            let (flags, next) = if i + 1 < n {
                (f | VRING_DESC_F_NEXT as u16, head + i as u16 + 1)
            } else {
                (f, 0)
            };
            let at = self.desc.0 + 16 * u64::from(head + i as u16);
            m.write_obj(a, GuestAddress(at)).unwrap();
            m.write_obj(l, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
            m.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        let idx: u16 = m.read_obj(GuestAddress(self.avail.0 + 2)).unwrap();
        m.write_obj(
            head,
            GuestAddress(self.avail.0 + 4 + 2 * u64::from(idx % QSIZE)),
        )
        .unwrap();
        m.write_obj(idx.wrapping_add(1), GuestAddress(self.avail.0 + 2))
            .unwrap();
        self.next_desc += n as u16;
        (head, data_at, status_at)
    }

    fn kick(&self) {
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
    }

    fn completions(&self) {
        self.backend
            .handle_event(
                self.backend.completion_event(),
                EventSet::IN,
                std::slice::from_ref(&self.vring),
                0,
            )
            .unwrap();
    }

    /// (id, len) of the used ring entries so far.
    fn used(&self) -> Vec<(u32, u32)> {
        let m = self.mem.memory();
        let idx: u16 = m.read_obj(GuestAddress(self.used.0 + 2)).unwrap();
        (0..u64::from(idx))
            .map(|i| {
                let at = self.used.0 + 4 + i * 8;
                (
                    m.read_obj(GuestAddress(at)).unwrap(),
                    m.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    fn byte(&self, at: GuestAddress) -> u8 {
        self.mem.memory().read_obj(at).unwrap()
    }

    fn bytes(&self, at: GuestAddress, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.mem.memory().read_slice(&mut v, at).unwrap();
        v
    }
}

#[test]
fn a_miss_does_not_stall_the_queue_and_completes_out_of_order() {
    let (mut r, src) = rig(false);
    let (a, a_data, a_status) = r.push(VIRTIO_BLK_T_IN, 0, &[0u8; 8192], true); // missing
    let (b, b_data, b_status) = r.push(VIRTIO_BLK_T_IN, 256, &[0u8; 4096], true); // present
    r.kick();
    // B completed although A (earlier in the ring) waits for its fetch.
    assert_eq!(r.used(), vec![(u32::from(b), 4097)]);
    assert_eq!(r.byte(b_status), 0);
    assert_eq!(r.bytes(b_data, 4096), r.content[131072..131072 + 4096]);
    assert_eq!(r.byte(a_status), 0xff, "A not answered yet");
    assert_eq!(r.backend.workers[0].inflight.load(Ordering::SeqCst), 1);
    // The fetch completes on another thread; the queue thread finishes A on its eventfd.
    std::thread::spawn(move || src.release()).join().unwrap();
    r.completions();
    assert_eq!(r.used(), vec![(u32::from(b), 4097), (u32::from(a), 8193)]);
    assert_eq!(r.byte(a_status), 0);
    assert_eq!(r.bytes(a_data, 8192), r.content[..8192]);
    assert_eq!(r.backend.workers[0].inflight.load(Ordering::SeqCst), 0);
    assert_eq!(r.backend.stats.read_misses.load(Ordering::SeqCst), 1);
}

/// A range evicted between its fetch and the read (a cache limit) is fetched again, at most
/// `FETCH_TRIES` times in all; then the read fails instead of looping.
#[test]
fn a_range_evicted_after_its_fetch_is_fetched_again() {
    let (mut r, src) = rig(false);
    src.lost.store(1, Ordering::SeqCst);
    let (a, a_data, a_status) = r.push(VIRTIO_BLK_T_IN, 0, &[0u8; 8192], true);
    r.kick();
    r.completions(); // the fetch "succeeded" but the range is gone: fetched again
    assert_eq!(src.fetches.load(Ordering::SeqCst), 2);
    assert_eq!(
        r.byte(a_status),
        0xff,
        "not answered while the second fetch waits"
    );
    let s = src.clone();
    std::thread::spawn(move || s.release()).join().unwrap();
    r.completions();
    assert_eq!(r.used(), vec![(u32::from(a), 8193)]);
    assert_eq!(r.byte(a_status), 0);
    assert_eq!(r.bytes(a_data, 8192), r.content[..8192]);

    // Lost every time: FETCH_TRIES fetches, then an I/O error, and the queue goes on.
    let (mut r, src) = rig(false);
    src.lost.store(100, Ordering::SeqCst);
    let (b, _, b_status) = r.push(VIRTIO_BLK_T_IN, 8, &[0u8; 4096], true);
    r.kick();
    for _ in 0..FETCH_TRIES {
        r.completions();
    }
    assert_eq!(src.fetches.load(Ordering::SeqCst), FETCH_TRIES as usize);
    assert_eq!(r.used(), vec![(u32::from(b), 1)]);
    assert_eq!(r.byte(b_status), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(r.backend.workers[0].inflight.load(Ordering::SeqCst), 0);
}

#[test]
fn read_only_device_refuses_writes_and_reports_ro() {
    let (mut r, _src) = rig(false);
    let f = r.backend.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(f & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_MQ), 0);
    let c = r.backend.get_config(0, 60);
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        2048,
        "capacity"
    );
    assert_eq!(
        u32::from_le_bytes(c[20..24].try_into().unwrap()),
        4096,
        "blk_size"
    );
    assert_eq!(
        u16::from_le_bytes(c[34..36].try_into().unwrap()),
        1,
        "num_queues"
    );
    assert_eq!(r.backend.get_config(20, 4), c[20..24].to_vec());
    let (_, _, st) = r.push(VIRTIO_BLK_T_OUT, 300, &[1u8; 4096], false);
    let (_, _, st2) = r.push(VIRTIO_BLK_T_IN, 2048, &[0u8; 512], true); // past the end
    let (_, _, st3) = r.push(99, 0, &[], false);
    let (_, id, st4) = r.push(VIRTIO_BLK_T_GET_ID, 0, &[0u8; 20], true);
    let (_, _, st5) = r.push(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    r.kick();
    assert_eq!(r.byte(st), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(r.byte(st2), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(r.byte(st3), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(r.byte(st4), 0);
    assert_eq!(&r.bytes(id, 12), b"lazyblk-test");
    assert_eq!(r.byte(st5), 0);
    assert_eq!(r.used().len(), 5);
}

#[test]
fn writes_and_flushes_on_a_writable_source() {
    let (mut r, src) = rig(true);
    src.release();
    let f = r.backend.features();
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    let (_, _, st) = r.push(VIRTIO_BLK_T_OUT, 16, &[7u8; 8192], false);
    let (fl, _, fst) = r.push(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    r.kick();
    assert_eq!(r.byte(st), 0);
    // The flush runs on its own thread and completes through the eventfd.
    let t0 = Instant::now();
    while r.used().len() < 2 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
        r.completions();
    }
    assert_eq!(r.used()[1], (u32::from(fl), 1));
    assert_eq!(r.byte(fst), 0);
    let (_, d, st2) = r.push(VIRTIO_BLK_T_IN, 16, &[0u8; 8192], true);
    r.kick();
    assert_eq!(r.byte(st2), 0);
    assert_eq!(r.bytes(d, 8192), vec![7u8; 8192]);
}

#[test]
fn preadv_all_fills_buffers_and_zero_pads() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    std::fs::write(&p, (0..10000u32).map(|i| i as u8).collect::<Vec<u8>>()).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    let mut a = vec![0xaau8; 3000];
    let mut b = vec![0xaau8; 9000];
    let iov = [
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        },
    ];
    preadv_all(f.as_raw_fd(), &iov, 2000).unwrap();
    assert!(a
        .iter()
        .enumerate()
        .all(|(i, &x)| x == ((2000 + i) as u32) as u8));
    assert!(b[..5000]
        .iter()
        .enumerate()
        .all(|(i, &x)| x == ((5000 + i) as u32) as u8));
    assert!(
        b[5000..].iter().all(|&x| x == 0),
        "past the end of the file: zeros"
    );
}
