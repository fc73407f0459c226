//! `lazyblk handover`, and what `recover`, `list`, `status`, `del` and `gc` do for devices added
//! with `--handover` (see `handover/mod.rs` for the steps and the daemon's side).

use crate::daemon::{self, read_record, record_path, socket_path, Record};
use crate::device::pid_alive;
use crate::handover::{self, dm, loopdev, Handover, Stack, Step};
use anyhow::{bail, Context, Result};
use lazyblk_chunkstore::StatsSnapshot;
use std::path::Path;
use std::time::{Duration, Instant};

fn record(state: &Path, id: u32) -> Result<(Record, Handover)> {
    let rec =
        read_record(state, id).with_context(|| format!("device {id} is not a lazyblk device"))?;
    let h = rec.handover.clone().with_context(|| {
        format!(
            "device {id} was added without --handover: its file system is on /dev/ublkb{id} itself, which cannot be swapped for a loop device"
        )
    })?;
    Ok((rec, h))
}

/// Run `lazyblk handover <id>`: the daemon hands a complete image over now, and exits.
pub fn run(state: &Path, id: u32) -> Result<()> {
    let (rec, h) = record(state, id)?;
    if h.step == Step::HandedOver {
        println!("{} already handed over to {}", h.device, h.reads());
        return Ok(());
    }
    if !pid_alive(rec.pid) {
        bail!(
            "device {id} has no running daemon (pid {} is gone, hand-over at step {}): run `lazyblk recover {id}`",
            rec.pid,
            h.step.name()
        );
    }
    let answer = daemon::control(state, id, "handover", Duration::from_secs(150))?;
    let Some(lo) = answer.strip_prefix("ok ") else {
        bail!("{}", answer.strip_prefix("error: ").unwrap_or(&answer));
    };
    let t0 = Instant::now();
    while pid_alive(rec.pid)
        || read_record(state, id)
            .and_then(|r| r.handover)
            .map(|h| h.step)
            != Some(Step::HandedOver)
    {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!(
                "the daemon of device {id} (pid {}) swapped {} to {lo} but did not finish within 60 s",
                rec.pid,
                h.device
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("handed over {} to {lo}; no daemon", h.device);
    Ok(())
}

/// `lazyblk recover <id>` of a device added with `--handover`. Returns what was done when the
/// hand-over was finished here (no daemon needed), `None` when the caller must start a new
/// daemon (which resumes serving through ublk and hands over again).
///
/// Before the swap IO may be parked in the dead daemon's ublk device: a swap now (a dm
/// suspend, a `LOOP_CHANGE_FD`, both wait for the IO in flight) would wait for it forever, so
/// the way forward is a new daemon. Once the swap is done (loop: the loop device's backing file
/// is the cache file, whatever the record says; dm: the suspend finished, so nothing is in
/// flight through ublk, or the loop table is active), the way forward needs no daemon: for dm
/// resume (the loop table loaded before the suspend becomes active), delete the ublk device.
pub fn recover(state: &Path, id: u32) -> Result<Option<String>> {
    let Some(rec) = read_record(state, id) else {
        return Ok(None);
    };
    let Some(h) = rec.handover.clone() else {
        return Ok(None);
    };
    if pid_alive(rec.pid) {
        if h.step >= Step::Sealed && h.step < Step::HandedOver {
            bail!(
                "device {id}: its daemon (pid {}) is handing it over (step {})",
                rec.pid,
                h.step.name()
            );
        }
        return Ok(None);
    }
    match h.step {
        Step::HandedOver => Ok(Some(format!(
            "{} is handed over to {}; nothing to recover",
            h.device,
            h.reads()
        ))),
        _ if h.stack == Stack::Loop => recover_loop(state, id, &h),
        Step::Serving | Step::Sealed | Step::LoopAttached => Ok(None),
        Step::Suspended | Step::Swapped => {
            let d = dm::Dm::open()?;
            let name = &h.dm_name;
            let lo = h
                .loop_dev
                .as_deref()
                .context("the record has no loop device")?;
            let lo_no = dm::devno_of(lo.trim_start_matches("/dev/")).ok();
            let bound = loopdev::backing_file(lo).is_some_and(|b| b == h.data);
            let info = d.info(name)?;
            let active = d.target(name, false)?;
            let inactive = d.target(name, true)?;
            if active.is_some() && active == lo_no && bound {
                if info.suspended {
                    d.resume(name)?;
                }
            } else if info.suspended {
                if inactive.is_some() && inactive == lo_no && bound {
                    // Suspended, the loop table loaded: the swap is one resume away.
                    d.resume(name)?;
                    eprintln!("lazyblk: {name} was suspended mid-hand-over; resumed on {lo}");
                } else {
                    // Suspended without a usable loop table: back to ublk, a daemon goes on.
                    let _ = d.clear_inactive(name);
                    d.resume(name)?;
                    handover::update(state, id, |h| h.step = Step::Serving)?;
                    eprintln!(
                        "lazyblk: {name} was suspended mid-hand-over; resumed on /dev/ublkb{id}"
                    );
                    return Ok(None);
                }
            } else {
                // The suspend never finished: the ublk table is active; a daemon goes on.
                handover::update(state, id, |h| h.step = Step::Serving)?;
                return Ok(None);
            }
            if d.target(name, false)? != lo_no {
                bail!("{name} does not map {lo} after resuming it");
            }
            handover::update(state, id, |h| h.step = Step::Swapped)?;
            handover::complete_after_swap(state, id)?;
            let _ = std::fs::remove_file(socket_path(state, id));
            Ok(Some(format!(
                "handed over {} to {lo} (device {id}); no daemon",
                h.device
            )))
        }
    }
}

/// `recover` of a loop-stack device whose daemon is gone: the kernel says whether the swap
/// happened (the record may still say `sealed` if the daemon died right after the ioctl).
fn recover_loop(state: &Path, id: u32, h: &Handover) -> Result<Option<String>> {
    let lo = h
        .loop_dev
        .as_deref()
        .context("the record has no loop device")?;
    match loopdev::backing_file(lo) {
        Some(b) if b == h.data => {
            handover::settle_loop(lo, &h.data);
            handover::update(state, id, |h| h.step = Step::Swapped)?;
            handover::complete_after_swap(state, id)?;
            let _ = std::fs::remove_file(socket_path(state, id));
            Ok(Some(format!(
                "handed over {lo} to {} (device {id}); no daemon",
                h.data.display()
            )))
        }
        Some(b) if b == Path::new(&format!("/dev/ublkb{id}")) => {
            if h.step != Step::Serving {
                handover::update(state, id, |h| h.step = Step::Serving)?;
            }
            Ok(None)
        }
        other => bail!(
            "device {id}: its loop device {lo} serves {}, neither /dev/ublkb{id} nor {}",
            other.map_or("nothing".into(), |p| p.display().to_string()),
            h.data.display()
        ),
    }
}

/// `del` of a loop-stack device: refuse while it is mounted (or otherwise claimed), detach the
/// loop device (whichever it serves, the ublk device or the cache file).
fn del_loop(h: &Handover, id: u32) -> Result<()> {
    let Some(lo) = h.loop_dev.as_deref() else {
        return Ok(());
    };
    let Some(backing) = loopdev::backing_file(lo) else {
        return Ok(());
    };
    if backing != h.data && backing != Path::new(&format!("/dev/ublkb{id}")) {
        // Not ours any more (detached and reused): leave it alone.
        return Ok(());
    }
    if loopdev::claimed(lo) {
        let at = dm::devno_of(lo.trim_start_matches("/dev/"))
            .ok()
            .and_then(dm::mount_point)
            .map(|m| format!("mounted on {m}"))
            .unwrap_or_else(|| "in use".into());
        bail!("{lo} is {at}: unmount it first");
    }
    loopdev::detach(lo)
}

/// `lazyblk del <id>` of a device with a hand-over: refuse while it is open (mounted), remove
/// the dm device or detach the loop device, and for a handed-over device drop its record (the
/// cache is kept). Returns `true` when nothing else is left to delete (no ublk device).
pub fn del(state: &Path, id: u32) -> Result<bool> {
    let Some(h) = read_record(state, id).and_then(|r| r.handover) else {
        return Ok(false);
    };
    if h.stack == Stack::Loop {
        del_loop(&h, id)?;
        return finish_del(state, id, h);
    }
    let d = dm::Dm::open()?;
    if d.exists(&h.dm_name) {
        let info = d.info(&h.dm_name)?;
        if info.suspended {
            bail!(
                "{} is suspended mid-hand-over: run `lazyblk recover {id}` first",
                h.device
            );
        }
        if info.open_count > 0 {
            let at = dm::mount_point(info.devno)
                .map(|m| format!("mounted on {m}"))
                .unwrap_or_else(|| "open".into());
            bail!("{} is {at}: unmount it first", h.device);
        }
        d.remove(&h.dm_name)?;
    }
    dm::remove_node(&h.dm_name);
    if let Some(lo) = &h.loop_dev {
        // The loop device detaches itself once the dm device closed it (autoclear); make
        // sure, without touching a loop device that now serves something else.
        if loopdev::backing_file(lo).is_some_and(|b| b == h.data) {
            loopdev::detach(lo)?;
        }
    }
    finish_del(state, id, h)
}

/// The end of `del` of a device with a hand-over: `false` while a ublk device is left (the
/// caller deletes it as any device), else drop the record.
fn finish_del(state: &Path, id: u32, h: Handover) -> Result<bool> {
    if Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        // Still a ublk device (and maybe its daemon): `del` goes on as for any device.
        return Ok(false);
    }
    let _ = std::fs::remove_file(record_path(state, id));
    let _ = std::fs::remove_file(socket_path(state, id));
    let detached = match h.stack {
        Stack::Loop => " (detached)".to_string(),
        Stack::Dm => h
            .loop_dev
            .map(|l| format!(" (loop device {l} detached)"))
            .unwrap_or_default(),
    };
    println!("deleted {}{detached}; cache kept", h.device);
    Ok(true)
}

/// `list` rows of devices whose ublk device is gone.
pub fn list_rows(state: &Path) {
    for r in handover::without_ublk(state) {
        let Some(h) = &r.handover else { continue };
        let pct = h
            .stats
            .as_ref()
            .map_or("?".into(), |s| format!("{:.1}%", pct(s)));
        let what = match h.step {
            Step::HandedOver => format!(
                "handed-over ({}, no daemon)",
                h.loop_dev.as_deref().unwrap_or("?")
            ),
            s => format!(
                "hand-over interrupted at {}: run `lazyblk recover {}`",
                s.name(),
                r.id
            ),
        };
        println!(
            "{:<4} {:<22} {:<20} {:>8}  {}",
            r.id,
            h.device,
            r.image.chars().take(19).collect::<String>(),
            pct,
            what
        );
    }
}

fn pct(s: &StatsSnapshot) -> f64 {
    100.0 * s.present_chunks as f64 / s.total_chunks.max(1) as f64
}

/// `status` of a device whose ublk device is gone: the counters kept in its record.
pub fn status(state: &Path, id: u32, json: bool) -> Result<bool> {
    let Some(rec) = read_record(state, id) else {
        return Ok(false);
    };
    let Some(h) = rec.handover else {
        return Ok(false);
    };
    if Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        return Ok(false);
    }
    let s = h.stats.clone().unwrap_or_default();
    if json {
        let mut v = serde_json::to_value(&s)?;
        v["handover"] = serde_json::json!({
            "step": h.step.name(),
            "device": h.device,
            "loop": h.loop_dev,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(true);
    }
    println!("device         {}", h.device);
    println!(
        "handed over    {} ({}; no daemon, no network)",
        h.loop_dev.as_deref().unwrap_or("?"),
        h.step.name()
    );
    println!("image          {}", rec.image);
    println!(
        "present        {:.1}% ({} of {} chunks)",
        pct(&s),
        s.present_chunks,
        s.total_chunks
    );
    println!("misses         {}", s.misses);
    println!("bytes fetched  {}", s.bytes_fetched);
    println!("chunks fetched {}", s.chunks_fetched);
    println!(
        "local copies   {} chunks, {} bytes ({} stale, {} reflinked)",
        s.local_copies, s.local_copy_bytes, s.local_copy_stale, s.local_reflinks
    );
    println!("requests       {} ({} retries)", s.requests, s.retries);
    println!("verify fails   {}", s.verify_failures);
    println!("failed IOs     {}", s.failed_ios);
    Ok(true)
}

/// The caches `gc` must keep: those of devices with a hand-over record, and any whose data
/// file a loop device serves (a handed-over device holds the file open, not the cache lock).
pub fn gc_keep(state: &Path, cache_root: &Path) -> Vec<lazyblk_format::ImageId> {
    let mut keep: Vec<_> = handover::records(state)
        .iter()
        .filter_map(|r| lazyblk_format::ImageId::parse(&r.image).ok())
        .collect();
    if let Ok(rd) = std::fs::read_dir(cache_root) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if let Ok(id) = lazyblk_format::ImageId::parse(&n) {
                if !loopdev::serving(&e.path().join("data")).is_empty() {
                    keep.push(id);
                }
            }
        }
    }
    keep
}
