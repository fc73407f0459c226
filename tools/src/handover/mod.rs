//! Hand-over to the kernel (`add --handover`): once every chunk of a read-only image is in the
//! cache, the device the user mounted is switched, under the mounted file system, from the ublk
//! device to the cache's `data` file, the ublk device is deleted and the daemon exits: nothing
//! in user space stays on the read path. Two stacks (see docs/DESIGN.md, "Hand-over to the
//! kernel"):
//!
//! - **loop** (the default for erofs images): the device to mount is a read-only loop device
//!   over `/dev/ublkbN` (O_DIRECT, so the only page cache is the one above it). The swap is one
//!   `LOOP_CHANGE_FD` to the cache file: the kernel freezes the loop queue (IO in flight through
//!   ublk completes), switches the backing file and goes on. What is left is exactly a kernel
//!   loop device of the image. `serving` → `sealed` (cache complete, flushed, sealed,
//!   fdatasync'd) → `swapped` (the loop device serves `data`) → ublk device stopped and deleted
//!   → `handed-over`.
//! - **dm** (any other image, or `--handover-via dm`): the device to mount is
//!   `/dev/mapper/lazyblk-<id>`, a dm `linear` over `/dev/ublkbN`, switched to a `linear` over a
//!   read-only loop device of `data`. `serving` → `sealed` → `loop-attached` (the loop table
//!   loaded into the dm device's inactive slot) → `suspended` (IO in flight through ublk drains,
//!   new IO is held) → resume (the loop table becomes active) → `swapped` → `handed-over`.
//!   The loop stack cannot serve every image: `LOOP_CHANGE_FD` reports a media change, and the
//!   kernel then shuts down a file system that has a shutdown hook (ext4, xfs); erofs has none
//!   and only loses its unused cached inodes and dentries. dm never tells the file system.
//!
//! Each step is recorded in the device record (`/run/lazyblk/<id>.json`, field `handover`)
//! before it is taken, so that a daemon killed anywhere leaves a state `lazyblk recover`
//! finishes or rolls back; where the record and the kernel may disagree (a kill between an
//! ioctl and the record), recover asks the kernel (the loop device's backing file, the dm
//! tables).

pub mod dm;
pub mod loopdev;

use crate::daemon::{read_record, record_path, Record};
use anyhow::{bail, Context, Result};
use lazyblk_chunkstore::{ChunkStore, StatsSnapshot};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// How the device the user mounts is built (`add --handover-via`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// loop for an erofs image, dm for anything else.
    Auto,
    /// A read-only loop device over the ublk device, switched with `LOOP_CHANGE_FD`.
    Loop,
    /// A dm `linear` over the ublk device, switched to a loop device of the cache file.
    Dm,
}

/// The stack a device was built with (in its record).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stack {
    /// dm `linear` (records written before there was a choice are dm).
    #[default]
    Dm,
    /// A loop device whose backing file is switched.
    Loop,
}

impl Stack {
    /// The `--handover-via` value that builds this stack.
    pub fn name(self) -> &'static str {
        match self {
            Stack::Dm => "dm",
            Stack::Loop => "loop",
        }
    }

    /// The stack `via` asks for, for an image whose first bytes are `first` (erofs or not).
    pub fn choose(via: Via, first: &[u8]) -> Stack {
        match via {
            Via::Loop => Stack::Loop,
            Via::Dm => Stack::Dm,
            Via::Auto if lazyblk_format::erofs::is_erofs(first) => Stack::Loop,
            Via::Auto => Stack::Dm,
        }
    }
}

/// Where a hand-over is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// The device maps the ublk device; the daemon serves.
    Serving,
    /// Every chunk present; the cache is flushed, sealed and durable.
    Sealed,
    /// dm: the loop device is attached (and its table loaded, inactive, into the dm device).
    LoopAttached,
    /// dm: the dm device is being (or was) suspended.
    Suspended,
    /// The device reads the cache file (dm: maps the loop device; loop: its backing file is
    /// `data`); the ublk device may still exist.
    Swapped,
    /// Done: the ublk device is deleted, no daemon.
    HandedOver,
}

