//! `lazyblk add`: serve an image as a ublk device. By default it starts a detached daemon (itself
//! with `--foreground`) and prints the device once the daemon reports it live; with
//! `--foreground` it is the daemon (`daemon.rs`), with `--foreground --supervise` the supervisor
//! of one (`supervise.rs`).

use crate::cmd::vhost::CowArgs;
use crate::store_args::StoreArgs;
use crate::{daemon, supervise};
use anyhow::{bail, Context, Result};
use clap::Args;
use lazyblk_remote::registry::{self, Serve};
use lazyblk_remote::Location;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// `lazyblk add`.
#[derive(Args)]
pub struct AddArgs {
    /// Manifest path or URL, or an image reference: a lazyblk image, or an ordinary container
    /// image whose lazy version (`lazyblk convert`, found through its referrers) is served.
    manifest: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Hardware queues, each with its own server thread. One by default: with a queue per
    /// CPU the thread that submits an IO and the one that serves it share a CPU.
    #[arg(long, default_value_t = lazyblk_ublk::DEFAULT_QUEUES)]
    queues: u16,
    /// Queue depth (each tag holds an IO buffer of up to 512 KiB).
    #[arg(long, default_value_t = lazyblk_ublk::DEFAULT_DEPTH)]
    depth: u16,
    /// Device id (default: the kernel picks).
    #[arg(long)]
    id: Option<u32>,
    /// Stay in the foreground and log to standard error.
    #[arg(long)]
    pub foreground: bool,
    /// Daemon log file.
    #[arg(long, default_value = "/var/log/lazyblk/lazyblk.log")]
    log_file: PathBuf,
    /// Run the daemon under a supervisor that restarts it (with `recover`) when it dies.
    #[arg(long)]
    supervise: bool,
    /// Hand the image over to the kernel once it is complete (every chunk fetched: with
    /// `--hydrate`, or once everything was read): the device to mount (printed) is switched,
    /// under the mounted file system, from the ublk device to the cache file; then the ublk
    /// device is deleted and the daemon exits (no process, no network on the read path). For an
    /// erofs image it is a read-only loop device (/dev/loopN) over /dev/ublkbN whose backing
    /// file becomes the cache file; otherwise (see --handover-via) /dev/mapper/lazyblk-<id>, a
    /// device-mapper linear switched to a loop device of the cache file. `lazyblk handover
    /// <id>` does it on demand. Read-only images only (not with --writable, nor --cache-limit).
    #[arg(long, conflicts_with = "writable")]
    handover: bool,
    /// How --handover builds the device: `loop` (a loop device over the ublk device, switched
    /// with LOOP_CHANGE_FD; for file systems without a shutdown hook, such as erofs), `dm` (a
    /// device-mapper linear, for any file system), `auto` (loop for erofs, else dm).
    #[arg(long, value_enum, default_value = "auto", requires = "handover")]
    handover_via: crate::handover::Via,
    /// Internal: take over device N after its daemon died.
    #[arg(long, hide = true)]
    recover_id: Option<u32>,
    /// Internal: pid of the supervisor of this daemon.
    #[arg(long, hide = true)]
    supervised_by: Option<u32>,
    #[command(flatten)]
    cow: CowArgs,
    /// For an ordinary container image (not a lazyblk one): the platform whose manifest's lazy
    /// version to serve when the reference names an index (`os/arch[/variant]`; default: this
    /// machine's).
    #[arg(long)]
    platform: Option<lazyblk_registry::Platform>,
    /// Internal: the lazy version of `manifest` found by the parent, pinned.
    #[arg(long, hide = true)]
    lazy: Option<String>,
    #[command(flatten)]
    sockets: crate::metrics::SocketArgs,
}

/// Run `lazyblk add` with the state directory `state`: as the supervisor of a daemon
/// (`--foreground --supervise`), as the daemon (`--foreground`), or by starting a detached daemon.
pub fn run(state: PathBuf, mut a: AddArgs) -> Result<()> {
    // Once, in the first process: the daemon, the supervisor's daemons and `recover` serve the
    // pinned lazy image it found.
    if a.recover_id.is_none() && a.lazy.is_none() {
        let t = std::time::Instant::now();
        a.lazy = lazy_version(&a)?;
        if a.lazy.is_some() {
            // For the daemon's attach times (`lazy`), passed on by `spawn_daemon`.
            let _ = LAZY_LOOKUP_MS.set(t.elapsed().as_millis() as u64);
        }
    }
    if a.foreground && a.supervise {
        run_supervisor(&state, &a)
    } else if a.foreground {
        run_daemon(state, a)
    } else {
        start_detached(&a)
    }
}

