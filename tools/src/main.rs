//! `lazyblk`: build chunked images and serve them lazily as ublk block devices.

mod cli;
mod daemon;
mod device;
mod signals;
mod store_args;
mod supervise;
mod verify;
mod vhost;

use anyhow::{bail, Context, Result};
use clap::Parser;
use cli::{Cli, Cmd};
use device::{is_ours, pid_alive, record_of};
use lazyblk_blocksource::BlockSource;
use lazyblk_chunkstore::builder::{build_image, BuildOptions, PackBlocks};
use lazyblk_chunkstore::{ChunkStore, Location};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use store_args::StoreArgs;

fn main() {
    let cli = Cli::parse();
    let foreground_daemon = matches!(
        cli.cmd,
        Cmd::Add {
            foreground: true,
            ..
        } | Cmd::Recover {
            foreground: true,
            ..
        }
    );
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
            no_metadata_pack,
            pack_blocks,
        } => cmd_build(
            &input,
            &output,
            BuildOptions {
                chunk_size: chunk_kib.saturating_mul(1024),
                level,
                metadata_pack: if no_metadata_pack {
                    PackBlocks::Off
                } else {
                    PackBlocks::Erofs
                },
                extra_pack_blocks: match pack_blocks {
                    Some(p) => {
                        let b = std::fs::read(&p).with_context(|| format!("{}", p.display()))?;
                        let l = lazyblk_chunkstore::format::BlockList::decode(&b)
                            .with_context(|| format!("{}", p.display()))?;
                        l.blocks.into_iter().map(u64::from).collect()
                    }
                    None => Vec::new(),
                },
                ..Default::default()
            },
            keep_image,
        ),
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
            supervise,
            recover_id,
            supervised_by,
            cow,
        } => {
            let ublk = lazyblk_ublk::Options {
                id: recover_id.or(id),
                queues,
                depth,
                recover: recover_id.is_some(),
                stats: std::sync::Arc::new(lazyblk_ublk::IoStats::new(usize::from(queues))),
                ..Default::default()
            };
            if foreground && supervise {
                // The supervisor: the same command line without --supervise is its daemon.
                let mut args: Vec<String> = std::env::args()
                    .skip(1)
                    .filter(|a| a != "--supervise")
                    .collect();
                args.extend(["--supervised-by".into(), std::process::id().to_string()]);
                supervise::run(&state, &args, stdout_file()?)
            } else if foreground {
                // In the foreground, standard output carries the ready line.
                let ready = Some(stdout_file()?);
                daemon::run(daemon::DaemonArgs {
                    manifest,
                    store: store.options()?,
                    store_args: store.to_args(),
                    ublk,
                    state_dir: state,
                    log: Some(log_file),
                    supervisor: supervised_by,
                    cow,
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
        Cmd::Trace {
            id,
            output,
            trace_only,
            blocks,
            pack,
        } => {
            if pack {
                cmd_trace_pack(&state, id, &output)
            } else {
                cmd_trace(&state, id, &output, trace_only, blocks)
            }
        }
        Cmd::Export { id, output } => {
            lazyblk_ublk::device_state(id)?;
            let out = std::path::absolute(&output)?;
            let r = daemon::control(
                &state,
                id,
                &format!("export {}", out.display()),
                Duration::from_secs(24 * 3600),
            )?;
            if r != "ok" {
                bail!("export of device {id}: {}", r.trim_start_matches("error: "));
            }
            println!("wrote {}", out.display());
            Ok(())
        }
        Cmd::Gc { cache_dir, dry_run } => {
            let mut freed = 0;
            for e in lazyblk_chunkstore::gc(&cache_dir, &[], dry_run)? {
                let what = if e.in_use {
                    "in use, kept"
                } else if e.removed {
                    freed += e.bytes;
                    "removed"
                } else {
                    "would be removed"
                };
                println!("{:>12} bytes  {}  {what}", e.bytes, e.dir.display());
            }
            println!("freed {freed} bytes");
            Ok(())
        }
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
        Cmd::Recover {
            id,
            foreground,
            supervise,
            wait,
        } => cmd_recover(&state, id, foreground, supervise, wait),
        Cmd::Detach { id, wait } => cmd_detach(&state, id, wait),
        Cmd::VerifyCache { dir } => verify::verify_cache(&dir),
        Cmd::Vhost(a) => vhost::run(a),
        Cmd::ExportCow(a) => vhost::export(a),
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
    let _ = child.wait();
    if let Some(msg) = line.strip_prefix("ERR ") {
        bail!("{msg}");
    }
    bail!(
        "the daemon exited before the device was live; see {}",
        log.display()
    )
}

fn cmd_build(input: &Path, output: &Path, opts: BuildOptions, keep: Option<PathBuf>) -> Result<()> {
    let md = std::fs::metadata(input).with_context(|| format!("{}", input.display()))?;
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    let (image, temp) = if md.is_dir() {
        let img = keep
            .clone()
            .unwrap_or_else(|| output.join(".image.erofs.tmp"));
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
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
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
        opts.chunk_size / 1024,
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
    if s.pack_blocks > 0 {
        let meta = s.pack_blocks - s.pack_extra_blocks;
        let what = if s.pack_extra_blocks > 0 {
            format!(
                "{meta} of file-system metadata, {} more from --pack-blocks",
                s.pack_extra_blocks
            )
        } else {
            "the file-system metadata".to_string()
        };
        println!(
            "metadata   {} blocks of 4 KiB in the pack ({what}), spread over {} chunks ({:.1}% of the stored chunks); packed into {} bytes at the end of the blob, fetched first at `add`",
            s.pack_blocks,
            s.pack_chunks,
            100.0 * s.pack_chunks as f64 / stored.max(1) as f64,
            s.pack_bytes
        );
    }
    println!("digest     {}", s.id);
    Ok(())
}

fn image_name(p: &Path) -> String {
    p.display().to_string()
}

fn cmd_cat(
    manifest: &str,
    store: &StoreArgs,
    offset: u64,
    length: Option<u64>,
    output: Option<PathBuf>,
) -> Result<()> {
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

/// The record and image of lazyblk device `id`, for the `trace` commands.
fn traced_device(state: &Path, id: u32) -> Result<(daemon::Record, lazyblk_chunkstore::ImageId)> {
    lazyblk_ublk::device_state(id)?;
    let rec =
        record_of(state, id).with_context(|| format!("device {id} is not a lazyblk device"))?;
    let image = lazyblk_chunkstore::ImageId::parse(&rec.image)?;
    Ok((rec, image))
}

/// A list the daemon of device `id` keeps (`trace`, `published`, `blocks`).
fn ask_list(state: &Path, id: u32, what: &str) -> Result<Vec<u32>> {
    serde_json::from_str(&daemon::control(state, id, what, Duration::from_secs(30))?)
        .with_context(|| format!("bad {what} answer from the daemon"))
}

fn cmd_trace(state: &Path, id: u32, output: &Path, trace_only: bool, blocks: bool) -> Result<()> {
    let (_, image) = traced_device(state, id)?;
    let ask = |what: &str| ask_list(state, id, what);
    let write = |bytes: Vec<u8>| {
        std::fs::write(output, bytes).with_context(|| format!("{}", output.display()))
    };
    if blocks {
        let list = lazyblk_chunkstore::format::BlockList {
            image,
            blocks: ask("blocks")?,
        };
        write(list.encode())?;
        println!(
            "{} blocks of 4 KiB read since add ({} KiB), written to {} (rebuild the image with `lazyblk build --pack-blocks` to store them in its pack)",
            list.blocks.len(),
            4 * list.blocks.len(),
            output.display()
        );
        return Ok(());
    }
    let mut chunks = ask("trace")?;
    let traced = chunks.len();
    if !trace_only {
        // The published list follows the trace, so the new list does not lose what the old
        // one had.
        let seen: std::collections::HashSet<u32> = chunks.iter().copied().collect();
        let published = ask("published")?;
        chunks.extend(published.into_iter().filter(|c| !seen.contains(c)));
    }
    let list = lazyblk_chunkstore::format::PrefetchList { image, chunks };
    write(list.encode())?;
    println!(
        "{traced} chunks in first-access order, {} from the published list, written to {} (publish it next to the manifest as `prefetch`)",
        list.chunks.len() - traced,
        output.display()
    );
    Ok(())
}

/// One 4 KiB buffer aligned for O_DIRECT.
#[repr(C, align(4096))]
struct AlignedBlock([u8; 4096]);

fn cmd_trace_pack(state: &Path, id: u32, output: &Path) -> Result<()> {
    let (rec, image) = traced_device(state, id)?;
    if rec.cow.is_some() {
        bail!("device {id} is writable: its blocks may differ from the image's, so they cannot go into a prefetch pack (trace a read-only device, or use --blocks)");
    }
    let mpath = rec.cache_root.join(image.hex()).join("manifest");
    let mbytes = std::fs::read(&mpath).with_context(|| format!("reading {}", mpath.display()))?;
    if lazyblk_chunkstore::ImageId::of(&mbytes) != image {
        bail!("{} is not the manifest of {image}", mpath.display());
    }
    let manifest = lazyblk_chunkstore::Manifest::decode(&mbytes)?;
    let blocks: Vec<u64> = ask_list(state, id, "blocks")?
        .into_iter()
        .map(u64::from)
        .collect();
    // The blocks are read back through the device, so they are the image's verified bytes
    // (whatever is missing is fetched, as for any read). With O_DIRECT: buffered reads would
    // make the kernel read ahead around every block, fetching chunks nobody read and adding
    // their blocks to the device's block trace.
    let bdev = format!("/dev/ublkb{id}");
    let dev = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&bdev)
            .with_context(|| format!("opening {bdev}"))?
    };
    let mut block = Box::new(AlignedBlock([0; 4096]));
    let mut read = |at: u64, buf: &mut [u8]| {
        use std::os::unix::fs::FileExt;
        // Whole 4 KiB blocks at 4 KiB offsets (the device's size is a multiple of them); the
        // image's last block may be short.
        dev.read_exact_at(&mut block.0, at)?;
        buf.copy_from_slice(&block.0[..buf.len()]);
        Ok(())
    };
    let s = lazyblk_chunkstore::builder::build_prefetch_pack(
        image,
        &manifest,
        &blocks,
        &mut read,
        output,
        lazyblk_chunkstore::builder::BuildOptions::default().level,
    )?;
    let meta = manifest.pack.as_ref().map_or(0, |p| p.blocks.len());
    println!(
        "{} blocks of 4 KiB ({} read since add, {meta} of the metadata pack) in {} frames, {} bytes, written to {} and {}",
        s.pack.pack.blocks.len(),
        blocks.len(),
        s.pack.pack.frames.len(),
        s.pack.blob_size,
        s.pack_path.display(),
        s.blob_path.display()
    );
    println!(
        "publish both next to the manifest (as `{}` and `{}`); pin with `add --pack-digest {}`",
        lazyblk_chunkstore::format::PACK_FILE,
        s.pack.blob_name,
        s.id
    );
    println!("digest     {}", s.id);
    Ok(())
}

fn cmd_list(state: &Path) -> Result<()> {
    if lazyblk_ublk::check_kernel().is_err() {
        lazyblk_ublk::check_kernel()?;
    }
    println!(
        "{:<4} {:<14} {:<20} {:>8}  STATE",
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
        println!(
            "{:<4} {:<14} {:<20} {:>8}  {}",
            id,
            format!("/dev/ublkb{id}"),
            image,
            pct,
            state_s
        );
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
            bail!(
                "the daemon of device {id} (pid {}) did not stop within 30 s",
                r.pid
            );
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

/// Wait until device `id`, whose daemon was `pid`, can be recovered: the daemon is gone and the
/// kernel has parked the device's IO (QUIESCED). On 6.12 the kernel notices a dead daemon at once
/// when the daemon had idle tags, else only at the block layer's IO timeout (30 s).
pub(crate) fn wait_recoverable(id: u32, pid: u32, timeout: Duration, say: bool) -> Result<()> {
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
pub(crate) fn recover_args(state: &Path, id: u32) -> Result<Vec<String>> {
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
    Ok(args)
}

fn cmd_recover(state: &Path, id: u32, foreground: bool, supervise: bool, wait: u64) -> Result<()> {
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

fn cmd_detach(state: &Path, id: u32, wait: u64) -> Result<()> {
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