impl Step {
    /// The name used in records, `list` and `LAZYBLK_HANDOVER_KILL_AT`.
    pub fn name(self) -> &'static str {
        match self {
            Step::Serving => "serving",
            Step::Sealed => "sealed",
            Step::LoopAttached => "loop-attached",
            Step::Suspended => "suspended",
            Step::Swapped => "swapped",
            Step::HandedOver => "handed-over",
        }
    }
}

/// The hand-over part of a device record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Handover {
    /// How the device is built.
    #[serde(default)]
    pub stack: Stack,
    /// dm: the dm device's name (`lazyblk-<id>`); loop: empty.
    #[serde(default)]
    pub dm_name: String,
    /// The device the user mounts (`/dev/mapper/lazyblk-<id>`, `/dev/loopN`).
    #[serde(alias = "dm_dev")]
    pub device: String,
    /// Device size in 512-byte sectors (the ublk device's, the loop device's).
    pub sectors: u64,
    /// The cache's data file, which the loop device serves.
    pub data: PathBuf,
    /// Where the hand-over is.
    pub step: Step,
    /// The loop device (dm: once attached; loop: the device itself).
    #[serde(default)]
    pub loop_dev: Option<String>,
    /// The store's counters when it was sealed (for `status` once the daemon is gone).
    #[serde(default)]
    pub stats: Option<StatsSnapshot>,
}

impl Handover {
    /// What the device reads once swapped: dm, its loop device; loop, the cache file.
    pub fn reads(&self) -> String {
        match self.stack {
            Stack::Dm => self.loop_dev.clone().unwrap_or_else(|| "?".into()),
            Stack::Loop => self.data.display().to_string(),
        }
    }
}

/// The dm name of device `id`.
pub fn dm_name(id: u32) -> String {
    format!("lazyblk-{id}")
}

