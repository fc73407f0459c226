//! The erofs image of a converted tree whose file data stays in its layers' regions: the
//! layout that keeps a shared base layer's chunks the same in every image built on it.
//!
//! ```text
//! block 0        superblock (at 1024)
//! block 1..      inodes (extended, 64 bytes; xattrs and small directories and symlinks
//!                inline), then the blocks of larger directories and symlinks
//! chunk-aligned  region of layer 0: its files' data, each at a 4 KiB boundary, stream order
//! chunk-aligned  region of layer 1 ...
//! ```
//!
//! Only the metadata (the first stretch) depends on the whole image; a region is a function
//! of its layer's tar alone ([`crate::apply::Regions`]) and starts on a chunk boundary, so
//! the builder cuts it into the same chunks, compressed the same, wherever it lands
//! (`lazyblk_builder::Part::shared`). A regular file is `FLAT_PLAIN` at its data's block in
//! its region: data a later layer replaced or deleted stays in the region unreferenced
//! (it is what keeps the region shared), and a file is never split.
//!
//! Written from the kernel's on-disk format (`fs/erofs/erofs_fs.h`, Linux 6.12) with no
//! feature bits set, so the kernel from 5.4 and `fsck.erofs` 1.5 read it. erofs-utils 1.5 can
//! only lay out a directory tree's own bytes (no `--tar`, no blob devices); the `erofs-rs`
//! crate's writer lays out files too and has no way to point a file at existing blocks, so
//! this writer is the project's own. Metadata is the same as `mkfs.erofs` keeps: modes,
//! owners, mtimes with nanoseconds, link counts, device numbers, xattrs (the prefixes erofs
//! can index: `user.`, `trusted.`, `security.`, POSIX ACLs; others are skipped with a
//! warning, as `mkfs.erofs` does).

use crate::apply::{DataRef, Regions};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use tracing::warn;

/// The erofs block size written.
pub const BLOCK: u64 = 4096;
use lazyblk_format::erofs::{MAGIC, SUPERBLOCK_OFFSET};
const SUPER_AT: usize = SUPERBLOCK_OFFSET as usize;
const INODE_LEN: usize = 64;
const XATTR_HEADER_LEN: usize = 12;
const DIRENT_LEN: usize = 12;
const FLAT_PLAIN: u16 = 0;
const FLAT_INLINE: u16 = 2;

/// An xattr as erofs stores it: (prefix index, name without the prefix, value).
type Xattr = (u8, Vec<u8>, Vec<u8>);

/// What a node holds beyond its inode.
enum Body {
    /// Entries, sorted by name (`.` and `..` among them), each a node index.
    Dir(Vec<(Vec<u8>, usize)>),
    Symlink(Vec<u8>),
    File(DataRef),
    /// A device (its `new_encode_dev` number), a fifo or a socket.
    Special(u32),
}

struct Node {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    nsec: u32,
    nlink: u32,
    /// (erofs prefix index, name without the prefix, value).
    xattrs: Vec<Xattr>,
    body: Body,
}

/// Where a node went.
#[derive(Clone, Copy, Default)]
struct Placed {
    nid: u64,
    layout: u16,
    /// First data block (directories, symlinks, files); the device number for specials.
    i_u: u32,
    size: u64,
}

/// What was written: the metadata's length and where each layer's region goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of metadata at the start of the image (a multiple of [`BLOCK`]).
    pub meta_len: u64,
    /// Where region `i` starts in the image (a multiple of the chunk size).
    pub region_offsets: Vec<u64>,
    /// The image's size: the end of the last region's last chunk (or of the metadata).
    pub image_size: u64,
    /// Inodes written.
    pub inodes: u64,
}

