//! Test helper binary: `gen-tree <dir> [--seed N] [--scale N]` and `digest-tree <dir>`.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "lazyblk test helpers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate the standard test tree.
    GenTree {
        /// Where.
        dir: PathBuf,
        /// RNG seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Multiplier for large file sizes.
        #[arg(long, default_value_t = 1)]
        scale: u64,
    },
    /// Print the digest of a tree (contents and metadata).
    DigestTree {
        /// Which.
        dir: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::GenTree { dir, seed, scale } => lazyblk_tests::tree::generate(&dir, seed, scale),
        Cmd::DigestTree { dir } => {
            print!("{}", lazyblk_tests::tree::digest(&dir)?);
            Ok(())
        }
    }
}
