//! lazyblk's ublk frontend: serve any [`BlockSource`] as `/dev/ublkbN`. It depends on
//! `lazyblk-blocksource` only and must not know about HTTP, registries, manifests or caches.
//!
//! One thread per hardware queue runs a single-threaded executor over libublk's per-queue
//! io_uring. Each of the queue's `depth` tags is an async task: it takes an IO command from the
//! kernel, serves it, commits the result and waits for the next one.
//!
//! * A read whose range is local ([`BlockSource::locate`]) is a plain `read` on the queue's own
//!   ring, straight from the cache file into the IO buffer; from a file on a disk through a
//!   second, `O_DIRECT` descriptor (`direct`), so the file's pages do not sit in the page cache
//!   next to the kernel's own cache of the device's blocks. A small one from a file in memory
//!   (tmpfs, ramfs), which io_uring would hand to a worker, is done on the queue thread: a copy
//!   out of a read-only shared mapping of the file when the source vouches that the range is
//!   written data ([`Located::written`](lazyblk_blocksource::Located::written)), else a
//!   `pread`.
//! * A read with missing data calls [`BlockSource::fetch`] and parks the tag. The fetch finishes
//!   on a fetcher thread, which posts `(tag, result)` to the queue's [`notify::Notifier`] and
//!   writes its eventfd. A `POLL_ADD` on that eventfd is kept armed in the ring, so the queue
//!   thread, asleep in `io_uring_enter`, wakes, drains the posts and resumes the parked tags.
//!   Only the queue thread ever completes its IOs; many misses on one queue run in parallel.
//!
//! Devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`, so a new
//! daemon can take over a device whose daemon died ([`Options::recover`]) without the kernel
//! failing IO or unmounting anything. A planned hand-over closes the [`FetchGate`] first, so the
//! old daemon stops fetching and leaves the reads that need data to the new one.

mod direct;
mod gate;
mod map;
mod notify;

pub use gate::FetchGate;

use direct::Direct;
use lazyblk_blocksource::fsutil::{self, PageCachePolicy};
use lazyblk_blocksource::{pread_exact_or_zero, BlockSource};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkFlags, UblkUringData};
use map::Mapping;
use notify::Notifier;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Errors of the ublk frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel has no ublk driver.
    #[error("this kernel has no ublk: /dev/ublk-control is missing (load it with `modprobe ublk_drv`; needs CONFIG_BLK_DEV_UBLK, Linux 6.0 or later)")]
    NoUblk,
    /// Not allowed to open the control device.
    #[error("permission denied on /dev/ublk-control: run as root")]
    NotRoot,
    /// The requested device id is in use.
    #[error("ublk device id {0} is already taken")]
    IdTaken(u32),
    /// No such device.
    #[error("no ublk device with id {0}")]
    NoDevice(u32),
    /// The device cannot be recovered.
    #[error("ublk device {id} cannot be recovered: {why}")]
    NotRecoverable {
        /// Device id.
        id: u32,
        /// Why not.
        why: String,
    },
    /// libublk reported an error.
    #[error("ublk: {0}")]
    Ublk(String),
}

impl Error {
    /// The positive errno closest to this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NoUblk => libc::ENODEV,
            Error::NotRoot => libc::EPERM,
            Error::IdTaken(_) => libc::EEXIST,
            Error::NoDevice(_) => libc::ENOENT,
            Error::NotRecoverable { .. } => libc::EINVAL,
            Error::Ublk(_) => libc::EIO,
        }
    }
}

fn ublk_err(e: UblkError) -> Error {
    Error::Ublk(e.to_string())
}

