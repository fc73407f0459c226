//! `lazyblk cat`: read an image through the chunk store, without a kernel device.

use crate::store_args::StoreArgs;
use anyhow::{bail, Context, Result};
use lazyblk_blocksource::BlockSource;
use lazyblk_chunkstore::{ChunkStore, Location};
use std::io::Write;
use std::path::PathBuf;

/// Run `lazyblk cat`: `length` bytes (default: to the end) at `offset` to `output` or stdout.
pub fn run(
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