/// How long this process looked up the lazy version of an ordinary image, if it did.
static LAZY_LOOKUP_MS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// `add <ref>` of an ordinary container image: its lazy version, pinned, said on stderr
/// (`lazyblk_remote::registry::lazy_version`). `None`: serve `manifest` as it is (a path, a
/// URL, a lazyblk image).
fn lazy_version(a: &AddArgs) -> Result<Option<String>> {
    let Location::Registry(loc) = Location::parse(&a.manifest) else {
        return Ok(None);
    };
    if loc.name != lazyblk_remote::registry::MANIFEST_FILE {
        return Ok(None);
    }
    let client = lazyblk_registry::Client::new(a.store.options()?.registry)?;
    let platform = a
        .platform
        .clone()
        .unwrap_or_else(lazyblk_registry::Platform::host);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(registry::lazy_version(&client, &loc.reference, &platform))? {
        Serve::Itself => Ok(None),
        Serve::Lazy(link) => {
            eprintln!(
                "lazyblk: {} has a lazy version {}, using it",
                a.manifest, link.reference
            );
            Ok(Some(link.reference.to_string()))
        }
    }
}

/// `args` with `--lazy <pinned>` when the lazy version was found here.
fn with_lazy(mut args: Vec<String>, a: &AddArgs) -> Vec<String> {
    if let Some(l) = &a.lazy {
        if !args.iter().any(|x| x == "--lazy") {
            args.extend(["--lazy".into(), l.clone()]);
        }
    }
    args
}

/// The supervisor: the same command line without --supervise is its daemon.
fn run_supervisor(state: &Path, a: &AddArgs) -> Result<()> {
    let args: Vec<String> = crate::args()
        .into_iter()
        .filter(|a| a != "--supervise")
        .collect();
    let mut args = with_lazy(args, a);
    args.extend(["--supervised-by".into(), std::process::id().to_string()]);
    supervise::run(state, &args, stdout_file()?)
}

/// The daemon itself, in the foreground: standard output carries the ready line.
fn run_daemon(state: PathBuf, a: AddArgs) -> Result<()> {
    let ublk = ublk_options(&a);
    let ready = Some(stdout_file()?);
    daemon::run(daemon::DaemonArgs {
        manifest: a.lazy.unwrap_or(a.manifest),
        store: a.store.options()?,
        store_args: a.store.to_args(),
        ublk,
        state_dir: state,
        log: Some(a.log_file),
        supervisor: a.supervised_by,
        cow: a.cow,
        handover: a.handover,
        handover_via: a.handover_via,
        sockets: a.sockets,
        ready,
    })
}

/// The ublk device the daemon creates (or, with `--recover-id`, takes over).
fn ublk_options(a: &AddArgs) -> lazyblk_ublk::Options {
    lazyblk_ublk::Options {
        id: a.recover_id.or(a.id),
        queues: a.queues,
        depth: a.depth,
        recover: a.recover_id.is_some(),
        stats: std::sync::Arc::new(lazyblk_ublk::IoStats::new(usize::from(a.queues))),
        ..Default::default()
    }
}

/// Start this command line with `--foreground` as a detached daemon and print its device once
/// it is live.
fn start_detached(a: &AddArgs) -> Result<()> {
    lazyblk_ublk::check_kernel()?;
    let mut args = with_lazy(crate::args(), a);
    args.push("--foreground".into());
    let (id, bdev) = spawn_daemon(&args, &a.log_file)?;
    if a.recover_id.is_some() {
        println!("recovered {bdev} (device {id})");
    } else {
        println!("{bdev}");
    }
    Ok(())
}

/// Standard output as a File we can hand to the daemon for its ready line.
fn stdout_file() -> Result<std::fs::File> {
    use std::os::fd::{AsFd, OwnedFd};
    let fd: OwnedFd = std::io::stdout().as_fd().try_clone_to_owned()?;
    Ok(std::fs::File::from(fd))
}

/// Start a detached daemon and wait for its ready line.
pub fn spawn_daemon(args: &[String], log: &Path) -> Result<(u32, String)> {
    if let Some(d) = log.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening the log file {}", log.display()))?;
    let (reader, writer) = std::io::pipe()?;
    let mut envs = vec![(
        crate::daemon::T0_ENV,
        crate::daemon::process_start_us().to_string(),
    )];
    if let Some(ms) = LAZY_LOOKUP_MS.get() {
        envs.push((crate::daemon::LAZY_MS_ENV, ms.to_string()));
    }
    let child = crate::spawn::start_self(args, &envs, writer, logf)?;
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        match line.trim().strip_prefix("WARN ") {
            Some(w) => eprintln!("lazyblk: warning: {w}"),
            None => break,
        }
    }
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("OK ") {
        let (id, bdev) = rest.split_once(' ').context("bad ready line")?;
        // The daemon keeps running; do not wait for it.
        std::mem::forget(child);
        return Ok((id.parse()?, bdev.to_string()));
    }
    child.wait();
    if let Some(msg) = line.strip_prefix("ERR ") {
        bail!("{msg}");
    }
    bail!(
        "the daemon exited before the device was live; see {}",
        log.display()
    )
}
