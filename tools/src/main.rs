//! `lazyblk`: build chunked images and serve them lazily as ublk block devices.
//!
//! This file parses the command line (`cli.rs`) and hands each subcommand to its module under
//! `cmd/`.

mod cli;
mod cmd;
mod daemon;
mod device;
mod handover;
mod metrics;
mod registry_args;
mod signals;
mod spawn;
mod store_args;
mod supervise;

use anyhow::Result;
use clap::Parser;
use cli::{Cli, Cmd};

fn main() {
    daemon::mark_process_start();
    std::process::exit(run_argv(std::env::args().collect()));
}

/// The log's level filter, reloaded when a forked daemon takes over ([`spawn`]).
type LogFilter =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;
static LOG_FILTER: std::sync::OnceLock<LogFilter> = std::sync::OnceLock::new();

/// The command line this process runs: its own, or in a forked daemon the one it was given
/// ([`spawn`]), which `std::env::args` does not show.
static ARGV: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The arguments of the command line this process runs, without the program name.
fn args() -> Vec<String> {
    ARGV.lock().expect("lock").iter().skip(1).cloned().collect()
}

/// Parse `argv` and run it; the exit status. A forked daemon ([`spawn`]) runs its command line
/// here too, so the log is set up once and only its level changes.
fn run_argv(argv: Vec<String>) -> i32 {
    use tracing_subscriber::prelude::*;
    *ARGV.lock().expect("lock") = argv.clone();
    let cli = Cli::parse_from(argv);
    let foreground_daemon = match &cli.cmd {
        Cmd::Add(a) => a.foreground,
        Cmd::Recover { foreground, .. } => *foreground,
        Cmd::Snapshotter(_) => true,
        _ => false,
    };
    let default = if foreground_daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LAZYBLK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    match LOG_FILTER.get() {
        Some(h) => {
            let _ = h.reload(filter);
        }
        None => {
            let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
            // No ANSI colours: a forked daemon keeps this layer, and its standard error is its
            // log file, whatever the command's was (the writer takes fd 2 at every event).
            tracing_subscriber::registry()
                .with(filter)
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(false),
                )
                .init();
            let _ = LOG_FILTER.set(handle);
        }
    }
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("lazyblk: error: {e:#}");
            1
        }
    }
}

/// Run one subcommand.
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
            push,
            registry,
        } => {
            cmd::build::run(
                &input,
                &output,
                cmd::build::options(chunk_kib, level, no_metadata_pack, pack_blocks)?,
                keep_image,
            )?;
            match push {
                Some(to) => cmd::push::push_dir(&output, &to, None, &registry),
                None => Ok(()),
            }
        }
        Cmd::Push {
            dir,
            reference,
            mount_from,
            registry,
        } => cmd::push::push_dir(&dir, &reference, mount_from.as_deref(), &registry),
        Cmd::Cat {
            manifest,
            store,
            offset,
            length,
            output,
        } => cmd::cat::run(&manifest, &store, offset, length, output),
        Cmd::Add(a) => cmd::add::run(state, a),
        Cmd::Convert(a) => cmd::convert::run(a),
        Cmd::List => cmd::manage::list(&state),
        Cmd::Trace {
            id,
            output,
            trace_only,
            blocks,
            pack,
            push,
            registry,
        } => {
            cmd::trace::run(&state, id, &output, trace_only, blocks, pack)?;
            match push {
                Some(to) => cmd::push::push_pack(&output, &to, &registry),
                None => Ok(()),
            }
        }
        Cmd::Export { id, output } => cmd::export::run(&state, id, &output),
        Cmd::Gc {
            cache_dir,
            dry_run,
            host_cache_limit: None,
        } => cmd::gc::run(&state, &cache_dir, dry_run),
        Cmd::Gc {
            cache_dir,
            host_cache_limit: Some(limit),
            ..
        } => cmd::gc::host_limit(&state, &cache_dir, limit),
        Cmd::Status { id, json } => cmd::manage::status(&state, id, json),
        Cmd::Del { id, all } => cmd::manage::del(&state, id, all),
        Cmd::Recover {
            id,
            foreground,
            supervise,
            wait,
        } => cmd::lifecycle::recover(&state, id, foreground, supervise, wait),
        Cmd::Detach { id, wait } => cmd::lifecycle::detach(&state, id, wait),
        Cmd::Handover { id } => cmd::handover::run(&state, id),
        Cmd::VerifyCache { dir } => cmd::verify::verify_cache(&dir),
        Cmd::Vhost(a) => cmd::vhost::run(a),
        Cmd::ExportCow(a) => cmd::vhost::export(a),
        Cmd::Snapshotter(a) => cmd::snapshotter::run(state, a),
        Cmd::Metrics {
            listen,
            socket_group,
        } => metrics::run(&state, listen, socket_group.as_deref()),
    }
}
