//! Deterministic test trees and a digest of a tree's contents and metadata, used to compare a
//! source directory with what the kernel shows through a lazyblk device.

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Generate a tree with many small files, large files, sparse files, symlinks, hardlinks,
/// xattrs, deep directories and empty files. `scale` multiplies the large-file sizes.
pub fn generate(root: &Path, seed: u64, scale: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    fs::create_dir_all(root)?;
    // Many small files in a few directories.
    for d in 0..8 {
        let dir = root.join(format!("small/d{d}"));
        fs::create_dir_all(&dir)?;
        for f in 0..150 {
            let n = rng.gen_range(0..6000);
            let mut v = vec![0u8; n];
            if f % 3 == 0 {
                rng.fill(&mut v[..]);
            } else {
                for (i, b) in v.iter_mut().enumerate() {
                    *b = b"small text file line\n"[i % 21];
                }
            }
            fs::write(dir.join(format!("f{f}.txt")), &v)?;
        }
    }
    // Large files: random (incompressible) and text (compressible).
    fs::create_dir_all(root.join("large"))?;
    let mut big = vec![0u8; (3 << 20) * scale as usize];
    rng.fill(&mut big[..]);
    fs::write(root.join("large/random.bin"), &big)?;
    let text: Vec<u8> = (0..(2 << 20) * scale as usize)
        .map(|i| b"the quick brown fox jumps over the lazy block device\n"[i % 53])
        .collect();
    fs::write(root.join("large/text.txt"), &text)?;
    // Sparse file: data, a hole, data.
    let mut sp = fs::File::create(root.join("large/sparse.img"))?;
    sp.write_all(&big[..65536])?;
    sp.seek(SeekFrom::Start(8 << 20))?;
    sp.write_all(&big[65536..131072])?;
    // Empty files and an empty directory.
    fs::create_dir_all(root.join("empty/dir"))?;
    fs::write(root.join("empty/file"), b"")?;
    // Deep directories.
    let mut deep = root.join("deep");
    for i in 0..24 {
        deep = deep.join(format!("level{i}"));
    }
    fs::create_dir_all(&deep)?;
    fs::write(deep.join("bottom.txt"), b"you found the bottom\n")?;
    // Symlinks (relative, absolute, dangling) and hardlinks.
    fs::create_dir_all(root.join("links"))?;
    std::os::unix::fs::symlink("../large/text.txt", root.join("links/rel"))?;
    std::os::unix::fs::symlink("/etc/hostname", root.join("links/abs"))?;
    std::os::unix::fs::symlink("nowhere/at/all", root.join("links/dangling"))?;
    fs::hard_link(root.join("small/d0/f1.txt"), root.join("links/hard1"))?;
    fs::hard_link(root.join("small/d0/f1.txt"), root.join("links/hard2"))?;
    // Modes.
    fs::set_permissions(
        root.join("small/d1/f2.txt"),
        fs::Permissions::from_mode(0o600),
    )?;
    fs::set_permissions(
        root.join("small/d1/f3.txt"),
        fs::Permissions::from_mode(0o755),
    )?;
    // xattrs.
    xattr::set(root.join("small/d2/f4.txt"), "user.lazyblk", b"hello xattr")
        .context("setting a user xattr (does the file system support xattrs?)")?;
    xattr::set(root.join("large"), "user.dirattr", b"on a directory")?;
    xattr::set(
        root.join("small/d2/f5.txt"),
        "trusted.secret",
        &[0u8, 1, 2, 255],
    )?;
    Ok(())
}

/// One line per entry: path, type, mode, owner, size, sha256 and link count or link target or
/// device number, xattrs (`security.capability` included, other `security.*` left out), hardlink
/// group.
pub fn digest(root: &Path) -> Result<String> {
    let mut lines = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    walk(root, root, &mut lines, &mut inodes)?;
    // Hardlink groups: the sorted list of names sharing an inode.
    for names in inodes.values().filter(|n| n.len() > 1) {
        let group = names.join(",");
        for n in names {
            if let Some(l) = lines.get_mut(n) {
                l.push_str(&format!(" links=[{group}]"));
            }
        }
    }
    Ok(lines.into_values().map(|l| l + "\n").collect())
}

fn walk(
    root: &Path,
    dir: &Path,
    lines: &mut BTreeMap<String, String>,
    inodes: &mut BTreeMap<(u64, u64), Vec<String>>,
) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let rel = p.strip_prefix(root)?.display().to_string();
        if rel == "lost+found" {
            continue;
        }
        let md = fs::symlink_metadata(&p)?;
        let ft = md.file_type();
        let mode = md.mode() & 0o7777;
        let mut xs: Vec<String> = xattr::list(&p)
            .map(|l| {
                l.filter_map(|n| {
                    let n = n.to_string_lossy().to_string();
                    // security.selinux and friends depend on the host, not the image;
                    // file capabilities belong to the image.
                    if n.starts_with("security.") && n != "security.capability" {
                        return None;
                    }
                    let v = xattr::get(&p, &n).ok().flatten().unwrap_or_default();
                    Some(format!("{n}={}", hex::encode(v)))
                })
                .collect()
            })
            .unwrap_or_default();
        xs.sort();
        let what = if ft.is_symlink() {
            format!("link -> {}", fs::read_link(&p)?.display())
        } else if ft.is_dir() {
            "dir".to_string()
        } else if ft.is_file() {
            let data = fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            if md.nlink() > 1 {
                inodes
                    .entry((md.dev(), md.ino()))
                    .or_default()
                    .push(rel.clone());
            }
            format!(
                "file size={} sha256={} nlink={}",
                md.len(),
                hex::encode(Sha256::digest(&data)),
                md.nlink()
            )
        } else {
            format!("special {:o} rdev={:x}", md.mode(), md.rdev())
        };
        let mode_s = if ft.is_symlink() {
            String::new()
        } else {
            format!(" mode={mode:o}")
        };
        lines.insert(
            rel.clone(),
            format!(
                "{rel}: {what}{mode_s} uid={} gid={} xattrs=[{}]",
                md.uid(),
                md.gid(),
                xs.join(",")
            ),
        );
        if ft.is_dir() {
            walk(root, &p, lines, inodes)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_sees_content_mode_and_xattr_changes() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("t");
        generate(&root, 1, 1).unwrap();
        let a = digest(&root).unwrap();
        assert!(
            a.contains("links=[links/hard1,links/hard2,small/d0/f1.txt]"),
            "{a}"
        );
        assert!(a.contains("user.lazyblk="));
        fs::write(root.join("small/d3/f7.txt"), b"changed").unwrap();
        let b = digest(&root).unwrap();
        assert_ne!(a, b);
        fs::set_permissions(
            root.join("small/d3/f8.txt"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        assert_ne!(b, digest(&root).unwrap());
    }
}
