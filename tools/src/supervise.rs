//! `--supervise`: a small parent process that restarts a device's daemon with `recover` when the
//! daemon dies (killed, crashed), so the mounted file system only sees a pause.
//!
//! The supervisor starts the daemon as its child, relays the daemon's ready lines to whoever
//! started it, then waits. A daemon that exits with status 0 was stopped on purpose (`del`,
//! `detach`): the supervisor exits too. Any other end is a death: the supervisor waits until the
//! kernel has parked the device's IO and starts `add --recover-id` from the device's record. It
//! gives up after `MAX_RESTARTS` deaths within `RESTART_WINDOW` (a daemon that cannot start);
//! the device then stays quiesced and `lazyblk recover` can still take it over.

use crate::cmd::lifecycle::{recover_args, wait_recoverable};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// How long to wait for the kernel to park the IO of a device whose daemon died.
const QUIESCE_WAIT: Duration = Duration::from_secs(120);

/// Start a daemon (`args`, an `add ... --foreground` command line) and read its ready lines.
/// Every line goes to `relay` when given, else to the log. Returns the child and, when it is
/// live, its device id.
fn start(args: &[String], mut relay: Option<&mut File>) -> Result<(Child, Option<u32>)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped());
    if relay.is_none() {
        // A restart: its attach began now, not when `add` started the supervisor.
        cmd.env_remove(crate::daemon::T0_ENV);
        cmd.env_remove(crate::daemon::LAZY_MS_ENV);
    }
    let mut child = cmd.spawn().context("starting the daemon")?;
    let out = child.stdout.take().context("daemon stdout")?;
    for line in BufReader::new(out).lines() {
        let line = line?;
        match relay.as_mut() {
            Some(r) => {
                let _ = writeln!(r, "{line}");
            }
            None => tracing::info!("supervisor: daemon says: {line}"),
        }
        if let Some(rest) = line.strip_prefix("OK ") {
            let id = rest.split(' ').next().and_then(|s| s.parse().ok());
            return Ok((child, id));
        }
        if line.starts_with("ERR ") {
            break;
        }
    }
    Ok((child, None))
}

/// Whether device `id` still exists and is not stopped (`del` may be deleting it).
fn still_there(id: u32) -> bool {
    match lazyblk_ublk::device_state(id) {
        Ok((lazyblk_ublk::DevState::Dead, _)) => {
            tracing::info!("supervisor: device {id} is stopped; done");
            false
        }
        Ok(_) => true,
        Err(_) => {
            tracing::info!("supervisor: device {id} is gone; done");
            false
        }
    }
}

/// Run the supervisor: `first` is the command line of the first daemon, `ready` where its ready
/// lines go.
pub fn run(state: &Path, first: &[String], mut ready: File) -> Result<()> {
    let me = std::process::id();
    let (mut child, id) = start(first, Some(&mut ready))?;
    drop(ready);
    let Some(id) = id else {
        let st = child.wait()?;
        bail!("the daemon did not start ({st})");
    };
    tracing::info!(
        "supervisor {me}: watching the daemon (pid {}) of device {id}",
        child.id()
    );
    let mut deaths: Vec<Instant> = Vec::new();
    loop {
        let pid = child.id();
        let st = child.wait()?;
        if st.success() {
            tracing::info!(
                "supervisor: the daemon of device {id} (pid {pid}) exited normally; done"
            );
            return Ok(());
        }
        // The recovery's control commands run on a thread of its own: libublk's control ring
        // is per thread, and the io-wq worker the kernel starts for a ring lives as long as
        // the ring does. The supervisor then keeps no thread but its own while it waits.
        let next = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("lazyblk-recover".into())
                .spawn_scoped(s, || recover(state, id, pid, st, me, &mut deaths))
                .context("starting the recovery thread")?
                .join()
                .map_err(|_| anyhow::anyhow!("supervisor: the recovery of device {id} panicked"))?
        })?;
        match next {
            Some(c) => child = c,
            None => return Ok(()),
        }
    }
}

/// After the daemon `pid` of device `id` died (`st`): start a recovering daemon, retrying,
/// and return it; `None` when there is nothing to recover (the device is gone or stopped, or a
/// hand-over finished it).
fn recover(
    state: &Path,
    id: u32,
    pid: u32,
    st: std::process::ExitStatus,
    me: u32,
    deaths: &mut Vec<Instant>,
) -> Result<Option<Child>> {
    if !still_there(id) {
        return Ok(None);
    }
    tracing::warn!("supervisor: the daemon of device {id} (pid {pid}) died ({st}); recovering");
    loop {
        if !still_there(id) {
            return Ok(None);
        }
        deaths.retain(|t| t.elapsed() < RESTART_WINDOW);
        deaths.push(Instant::now());
        if deaths.len() > MAX_RESTARTS {
            bail!(
                "supervisor: device {id} lost its daemon {} times within {} s; giving up (the device keeps its IO parked; `lazyblk recover {id}` retries)",
                deaths.len(),
                RESTART_WINDOW.as_secs()
            );
        }
        // A daemon that died past the swap of a hand-over: finish it, no daemon needed.
        match crate::cmd::handover::recover(state, id) {
            Ok(Some(done)) => {
                tracing::info!("supervisor: {done}");
                return Ok(None);
            }
            Ok(None) => {}
            Err(e) => tracing::error!("supervisor: device {id}: {e:#}"),
        }
        let attempt = wait_recoverable(id, pid, QUIESCE_WAIT, false).and_then(|()| {
            let mut args = recover_args(state, id)?;
            args.extend([
                "--foreground".into(),
                "--supervised-by".into(),
                me.to_string(),
            ]);
            start(&args, None)
        });
        match attempt {
            Ok((c, Some(_))) => {
                tracing::info!("supervisor: device {id} recovered by pid {}", c.id());
                return Ok(Some(c));
            }
            Ok((mut c, None)) => {
                let st = c.wait()?;
                tracing::error!(
                    "supervisor: the recovering daemon of device {id} did not start ({st})"
                );
            }
            Err(e) => tracing::error!("supervisor: recovering device {id}: {e:#}"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