/// Write to `out` the metadata of the erofs image of the tree at `root` (applied with
/// [`crate::apply::Tree::open_with_regions`], whose file data `regions` holds), for regions
/// placed at chunk boundaries of `chunk_size` bytes after it; `uuid` is the volume's.
pub fn write_image(
    root: &Path,
    regions: &Regions,
    chunk_size: u64,
    uuid: [u8; 16],
    out: &Path,
) -> Result<Layout> {
    let nodes = collect(root, regions)?;
    // 1. Inodes, in walk order (a directory's entries next to each other), none crossing a
    // block boundary.
    let mut placed = vec![Placed::default(); nodes.len()];
    let mut pos = BLOCK as usize;
    for (i, n) in nodes.iter().enumerate() {
        let x = xattr_size(&n.xattrs);
        let (size, tail) = match &n.body {
            Body::Dir(entries) => {
                let (blocks, last) = dir_blocks(entries);
                (
                    (blocks.len() as u64 - 1) * BLOCK + last as u64,
                    (blocks.len() == 1).then_some(last),
                )
            }
            Body::Symlink(t) => (t.len() as u64, Some(t.len())),
            Body::File(d) => (d.len, None),
            Body::Special(_) => (0, None),
        };
        let inline = tail.filter(|t| INODE_LEN + x + t <= BLOCK as usize);
        let record = (INODE_LEN + x + inline.unwrap_or(0)).next_multiple_of(32);
        if record <= BLOCK as usize && pos % BLOCK as usize + record > BLOCK as usize {
            pos = pos.next_multiple_of(BLOCK as usize);
        }
        placed[i] = Placed {
            nid: pos as u64 / 32,
            layout: if inline.is_some() {
                FLAT_INLINE
            } else {
                FLAT_PLAIN
            },
            i_u: 0,
            size,
        };
        pos += record;
    }
    if placed[0].nid > u64::from(u16::MAX) {
        return Err(Error::Source(
            "erofs: the root inode is out of reach".into(),
        ));
    }
    // 2. Blocks of the directories and symlinks that are not inline.
    let mut blk = pos.div_ceil(BLOCK as usize) as u64;
    for (i, n) in nodes.iter().enumerate() {
        let p = &mut placed[i];
        match &n.body {
            Body::Dir(_) | Body::Symlink(_) if p.layout == FLAT_PLAIN => {
                p.i_u = block_u32(blk)?;
                blk += p.size.div_ceil(BLOCK);
            }
            Body::Special(rdev) => p.i_u = *rdev,
            _ => {}
        }
    }
    let meta_len = blk * BLOCK;
    // 3. The regions, and the files in them.
    let mut region_offsets = Vec::with_capacity(regions.lens.len());
    let mut end = meta_len;
    for &len in &regions.lens {
        let at = end.next_multiple_of(chunk_size);
        region_offsets.push(at);
        // Whole chunks: its last chunk is as long wherever the region lands, the image's end
        // or not (and a file's last block is readable to its end).
        end = at + len.next_multiple_of(chunk_size);
    }
    let image_size = end.max(meta_len);
    block_u32(image_size.div_ceil(BLOCK))?;
    for (i, n) in nodes.iter().enumerate() {
        if let Body::File(d) = &n.body {
            placed[i].i_u = match d.len {
                0 => 0,
                _ => block_u32((region_offsets[d.layer] + d.offset) / BLOCK)?,
            };
        }
    }
    // 4. The bytes.
    let mut img = vec![0u8; meta_len as usize];
    let sb = &mut img[SUPER_AT..SUPER_AT + 128];
    put32(sb, 0, MAGIC);
    sb[12] = 12; // blkszbits
    put16(sb, 14, placed[0].nid as u16);
    put64(sb, 16, nodes.len() as u64);
    put32(sb, 36, image_size.div_ceil(BLOCK) as u32);
    sb[48..64].copy_from_slice(&uuid);
    for (i, n) in nodes.iter().enumerate() {
        let p = placed[i];
        let at = p.nid as usize * 32;
        let x = xattr_size(&n.xattrs);
        let ino = &mut img[at..at + INODE_LEN];
        put16(ino, 0, 1 | (p.layout << 1));
        put16(
            ino,
            2,
            if x == 0 {
                0
            } else {
                ((x - XATTR_HEADER_LEN) / 4 + 1) as u16
            },
        );
        put16(ino, 4, n.mode as u16);
        put64(ino, 8, p.size);
        put32(ino, 16, p.i_u);
        put32(ino, 20, i as u32 + 1);
        put32(ino, 24, n.uid);
        put32(ino, 28, n.gid);
        put64(ino, 32, n.mtime as u64);
        put32(ino, 40, n.nsec);
        put32(ino, 44, n.nlink);
        write_xattrs(&mut img[at + INODE_LEN..at + INODE_LEN + x], &n.xattrs);
        let data_at = at + INODE_LEN + x;
        match &n.body {
            Body::Dir(entries) => {
                let (blocks, _) = dir_blocks(entries);
                for (b, range) in blocks.iter().enumerate() {
                    let start = match p.layout {
                        FLAT_INLINE => data_at,
                        _ => (p.i_u as usize + b) * BLOCK as usize,
                    };
                    write_dir_block(&mut img[start..], &entries[range.clone()], &placed, &nodes);
                }
            }
            Body::Symlink(t) => {
                let start = match p.layout {
                    FLAT_INLINE => data_at,
                    _ => p.i_u as usize * BLOCK as usize,
                };
                img[start..start + t.len()].copy_from_slice(t);
            }
            Body::File(_) | Body::Special(_) => {}
        }
    }
    lazyblk_builder::write_atomic(out, &img)?;
    Ok(Layout {
        meta_len,
        region_offsets,
        image_size,
        inodes: nodes.len() as u64,
    })
}

