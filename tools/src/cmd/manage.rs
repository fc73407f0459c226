//! `lazyblk list`, `status` and `del`: the lazyblk devices, their counters, and stopping them.

use crate::daemon;
use crate::device::{is_ours, pid_alive, record_of};
use anyhow::{bail, Result};
use std::path::Path;
use std::time::Duration;

/// Run `lazyblk list`.
pub fn list(state: &Path) -> Result<()> {
    if lazyblk_ublk::check_kernel().is_err() {
        lazyblk_ublk::check_kernel()?;
    }
    println!(
        "{:<4} {:<22} {:<20} {:>8}  STATE",
        "ID", "DEVICE", "IMAGE", "PRESENT"
    );
    for id in lazyblk_ublk::device_ids() {
        let Ok((st, _)) = lazyblk_ublk::device_state(id) else {
            continue;
        };
        if !is_ours(id) {
            continue;
        }
        let rec = record_of(state, id);
        let (image, pct, alive) = match &rec {
            Some(r) => (
                r.image.chars().take(19).collect::<String>(),
                present_pct(state, id, r).map_or("?".into(), |p| format!("{p:.1}%")),
                pid_alive(r.pid),
            ),
            None => ("?".into(), "?".into(), false),
        };
        let state_s = match (st, alive) {
            (lazyblk_ublk::DevState::Live, true) => "live".to_string(),
            (lazyblk_ublk::DevState::Quiesced, _) => {
                format!("daemon dead, IO parked: run `lazyblk recover {id}`")
            }
            (s, _) => format!("{s:?}").to_lowercase(),
        };
        let (dev, state_s) = match rec.as_ref().and_then(|r| r.handover.as_ref()) {
            Some(h) if h.step == crate::handover::Step::Serving => (h.device.clone(), state_s),
            Some(h) => (
                h.device.clone(),
                format!("{state_s} (hand-over: {})", h.step.name()),
            ),
            None => (format!("/dev/ublkb{id}"), state_s),
        };
        println!(
            "{:<4} {:<22} {:<20} {:>8}  {}",
            id, dev, image, pct, state_s
        );
    }
    crate::cmd::handover::list_rows(state);
    Ok(())
}

/// Run `lazyblk status`.
pub fn status(state: &Path, id: u32, json: bool) -> Result<()> {
    if crate::cmd::handover::status(state, id, json)? {
        return Ok(());
    }
    lazyblk_ublk::device_state(id)?;
    let s = daemon::query_status(state, id)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("device         /dev/ublkb{id}");
    println!("image          {}", s.image);
    if let Some(a) = &s.attach {
        println!("attach         {}", a.line());
    }
    println!(
        "present        {:.1}% ({} of {} chunks)",
        100.0 * s.present_chunks as f64 / s.total_chunks.max(1) as f64,
        s.present_chunks,
        s.total_chunks
    );
    if let Some(pack) = &s.prefetch_pack {
        println!(
            "prefetch pack  {} of {} frames present ({pack})",
            s.pack_frames_present, s.pack_frames
        );
    } else if s.pack_frames > 0 {
        println!(
            "metadata pack  {} of {} frames present",
            s.pack_frames_present, s.pack_frames
        );
    }
    println!("hits           {}", s.hits);
    println!("misses         {}", s.misses);
    println!("bytes fetched  {}", s.bytes_fetched);
    println!("chunks fetched {}", s.chunks_fetched);
    println!(
        "local copies   {} chunks, {} bytes ({} stale, {} reflinked)",
        s.local_copies, s.local_copy_bytes, s.local_copy_stale, s.local_reflinks
    );
    println!("requests       {} ({} retries)", s.requests, s.retries);
    println!(
        "fetch latency  mean {:.1} ms, max {:.1} ms",
        s.fetch_latency_us_mean as f64 / 1000.0,
        s.fetch_latency_us_max as f64 / 1000.0
    );
    for o in &s.fetched_by_origin {
        let kind = if o.mirror { " (mirror)" } else { "" };
        println!("  from         {} bytes from {}{kind}", o.bytes, o.origin);
    }
    println!(
        "cache bytes    {} ({} chunks evicted, {} of them by the host cache limit)",
        s.cached_bytes, s.evicted_chunks, s.host_evicted_chunks
    );
    println!(
        "time           reads waited {} ms on misses; requests {} ms (summed), verify+write {} ms, fdatasync {} ms",
        s.miss_wait_us_total / 1000,
        s.network_us_total / 1000,
        s.verify_us_total / 1000,
        s.persist_us_total / 1000
    );
    println!("verify fails   {}", s.verify_failures);
    println!("failed IOs     {}", s.failed_ios);
    Ok(())
}