/// Read counters of a device, one cache line per queue. Each slot has a single writer, its
/// queue thread, which bumps it with a plain load and store (no locked read-modify-write on the
/// IO path); readers on other threads see a value at most a few IOs old.
#[derive(Debug)]
pub struct IoStats {
    queues: Box<[QueueStats]>,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct QueueStats {
    reads: AtomicU64,
    read_misses: AtomicU64,
    miss_wait_us: AtomicU64,
}

/// Add one to a counter that only the calling thread writes.
fn bump(c: &AtomicU64) {
    add(c, 1);
}

/// Add `n` to a counter that only the calling thread writes.
fn add(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

impl IoStats {
    /// Counters for `queues` queues. A device must not have more queues than that: a shared
    /// slot would have two writers and lose counts.
    pub fn new(queues: usize) -> Self {
        IoStats {
            queues: (0..queues.max(1)).map(|_| QueueStats::default()).collect(),
        }
    }

    fn queue(&self, qid: u16) -> &QueueStats {
        &self.queues[usize::from(qid) % self.queues.len()]
    }

    /// Reads served so far.
    pub fn reads(&self) -> u64 {
        self.queues
            .iter()
            .map(|q| q.reads.load(Ordering::Relaxed))
            .sum()
    }

    /// Reads that had to wait for a fetch.
    pub fn read_misses(&self) -> u64 {
        self.queues
            .iter()
            .map(|q| q.read_misses.load(Ordering::Relaxed))
            .sum()
    }

    /// What those reads waited for their fetches, summed, in microseconds.
    pub fn miss_wait_us(&self) -> u64 {
        self.queues
            .iter()
            .map(|q| q.miss_wait_us.load(Ordering::Relaxed))
            .sum()
    }
}

impl Default for IoStats {
    fn default() -> Self {
        IoStats::new(16)
    }
}

/// How to create (or recover) a device.
#[derive(Clone, Debug)]
pub struct Options {
    /// Device id to use; `None` lets the kernel choose.
    pub id: Option<u32>,
    /// Hardware queues.
    pub queues: u16,
    /// Queue depth.
    pub depth: u16,
    /// Largest IO in bytes.
    pub io_buf_bytes: u32,
    /// Take over an existing, quiesced device instead of adding one.
    pub recover: bool,
    /// Opaque JSON stored with the device (for `list` and `recover`).
    pub target_data: serde_json::Value,
    /// Closed to stop fetching before a planned hand-over to a new daemon.
    pub gate: Arc<FetchGate>,
    /// Read counters, kept by the queue threads.
    pub stats: Arc<IoStats>,
}

/// Hardware queues of a device by default: one. With a queue per CPU, the thread that submits an
/// IO and the queue thread serving it share that CPU (measured in the 2-vCPU benchmark guest:
/// 4k random reads at half the rate with 2 queues x 32 than with 1 x 64).
pub const DEFAULT_QUEUES: u16 = 1;
/// Tags per queue by default (each holds an IO buffer of `io_buf_bytes`).
pub const DEFAULT_DEPTH: u16 = 64;

impl Default for Options {
    fn default() -> Self {
        Options {
            id: None,
            queues: DEFAULT_QUEUES,
            depth: DEFAULT_DEPTH,
            io_buf_bytes: 512 << 10,
            recover: false,
            target_data: serde_json::Value::Null,
            gate: Arc::default(),
            stats: Arc::default(),
        }
    }
}

/// A device that is live.
#[derive(Clone, Debug)]
pub struct LiveDevice {
    /// Device id (N in `/dev/ublkbN`).
    pub id: u32,
    /// Block device path.
    pub bdev: String,
    /// Feature flags the kernel accepted.
    pub flags: u64,
}

impl LiveDevice {
    /// Whether the kernel accepted user recovery for this device.
    pub fn recoverable(&self) -> bool {
        self.flags & u64::from(libublk::sys::UBLK_F_USER_RECOVERY) != 0
    }
}

/// Device states as reported by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevState {
    /// Not started or stopped.
    Dead,
    /// Serving IO.
    Live,
    /// The daemon died; IO is parked, waiting for `recover`.
    Quiesced,
    /// The daemon died; IO fails.
    FailIo,
    /// Unknown state value.
    Other(u16),
}

/// Name of the target type stored with devices.
pub const TARGET_NAME: &str = "lazyblk";

/// Fail early when device id `id` is already in use.
pub fn check_id_free(id: u32) -> Result<(), Error> {
    if Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        return Err(Error::IdTaken(id));
    }
    Ok(())
}