fn block_u32(b: u64) -> Result<u32> {
    u32::try_from(b).map_err(|_| Error::Source("erofs: the image passes 16 TiB".into()))
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The directory's entries cut into blocks (each a range of entries), and the bytes used in
/// the last block.
fn dir_blocks(entries: &[(Vec<u8>, usize)]) -> (Vec<std::ops::Range<usize>>, usize) {
    let mut blocks = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, (name, _)) in entries.iter().enumerate() {
        let need = DIRENT_LEN + name.len();
        if used + need > BLOCK as usize {
            blocks.push(start..i);
            (start, used) = (i, 0);
        }
        used += need;
    }
    blocks.push(start..entries.len());
    (blocks, used)
}

/// One directory block: the dirents, then the names (no terminators).
fn write_dir_block(b: &mut [u8], entries: &[(Vec<u8>, usize)], placed: &[Placed], nodes: &[Node]) {
    let mut name_at = DIRENT_LEN * entries.len();
    for (k, (name, node)) in entries.iter().enumerate() {
        let d = &mut b[k * DIRENT_LEN..(k + 1) * DIRENT_LEN];
        put64(d, 0, placed[*node].nid);
        put16(d, 8, name_at as u16);
        d[10] = file_type(nodes[*node].mode);
        b[name_at..name_at + name.len()].copy_from_slice(name);
        name_at += name.len();
    }
}

/// The erofs dirent file type of `mode`.
fn file_type(mode: u32) -> u8 {
    match mode & libc::S_IFMT {
        libc::S_IFREG => 1,
        libc::S_IFDIR => 2,
        libc::S_IFCHR => 3,
        libc::S_IFBLK => 4,
        libc::S_IFIFO => 5,
        libc::S_IFSOCK => 6,
        libc::S_IFLNK => 7,
        _ => 0,
    }
}

fn xattr_size(x: &[Xattr]) -> usize {
    if x.is_empty() {
        return 0;
    }
    XATTR_HEADER_LEN
        + x.iter()
            .map(|(_, n, v)| (4 + n.len() + v.len()).next_multiple_of(4))
            .sum::<usize>()
}

fn write_xattrs(b: &mut [u8], x: &[Xattr]) {
    // The header (name filter, shared count: none) is all zeros.
    let mut at = XATTR_HEADER_LEN.min(b.len());
    for (index, name, value) in x {
        b[at] = name.len() as u8;
        b[at + 1] = *index;
        put16(b, at + 2, value.len() as u16);
        b[at + 4..at + 4 + name.len()].copy_from_slice(name);
        b[at + 4 + name.len()..at + 4 + name.len() + value.len()].copy_from_slice(value);
        at += (4 + name.len() + value.len()).next_multiple_of(4);
    }
}

/// The erofs prefix index of an xattr name and the rest of the name (`None`: erofs cannot
/// store it without long-prefix support).
fn xattr_prefix(key: &[u8]) -> Option<(u8, &[u8])> {
    const PREFIXES: [(&[u8], u8); 5] = [
        (b"user.", 1),
        (b"system.posix_acl_access", 2),
        (b"system.posix_acl_default", 3),
        (b"trusted.", 4),
        (b"security.", 6),
    ];
    PREFIXES.iter().find_map(|(p, i)| {
        let rest = key.strip_prefix(*p)?;
        // The ACL names are whole names, not prefixes.
        (*i > 3 || *i == 1 || rest.is_empty()).then_some((*i, rest))
    })
}

/// The xattrs of `path` (not followed), for erofs.
fn xattrs(path: &Path) -> Result<Vec<Xattr>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Source(format!("{}: a NUL in the path", path.display())))?;
    let io = |e| Error::io(path, e);
    let names = xattr_call(|buf, len| {
        // SAFETY: `c` is a valid C string and `buf` a writable buffer of `len` bytes (or null
        // with 0, which asks for the size).
        unsafe { libc::llistxattr(c.as_ptr(), buf.cast(), len) }
    })
    .map_err(io)?;
    let mut v = Vec::new();
    for key in names.split(|&b| b == 0).filter(|k| !k.is_empty()) {
        let Some((index, rest)) = xattr_prefix(key) else {
            warn!(path = %path.display(), xattr = %String::from_utf8_lossy(key), "xattr not kept: erofs has no prefix for it");
            continue;
        };
        let k = CString::new(key).expect("split at NULs");
        let value = xattr_call(|buf, len| {
            // SAFETY: valid C strings; `buf` is writable for `len` bytes (or null with 0).
            unsafe { libc::lgetxattr(c.as_ptr(), k.as_ptr(), buf.cast(), len) }
        })
        .map_err(io)?;
        if rest.len() > usize::from(u8::MAX) || value.len() > usize::from(u16::MAX) {
            return Err(Error::Source(format!(
                "{}: xattr {} is too large for erofs",
                path.display(),
                String::from_utf8_lossy(key)
            )));
        }
        v.push((index, rest.to_vec(), value));
    }
    Ok(v)
}

