//! Test support for erofs images: deterministic data, `mkfs.erofs` (erofs-utils, installed by
//! `scripts/setup`), and a small reader written independently of the walker, to check it
//! (and, through the `testing` feature, the builder's metadata packs) against real images.

use super::*;
use crate::error::Result;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Deterministic incompressible bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Run `mkfs.erofs` on `tree`. `None` if this mkfs.erofs rejects the options; panics with
/// a clear message if mkfs.erofs is not installed.
pub fn mkfs(tree: &Path, out: &Path, opts: &[&str]) -> Option<Vec<u8>> {
    let o = Command::new("mkfs.erofs")
        .arg("--quiet")
        .args(opts)
        .arg(out)
        .arg(tree)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run mkfs.erofs ({e}): these tests need erofs-utils \
                 (scripts/setup installs it; apt-get install erofs-utils)"
            )
        });
    if !o.status.success() {
        eprintln!(
            "mkfs.erofs {opts:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        return None;
    }
    Some(std::fs::read(out).expect("read image"))
}

/// One node of a listing: kind, size, symlink target and user xattrs.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    /// `d`, `f`, `l` (symlink) or `o` (other).
    pub kind: char,
    /// Size in bytes.
    pub size: u64,
    /// Symlink target.
    pub target: Vec<u8>,
    /// User xattrs, sorted.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A deliberately simple erofs reader for well-formed images (uncompressed directories and
/// symlinks), independent of the walker. It panics on anything it does not expect.
pub struct Reader<'a> {
    img: &'a [u8],
    blksz: usize,
    meta: usize,
    xattr: usize,
    /// Nid of the root directory.
    pub root: u64,
}

/// An inode as the reader sees it.
pub struct RInode {
    /// Byte offset of the inode in the image.
    pub pos: usize,
    body: usize,
    /// The data layout (`i_format >> 1 & 7`).
    pub layout: u16,
    mode: u16,
    size: usize,
    i_u: u32,
}

