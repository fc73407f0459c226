//! lazyblk's vhost-user-blk frontend: serve any [`BlockSource`] to a VM (qemu's
//! `vhost-user-blk-pci`, cloud-hypervisor, ...) over a vhost-user socket. It depends on
//! `lazyblk-blocksource` only and must not know about HTTP, registries, manifests or caches.
//! (One file of ~800 lines: the backend, its queue worker and the request parsing share the
//! virtio state and would only trade one file for three that must be read together.)
//!
//! Built on rust-vmm's `vhost-user-backend`: one worker thread per virtqueue, each an epoll loop
//! on the queue's kick eventfd and on a completion eventfd of our own.
//!
//! * A read whose range is local ([`BlockSource::locate`]) is one `preadv` from the source's
//!   file straight into the guest's buffers, on the queue's thread.
//! * A read with missing data calls [`BlockSource::fetch`] and is parked; the queue goes on with
//!   its other descriptors. The fetch completes on a fetcher thread, which posts the request's
//!   token to the queue's [`Notifier`] and writes its eventfd; the queue's thread wakes in
//!   epoll, reads the now-local data into the guest and puts the descriptor in the used ring.
//!   Requests complete out of order.
//! * Writes, discards and write-zeroes go to [`BlockSource::write_at`] / `discard` (a writable
//!   source, e.g. the COW layer); a flush runs on its own thread and completes like a miss, so a
//!   slow `fdatasync` does not stall reads either.
//! * `VIRTIO_RING_F_EVENT_IDX`, multiple queues (`VIRTIO_BLK_F_MQ`), the config space
//!   (capacity, `blk_size`, `VIRTIO_BLK_F_RO` for read-only sources, discard limits) and
//!   `VIRTIO_BLK_F_FLUSH` are supported.

use lazyblk_blocksource::{BlockError, BlockSource, Geometry, FETCH_TRIES};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap<()>>>;

/// Errors of the vhost-user frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be created.
    #[error("vhost-user socket {path}: {detail}")]
    Socket {
        /// Socket path.
        path: String,
        /// What failed.
        detail: String,
    },
    /// The vhost-user daemon failed.
    #[error("vhost-user: {0}")]
    Daemon(String),
    /// Local resources (eventfds) could not be had.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How to serve.
#[derive(Clone, Debug)]
pub struct Options {
    /// Virtqueues (each gets its own thread).
    pub queues: u16,
    /// Largest queue size the VMM may configure.
    pub queue_size: u16,
    /// Serial number reported by `VIRTIO_BLK_T_GET_ID` (at most 20 bytes are used).
    pub serial: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            queues: 2,
            queue_size: 256,
            serial: "lazyblk".into(),
        }
    }
}

/// Counters of a backend, shared across connections.
#[derive(Debug, Default)]
pub struct Stats {
    /// Read requests.
    pub reads: AtomicU64,
    /// Bytes read by the guest.
    pub read_bytes: AtomicU64,
    /// Reads that had to wait for a fetch.
    pub read_misses: AtomicU64,
    /// Write requests.
    pub writes: AtomicU64,
    /// Bytes written by the guest.
    pub write_bytes: AtomicU64,
    /// Flush requests.
    pub flushes: AtomicU64,
    /// Discard and write-zeroes requests.
    pub discards: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
}

/// Fetch completions of one queue: posted from any thread, drained by the queue's thread.
struct Notifier {
    fd: EventFd,
    posts: Mutex<Vec<(u64, Result<(), BlockError>)>>,
}

impl Notifier {
    fn new() -> std::io::Result<Notifier> {
        Ok(Notifier {
            fd: EventFd::new(EFD_NONBLOCK)?,
            posts: Mutex::new(Vec::new()),
        })
    }

    fn post(&self, token: u64, r: Result<(), BlockError>) {
        self.posts.lock().expect("lock").push((token, r));
        if let Err(e) = self.fd.write(1) {
            tracing::error!("completion eventfd: {e}");
        }
    }

