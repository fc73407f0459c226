//! `lazyblk recover` and `detach`: hand a device over from one daemon to the next without
//! stopping it (the supervisor of `add --supervise`, in `supervise.rs`, recovers the same way).

use crate::cmd::add::spawn_daemon;
use crate::daemon;
use crate::device::{pid_alive, record_of};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Wait until device `id`, whose daemon was `pid`, can be recovered: the daemon is gone and the
/// kernel has parked the device's IO (QUIESCED). On 6.12 the kernel notices a dead daemon at once
/// when the daemon had idle tags, else only at the block layer's IO timeout (30 s).
pub fn wait_recoverable(id: u32, pid: u32, timeout: Duration, say: bool) -> Result<()> {
    use lazyblk_ublk::DevState;
    let t0 = std::time::Instant::now();
    let mut said = !say;
    loop {
        let (st, _) = lazyblk_ublk::device_state(id)?;
        let alive = pid_alive(pid);
        match st {
            DevState::Quiesced | DevState::FailIo if !alive => return Ok(()),
            DevState::Live if alive => {
                bail!("device {id} is live and its daemon (pid {pid}) is running")
            }
            DevState::Dead => bail!(
                "device {id} is stopped and cannot be recovered (delete it with `lazyblk del {id}`)"
            ),
            _ => {}
        }
        if t0.elapsed() >= timeout {
            bail!(
                "device {id} is still {st:?} {} s after its daemon (pid {pid}) went away; try `lazyblk recover {id}` again",
                timeout.as_secs()
            );
        }
        if !said {
            eprintln!(
                "lazyblk: waiting up to {} s for the kernel to park the IO of device {id} (daemon pid {pid} is gone)",
                timeout.as_secs()
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `add` command line that takes over device `id` with the settings of its record.
pub fn recover_args(state: &Path, id: u32) -> Result<Vec<String>> {
    let rec =
        record_of(state, id).with_context(|| format!("device {id} is not a lazyblk device"))?;
    let mut args = vec![
        "--state-dir".to_string(),
        state.display().to_string(),
        "add".into(),
        rec.manifest.clone(),
        "--digest".into(),
        rec.image.clone(),
        "--queues".into(),
        rec.queues.to_string(),
        "--depth".into(),
        rec.depth.to_string(),
        "--recover-id".into(),
        id.to_string(),
    ];
    if rec.store_args.is_empty() {
        // A record written before the store settings were kept.
        args.extend([
            "--cache-dir".into(),
            rec.cache_root.display().to_string(),
            "--io-deadline".into(),
            rec.io_deadline_secs.to_string(),
        ]);
    } else {
        args.extend(rec.store_args.iter().cloned());
    }
    if let Some(l) = &rec.log {
        args.extend(["--log-file".into(), l.display().to_string()]);
    }
    if let Some(c) = &rec.cow {
        args.extend(["--writable".into(), "--cow".into(), c.display().to_string()]);
    }
    if let Some(h) = &rec.handover {
        args.extend([
            "--handover".into(),
            "--handover-via".into(),
            h.stack.name().into(),
        ]);
    }
    Ok(args)
}

/// Run `lazyblk recover`: wait until device `id` can be taken over, then start its new daemon.
pub fn recover(state: &Path, id: u32, foreground: bool, supervise: bool, wait: u64) -> Result<()> {
    // A hand-over that got past the suspend is finished without a daemon.
    if let Some(done) = crate::cmd::handover::recover(state, id)? {
        println!("{done}");
        return Ok(());
    }
    lazyblk_ublk::device_state(id)?;
    let rec =
        record_of(state, id).with_context(|| format!("device {id} is not a lazyblk device"))?;
    if let Some(sup) = rec.supervisor.filter(|&p| pid_alive(p)) {
        bail!("device {id} is supervised by pid {sup}, which recovers it by itself");
    }
    wait_recoverable(id, rec.pid, Duration::from_secs(wait), true)?;
    let mut args = recover_args(state, id)?;
    if supervise {
        args.push("--supervise".into());
    }
    args.push("--foreground".into());
    if foreground {
        let st = Command::new(std::env::current_exe()?)
            .args(&args)
            .status()?;
        if !st.success() {
            bail!("the recovered daemon failed");
        }
        return Ok(());
    }
    let log = rec
        .log
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/log/lazyblk/lazyblk.log"));
    let (id, bdev) = spawn_daemon(&args, &log)?;
    println!("recovered {bdev} (device {id})");
    Ok(())
}

/// Run `lazyblk detach`: the daemon of device `id` exits and leaves the device parked.
pub fn detach(state: &Path, id: u32, wait: u64) -> Result<()> {
    lazyblk_ublk::device_state(id)?;
    let rec =
        record_of(state, id).with_context(|| format!("device {id} is not a lazyblk device"))?;
    if !pid_alive(rec.pid) {
        bail!(
            "device {id} has no running daemon (pid {} is gone)",
            rec.pid
        );
    }
    let answer = daemon::control(state, id, "detach", Duration::from_secs(60))?;
    if !answer.starts_with("ok") {
        bail!("the daemon of device {id} refused to detach: {answer}");
    }
    if let Some(note) = answer
        .strip_prefix("ok (")
        .and_then(|a| a.strip_suffix(')'))
    {
        eprintln!("lazyblk: warning: {note}");
    }
    let t0 = std::time::Instant::now();
    while pid_alive(rec.pid) {
        if t0.elapsed() > Duration::from_secs(30) {
            bail!(
                "the daemon of device {id} (pid {}) said it detaches but did not exit within 30 s",
                rec.pid
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_recoverable(id, rec.pid, Duration::from_secs(wait), false)?;
    println!(
        "detached /dev/ublkb{id}: daemon pid {} exited, IO waits; `lazyblk recover {id}` reattaches",
        rec.pid
    );
    Ok(())
}