impl<'a> Reader<'a> {
    /// A reader of the image `img` (panics on a bad superblock: test images are real).
    pub fn new(img: &'a [u8]) -> Reader<'a> {
        let sb = &img[1024..1152];
        assert_eq!(u32::from_le_bytes(sb[0..4].try_into().unwrap()), MAGIC);
        let blksz = 1usize << sb[12];
        let u32_at = |at: usize| u32::from_le_bytes(sb[at..at + 4].try_into().unwrap());
        Reader {
            img,
            blksz,
            meta: u32_at(40) as usize * blksz,
            xattr: u32_at(44) as usize * blksz,
            root: u64::from(u16::from_le_bytes([sb[14], sb[15]])),
        }
    }

    /// The little-endian `u16` at `at`.
    pub fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.img[at..at + 2].try_into().unwrap())
    }

    /// The little-endian `u32` at `at`.
    pub fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.img[at..at + 4].try_into().unwrap())
    }

    /// The inode `nid`.
    pub fn inode(&self, nid: u64) -> RInode {
        let pos = self.meta + 32 * nid as usize;
        let format = self.u16(pos);
        let extended = format & 1 == 1;
        let icount = self.u16(pos + 2) as usize;
        let xattr_size = if icount == 0 {
            0
        } else {
            12 + 4 * (icount - 1)
        };
        let size = if extended {
            u64::from_le_bytes(self.img[pos + 8..pos + 16].try_into().unwrap()) as usize
        } else {
            self.u32(pos + 8) as usize
        };
        RInode {
            pos,
            body: pos + if extended { 64 } else { 32 } + xattr_size,
            layout: format >> 1,
            mode: self.u16(pos + 4),
            size,
            i_u: self.u32(pos + 16),
        }
    }

    /// The data of an uncompressed directory or symlink, block by block, with each block's
    /// offset in the image.
    pub fn blocks(&self, ino: &RInode) -> Vec<(usize, &'a [u8])> {
        let raw = ino.i_u as usize * self.blksz;
        let nblocks = ino.size.div_ceil(self.blksz);
        (0..nblocks)
            .map(|i| {
                let len = (ino.size - i * self.blksz).min(self.blksz);
                let at = match ino.layout {
                    0 => raw + i * self.blksz,
                    2 if i + 1 == nblocks => ino.body,
                    2 => raw + i * self.blksz,
                    l => panic!("reader: unexpected layout {l} for a directory or symlink"),
                };
                (at, &self.img[at..at + len])
            })
            .collect()
    }

    /// A directory's entries: name, nid and the image offset of the dirent.
    pub fn entries(&self, dir: &RInode) -> Vec<(Vec<u8>, u64, usize)> {
        let mut out = Vec::new();
        for (at, b) in self.blocks(dir) {
            let n = usize::from(u16::from_le_bytes([b[8], b[9]])) / 12;
            for i in 0..n {
                let nid = u64::from_le_bytes(b[12 * i..12 * i + 8].try_into().unwrap());
                let start = usize::from(u16::from_le_bytes([b[12 * i + 8], b[12 * i + 9]]));
                let end = if i + 1 < n {
                    usize::from(u16::from_le_bytes([b[12 * i + 20], b[12 * i + 21]]))
                } else {
                    b[start..]
                        .iter()
                        .position(|&c| c == 0)
                        .map_or(b.len(), |p| start + p)
                };
                out.push((b[start..end].to_vec(), nid, at + 12 * i));
            }
        }
        out
    }

    /// User xattrs (name index 1), inline and shared, sorted.
    /// The xattrs of an inode, as (name with its prefix, value).
    pub fn xattrs(&self, ino: &RInode) -> Vec<(Vec<u8>, Vec<u8>)> {
        let header = ino.pos + if self.u16(ino.pos) & 1 == 1 { 64 } else { 32 };
        if header == ino.body {
            return Vec::new();
        }
        let shared = usize::from(self.img[header + 4]);
        let entry = |at: usize| {
            let (nlen, index) = (usize::from(self.img[at]), self.img[at + 1]);
            let vlen = usize::from(self.u16(at + 2));
            let name = self.img[at + 4..at + 4 + nlen].to_vec();
            let value = self.img[at + 4 + nlen..at + 4 + nlen + vlen].to_vec();
            ((index, name, value), (4 + nlen + vlen).next_multiple_of(4))
        };
        let mut all = Vec::new();
        for i in 0..shared {
            let id = self.u32(header + 12 + 4 * i) as usize;
            all.push(entry(self.xattr + 4 * id).0);
        }
        let mut at = header + 12 + 4 * shared;
        while at < ino.body {
            let (e, len) = entry(at);
            all.push(e);
            at += len;
        }
        let mut user: Vec<_> = all
            .into_iter()
            .filter(|(index, _, _)| *index == 1)
            .map(|(_, n, v)| (n, v))
            .collect();
        user.sort();
        user
    }

    /// `ls -lR` with xattrs: every path with its kind, size, symlink target and xattrs.
    /// Every path of the tree with what the reader sees of it.
    pub fn list(&self) -> BTreeMap<String, Node> {
        let mut out = BTreeMap::new();
        let mut dirs = vec![(String::new(), self.root)];
        while let Some((path, nid)) = dirs.pop() {
            let dir = self.inode(nid);
            for (name, nid, _) in self.entries(&dir) {
                if name == b"." || name == b".." {
                    continue;
                }
                let path = format!("{path}/{}", String::from_utf8(name).unwrap());
                let ino = self.inode(nid);
                let (kind, size, target) = match ino.mode & S_IFMT {
                    S_IFDIR => {
                        dirs.push((path.clone(), nid));
                        ('d', 0, Vec::new())
                    }
                    S_IFREG => ('f', ino.size as u64, Vec::new()),
                    S_IFLNK => {
                        let t: Vec<u8> = self
                            .blocks(&ino)
                            .iter()
                            .flat_map(|(_, b)| *b)
                            .copied()
                            .collect();
                        ('l', ino.size as u64, t)
                    }
                    _ => ('s', 0, Vec::new()),
                };
                let xattrs = self.xattrs(&ino);
                out.insert(
                    path,
                    Node {
                        kind,
                        size,
                        target,
                        xattrs,
                    },
                );
            }
        }
        out
    }
}

/// A `read_at` over the image bytes `img`, as the walker takes it.
pub fn reader(img: &[u8]) -> impl FnMut(u64, &mut [u8]) -> std::io::Result<()> + '_ {
    move |off, buf| {
        let src = usize::try_from(off)
            .ok()
            .and_then(|o| img.get(o..o.checked_add(buf.len())?))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// The walker's metadata extents of the image bytes `img`.
pub fn extents_of(img: &[u8]) -> Result<Vec<Extent>> {
    metadata_extents(&mut reader(img), img.len() as u64)
}