    fn drain(&self) -> Vec<(u64, Result<(), BlockError>)> {
        let _ = self.fd.read();
        std::mem::take(&mut *self.posts.lock().expect("lock"))
    }
}

/// A request parked until its fetch (or flush) completes.
enum Parked {
    Read {
        head: u16,
        offset: u64,
        segs: Vec<(GuestAddress, usize)>,
        status: Option<GuestAddress>,
        /// Fetches of the range so far.
        tries: u32,
    },
    Flush {
        head: u16,
        status: Option<GuestAddress>,
    },
}

#[derive(Default)]
struct QueueState {
    parked: HashMap<u64, Parked>,
    next_token: u64,
}

/// One per worker thread (one queue each).
struct Worker {
    notifier: Arc<Notifier>,
    state: Mutex<QueueState>,
    inflight: AtomicUsize,
    exit: Mutex<Option<EventNotifier>>,
}

struct Backend {
    source: Arc<dyn BlockSource>,
    geo: Geometry,
    queues: usize,
    queue_size: usize,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    mem: Mem,
    event_idx: AtomicBool,
    workers: Vec<Worker>,
    stats: Arc<Stats>,
}

/// The status byte and how many bytes of the guest's writable buffers were filled.
struct Done {
    head: u16,
    /// `None` for a malformed chain without a status byte (returned to the guest unanswered).
    status: Option<GuestAddress>,
    code: u8,
    written: u32,
}

const SECTOR: u64 = 512;

impl Backend {
    fn completion_event(&self) -> u16 {
        self.queues as u16 + 1
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_MQ);
        if self.geo.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// `struct virtio_blk_config` (virtio 1.2, 5.2.4), little endian.
    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let bs = self.geo.block_size;
        let sectors_per_block = bs / SECTOR as u32;
        c[0..8].copy_from_slice(&(self.geo.size / SECTOR).to_le_bytes()); // capacity
        c[12..16].copy_from_slice(&(self.queue_size as u32 - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&bs.to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&(self.queues as u16).to_le_bytes()); // num_queues
        let max_sectors: u32 = (32 << 20) / SECTOR as u32;
        c[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&sectors_per_block.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Pop every available chain of the queue and start it.
    fn process_queue(&self, vring: &VringRwLock<Mem>, worker: &Worker) -> std::io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Acquire);
        loop {
            if event_idx {
                vring
                    .disable_notification()
                    .map_err(std::io::Error::other)?;
            }
            let chains: Vec<Chain> = vring
                .get_mut()
                .get_queue_mut()
                .iter(self.mem.memory())
                .map_err(std::io::Error::other)?
                .collect();
            let mut done = Vec::new();
            for chain in chains {
                if let Some(d) = self.start(chain, worker) {
                    done.push(d);
                }
            }
            self.complete(vring, done)?;
            if !event_idx || !vring.enable_notification().map_err(std::io::Error::other)? {
                break;
            }
        }
        Ok(())
    }

