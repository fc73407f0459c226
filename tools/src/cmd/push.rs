//! `lazyblk push`, and the push steps of `build --push` and `trace --pack --push`: publish to
//! an OCI registry (`docs/FORMAT.md`, "In an OCI registry"), print the manifest digest.

use crate::registry_args::RegistryArgs;
use anyhow::{Context, Result};
use lazyblk_builder::push::File;
use lazyblk_builder::PushSummary;
use lazyblk_registry::{PushOutcome, Reference};
use std::path::Path;

/// What `push` prints per file (on stderr), and the digest on stdout.
fn report(f: &File, o: PushOutcome) {
    let what = match o {
        PushOutcome::Exists => "already there".to_string(),
        PushOutcome::Mounted => "mounted".to_string(),
        PushOutcome::Uploaded => "uploaded".to_string(),
        PushOutcome::UploadedChunked(n) => format!("uploaded in {n} pieces"),
    };
    eprintln!("  {:<14} {} {:>10} bytes: {what}", f.name, f.digest, f.size);
}

fn finish(r: &Reference, s: PushSummary) {
    eprintln!("pushed {r} (image {})", s.image);
    println!("{}", s.digest);
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn reference(s: &str) -> Result<Reference> {
    Reference::parse(s).with_context(|| format!("not an image reference: {s:?}"))
}

/// `lazyblk push <dir> <ref>` (and `build --push`): publish the build directory `dir`.
pub fn push_dir(dir: &Path, to: &str, mount_from: Option<&str>, reg: &RegistryArgs) -> Result<()> {
    let r = reference(to)?;
    let client = reg.client()?;
    let s = runtime()?
        .block_on(lazyblk_builder::push(&client, dir, &r, mount_from, &report))
        .with_context(|| format!("pushing {} to {r}", dir.display()))?;
    finish(&r, s);
    Ok(())
}

/// `lazyblk convert`'s push: publish the build directory `dir` to `to`, linked to its source
/// (`subject`, and referrers in the source's repository: `lazyblk_builder::push_linked`).
pub fn push_linked_dir(
    dir: &Path,
    to: &str,
    link: &lazyblk_builder::SourceLink,
    reg: &RegistryArgs,
) -> Result<()> {
    let r = reference(to)?;
    let client = reg.client()?;
    let s = runtime()?
        .block_on(lazyblk_builder::push_linked(
            &client, dir, &r, link, &report,
        ))
        .with_context(|| format!("pushing {} to {r}", dir.display()))?;
    let src = link.repository.repository();
    for l in &s.links {
        let how = if l.fallback {
            "referrers tag schema"
        } else {
            "referrers API"
        };
        eprintln!("linked {src}@{} -> {src}@{} ({how})", l.subject, l.digest);
    }
    finish(&r, s.pushed);
    Ok(())
}

/// `trace --pack --push <ref>`: publish the prefetch pack at `pack` over the image `to` names.
pub fn push_pack(pack: &Path, to: &str, reg: &RegistryArgs) -> Result<()> {
    let r = reference(to)?;
    let client = reg.client()?;
    let s = runtime()?
        .block_on(lazyblk_builder::push_pack(&client, pack, &r, &report))
        .with_context(|| format!("pushing the prefetch pack {} to {r}", pack.display()))?;
    finish(&r, s);
    Ok(())
}