/// Fail early with a clear error when ublk is not usable here.
pub fn check_kernel() -> Result<(), Error> {
    let p = Path::new("/dev/ublk-control");
    if !p.exists() {
        return Err(Error::NoUblk);
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(p) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(Error::NotRoot),
        Err(e) => Err(Error::Ublk(format!("/dev/ublk-control: {e}"))),
    }
}

fn state_of(v: u16) -> DevState {
    match u32::from(v) {
        libublk::sys::UBLK_S_DEV_DEAD => DevState::Dead,
        libublk::sys::UBLK_S_DEV_LIVE => DevState::Live,
        libublk::sys::UBLK_S_DEV_QUIESCED => DevState::Quiesced,
        libublk::sys::UBLK_S_DEV_FAIL_IO => DevState::FailIo,
        _ => DevState::Other(v),
    }
}

fn open_ctrl(id: u32) -> Result<UblkCtrl, Error> {
    check_kernel()?;
    if !Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        return Err(Error::NoDevice(id));
    }
    UblkCtrl::new_simple(id as i32).map_err(|_| Error::NoDevice(id))
}

/// The driver's state for device `id`, and the target data stored with it.
pub fn device_state(id: u32) -> Result<(DevState, Option<serde_json::Value>), Error> {
    let ctrl = open_ctrl(id)?;
    let info = ctrl.dev_info();
    Ok((state_of(info.state), ctrl.get_target_data_from_json()))
}

/// Ids of all ublk devices.
pub fn device_ids() -> Vec<u32> {
    let mut ids = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/class/ublk-char") {
        for e in rd.flatten() {
            if let Some(n) = e.file_name().to_str().and_then(|n| n.strip_prefix("ublkc")) {
                if let Ok(id) = n.parse() {
                    ids.push(id);
                }
            }
        }
    }
    ids.sort();
    ids
}

/// Stop device `id` (its daemon's queues exit; the device stays until deleted).
pub fn stop(id: u32) -> Result<(), Error> {
    open_ctrl(id)?.kill_dev().map(|_| ()).map_err(ublk_err)
}

/// Delete device `id`.
pub fn delete(id: u32) -> Result<(), Error> {
    open_ctrl(id)?.del_dev().map(|_| ()).map_err(ublk_err)
}