/// Test hook: `LAZYBLK_HANDOVER_KILL_AT=<step>` makes the daemon SIGKILL itself right after it
/// has recorded and taken `step` (`sealed`, `swapped`; dm also `loop-attached`, `suspended`),
/// so the guest tests can crash it at each step.
fn kill_point(step: Step) {
    if std::env::var("LAZYBLK_HANDOVER_KILL_AT").as_deref() == Ok(step.name()) {
        tracing::warn!("LAZYBLK_HANDOVER_KILL_AT={}: killing myself", step.name());
        // SAFETY: kill() of our own pid with SIGKILL; no memory is involved.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Change the hand-over part of device `id`'s record (atomically replaced).
pub fn update(state: &Path, id: u32, f: impl FnOnce(&mut Handover)) -> Result<Record> {
    let mut rec = read_record(state, id).with_context(|| format!("no record of device {id}"))?;
    let h = rec
        .handover
        .as_mut()
        .with_context(|| format!("device {id} was not added with --handover"))?;
    f(h);
    lazyblk_builder::write_atomic(&record_path(state, id), &serde_json::to_vec_pretty(&rec)?)?;
    Ok(rec)
}

fn set_step(state: &Path, id: u32, step: Step) -> Result<()> {
    update(state, id, |h| h.step = step)?;
    tracing::info!("hand-over of device {id}: {}", step.name());
    Ok(())
}

/// Refuse `--handover` where it cannot work: a writable device keeps its daemon (its COW layer
/// is not a plain file), and a cache limit would evict chunks of an image that must stay whole.
pub fn check_options(writable: bool, cache_limit: Option<u64>) -> Result<()> {
    if writable {
        bail!("--handover is for read-only images only: a writable device (--writable) keeps its daemon");
    }
    if cache_limit.is_some() {
        bail!(
            "--handover needs the whole image in the cache; --cache-limit would evict parts of it"
        );
    }
    Ok(())
}

/// Daemon, once the ublk device is live: make sure the device over it exists (create it, or,
/// after `recover`, take the one of the previous daemon back to serving through ublk) and put
/// the hand-over into the record. `first` is the start of the image (for `Via::Auto`).
/// Returns the device path to report.
pub fn setup(
    state: &Path,
    record: &mut Record,
    ublk_bdev: &str,
    size: u64,
    via: Via,
    first: &[u8],
) -> Result<String> {
    let previous = read_record(state, record.id)
        .and_then(|r| r.handover)
        .filter(|h| h.step < Step::Swapped);
    let stack = match &previous {
        Some(h) => h.stack,
        None => Stack::choose(via, first),
    };
    let hex = record.image.trim_start_matches("sha256:");
    let data = record.cache_root.join(hex).join("data");
    let sectors = size / 512;
    let (dm_name, device, loop_dev) = match stack {
        Stack::Dm => {
            let name = dm_name(record.id);
            (name.clone(), setup_dm(&name, ublk_bdev, sectors)?, None)
        }
        Stack::Loop => {
            let lo = setup_loop(previous.as_ref(), ublk_bdev, size)?;
            (String::new(), lo.clone(), Some(lo))
        }
    };
    record.handover = Some(Handover {
        stack,
        dm_name,
        device: device.clone(),
        sectors,
        data,
        step: Step::Serving,
        loop_dev,
        stats: None,
    });
    Ok(device)
}

fn setup_dm(name: &str, ublk_bdev: &str, sectors: u64) -> Result<String> {
    let ublk = dm::devno_of(ublk_bdev.trim_start_matches("/dev/"))?;
    let d = dm::Dm::open()?;
    let devno = if d.exists(name) {
        // A new daemon of a device whose hand-over did not get to the swap: forget any table
        // loaded for it (that closes its loop device, which then detaches itself) and serve.
        match d.target(name, false)? {
            Some(t) if t == ublk => {}
            other => {
                bail!("the device-mapper device {name} exists but maps {other:?}, not {ublk_bdev}")
            }
        }
        d.clear_inactive(name)?;
        if d.info(name)?.suspended {
            d.resume(name)?;
            tracing::warn!("{name} was left suspended; resumed on {ublk_bdev}");
        }
        d.info(name)?.devno
    } else {
        d.create_linear(name, ublk, sectors)?
    };
    Ok(dm::make_node(name, devno)?.display().to_string())
}

/// The loop device over the ublk device: the previous daemon's, if it still serves the ublk
/// device (a recovered daemon), else a new one. Not autoclear: it must outlive this daemon
/// (`del` detaches it).
fn setup_loop(previous: Option<&Handover>, ublk_bdev: &str, size: u64) -> Result<String> {
    if let Some(lo) = previous.and_then(|h| h.loop_dev.as_deref()) {
        match loopdev::backing_file(lo) {
            Some(b) if b == Path::new(ublk_bdev) => return Ok(lo.to_string()),
            other => tracing::warn!(
                "the previous loop device {lo} serves {other:?}, not {ublk_bdev}; attaching a new one"
            ),
        }
    }
    let how = loopdev::Attach {
        block_size: lazyblk_chunkstore::BLOCK_SIZE,
        direct_io: true,
        autoclear: false,
    };
    let lo = loopdev::attach_read_only(Path::new(ublk_bdev), size, how)?;
    Ok(lo.path)
}

/// A request of `lazyblk handover` to the daemon: the channel its answer goes to.
type Request = mpsc::Sender<String>;

static REQUESTS: Mutex<Option<mpsc::Sender<Request>>> = Mutex::new(None);

/// Control socket `handover`: ask the hand-over thread to hand over now; its one-line answer.
pub fn request(timeout: Duration) -> String {
    let Some(tx) = REQUESTS.lock().expect("lock").clone() else {
        return "error: this device was not added with --handover".into();
    };
    let (atx, arx) = mpsc::channel();
    if tx.send(atx).is_err() {
        return "error: the hand-over already ran".into();
    }
    arx.recv_timeout(timeout)
        .unwrap_or_else(|_| "error: no answer from the hand-over".into())
}

/// What the hand-over thread of a daemon works with.
pub struct Ctx {
    /// State directory.
    pub state: PathBuf,
    /// Device id.
    pub id: u32,
    /// The store (weak: the daemon closes it at exit).
    pub store: Weak<ChunkStore>,
    /// Set before the daemon stops its ublk device, so that it deletes it.
    pub stopping: Arc<AtomicBool>,
}

/// Daemon: start the hand-over thread. It hands over as soon as the image is complete (`auto`,
/// i.e. `add --handover`) or when `lazyblk handover` asks (and the image is complete).
pub fn spawn(ctx: Ctx, auto: bool) {
    let (tx, rx) = mpsc::channel::<Request>();
    *REQUESTS.lock().expect("lock") = Some(tx);
    std::thread::spawn(move || loop {
        let asked = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(a) => Some(a),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if ctx.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Some(store) = ctx.store.upgrade() else {
            return;
        };
        let s = store.stats();
        let complete = s.present_chunks == s.total_chunks;
        if !complete {
            if let Some(a) = asked {
                let _ = a.send(format!(
                    "error: the image is not complete yet: {} of {} chunks present (add --hydrate fetches the rest)",
                    s.present_chunks, s.total_chunks
                ));
            }
            continue;
        }
        if asked.is_none() && !auto {
            continue;
        }
        match run(&ctx, &store) {
            Ok(loop_dev) => {
                if let Some(a) = asked {
                    let _ = a.send(format!("ok {loop_dev}"));
                }
                *REQUESTS.lock().expect("lock") = None;
                return;
            }
            Err(e) => {
                tracing::error!("hand-over of device {}: {e:#}; still serving", ctx.id);
                if let Some(a) = asked {
                    let _ = a.send(format!("error: {e:#}"));
                }
                if auto {
                    // Do not retry in a tight loop; `lazyblk handover` can still ask.
                    std::thread::sleep(Duration::from_secs(5));
                }
            }
        }
    });
}

/// The hand-over proper, up to and including the stop of the ublk device; the daemon's exit
/// path (`finish`) deletes it and records `handed-over`. Returns what the device now reads.
fn run(ctx: &Ctx, store: &ChunkStore) -> Result<String> {
    let (state, id) = (ctx.state.as_path(), ctx.id);
    let rec = read_record(state, id).context("no device record")?;
    let h = rec.handover.clone().context("no hand-over in the record")?;
    let ublk_bdev = format!("/dev/ublkb{id}");
    match h.stack {
        Stack::Dm => {
            let d = dm::Dm::open()?;
            let ublk = dm::devno_of(&format!("ublkb{id}"))?;
            if d.target(&h.dm_name, false)? != Some(ublk) {
                bail!("{} does not map {ublk_bdev}", h.dm_name);
            }
        }
        Stack::Loop => {
            let lo = h
                .loop_dev
                .as_deref()
                .context("the record has no loop device")?;
            if loopdev::backing_file(lo).as_deref() != Some(Path::new(&ublk_bdev)) {
                bail!("{lo} does not serve {ublk_bdev}");
            }
        }
    }
    seal(state, id, store)?;
    let lo_path = match h.stack {
        Stack::Dm => swap_dm(state, id, &h)?,
        Stack::Loop => swap_loop(state, id, &h)?,
    };
    set_step(state, id, Step::Swapped)?;
    kill_point(Step::Swapped);
    // Nothing maps the ublk device any more: stop it; `serve` returns and the daemon's exit
    // path deletes it, records `handed-over` and closes the cache.
    ctx.stopping.store(true, Ordering::SeqCst);
    lazyblk_ublk::stop(id).context("stopping the ublk device")?;
    Ok(lo_path)
}

/// Step 1, both stacks: durable and complete; no fetch, readahead or eviction starts from now
/// on.
fn seal(state: &Path, id: u32, store: &ChunkStore) -> Result<()> {
    store.flush()?;
    let left = store.seal(Duration::from_secs(5))?;
    let s = store.stats();
    if left > 0 || s.present_chunks != s.total_chunks {
        bail!(
            "the cache is not complete after sealing ({} of {} chunks, {left} in flight)",
            s.present_chunks,
            s.total_chunks
        );
    }
    update(state, id, |h| {
        h.step = Step::Sealed;
        h.stats = Some(s.clone());
    })?;
    tracing::info!("hand-over of device {id}: sealed");
    kill_point(Step::Sealed);
    Ok(())
}

/// The loop stack's swap: one `LOOP_CHANGE_FD` to the cache file. Returns what the device
/// now reads (the cache file).
fn swap_loop(state: &Path, id: u32, h: &Handover) -> Result<String> {
    let lo = h
        .loop_dev
        .clone()
        .context("the record has no loop device")?;
    if let Err(e) = loopdev::change_backing(&lo, &h.data) {
        let _ = set_step(state, id, Step::Serving);
        return Err(e);
    }
    if loopdev::backing_file(&lo).as_deref() != Some(h.data.as_path()) {
        bail!(
            "{lo} does not serve {} after LOOP_CHANGE_FD",
            h.data.display()
        );
    }
    tracing::info!(
        "hand-over of device {id}: {lo} now reads {}",
        h.data.display()
    );
    settle_loop(&lo, &h.data);
    Ok(h.reads())
}

/// After the loop stack's swap (by the daemon, or by `recover` after a kill): O_DIRECT was for
/// `/dev/ublkbN` (one page cache: the one above the loop device). A cache on a disk keeps it; on
/// tmpfs the page cache *is* the file, and buffered reads of it are what a kernel loop device of
/// a local image does (and faster: no direct-IO setup per IO).
pub fn settle_loop(lo: &str, data: &Path) {
    let keep_direct = File::open(data)
        .is_ok_and(|f| lazyblk_blocksource::fsutil::page_cache_policy(f.as_raw_fd()).drops());
    if !keep_direct && loopdev::direct_io(lo) == Some(true) {
        if let Err(e) = loopdev::set_direct_io(lo, false) {
            // Still correct, just the slower way: not a reason to stop the hand-over.
            tracing::warn!("{e:#}");
        }
    }
}

/// The dm stack's swap: a loop device of the cache file, its table loaded into the inactive
/// slot, suspend (IO in flight through ublk drains), resume on it. Returns the loop device.
fn swap_dm(state: &Path, id: u32, h: &Handover) -> Result<String> {
    let name = h.dm_name.clone();
    let d = dm::Dm::open()?;
    let size = h.sectors * 512;
    // On a disk, the loop device reads `data` with O_DIRECT: the page cache above it (the
    // mounted file system's, the device's) is the only copy, as it was with the daemon.
    let direct = File::open(&h.data)
        .is_ok_and(|f| lazyblk_blocksource::fsutil::page_cache_policy(f.as_raw_fd()).drops());
    let how = loopdev::Attach {
        block_size: lazyblk_chunkstore::BLOCK_SIZE,
        direct_io: direct,
        // The dm table holds it open; it detaches itself when the table goes.
        autoclear: true,
    };
    let lo = loopdev::attach_read_only(&h.data, size, how)?;
    let lo_path = lo.path.clone();
    let rollback = |d: &dm::Dm| {
        let _ = d.clear_inactive(&name);
        let _ = set_step(state, id, Step::Serving);
    };
    let lo_no = dm::devno_of(lo_path.trim_start_matches("/dev/"))?;
    if let Err(e) = d.load_linear(&name, lo_no, h.sectors) {
        rollback(&d);
        return Err(e);
    }
    drop(lo.file);
    update(state, id, |h| {
        h.step = Step::LoopAttached;
        h.loop_dev = Some(lo_path.clone());
    })?;
    tracing::info!("hand-over of device {id}: loop-attached ({lo_path})");
    kill_point(Step::LoopAttached);
    set_step(state, id, Step::Suspended)?;
    if let Err(e) = d.suspend(&name) {
        let _ = d.resume(&name);
        rollback(&d);
        return Err(e);
    }
    kill_point(Step::Suspended);
    if let Err(e) = d.resume(&name) {
        // Never leave it suspended: back to the ublk table.
        let _ = d.clear_inactive(&name);
        let _ = d.resume(&name);
        let _ = set_step(state, id, Step::Serving);
        return Err(e);
    }
    if d.target(&name, false)? != Some(lo_no) {
        bail!("{name} does not map {lo_path} after the swap");
    }
    Ok(lo_path)
}

/// Daemon exit path: whether the record of device `id` must stay (a hand-over that got to the
/// swap). Then the ublk device is deleted here (again: the normal exit path did already) and
/// the record says `handed-over`.
pub fn finish(state: &Path, id: u32) -> bool {
    let Some(h) = read_record(state, id).and_then(|r| r.handover) else {
        return false;
    };
    if h.step < Step::Swapped {
        return false;
    }
    complete_after_swap(state, id).unwrap_or_else(|e| {
        tracing::error!("hand-over of device {id}: {e:#}; `lazyblk recover {id}` finishes it");
    });
    true
}

/// After the swap: delete the ublk device if it is still there, record `handed-over`.
pub fn complete_after_swap(state: &Path, id: u32) -> Result<()> {
    if Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        if let Err(e) = lazyblk_ublk::delete(id) {
            if Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
                return Err(e).context("deleting the ublk device");
            }
        }
    }
    update(state, id, |h| h.step = Step::HandedOver)?;
    tracing::info!("hand-over of device {id}: handed-over; the daemon exits");
    Ok(())
}

