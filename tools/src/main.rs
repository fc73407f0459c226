//! `lazyblk`: build chunked images and serve them lazily as ublk block devices.

mod daemon;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use lazyblk_blocksource::BlockSource;
use lazyblk_chunkstore::builder::{build_image, BuildOptions};
use lazyblk_chunkstore::remote::HttpOptions;
use lazyblk_chunkstore::{ChunkStore, Location, StoreOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "lazyblk", version, about = "Lazy block devices: erofs images served on demand through ublk")]
struct Cli {
    /// Directory for daemon records and control sockets.
    #[arg(long, global = true, env = "LAZYBLK_STATE_DIR", default_value = "/run/lazyblk")]
    state_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct StoreArgs {
    /// Cache root (one directory per image inside).
    #[arg(long, env = "LAZYBLK_CACHE_DIR", default_value = "/var/cache/lazyblk")]
    cache_dir: PathBuf,
    /// Require the manifest to have this digest (sha256:...).
    #[arg(long)]
    digest: Option<String>,
    /// Seconds a read may wait for a missing chunk while the remote is failing (0: forever).
    #[arg(long, default_value_t = 300)]
    io_deadline: u64,
    /// Range requests in flight.
    #[arg(long, default_value_t = 8)]
    max_requests: usize,
    /// Chunks read ahead after a miss.
    #[arg(long, default_value_t = 4)]
    readahead: u64,
}

impl StoreArgs {
    fn options(&self) -> Result<StoreOptions> {
        Ok(StoreOptions {
            cache_root: self.cache_dir.clone(),
            expected_id: daemon::parse_digest(self.digest.as_deref())?,
            http: HttpOptions::default(),
            max_requests: self.max_requests,
            readahead_chunks: self.readahead,
            io_deadline: (self.io_deadline > 0).then(|| Duration::from_secs(self.io_deadline)),
            ..Default::default()
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Make a chunked image from a directory (via mkfs.erofs) or a raw image file.
    Build {
        /// A directory tree or a raw image (erofs or any disk image).
        input: PathBuf,
        /// Output directory (gets `manifest` and `blob`).
        #[arg(short, long)]
        output: PathBuf,
        /// Chunk size in KiB (power of two, 4..65536).
        #[arg(long, default_value_t = lazyblk_chunkstore::format::DEFAULT_CHUNK_SIZE / 1024)]
        chunk_kib: u32,
        /// zstd level.
        #[arg(long, default_value_t = 9)]
        level: i32,
        /// Keep the intermediate erofs image (when building from a directory) at this path.
        #[arg(long)]
        keep_image: Option<PathBuf>,
    },
    /// Read an image through the chunk store (no kernel device needed).
    Cat {
        /// Manifest path or URL.
        manifest: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Start offset.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes to read (default: to the end of the image).
        #[arg(long)]
        length: Option<u64>,
        /// Write here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Serve an image as /dev/ublkbN; prints the device path once it is live.
    Add {
        /// Manifest path or URL.
        manifest: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Hardware queues.
        #[arg(long, default_value_t = 2)]
        queues: u16,
        /// Queue depth.
        #[arg(long, default_value_t = 64)]
        depth: u16,
        /// Device id (default: the kernel picks).
        #[arg(long)]
        id: Option<u32>,
        /// Stay in the foreground and log to standard error.
        #[arg(long)]
        foreground: bool,
        /// Daemon log file.
        #[arg(long, default_value = "/var/log/lazyblk/lazyblk.log")]
        log_file: PathBuf,
        /// Internal: take over device N after its daemon died.
        #[arg(long, hide = true)]
        recover_id: Option<u32>,
    },
    /// List lazyblk devices.
    List,
    /// Counters of a device.
    Status {
        /// Device id.
        id: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop and delete a device (its cache is kept).
    Del {
        /// Device id.
        id: Option<u32>,
        /// Every lazyblk device.
        #[arg(long)]
        all: bool,
    },
    /// Restart the daemon of a device whose daemon died, without unmounting anything.
    Recover {
        /// Device id.
        id: u32,
        /// Stay in the foreground.
        #[arg(long)]
        foreground: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let foreground_daemon = matches!(cli.cmd, Cmd::Add { foreground: true, .. } | Cmd::Recover { foreground: true, .. });
    let default = if foreground_daemon { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LAZYBLK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(e) = run(cli) {
        eprintln!("lazyblk: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let state = cli.state_dir.clone();
    match cli.cmd {
        Cmd::Build {
            input,
            output,
            chunk_kib,
            level,
            keep_image,
        } => cmd_build(&input, &output, chunk_kib, level, keep_image),
        Cmd::Cat {
            manifest,
            store,
            offset,
            length,
            output,
        } => cmd_cat(&manifest, &store, offset, length, output),
        Cmd::Add {
            manifest,
            store,
            queues,
            depth,
            id,
            foreground,
            log_file,
            recover_id,
        } => {
            let ublk = lazyblk_ublk::Options {
                id: recover_id.or(id),
                queues,
                depth,
                recover: recover_id.is_some(),
                ..Default::default()
            };
            if foreground {
                // In the foreground, standard output carries the one ready line.
                let ready = Some(stdout_file()?);
                daemon::run(daemon::DaemonArgs {
                    manifest,
                    store: store.options()?,
                    ublk,
                    state_dir: state,
                    log: None,
                    ready,
                })
            } else {
                lazyblk_ublk::check_kernel()?;
                let mut args: Vec<String> = std::env::args().skip(1).collect();
                args.push("--foreground".into());
                let (id, bdev) = spawn_daemon(&args, &log_file)?;
                if recover_id.is_some() {
                    println!("recovered {bdev} (device {id})");
                } else {
                    println!("{bdev}");
                }
                Ok(())
            }
        }
        Cmd::List => cmd_list(&state),
        Cmd::Status { id, json } => cmd_status(&state, id, json),
        Cmd::Del { id, all } => match (id, all) {
            (Some(id), false) => cmd_del(&state, id),
            (None, true) => {
                for id in lazyblk_ublk::device_ids() {
                    if is_ours(id) {
                        cmd_del(&state, id)?;
                    }
                }
                Ok(())
            }
            _ => bail!("give a device id or --all"),
        },
        Cmd::Recover { id, foreground } => cmd_recover(&state, id, foreground),
    }
}

/// Standard output as a File we can hand to the daemon for its ready line.
fn stdout_file() -> Result<std::fs::File> {
    use std::os::fd::{AsFd, OwnedFd};
    let fd: OwnedFd = std::io::stdout().as_fd().try_clone_to_owned()?;
    Ok(std::fs::File::from(fd))
}

/// Start a detached daemon and wait for its ready line.
fn spawn_daemon(args: &[String], log: &Path) -> Result<(u32, String)> {
    use std::os::unix::process::CommandExt;
    if let Some(d) = log.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening the log file {}", log.display()))?;
    let (reader, writer) = std::io::pipe()?;
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(logf)
        .process_group(0)
        .spawn()
        .context("starting the daemon")?;
    let mut line = String::new();
    BufReader::new(reader).read_line(&mut line)?;
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("OK ") {
        let (id, bdev) = rest.split_once(' ').context("bad ready line")?;
        // The daemon keeps running; do not wait for it.
        std::mem::forget(child);
        return Ok((id.parse()?, bdev.to_string()));
    }
    let _ = child.wait();
    if let Some(msg) = line.strip_prefix("ERR ") {
        bail!("{msg}");
    }
    bail!("the daemon exited before the device was live; see {}", log.display())
}

fn cmd_build(input: &Path, output: &Path, chunk_kib: u32, level: i32, keep: Option<PathBuf>) -> Result<()> {
    let md = std::fs::metadata(input).with_context(|| format!("{}", input.display()))?;
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    let (image, temp) = if md.is_dir() {
        let img = keep.clone().unwrap_or_else(|| output.join(".image.erofs.tmp"));
        let st = Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(&img)
            .arg(input)
            .status()
            .context("running mkfs.erofs (install erofs-utils)")?;
        if !st.success() {
            bail!("mkfs.erofs failed on {}", input.display());
        }
        (img, keep.is_none())
    } else {
        (input.to_path_buf(), false)
    };
    let size = std::fs::metadata(&image)?.len();
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(size);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let opts = BuildOptions {
        chunk_size: chunk_kib.saturating_mul(1024),
        level,
        ..Default::default()
    };
    let s = build_image(&image, output, &opts, |done| bar.set_position(done));
    bar.finish_and_clear();
    if temp {
        let _ = std::fs::remove_file(&image);
    }
    let s = s?;
    let stored = s.chunks - s.zero_chunks;
    println!("image      {} ({} bytes)", image_name(input), s.image_size);
    println!(
        "chunks     {} x {} KiB: {} zero, {} stored, {} unique (dedup {:.2}x)",
        s.chunks,
        chunk_kib,
        s.zero_chunks,
        stored,
        s.unique_chunks,
        stored as f64 / s.unique_chunks.max(1) as f64
    );
    println!(
        "blob       {} bytes ({:.1}% of the image)",
        s.blob_size,
        100.0 * s.blob_size as f64 / s.image_size.max(1) as f64
    );
    println!("manifest   {} bytes", s.manifest_size);
    println!("digest     {}", s.id);
    Ok(())
}

fn image_name(p: &Path) -> String {
    p.display().to_string()
}

fn cmd_cat(manifest: &str, store: &StoreArgs, offset: u64, length: Option<u64>, output: Option<PathBuf>) -> Result<()> {
    let s = ChunkStore::open(&Location::parse(manifest), store.options()?)?;
    let size = s.manifest().image_size;
    if offset > size {
        bail!("offset {offset} is beyond the image size {size}");
    }
    let len = length.unwrap_or(size - offset);
    if offset + len > size {
        bail!("{offset}+{len} is beyond the image size {size}");
    }
    let mut out: Box<dyn Write> = match &output {
        Some(p) => Box::new(std::fs::File::create(p).with_context(|| format!("{}", p.display()))?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut buf = vec![0u8; 4 << 20];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(buf.len() as u64) as usize;
        s.read_at(at, &mut buf[..n])?;
        out.write_all(&buf[..n])?;
        at += n as u64;
    }
    out.flush()?;
    Ok(())
}

fn is_ours(id: u32) -> bool {
    matches!(lazyblk_ublk::device_state(id), Ok((_, Some(v))) if v.get(lazyblk_ublk::TARGET_NAME).is_some())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

fn record_of(state: &Path, id: u32) -> Option<daemon::Record> {
    daemon::read_record(state, id).or_else(|| {
        let (_, data) = lazyblk_ublk::device_state(id).ok()?;
        serde_json::from_value(data?.get(lazyblk_ublk::TARGET_NAME)?.clone()).ok()
    })
}

fn present_pct(state: &Path, id: u32, rec: &daemon::Record) -> Option<f64> {
    if let Ok(s) = daemon::query_status(state, id) {
        return Some(100.0 * s.present_chunks as f64 / s.total_chunks.max(1) as f64);
    }
    let hex = rec.image.strip_prefix("sha256:")?;
    let b = std::fs::read(rec.cache_root.join(hex).join("bitmap")).ok()?;
    let bits: u64 = b.get(64..)?.iter().map(|x| u64::from(x.count_ones())).sum();
    let m = std::fs::read(rec.cache_root.join(hex).join("manifest")).ok()?;
    let n = lazyblk_chunkstore::Manifest::decode(&m).ok()?.chunk_count();
    Some(100.0 * bits as f64 / n.max(1) as f64)
}

fn cmd_list(state: &Path) -> Result<()> {
    if lazyblk_ublk::check_kernel().is_err() {
        lazyblk_ublk::check_kernel()?;
    }
    println!("{:<4} {:<14} {:<20} {:>8}  STATE", "ID", "DEVICE", "IMAGE", "PRESENT");
    for id in lazyblk_ublk::device_ids() {
        let Ok((st, _)) = lazyblk_ublk::device_state(id) else { continue };
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
            (lazyblk_ublk::DevState::Quiesced, _) => format!("daemon dead, IO parked: run `lazyblk recover {id}`"),
            (s, _) => format!("{s:?}").to_lowercase(),
        };
        println!("{:<4} {:<14} {:<20} {:>8}  {}", id, format!("/dev/ublkb{id}"), image, pct, state_s);
    }
    Ok(())
}

fn cmd_status(state: &Path, id: u32, json: bool) -> Result<()> {
    lazyblk_ublk::device_state(id)?;
    let s = daemon::query_status(state, id)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("device         /dev/ublkb{id}");
    println!("image          {}", s.image);
    println!(
        "present        {:.1}% ({} of {} chunks)",
        100.0 * s.present_chunks as f64 / s.total_chunks.max(1) as f64,
        s.present_chunks,
        s.total_chunks
    );
    println!("hits           {}", s.hits);
    println!("misses         {}", s.misses);
    println!("bytes fetched  {}", s.bytes_fetched);
    println!("chunks fetched {}", s.chunks_fetched);
    println!("requests       {} ({} retries)", s.requests, s.retries);
    println!(
        "fetch latency  mean {:.1} ms, max {:.1} ms",
        s.fetch_latency_us_mean as f64 / 1000.0,
        s.fetch_latency_us_max as f64 / 1000.0
    );
    println!("verify fails   {}", s.verify_failures);
    println!("failed IOs     {}", s.failed_ios);
    Ok(())
}

fn cmd_del(state: &Path, id: u32) -> Result<()> {
    lazyblk_ublk::device_state(id)?;
    let rec = record_of(state, id);
    if let Some(r) = rec.as_ref().filter(|r| pid_alive(r.pid)) {
        // SAFETY: kill() sends a signal to a pid; no memory is involved.
        unsafe { libc::kill(r.pid as i32, libc::SIGTERM) };
        let t0 = std::time::Instant::now();
        while pid_alive(r.pid) && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if pid_alive(r.pid) {
            bail!("the daemon of device {id} (pid {}) did not stop within 30 s", r.pid);
        }
    }
    if Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        lazyblk_ublk::delete(id)?;
    }
    let _ = std::fs::remove_file(daemon::record_path(state, id));
    let _ = std::fs::remove_file(daemon::socket_path(state, id));
    println!("deleted /dev/ublkb{id}");
    Ok(())
}

fn cmd_recover(state: &Path, id: u32, foreground: bool) -> Result<()> {
    let (st, _) = lazyblk_ublk::device_state(id)?;
    let rec = record_of(state, id).with_context(|| format!("device {id} is not a lazyblk device"))?;
    if pid_alive(rec.pid) && st == lazyblk_ublk::DevState::Live {
        bail!("device {id} is live and its daemon (pid {}) is running", rec.pid);
    }
    let mut args = vec![
        "--state-dir".to_string(),
        state.display().to_string(),
        "add".into(),
        rec.manifest.clone(),
        "--cache-dir".into(),
        rec.cache_root.display().to_string(),
        "--digest".into(),
        rec.image.clone(),
        "--queues".into(),
        rec.queues.to_string(),
        "--depth".into(),
        rec.depth.to_string(),
        "--io-deadline".into(),
        rec.io_deadline_secs.to_string(),
        "--recover-id".into(),
        id.to_string(),
    ];
    if let Some(l) = &rec.log {
        args.extend(["--log-file".into(), l.display().to_string()]);
    }
    if foreground {
        args.push("--foreground".into());
        let st = Command::new(std::env::current_exe()?).args(&args).status()?;
        if !st.success() {
            bail!("the recovered daemon failed");
        }
        return Ok(());
    }
    let log = rec.log.clone().unwrap_or_else(|| PathBuf::from("/var/log/lazyblk/lazyblk.log"));
    args.push("--foreground".into());
    let (id, bdev) = spawn_daemon(&args, &log)?;
    println!("recovered {bdev} (device {id})");
    Ok(())
}
