//! Starting a daemon from the running command (`add`, `recover`): `lazyblk` again with other
//! arguments, detached, its standard output a pipe for the ready line and its standard error the
//! log.
//!
//! When this process has one thread (the command line, before any runtime), the daemon is a
//! `fork` that runs the new command line in the copy, without `exec`: under TCG a start of this
//! 20 MB binary (loading, relocation, the page faults of its first run, clap and the log set-up)
//! took 130-150 ms, a third of an attach (`docs/DESIGN.md`, "Attach"). With more threads (the
//! snapshotter) a fork is not safe, and it is a `fork` + `exec` as before; so is a supervisor's
//! start of its daemon (`supervise.rs`), which watches a `Child`.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::PipeWriter;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};

/// A started daemon.
pub enum Started {
    /// A fork of this process running the command line.
    Forked(libc::pid_t),
    /// `lazyblk` started again.
    Exec(std::process::Child),
}

impl Started {
    /// Wait for it to exit (after it failed to start).
    pub fn wait(self) {
        match self {
            Started::Forked(pid) => {
                let mut st = 0;
                // SAFETY: waitpid on our own child, with a valid pointer for its status.
                unsafe { libc::waitpid(pid, &mut st, 0) };
            }
            Started::Exec(mut c) => {
                let _ = c.wait();
            }
        }
    }
}

/// Whether this process has exactly one thread (`/proc/self/stat`, field 20).
fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .is_some_and(|s| crate::device::stat_field(&s, 20) == Some("1"))
}

/// Start `lazyblk <args>` with `envs` added to the environment, standard input `/dev/null`,
/// standard output `stdout`, standard error `stderr`, in a process group of its own.
pub fn start_self(
    args: &[String],
    envs: &[(&str, String)],
    stdout: PipeWriter,
    stderr: File,
) -> Result<Started> {
    use std::io::Write;
    if single_threaded() && std::env::var_os("LAZYBLK_SPAWN_EXEC").is_none() {
        let null = File::open("/dev/null").context("opening /dev/null")?;
        let out: OwnedFd = stdout.into();
        // Nothing buffered may be written twice.
        let _ = std::io::stdout().flush();
        // SAFETY: this process has one thread, so the child gets a consistent copy of all of
        // it (no lock held by a thread it lacks); the child only sets up its descriptors and
        // environment and runs the command line, and never returns from `child`.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        if pid == 0 {
            child(args, envs, &null, &out, &stderr);
        }
        return Ok(Started::Forked(pid));
    }
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    use std::os::unix::process::CommandExt;
    cmd.args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    Ok(Started::Exec(cmd.spawn().context("starting the daemon")?))
}

/// The forked child: its descriptors, its environment, then the command line.
fn child(args: &[String], envs: &[(&str, String)], null: &File, out: &OwnedFd, err: &File) -> ! {
    // SAFETY: plain system calls on descriptors this process owns; a failure leaves the
    // inherited descriptor in place, which only misdirects output.
    unsafe {
        libc::setpgid(0, 0);
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(out.as_raw_fd(), 1);
        libc::dup2(err.as_raw_fd(), 2);
    }
    for (k, v) in envs {
        // One thread (the fork's), so nothing reads the environment meanwhile.
        std::env::set_var(k, v);
    }
    crate::daemon::mark_fork();
    let mut argv = vec!["lazyblk".to_string()];
    argv.extend(args.iter().cloned());
    std::process::exit(crate::run_argv(argv))
}