/// The records in `state` that have a hand-over.
pub fn records(state: &Path) -> Vec<Record> {
    crate::daemon::records(state)
        .into_iter()
        .filter(|r| r.handover.is_some())
        .collect()
}

/// Records whose ublk device is gone (handed over, or crashed after the swap).
pub fn without_ublk(state: &Path) -> Vec<Record> {
    records(state)
        .into_iter()
        .filter(|r| !Path::new(&format!("/sys/class/ublk-char/ublkc{}", r.id)).exists())
        .collect()
}

/// For a new device without `--id`: an id that neither a ublk device nor a handed-over device
/// uses (ids of handed-over devices are free in the kernel but name their dm device and
/// record). `None` when there is no handed-over device: the kernel chooses as before.
pub fn free_id(state: &Path) -> Option<u32> {
    let taken: Vec<u32> = without_ublk(state).iter().map(|r| r.id).collect();
    if taken.is_empty() {
        return None;
    }
    let ublk = lazyblk_ublk::device_ids();
    (0..u32::MAX).find(|i| !taken.contains(i) && !ublk.contains(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_ordered_and_named_as_recorded() {
        let all = [
            Step::Serving,
            Step::Sealed,
            Step::LoopAttached,
            Step::Suspended,
            Step::Swapped,
            Step::HandedOver,
        ];
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        for s in all {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
    }

    #[test]
    fn a_record_without_a_handover_still_reads() {
        let r: Record = serde_json::from_value(serde_json::json!({
            "id": 3, "pid": 1, "bdev": "/dev/ublkb3", "image": "sha256:00",
            "manifest": "m", "cache_root": "/c", "queues": 1, "depth": 64,
            "io_deadline_secs": 0, "log": null
        }))
        .unwrap();
        assert!(r.handover.is_none());
    }

    #[test]
    fn auto_takes_the_loop_stack_for_erofs_only() {
        let mut sb = vec![0u8; 4096];
        sb[1024..1028].copy_from_slice(&lazyblk_format::erofs::MAGIC.to_le_bytes());
        sb[1024 + 12] = 12; // 4 KiB blocks
        assert_eq!(Stack::choose(Via::Auto, &sb), Stack::Loop);
        let ext4 = vec![0u8; 4096];
        assert_eq!(Stack::choose(Via::Auto, &ext4), Stack::Dm);
        assert_eq!(Stack::choose(Via::Loop, &ext4), Stack::Loop);
        assert_eq!(Stack::choose(Via::Dm, &sb), Stack::Dm);
        assert_eq!(Stack::choose(Via::Auto, &sb[..100]), Stack::Dm);
    }

    #[test]
    fn a_record_from_before_the_stacks_reads_as_dm() {
        let h: Handover = serde_json::from_value(serde_json::json!({
            "dm_name": "lazyblk-0", "dm_dev": "/dev/mapper/lazyblk-0", "sectors": 8,
            "data": "/c/data", "step": "serving"
        }))
        .unwrap();
        assert_eq!(h.stack, Stack::Dm);
        assert_eq!(h.device, "/dev/mapper/lazyblk-0");
    }

    #[test]
    fn handover_is_refused_for_writable_devices_and_cache_limits() {
        assert!(check_options(false, None).is_ok());
        assert!(check_options(true, None).is_err());
        assert!(check_options(false, Some(1 << 30)).is_err());
    }
}