/// Call a size-then-fill xattr function until the value fits.
fn xattr_call(mut f: impl FnMut(*mut u8, usize) -> isize) -> std::io::Result<Vec<u8>> {
    loop {
        let n = f(std::ptr::null_mut(), 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = vec![0u8; n as usize];
        let got = f(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

/// The kernel's `new_encode_dev` of a `dev_t`.
fn encode_dev(rdev: u64) -> u32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Every node of the tree at `root`, the root first, each directory's entries made together.
fn collect(root: &Path, regions: &Regions) -> Result<Vec<Node>> {
    let node = |path: &Path, md: &std::fs::Metadata, body: Body| -> Result<Node> {
        Ok(Node {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            nsec: md.mtime_nsec() as u32,
            nlink: md.nlink() as u32,
            xattrs: xattrs(path)?,
            body,
        })
    };
    let md = std::fs::symlink_metadata(root).map_err(|e| Error::io(root, e))?;
    let mut nodes = vec![node(root, &md, Body::Dir(Vec::new()))?];
    let mut links: HashMap<u64, usize> = HashMap::new();
    let mut stack: Vec<(PathBuf, usize, usize)> = vec![(root.to_path_buf(), 0, 0)];
    while let Some((dir, me, parent)) = stack.pop() {
        let mut names = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            names.push(e.map_err(|e| Error::io(&dir, e))?.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut entries = vec![(b".".to_vec(), me), (b"..".to_vec(), parent)];
        let mut subdirs = 0;
        let mut below = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let md = std::fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
            let ft = md.file_type();
            if !ft.is_dir() && md.nlink() > 1 {
                if let Some(&n) = links.get(&md.ino()) {
                    entries.push((name.as_bytes().to_vec(), n));
                    continue;
                }
            }
            let body = if ft.is_dir() {
                subdirs += 1;
                Body::Dir(Vec::new())
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&path).map_err(|e| Error::io(&path, e))?;
                Body::Symlink(t.as_os_str().as_bytes().to_vec())
            } else if ft.is_file() {
                let d = regions.files.get(&md.ino()).copied().ok_or_else(|| {
                    Error::Source(format!("{}: no layer wrote its data", path.display()))
                })?;
                if d.len != md.len() {
                    return Err(Error::Source(format!(
                        "{}: {} bytes in the tree, {} in its layer",
                        path.display(),
                        md.len(),
                        d.len
                    )));
                }
                Body::File(d)
            } else if ft.is_block_device() || ft.is_char_device() {
                Body::Special(encode_dev(md.rdev()))
            } else {
                Body::Special(0)
            };
            let i = nodes.len();
            nodes.push(node(&path, &md, body)?);
            if ft.is_dir() {
                below.push((path, i, me));
            } else if md.nlink() > 1 {
                links.insert(md.ino(), i);
            }
            entries.push((name.as_bytes().to_vec(), i));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        nodes[me].nlink = 2 + subdirs;
        nodes[me].body = Body::Dir(entries);
        // Depth first, in name order.
        stack.extend(below.into_iter().rev());
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_blocks_split_at_the_block_size() {
        let e = |n: usize| (vec![b'a'; n], 0usize);
        let (b, last) = dir_blocks(&[e(1), e(2)]);
        assert_eq!((b.len(), b[0].clone(), last), (1, 0..2, 27));
        // 4096 = 2 * (12 + 2036): the third starts a block.
        let (b, last) = dir_blocks(&[e(2036), e(2036), e(5)]);
        assert_eq!((b, last), (vec![0..2, 2..3], 17));
    }

    #[test]
    fn xattr_prefixes() {
        assert_eq!(
            xattr_prefix(b"security.capability"),
            Some((6, &b"capability"[..]))
        );
        assert_eq!(xattr_prefix(b"user.x"), Some((1, &b"x"[..])));
        assert_eq!(
            xattr_prefix(b"system.posix_acl_access"),
            Some((2, &b""[..]))
        );
        assert_eq!(xattr_prefix(b"system.posix_acl_accessX"), None);
        assert_eq!(xattr_prefix(b"system.other"), None);
    }

    #[test]
    fn devices_encode_like_the_kernel() {
        assert_eq!(encode_dev(libc::makedev(1, 3)), 0x103);
        assert_eq!(
            encode_dev(libc::makedev(8, 0x1234)),
            0x34 | (8 << 8) | (0x1200 << 12)
        );
    }
}