/// Create (or recover) a device over `source` and serve it until it is stopped or deleted.
/// `on_live` runs once the block device exists.
pub fn serve(
    source: Arc<dyn BlockSource>,
    opts: &Options,
    on_live: impl FnOnce(&LiveDevice) + Send + Sync + 'static,
) -> Result<(), Error> {
    check_kernel()?;
    let geo = source.geometry();
    let recovery_flags =
        u64::from(libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE);
    let (id, dev_flags) = if opts.recover {
        let id = opts
            .id
            .ok_or_else(|| Error::Ublk("recover needs a device id".into()))?;
        let ctrl = open_ctrl(id)?;
        let info = ctrl.dev_info();
        if info.flags & u64::from(libublk::sys::UBLK_F_USER_RECOVERY) == 0 {
            return Err(Error::NotRecoverable {
                id,
                why: "it was created without UBLK_F_USER_RECOVERY".into(),
            });
        }
        match state_of(info.state) {
            DevState::Quiesced | DevState::FailIo => {}
            s => {
                return Err(Error::NotRecoverable {
                    id,
                    why: format!("its daemon is not dead (state {s:?})"),
                })
            }
        }
        // libublk retries EBUSY (the old daemon's /dev/ublkcN not yet released) for 30 s, then
        // returns it as Ok(-EBUSY): that is a failure, not a start.
        match ctrl.start_user_recover().map_err(ublk_err)? {
            r if r < 0 => {
                return Err(Error::NotRecoverable {
                    id,
                    why: format!(
                        "START_USER_RECOVERY failed with errno {} (is the old daemon still holding /dev/ublkc{id}?)",
                        -r
                    ),
                })
            }
            _ => {}
        }
        (id as i32, UblkFlags::UBLK_DEV_F_RECOVER_DEV)
    } else {
        if let Some(id) = opts.id {
            check_id_free(id)?;
        }
        (
            opts.id.map_or(-1, |i| i as i32),
            UblkFlags::UBLK_DEV_F_ADD_DEV,
        )
    };
    let ctrl = UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(id)
        .nr_queues(opts.queues.max(1))
        .depth(opts.depth.max(1))
        .io_buf_bytes(opts.io_buf_bytes)
        .ctrl_flags(recovery_flags)
        .dev_flags(dev_flags)
        .build()
        .map_err(|e| match e {
            UblkError::UringIOError(r) if r == -libc::EEXIST => Error::IdTaken(id as u32),
            other => ublk_err(other),
        })?;
    let target_data = opts.target_data.clone();
    let read_only = geo.read_only;
    // The source's files become fixed files 1.. of every queue's ring (0 is /dev/ublkcN), so a
    // present read skips the per-IO file lookup.
    let mut fds = source.files();
    fds.sort_unstable();
    fds.dedup();
    fds.truncate(MAX_FIXED_FILES);
    let n_src = fds.len() as u32;
    let mut n_direct = 0u32;
    let fixed: Arc<Vec<SourceFile>> = Arc::new(
        fds.into_iter()
            .map(|fd| {
                let policy = fsutil::page_cache_policy(fd);
                let in_memory = policy == PageCachePolicy::InMemory;
                let direct = match policy {
                    PageCachePolicy::Bypass => Direct::open(fd),
                    _ => None,
                };
                // Direct descriptors are fixed files after the source's, while there is room.
                let direct_fixed = direct
                    .as_ref()
                    .filter(|_| (n_direct as usize) < MAX_FIXED_DIRECT)
                    .map(|_| {
                        n_direct += 1;
                        n_src + n_direct
                    });
                SourceFile {
                    fd,
                    in_memory,
                    map: if in_memory { Mapping::of(fd) } else { None },
                    direct: direct.map(|d| (d, direct_fixed)),
                }
            })
            .collect(),
    );
    let fixed_init = fixed.clone();
    let tgt_init = move |dev: &mut UblkDev| {
        let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
        let tgt = &mut dev.tgt;
        for f in fixed_init.iter() {
            tgt.fds[tgt.nr_fds as usize] = f.fd;
            tgt.nr_fds += 1;
        }
        for f in fixed_init.iter() {
            if let Some((d, Some(_))) = &f.direct {
                tgt.fds[tgt.nr_fds as usize] = d.file.as_raw_fd();
                tgt.nr_fds += 1;
            }
        }
        tgt.dev_size = geo.size;
        let shift = geo.block_size.trailing_zeros() as u8;
        tgt.params = libublk::sys::ublk_params {
            types: libublk::sys::UBLK_PARAM_TYPE_BASIC,
            basic: libublk::sys::ublk_param_basic {
                attrs: if read_only {
                    libublk::sys::UBLK_ATTR_READ_ONLY
                } else {
                    0
                },
                logical_bs_shift: shift,
                physical_bs_shift: shift,
                io_opt_shift: shift,
                io_min_shift: shift,
                max_sectors,
                dev_sectors: geo.size >> 9,
                ..Default::default()
            },
            ..Default::default()
        };
        dev.set_target_json(serde_json::json!({ TARGET_NAME: target_data }));
        Ok(())
    };
    let src = source.clone();
    let gate = opts.gate.clone();
    let stats = opts.stats.clone();
    // Set when the device could not be started: the queue (serving on this thread) stops.
    let abort = Arc::new(AtomicBool::new(false));
    let q_abort = abort.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| {
        queue_main(
            qid,
            dev,
            src.clone(),
            gate.clone(),
            stats.clone(),
            fixed.clone(),
            &q_abort,
        )
    };
    let wh = move |c: &UblkCtrl| {
        let info = c.dev_info();
        on_live(&LiveDevice {
            id: info.dev_id,
            bdev: c.get_bdev_path(),
            flags: info.flags,
        });
    };
    if opts.queues.max(1) == 1 {
        serve_one_queue_here(&ctrl, tgt_init, q_fn, wh, &abort).map_err(ublk_err)?;
    } else {
        ctrl.run_target(tgt_init, q_fn, wh).map_err(ublk_err)?;
    }
    Ok(())
}