    /// Put finished requests in the used ring and notify the guest if it wants to be.
    fn complete(&self, vring: &VringRwLock<Mem>, done: Vec<Done>) -> std::io::Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let mem = self.mem.memory();
        for d in &done {
            if d.code != VIRTIO_BLK_S_OK as u8 {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            let used = match d.status {
                Some(at) => {
                    if let Err(e) = mem.write_obj(d.code, at) {
                        tracing::error!("writing a status byte at {at:?}: {e}");
                    }
                    d.written + 1
                }
                None => 0,
            };
            vring
                .add_used(d.head, used)
                .map_err(std::io::Error::other)?;
        }
        if vring.needs_notification().map_err(std::io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Parse and run one request; `None` when it was parked.
    fn start(&self, chain: Chain, worker: &Worker) -> Option<Done> {
        let head = chain.head_index();
        let mem = self.mem.memory();
        let descs: Vec<_> = chain.collect();
        // Driver-readable descriptors come first (header, then data for writes), then the
        // device-writable ones (data for reads, then the status byte).
        let mut readable: Vec<(GuestAddress, usize)> = Vec::new();
        let mut writable: Vec<(GuestAddress, usize)> = Vec::new();
        for d in &descs {
            if d.is_write_only() {
                writable.push((d.addr(), d.len() as usize));
            } else if writable.is_empty() {
                readable.push((d.addr(), d.len() as usize));
            }
        }
        let malformed = Done {
            head,
            status: None,
            code: VIRTIO_BLK_S_IOERR as u8,
            written: 0,
        };
        let Some(&(last, last_len)) = writable.last().filter(|s| s.1 > 0) else {
            tracing::warn!("virtio-blk request {head} has no status byte");
            return Some(malformed);
        };
        let status = Some(GuestAddress(last.0 + last_len as u64 - 1));
        // Data-in: everything writable but the status byte.
        let n = writable.len();
        writable[n - 1].1 -= 1;
        writable.retain(|s| s.1 > 0);
        let mut hdr = [0u8; 16];
        if take_bytes(&mem, &mut readable, &mut hdr).is_none() {
            tracing::warn!("virtio-blk request {head} has no header");
            return Some(Done {
                status,
                ..malformed
            });
        }
        let rtype = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
        let done = |code: u32, written: usize| {
            Some(Done {
                head,
                status,
                code: code as u8,
                written: written as u32,
            })
        };
        match rtype {
            VIRTIO_BLK_T_IN => {
                let len: usize = writable.iter().map(|s| s.1).sum();
                let Some(offset) = self.check(sector, len as u64) else {
                    return done(VIRTIO_BLK_S_IOERR, 0);
                };
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .read_bytes
                    .fetch_add(len as u64, Ordering::Relaxed);
                if len == 0 {
                    return done(VIRTIO_BLK_S_OK, 0);
                }
                if self.source.locate(offset, len as u64).is_some() {
                    return match self.read_into(&mem, offset, &writable) {
                        Ok(()) => done(VIRTIO_BLK_S_OK, len),
                        Err(e) => {
                            tracing::warn!("read {offset}+{len}: {e}");
                            done(e.virtio_status().into(), 0)
                        }
                    };
                }
                // A miss: park it, go on with the queue.
                self.stats.read_misses.fetch_add(1, Ordering::Relaxed);
                let token = self.park(
                    worker,
                    Parked::Read {
                        head,
                        offset,
                        segs: writable,
                        status,
                        tries: 1,
                    },
                );
                let n = worker.notifier.clone();
                self.source
                    .fetch(offset, len as u64, Box::new(move |r| n.post(token, r)));
                None
            }
            VIRTIO_BLK_T_OUT => {
                let len: usize = readable.iter().map(|s| s.1).sum();
                let Some(offset) = self.check(sector, len as u64) else {
                    return done(VIRTIO_BLK_S_IOERR, 0);
                };
                if self.geo.read_only {
                    return done(VIRTIO_BLK_S_IOERR, 0);
                }
                let mut buf = vec![0u8; len];
                let mut at = 0;
                for &(a, l) in &readable {
                    if mem.read_slice(&mut buf[at..at + l], a).is_err() {
                        return done(VIRTIO_BLK_S_IOERR, 0);
                    }
                    at += l;
                }
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .write_bytes
                    .fetch_add(len as u64, Ordering::Relaxed);
                match self.source.write_at(offset, &buf) {
                    Ok(()) => done(VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        tracing::warn!("write {offset}+{len}: {e}");
                        done(e.virtio_status().into(), 0)
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                if self.geo.read_only {
                    return done(VIRTIO_BLK_S_OK, 0);
                }
                // fdatasync can take long: on its own thread, completed like a miss.
                let token = self.park(worker, Parked::Flush { head, status });
                let (n, src) = (worker.notifier.clone(), self.source.clone());
                let spawned = std::thread::Builder::new()
                    .name("lazyblk-flush".into())
                    .spawn(move || n.post(token, src.flush()));
                if let Err(e) = spawned {
                    tracing::error!("flush thread: {e}");
                    worker.notifier.post(token, self.source.flush());
                }
                None
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut at = 0;
                for &(a, l) in &writable {
                    let n = l.min(self.serial.len() - at);
                    if mem.write_slice(&self.serial[at..at + n], a).is_err() {
                        return done(VIRTIO_BLK_S_IOERR, 0);
                    }
                    at += n;
                    if at == self.serial.len() {
                        break;
                    }
                }
                done(VIRTIO_BLK_S_OK, at)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.geo.read_only {
                    return done(VIRTIO_BLK_S_UNSUPP, 0);
                }
                self.stats.discards.fetch_add(1, Ordering::Relaxed);
                let mut segs = readable;
                loop {
                    let mut seg = [0u8; 16];
                    if segs.iter().map(|s| s.1).sum::<usize>() < 16 {
                        break;
                    }
                    if take_bytes(&mem, &mut segs, &mut seg).is_none() {
                        return done(VIRTIO_BLK_S_IOERR, 0);
                    }
                    let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
                    let count = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
                    let len = u64::from(count) * SECTOR;
                    let Some(offset) = self.check(sector, len) else {
                        return done(VIRTIO_BLK_S_IOERR, 0);
                    };
                    if let Err(e) = self.source.discard(offset, len) {
                        tracing::warn!("discard {offset}+{len}: {e}");
                        return done(e.virtio_status().into(), 0);
                    }
                }
                done(VIRTIO_BLK_S_OK, 0)
            }
            _ => done(VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// Byte offset of `sector` if `len` bytes from there fit the device.
    fn check(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR)?;
        (offset.checked_add(len)? <= self.geo.size).then_some(offset)
    }

    fn park(&self, worker: &Worker, p: Parked) -> u64 {
        let mut st = worker.state.lock().expect("lock");
        let token = st.next_token;
        st.next_token += 1;
        st.parked.insert(token, p);
        worker.inflight.fetch_add(1, Ordering::AcqRel);
        token
    }

    /// Finish the parked requests whose fetch or flush completed.
    fn drain(&self, vring: &VringRwLock<Mem>, worker: &Worker) -> std::io::Result<()> {
        let posts = worker.notifier.drain();
        if posts.is_empty() {
            return Ok(());
        }
        let mem = self.mem.memory();
        let mut done = Vec::with_capacity(posts.len());
        for (token, r) in posts {
            let Some(p) = worker.state.lock().expect("lock").parked.remove(&token) else {
                continue;
            };
            worker.inflight.fetch_sub(1, Ordering::AcqRel);
            match p {
                Parked::Flush { head, status } => {
                    let code = match r {
                        Ok(()) => VIRTIO_BLK_S_OK as u8,
                        Err(e) => {
                            tracing::warn!("flush: {e}");
                            e.virtio_status()
                        }
                    };
                    done.push(Done {
                        head,
                        status,
                        code,
                        written: 0,
                    });
                }
                Parked::Read {
                    head,
                    offset,
                    segs,
                    status,
                    tries,
                } => {
                    let len: usize = segs.iter().map(|s| s.1).sum();
                    if r.is_ok()
                        && tries < FETCH_TRIES
                        && self.source.locate(offset, len as u64).is_none()
                    {
                        // Fetched, then evicted (a cache limit) before this read: fetch again.
                        let token = self.park(
                            worker,
                            Parked::Read {
                                head,
                                offset,
                                segs,
                                status,
                                tries: tries + 1,
                            },
                        );
                        let n = worker.notifier.clone();
                        self.source
                            .fetch(offset, len as u64, Box::new(move |r| n.post(token, r)));
                        continue;
                    }
                    let r = r.and_then(|()| self.read_into(&mem, offset, &segs));
                    done.push(match r {
                        Ok(()) => Done {
                            head,
                            status,
                            code: VIRTIO_BLK_S_OK as u8,
                            written: len as u32,
                        },
                        Err(e) => {
                            tracing::warn!("read {offset}+{len}: {e}");
                            Done {
                                head,
                                status,
                                code: e.virtio_status(),
                                written: 0,
                            }
                        }
                    });
                }
            }
        }
        self.complete(vring, done)
    }

    /// Read `[offset, offset + total)` of the (now local) source into the guest buffers.
    fn read_into(
        &self,
        mem: &GuestMemoryMmap<()>,
        offset: u64,
        segs: &[(GuestAddress, usize)],
    ) -> Result<(), BlockError> {
        let len: usize = segs.iter().map(|s| s.1).sum();
        let loc = self.source.locate(offset, len as u64).ok_or_else(|| {
            BlockError::Unavailable(format!("range {offset}+{len} not local after its fetch"))
        })?;
        // Host views of the guest buffers (a buffer may span memory regions).
        let mut slices = Vec::new();
        for &(a, l) in segs {
            for s in mem.get_slices(a, l) {
                let s = s.map_err(|e| BlockError::Unavailable(format!("guest buffer: {e}")))?;
                slices.push(s);
            }
        }
        let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
        let iov: Vec<libc::iovec> = guards
            .iter()
            .zip(&slices)
            .map(|(g, s)| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: s.len(),
            })
            .collect();
        preadv_all(loc.fd, &iov, loc.offset)?;
        Ok(())
    }
}

/// Copy the first `out.len()` bytes of the segments into `out` and drop them from `segs`.
fn take_bytes(
    mem: &GuestMemoryMmap<()>,
    segs: &mut Vec<(GuestAddress, usize)>,
    out: &mut [u8],
) -> Option<()> {
    let mut at = 0;
    while at < out.len() {
        let (a, l) = segs.first_mut()?;
        let n = (*l).min(out.len() - at);
        mem.read_slice(&mut out[at..at + n], *a).ok()?;
        at += n;
        *a = GuestAddress(a.0 + n as u64);
        *l -= n;
        if *l == 0 {
            segs.remove(0);
        }
    }
    Some(())
}

/// `preadv` until every iovec is full; bytes past the end of the file read as zeros.
fn preadv_all(fd: RawFd, iov: &[libc::iovec], offset: u64) -> std::io::Result<()> {
    let mut iov: Vec<libc::iovec> = iov.to_vec();
    let mut first = 0usize;
    let mut off = offset;
    while first < iov.len() {
        let n = (iov.len() - first).min(1024);
        // SAFETY: every iovec points into guest memory that stays mapped while the guards of the
        // caller are alive, and `fd` is open (owned by the source, alive as long as it is).
        let r = unsafe { libc::preadv(fd, iov[first..].as_ptr(), n as i32, off as libc::off_t) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            for v in &iov[first..] {
                // SAFETY: as above; zero the rest of the buffers (end of file).
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            return Ok(());
        }
        let mut r = r as usize;
        off += r as u64;
        while r > 0 && first < iov.len() {
            if r >= iov[first].iov_len {
                r -= iov[first].iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same buffer, by less than its length.
                iov[first].iov_base = unsafe { iov[first].iov_base.cast::<u8>().add(r) }.cast();
                iov[first].iov_len -= r;
                r = 0;
            }
        }
        while first < iov.len() && iov[first].iov_len == 0 {
            first += 1;
        }
    }
    Ok(())
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        Backend::features(self)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(c.len());
        let end = (offset as usize + size as usize).min(c.len());
        out[..end - start].copy_from_slice(&c[start..end]);
        out
    }

    fn update_memory(&self, _mem: Mem) -> std::io::Result<()> {
        // The handler updates the GuestMemoryAtomic we share with it.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        let (c2, n2) = (c, n.try_clone().ok()?);
        *self.workers.get(thread_index)?.exit.lock().expect("lock") = Some(n2);
        Some((c2, n))
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        // Let parked requests finish before the VMM reads the ring's state.
        if let Some(w) = self.workers.get(queue_index as usize) {
            let t0 = Instant::now();
            while w.inflight.load(Ordering::Acquire) > 0 && t0.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock<Mem>],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let (Some(worker), Some(vring)) = (self.workers.get(thread_id), vrings.first()) else {
            return Ok(());
        };
        if device_event == 0 {
            self.process_queue(vring, worker)
        } else if device_event == self.completion_event() {
            self.drain(vring, worker)
        } else {
            Ok(())
        }
    }
}

/// A listening vhost-user socket.
pub struct Server {
    listener: Listener,
    path: String,
}

/// A handle to end the connection being served (from another thread).
#[derive(Clone, Default)]
pub struct Stopper {
    inner: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
}

impl Stopper {
    /// End the current connection, if any.
    pub fn stop(&self) {
        if let Some(h) = self.inner.lock().expect("lock").as_ref() {
            h.shutdown();
        }
    }
}

impl Server {
    /// Create the socket (replacing a stale one).
    pub fn bind(path: &Path) -> Result<Server, Error> {
        let p = path.display().to_string();
        let listener = Listener::new(path, true).map_err(|e| Error::Socket {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        Ok(Server { listener, path: p })
    }

    /// The socket path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Wait for a VMM to connect, serve `source` to it until it disconnects (or `stopper` is
    /// used), then return. Call again for the next connection.
    pub fn serve_one(
        &mut self,
        source: Arc<dyn BlockSource>,
        opts: &Options,
        stats: &Arc<Stats>,
        stopper: &Stopper,
    ) -> Result<(), Error> {
        let geo = source.geometry();
        let queues = usize::from(opts.queues.clamp(1, 64));
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let sb = opts.serial.as_bytes();
        let n = sb.len().min(serial.len());
        serial[..n].copy_from_slice(&sb[..n]);
        let mem: Mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut workers = Vec::with_capacity(queues);
        for _ in 0..queues {
            workers.push(Worker {
                notifier: Arc::new(Notifier::new()?),
                state: Mutex::new(QueueState::default()),
                inflight: AtomicUsize::new(0),
                exit: Mutex::new(None),
            });
        }
        let backend = Arc::new(Backend {
            source,
            geo,
            queues,
            queue_size: usize::from(opts.queue_size.clamp(4, 1024)),
            serial,
            mem: mem.clone(),
            event_idx: AtomicBool::new(false),
            workers,
            stats: stats.clone(),
        });
        let mut daemon = VhostUserDaemon::new("lazyblk-vhost".into(), backend.clone(), mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        for (i, h) in daemon.get_epoll_handlers().iter().enumerate() {
            h.register_listener(
                backend.workers[i].notifier.fd.as_raw_fd(),
                EventSet::IN,
                u64::from(backend.completion_event()),
            )?;
        }
        daemon
            .start(&mut self.listener)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        *stopper.inner.lock().expect("lock") = daemon.shutdown_handle();
        let r = daemon.wait();
        *stopper.inner.lock().expect("lock") = None;
        for w in &backend.workers {
            if let Some(n) = w.exit.lock().expect("lock").take() {
                let _ = n.notify();
            }
        }
        use vhost::vhost_user::Error as VuError;
        match r {
            // A VMM that goes away, even mid-message, is an ordinary end of a connection.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VuError::Disconnected | VuError::PartialMessage | VuError::SocketBroken(_),
            )) => Ok(()),
            Err(e) => Err(Error::Daemon(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests;
