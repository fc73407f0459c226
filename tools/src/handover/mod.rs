//! Hand-over to the kernel (`add --handover`): once every chunk of a read-only image is in the
//! cache, the device the user mounted (`/dev/mapper/lazyblk-<id>`, a dm `linear` over
//! `/dev/ublkbN`) is switched to a `linear` over a read-only loop device of the cache's `data`
//! file, the ublk device is deleted and the daemon exits: nothing in user space stays on the
//! read path.
//!
//! The steps, each recorded in the device record (`/run/lazyblk/<id>.json`, field `handover`)
//! before it is taken, so that a daemon killed anywhere leaves a state `lazyblk recover`
//! finishes or rolls back (see docs/DESIGN.md, "Hand-over to the kernel"):
//!
//! `serving` → `sealed` (cache complete, flushed, sealed, fdatasync'd) → `loop-attached`
//! (read-only loop over `data`, its table loaded into the dm device's inactive slot) →
//! `suspended` (suspend: IO in flight through ublk drains, new IO is held) → resume (the loop
//! table becomes active) → `swapped` → ublk device stopped and deleted → `handed-over`.

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

/// Where a hand-over is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// The dm device maps the ublk device; the daemon serves.
    Serving,
    /// Every chunk present; the cache is flushed, sealed and durable.
    Sealed,
    /// The loop device is attached (and its table loaded, inactive, into the dm device).
    LoopAttached,
    /// The dm device is being (or was) suspended.
    Suspended,
    /// The dm device maps the loop device; the ublk device may still exist.
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
    /// The dm device's name (`lazyblk-<id>`).
    pub dm_name: String,
    /// Its node, the device the user mounts.
    pub dm_dev: String,
    /// Device size in 512-byte sectors (the ublk device's, the loop device's).
    pub sectors: u64,
    /// The cache's data file, which the loop device serves.
    pub data: PathBuf,
    /// Where the hand-over is.
    pub step: Step,
    /// The loop device, once attached.
    #[serde(default)]
    pub loop_dev: Option<String>,
    /// The store's counters when it was sealed (for `status` once the daemon is gone).
    #[serde(default)]
    pub stats: Option<StatsSnapshot>,
}

/// The dm name of device `id`.
pub fn dm_name(id: u32) -> String {
    format!("lazyblk-{id}")
}

/// Test hook: `LAZYBLK_HANDOVER_KILL_AT=<step>` makes the daemon SIGKILL itself right after it
/// has recorded and taken `step` (`loop-attached`, `suspended`, `swapped`), so the guest tests
/// can crash it at each step.
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

/// Daemon, once the ublk device is live: make sure the dm device over it exists (create it,
/// or, after `recover`, take it back to serving through ublk) and put the hand-over into the
/// record. Returns the device path to report (`/dev/mapper/lazyblk-<id>`).
pub fn setup(record: &mut Record, ublk_bdev: &str, size: u64) -> Result<String> {
    let id = record.id;
    let name = dm_name(id);
    let ublk = dm::devno_of(ublk_bdev.trim_start_matches("/dev/"))?;
    let sectors = size / 512;
    let d = dm::Dm::open()?;
    let devno = if d.exists(&name) {
        // A new daemon of a device whose hand-over did not get to the swap: forget any table
        // loaded for it (that closes its loop device, which then detaches itself) and serve.
        match d.target(&name, false)? {
            Some(t) if t == ublk => {}
            other => {
                bail!("the device-mapper device {name} exists but maps {other:?}, not {ublk_bdev}")
            }
        }
        d.clear_inactive(&name)?;
        if d.info(&name)?.suspended {
            d.resume(&name)?;
            tracing::warn!("{name} was left suspended; resumed on {ublk_bdev}");
        }
        d.info(&name)?.devno
    } else {
        d.create_linear(&name, ublk, sectors)?
    };
    let node = dm::make_node(&name, devno)?;
    let hex = record.image.trim_start_matches("sha256:");
    record.handover = Some(Handover {
        dm_name: name,
        dm_dev: node.display().to_string(),
        sectors,
        data: record.cache_root.join(hex).join("data"),
        step: Step::Serving,
        loop_dev: None,
        stats: None,
    });
    Ok(node.display().to_string())
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
/// path (`finish`) deletes it and records `handed-over`. Returns the loop device.
fn run(ctx: &Ctx, store: &ChunkStore) -> Result<String> {
    let (state, id) = (ctx.state.as_path(), ctx.id);
    let rec = read_record(state, id).context("no device record")?;
    let h = rec.handover.clone().context("no hand-over in the record")?;
    let name = h.dm_name.clone();
    let d = dm::Dm::open()?;
    let ublk = dm::devno_of(&format!("ublkb{id}"))?;
    if d.target(&name, false)? != Some(ublk) {
        bail!("{name} does not map /dev/ublkb{id}");
    }
    // 1. Durable and complete: no fetch, readahead or eviction starts from now on.
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
    // 2. The loop device, and its table in the dm device's inactive slot (which holds it open).
    let size = h.sectors * 512;
    // On a disk, the loop device reads `data` with O_DIRECT: the page cache above it (the
    // mounted file system's, the device's) is the only copy, as it was with the daemon.
    let direct = File::open(&h.data)
        .is_ok_and(|f| lazyblk_blocksource::fsutil::page_cache_policy(f.as_raw_fd()).drops());
    let lo = loopdev::attach_read_only(&h.data, size, lazyblk_chunkstore::BLOCK_SIZE, direct)?;
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
    // 3. Suspend (IO in flight through ublk, which this daemon still serves, drains) and
    //    resume: the loop table becomes the active one.
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
    set_step(state, id, Step::Swapped)?;
    kill_point(Step::Swapped);
    // 4. Nothing maps the ublk device any more: stop it; `serve` returns and the daemon's exit
    //    path deletes it, records `handed-over` and closes the cache.
    ctx.stopping.store(true, Ordering::SeqCst);
    lazyblk_ublk::stop(id).context("stopping the ublk device")?;
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
    fn handover_is_refused_for_writable_devices_and_cache_limits() {
        assert!(check_options(false, None).is_ok());
        assert!(check_options(true, None).is_err());
        assert!(check_options(false, Some(1 << 30)).is_err());
    }
}