/// Run `lazyblk del`: device `id`, or every lazyblk device with `all`.
pub fn del(state: &Path, id: Option<u32>, all: bool) -> Result<()> {
    match (id, all) {
        (Some(id), false) => del_one(state, id),
        (None, true) => {
            for id in lazyblk_ublk::device_ids() {
                if is_ours(id) {
                    del_one(state, id)?;
                }
            }
            for r in crate::handover::without_ublk(state) {
                del_one(state, r.id)?;
            }
            Ok(())
        }
        _ => bail!("give a device id or --all"),
    }
}

/// Stop device `id`: its daemon, then the device, then its record and socket.
fn del_one(state: &Path, id: u32) -> Result<()> {
    // A device added with --handover: its dm device first (refused while mounted).
    if crate::cmd::handover::del(state, id)? {
        return Ok(());
    }
    lazyblk_ublk::device_state(id)?;
    if let Some(r) = record_of(state, id).filter(|r| pid_alive(r.pid)) {
        stop_daemon(id, r.pid)?;
    }
    if Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        lazyblk_ublk::delete(id)?;
    }
    let _ = std::fs::remove_file(daemon::record_path(state, id));
    let _ = std::fs::remove_file(daemon::socket_path(state, id));
    let _ = std::fs::remove_file(crate::metrics::socket_path(state, id));
    println!("deleted /dev/ublkb{id}");
    Ok(())
}

/// Ask the daemon `pid` of device `id` to stop (SIGTERM) and wait up to 30 s until it has.
fn stop_daemon(id: u32, pid: u32) -> Result<()> {
    // SAFETY: kill() sends a signal to a pid; no memory is involved.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let t0 = std::time::Instant::now();
    // One verdict, the last poll's (a second look could catch the process in its reaping).
    let mut alive = pid_alive(pid);
    while alive && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
        alive = pid_alive(pid);
    }
    if alive {
        bail!("the daemon of device {id} (pid {pid}) did not stop within 30 s");
    }
    Ok(())
}

/// How much of device `id`'s image is in its cache, in percent: from its daemon, else from
/// the cache's bitmap.
fn present_pct(state: &Path, id: u32, rec: &daemon::Record) -> Option<f64> {
    if let Ok(s) = daemon::query_status(state, id) {
        return Some(100.0 * s.present_chunks as f64 / s.total_chunks.max(1) as f64);
    }
    let hex = rec.image.strip_prefix("sha256:")?;
    let m = std::fs::read(rec.cache_root.join(hex).join("manifest")).ok()?;
    let n = lazyblk_format::Manifest::decode(&m).ok()?.chunk_count();
    // The chunks' bits only: pack frames' bits follow them.
    let b = std::fs::read(rec.cache_root.join(hex).join("bitmap")).ok()?;
    let bits = b.get(lazyblk_chunkstore::bitmap::HEADER_LEN..)?;
    let present = (0..n as usize)
        .filter(|&i| bits.get(i / 8).is_some_and(|x| x >> (i % 8) & 1 == 1))
        .count();
    Some(100.0 * present as f64 / n.max(1) as f64)
}