/// libublk's `run_target` for a device of one queue, with the queue served on the calling
/// thread: `run_target` spawns a thread per queue and keeps the calling one waiting for them,
/// a thread per device that only waits (a node runs hundreds of devices). Here a short-lived
/// thread starts the device (`START_DEV` returns only once the queue has fetched its
/// commands, and the kernel's partition scan reads through the queue) and runs `on_live`,
/// then exits. Should the start fail, `abort` stops the queue and the error is returned.
fn serve_one_queue_here<T, Q, W>(
    ctrl: &UblkCtrl,
    tgt_fn: T,
    q_fn: Q,
    on_live: W,
    abort: &AtomicBool,
) -> Result<(), UblkError>
where
    T: FnOnce(&mut UblkDev) -> Result<(), UblkError>,
    Q: FnOnce(u16, &UblkDev),
    W: FnOnce(&UblkCtrl) + Send,
{
    let dev = UblkDev::new(ctrl.get_name(), tgt_fn, ctrl)?;
    let tid = UblkCtrl::init_queue_thread();
    libublk::io::set_io_thread_idx(0);
    ctrl.set_thread_affinity(0, tid);
    ctrl.configure_queue(&dev, 0, tid)?;
    let started = std::thread::scope(|s| {
        let starter = std::thread::Builder::new()
            .name("lazyblk-start".into())
            .spawn_scoped(s, || {
                // The queue stops unless the device started and `on_live` returned (a panic
                // here must not leave the queue serving a device nobody started).
                struct StopUnlessLive<'a>(&'a AtomicBool, bool);
                impl Drop for StopUnlessLive<'_> {
                    fn drop(&mut self) {
                        if !self.1 {
                            self.0.store(true, Ordering::SeqCst);
                        }
                    }
                }
                let mut guard = StopUnlessLive(abort, false);
                // libublk's control ring is per thread: this one needs its own.
                libublk::ctrl::ublk_init_ctrl_task_ring(|ring| {
                    if ring.is_none() {
                        *ring = Some(
                            io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                                .build(16)
                                .map_err(UblkError::IOError)?,
                        );
                    }
                    Ok(())
                })?;
                ctrl.start_dev(&dev)?;
                on_live(ctrl);
                guard.1 = true;
                Ok(())
            })
            .map_err(|e| UblkError::OtherError(-e.raw_os_error().unwrap_or(libc::EAGAIN)))?;
        q_fn(0, &dev);
        starter
            .join()
            .unwrap_or(Err(UblkError::OtherError(-libc::EIO)))
    });
    // The device may be deleted from another context: a failure here is normal.
    let _ = ctrl.stop_dev();
    started
}

fn queue_main(
    qid: u16,
    dev: &UblkDev,
    source: Arc<dyn BlockSource>,
    gate: Arc<FetchGate>,
    stats: Arc<IoStats>,
    fixed: Arc<Vec<SourceFile>>,
    abort: &AtomicBool,
) {
    let depth = dev.dev_info.queue_depth;
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!("queue {qid}: {e}");
            return;
        }
    };
    let notifier = match Notifier::new(depth) {
        Ok(n) => Arc::new(n),
        Err(e) => {
            tracing::error!("queue {qid}: eventfd: {e}");
            return;
        }
    };
    let exe = smol::LocalExecutor::new();
    let mut tasks = Vec::new();
    for tag in 0..depth {
        let (q, n, s, g) = (q.clone(), notifier.clone(), source.clone(), gate.clone());
        let (st, fx) = (stats.clone(), fixed.clone());
        tasks.push(exe.spawn(async move {
            let ctx = IoCtx {
                notifier: &n,
                source: &*s,
                gate: &g,
                stats: st.queue(qid),
                fixed: &fx,
            };
            match io_task(&q, tag, &ctx).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!("queue {qid} tag {tag}: {e}"),
            }
        }));
    }
    {
        let (q, n) = (q.clone(), notifier.clone());
        exe.spawn(async move { n.run(&q).await }).detach();
    }
    smol::block_on(exe.run(async {
        let run_ops = || while exe.try_tick() {};
        let done = || abort.load(Ordering::SeqCst) || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            if !matches!(e, UblkError::QueueIsDown) {
                tracing::error!("queue {qid}: {e}");
            }
        }
    }));
}

