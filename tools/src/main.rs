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
mod store_args;
mod supervise;

use anyhow::Result;
use clap::Parser;
use cli::{Cli, Cmd};
use std::io::IsTerminal;

fn main() {
    daemon::mark_process_start();
    let cli = Cli::parse();
    let foreground_daemon = match &cli.cmd {
        Cmd::Add(a) => a.foreground,
        Cmd::Recover { foreground, .. } => *foreground,
        Cmd::Snapshotter(_) => true,
        _ => false,
    };
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
        Cmd::Gc { cache_dir, dry_run } => cmd::gc::run(&state, &cache_dir, dry_run),
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