/// What an IO task of a queue works with.
struct IoCtx<'a> {
    notifier: &'a Arc<Notifier>,
    source: &'a dyn BlockSource,
    gate: &'a FetchGate,
    stats: &'a QueueStats,
    /// Fixed file `i + 1` of the ring is `fixed[i]`.
    fixed: &'a [SourceFile],
}

async fn io_task(q: &UblkQueue<'_>, tag: u16, ctx: &IoCtx<'_>) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let res = handle_io(q, tag, ctx, buf.as_mut_slice()).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

async fn handle_io(q: &UblkQueue<'_>, tag: u16, ctx: &IoCtx<'_>, buf: &mut [u8]) -> i32 {
    let (notifier, source) = (ctx.notifier, ctx.source);
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let off = iod.start_sector << 9;
    let len = (iod.nr_sectors as usize) << 9;
    match op {
        libublk::sys::UBLK_IO_OP_READ => {
            if len > buf.len() {
                return -libc::EINVAL;
            }
            bump(&ctx.stats.reads);
            let loc = match source.locate(off, len as u64) {
                Some(loc) => loc,
                None => {
                    bump(&ctx.stats.read_misses);
                    let Some(_fetching) = ctx.gate.enter() else {
                        // Handing over to a new daemon: never complete this read here; the
                        // kernel re-issues it to the next daemon once this one has exited.
                        return std::future::pending().await;
                    };
                    tracing::debug!("tag {tag}: miss at {off}+{len}");
                    let waited = std::time::Instant::now();
                    // With a cache limit, a range can be evicted between its fetch and this
                    // read: fetch it again, a few times, before failing the IO.
                    let mut tries = 0;
                    loop {
                        let n = notifier.clone();
                        source.fetch(
                            off,
                            len as u64,
                            Box::new(move |r| n.post(tag, r.map_err(|e| e.errno()))),
                        );
                        if let Err(errno) = notifier.wait(tag).await {
                            tracing::warn!("read {off}+{len} failed: errno {errno}");
                            return -errno;
                        }
                        if let Some(loc) = source.locate(off, len as u64) {
                            add(&ctx.stats.miss_wait_us, waited.elapsed().as_micros() as u64);
                            break loc;
                        }
                        tries += 1;
                        if tries == lazyblk_blocksource::FETCH_TRIES {
                            tracing::warn!("read {off}+{len}: evicted again after {tries} fetches");
                            return -libc::EIO;
                        }
                    }
                }
            };
            match ctx.fixed.iter().position(|f| f.fd == loc.fd) {
                Some(i) if ctx.fixed[i].in_memory && len <= INLINE_READ_MAX => {
                    let f = &ctx.fixed[i];
                    let map = f.map.as_ref().filter(|_| loc.written);
                    if map.is_some_and(|m| m.copy_out(loc.offset, &mut buf[..len])) {
                        return len as i32;
                    }
                    match pread_exact_or_zero(loc.fd, &mut buf[..len], loc.offset) {
                        Ok(()) => len as i32,
                        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                    }
                }
                Some(i) => {
                    let f = &ctx.fixed[i];
                    let direct = f.direct.as_ref().map(|(d, fixed)| {
                        let file = match fixed {
                            Some(k) => File::Fixed(*k),
                            None => File::Fd(d.file.as_raw_fd()),
                        };
                        (file, d)
                    });
                    let file = File::Fixed(i as u32 + 1);
                    read_local(file, direct, loc.offset, &mut buf[..len]).await
                }
                None => read_local(File::Fd(loc.fd), None, loc.offset, &mut buf[..len]).await,
            }
        }
        libublk::sys::UBLK_IO_OP_FLUSH => match source.flush() {
            Ok(()) => 0,
            Err(e) => -e.errno(),
        },
        libublk::sys::UBLK_IO_OP_WRITE => match source.write_at(off, &buf[..len.min(buf.len())]) {
            Ok(()) => len as i32,
            Err(e) => -e.errno(),
        },
        libublk::sys::UBLK_IO_OP_DISCARD | libublk::sys::UBLK_IO_OP_WRITE_ZEROES => {
            match source.discard(off, len as u64) {
                Ok(()) => 0,
                Err(e) => -e.errno(),
            }
        }
        _ => -libc::EOPNOTSUPP,
    }
}

/// Fixed files of a queue's ring besides /dev/ublkcN (libublk has room for 32 in all): the
/// source's files, then their direct descriptors.
const MAX_FIXED_FILES: usize = 16;
const MAX_FIXED_DIRECT: usize = 15;

/// A file of the source, registered as fixed file `i + 1` of every queue's ring.
#[derive(Debug)]
struct SourceFile {
    fd: i32,
    /// On tmpfs or ramfs: a read is a copy from memory and never waits for a device.
    in_memory: bool,
    /// A read-only mapping of an in-memory file, for its written ranges.
    map: Option<Mapping>,
    /// For a file on a disk: its `O_DIRECT` descriptor and, when it has one, its fixed file
    /// index in the rings.
    direct: Option<(Direct, Option<u32>)>,
}

/// Largest read of an in-memory file done on the queue thread itself. Larger ones still go to
/// the ring: io-wq workers copy them in parallel on other CPUs, while the queue thread copying
/// 512 KiB reads one after the other halved 1 MiB sequential reads in the benchmark guest.
const INLINE_READ_MAX: usize = 32 << 10;

// Whether a file is in memory (tmpfs, ramfs) is `fsutil::in_memory`. io_uring cannot complete
// a buffered read of such a file inline (observed on 6.12 in a guest profile): it hands every
// one to an io-wq worker, two context switches per 4 KiB read, which halved the 4k random read
// rate of a cache on tmpfs in the benchmark guest. A plain `pread` on the queue thread is a
// memcpy instead.

/// Where a present read comes from: a file registered with the ring, or a plain descriptor.
#[derive(Clone, Copy)]
enum File {
    Fixed(u32),
    Fd(i32),
}

/// Read `buf.len()` bytes at `offset` of `file` on the queue's ring, retrying short reads.
/// With `direct` (the file's `O_DIRECT` descriptor), each read whose offset, length and buffer
/// meet its alignment goes there; the others, and all after one the file system refused with
/// `EINVAL`, go to `file`.
async fn read_local(
    file: File,
    mut direct: Option<(File, &Direct)>,
    offset: u64,
    buf: &mut [u8],
) -> i32 {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let (ptr, n, at) = (rest.as_mut_ptr(), rest.len() as u32, offset + done as u64);
        let via = match direct {
            Some((f, d)) if d.fits(at, rest.len(), ptr) => Some(f),
            _ => None,
        };
        let sqe = match via.unwrap_or(file) {
            File::Fixed(i) => {
                io_uring::opcode::Read::new(io_uring::types::Fixed(i), ptr, n).offset(at)
            }
            File::Fd(fd) => io_uring::opcode::Read::new(io_uring::types::Fd(fd), ptr, n).offset(at),
        }
        .build();
        let r = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
            .await
            .unwrap_or(-libc::EIO);
        if r == -libc::EAGAIN || r == -libc::EINTR {
            continue;
        }
        if r == -libc::EINVAL && via.is_some() {
            tracing::debug!("an O_DIRECT read at {at}+{n} was refused; reading it buffered");
            direct = None;
            continue;
        }
        if r < 0 {
            return r;
        }
        if r == 0 {
            rest.fill(0);
            break;
        }
        done += r as usize;
    }
    buf.len() as i32
}
