//! Where an erofs image keeps its file-system metadata, for a build-time prefetch list.
//!
//! mkfs.erofs (erofs-utils 1.5) allocates inode, directory and file-data blocks from one
//! allocator as it goes, so the metadata of a large tree is spread all over the image and a lazy
//! `ls -lR` misses on chunk after chunk. [`metadata_extents`] walks the file system from the root
//! directory, breadth first, and returns the byte ranges that such a walk reads, in the order it
//! first needs them: the superblock, every reachable inode (with its inline xattrs and, for
//! directories and symlinks, its inline tail), the shared xattrs inodes refer to, the data
//! blocks of directories and symlinks, and the block maps and compression indexes of files.
//! File data is never included. `lazyblk build` turns the ranges into a prefetch list
//! ([`crate::format::PrefetchList`]).
//!
//! The layout is the kernel's on-disk format (`fs/erofs/erofs_fs.h`). The image is untrusted:
//! every offset is checked against the image size before it is read, nothing is allocated from
//! an unchecked size, every inode is visited once, and the total number of bytes read and
//! inodes visited is bounded, so a malformed image yields an error, never a panic or a hang.
//! Images this walker cannot follow (feature bits it does not know, compressed directories)
//! are either rejected as a whole or not descended into.

use crate::error::{Error, Result};
use std::collections::{HashSet, VecDeque};

/// Byte offset of the superblock in the image.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// The superblock magic number (stored little endian).
pub const MAGIC: u32 = 0xE0F5_E1E2;

/// On-disk superblock size without extension slots.
const SUPERBLOCK_LEN: u64 = 128;
const SB_EXTSLOT_LEN: u64 = 16;
const DEVICE_SLOT_LEN: u64 = 128;
/// A nid counts 32-byte slots from the start of the metadata area.
const NID_SLOT: u64 = 32;
const COMPACT_INODE_LEN: u64 = 32;
const EXTENDED_INODE_LEN: u64 = 64;
const XATTR_IBODY_HEADER_LEN: u64 = 12;
const XATTR_ENTRY_HEADER_LEN: u64 = 4;
const DIRENT_LEN: usize = 12;
const MAX_NAME_LEN: usize = 255;
/// A hole in a chunk-based file's block map.
const NULL_ADDR: u32 = u32::MAX;

// superblock feature_incompat bits
const INCOMPAT_DEVICE_TABLE: u32 = 0x08;
const INCOMPAT_FRAGMENTS: u32 = 0x20;
/// Every incompatible feature whose layout this walker understands (up to XATTR_PREFIXES).
const INCOMPAT_KNOWN: u32 = 0x7f;

// i_format: bit 0 = extended inode, bits 1-3 = data layout; higher bits are unknown.
const I_FORMAT_KNOWN: u16 = 0x0f;
const LAYOUT_FLAT_PLAIN: u8 = 0;
const LAYOUT_COMPRESSED_FULL: u8 = 1;
const LAYOUT_FLAT_INLINE: u8 = 2;
const LAYOUT_COMPRESSED_COMPACT: u8 = 3;
const LAYOUT_CHUNK_BASED: u8 = 4;

// chunk-based inodes: i_u holds a format word
const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1f;
const CHUNK_FORMAT_INDEXES: u16 = 0x20;
const CHUNK_INDEX_LEN: u64 = 8;
const BLOCK_MAP_ENTRY_LEN: u64 = 4;

// compressed inodes
const Z_MAP_HEADER_LEN: u64 = 8;
const Z_FULL_INDEX_LEN: u64 = 8;
const Z_ADVISE_COMPACTED_2B: u16 = 0x0001;
/// In `h_clusterbits`: the whole file lives in the packed inode, there are no indexes.
const Z_FRAGMENT_INODE: u8 = 0x80;

const S_IFMT: u16 = 0o170_000;
const S_IFDIR: u16 = 0o040_000;
const S_IFREG: u16 = 0o100_000;
const S_IFLNK: u16 = 0o120_000;

/// Block sizes accepted: 512 bytes to 64 KiB.
const BLKSZBITS: std::ops::RangeInclusive<u8> = 9..=16;
/// Largest directory followed (a million entries with 40-byte names take 50 MiB).
const MAX_DIR_SIZE: u64 = 256 << 20;
/// Largest symlink target included (the kernel's `PATH_MAX`).
const MAX_SYMLINK_LEN: u64 = 4096;
/// Most inodes visited.
const MAX_INODES: usize = 1 << 23;
/// The walk may read at most this much on top of twice the image size (a well-formed image
/// reads each metadata byte about once).
const READ_SLACK: u64 = 1 << 20;

/// A byte range of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset of the first byte.
    pub offset: u64,
    /// Length in bytes (never zero in the walk's output).
    pub len: u64,
}

impl Extent {
    /// Offset one past the last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Reads exactly `buf.len()` bytes at an offset of the image.
pub type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> std::io::Result<()> + 'a;

/// Whether `first_2k` (the first bytes of an image, at least 1152 of them) starts an erofs file
/// system: the superblock magic at byte 1024 and a plausible block size.
pub fn is_erofs(first_2k: &[u8]) -> bool {
    let sb = SUPERBLOCK_OFFSET as usize;
    match first_2k.get(sb..sb + SUPERBLOCK_LEN as usize) {
        Some(b) => le_u32(b, 0) == MAGIC && BLKSZBITS.contains(&b[12]),
        None => false,
    }
}

/// The metadata of the erofs image of `image_size` bytes that `read_at` reads, as byte ranges
/// in the order a breadth-first walk from the root directory first needs them (adjacent ranges
/// merged). See the [module documentation](self) for what is included.
///
/// Errors are `Error::Invalid("erofs: ...")`: not an erofs image, an unsupported feature,
/// inconsistent metadata, a walk larger than its bounds, or a failed read.
pub fn metadata_extents(read_at: &mut ReadAt<'_>, image_size: u64) -> Result<Vec<Extent>> {
    let mut w = Walker {
        read_at,
        image_size,
        budget: image_size.saturating_mul(2).saturating_add(READ_SLACK),
        sb: Superblock::default(),
        blksz: 0,
        visited: HashSet::new(),
        out: Vec::new(),
    };
    w.walk()?;
    Ok(w.out)
}

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("erofs: {msg}"))
}

/// `N` bytes of `b` from `at` (callers read fields of buffers whose length they know).
fn bytes<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes(b, at))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes(b, at))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes(b, at))
}

fn align_up(x: u64, to: u64) -> Option<u64> {
    x.checked_next_multiple_of(to)
}

#[derive(Clone, Copy, Debug, Default)]
struct Superblock {
    blkszbits: u8,
    sb_extslots: u8,
    root_nid: u64,
    meta_blkaddr: u32,
    xattr_blkaddr: u32,
    feature_incompat: u32,
    extra_devices: u16,
    devt_slotoff: u16,
    packed_nid: u64,
}

impl Superblock {
    fn parse(b: &[u8; SUPERBLOCK_LEN as usize]) -> Result<Superblock> {
        if le_u32(b, 0) != MAGIC {
            return Err(invalid("bad superblock magic (not an erofs image)"));
        }
        let sb = Superblock {
            blkszbits: b[12],
            sb_extslots: b[13],
            root_nid: u64::from(le_u16(b, 14)),
            meta_blkaddr: le_u32(b, 40),
            xattr_blkaddr: le_u32(b, 44),
            feature_incompat: le_u32(b, 80),
            extra_devices: le_u16(b, 86),
            devt_slotoff: le_u16(b, 88),
            packed_nid: le_u64(b, 96),
        };
        if !BLKSZBITS.contains(&sb.blkszbits) {
            return Err(invalid(format!(
                "unsupported block size 2^{}",
                sb.blkszbits
            )));
        }
        let unknown = sb.feature_incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(invalid(format!(
                "unsupported incompatible features {unknown:#x}"
            )));
        }
        let dirblkbits = b[90];
        if dirblkbits != 0 {
            return Err(invalid(format!("unsupported dirblkbits {dirblkbits}")));
        }
        Ok(sb)
    }
}

/// What the walk needs of an on-disk inode.
#[derive(Clone, Copy, Debug)]
struct Inode {
    nid: u64,
    /// Byte offset of the inode.
    pos: u64,
    /// Inode size: 32 (compact) or 64 (extended).
    isize: u64,
    /// Inline xattr area size.
    xattr_size: u64,
    layout: u8,
    mode: u16,
    size: u64,
    /// `raw_blkaddr`, `rdev`, `compressed_blocks` or the chunk format, by layout and type.
    i_u: u32,
}

impl Inode {
    /// Offset just past the inode and its inline xattrs: inline data, block maps and
    /// compression indexes start here.
    fn body_end(&self) -> u64 {
        self.pos + self.isize + self.xattr_size
    }

    fn file_type(&self) -> u16 {
        self.mode & S_IFMT
    }
}

/// A run of a directory's (or symlink's) data: `len` bytes at logical offset `logical`, stored
/// at byte `physical` of the image.
#[derive(Clone, Copy, Debug)]
struct Run {
    logical: u64,
    physical: u64,
    len: u64,
}

struct Walker<'r, 'a> {
    read_at: &'r mut ReadAt<'a>,
    image_size: u64,
    /// Bytes the walk may still read.
    budget: u64,
    sb: Superblock,
    blksz: u64,
    visited: HashSet<u64>,
    out: Vec<Extent>,
}

impl Walker<'_, '_> {
    fn walk(&mut self) -> Result<()> {
        let mut raw = [0u8; SUPERBLOCK_LEN as usize];
        self.read(SUPERBLOCK_OFFSET, &mut raw)?;
        self.sb = Superblock::parse(&raw)?;
        self.blksz = 1 << self.sb.blkszbits;
        // Mount reads the block holding the superblock and its extension slots.
        let sb_end =
            SUPERBLOCK_OFFSET + SUPERBLOCK_LEN + SB_EXTSLOT_LEN * u64::from(self.sb.sb_extslots);
        self.emit(0, sb_end.max(self.blksz).min(self.image_size));
        if self.sb.feature_incompat & INCOMPAT_DEVICE_TABLE != 0 && self.sb.extra_devices > 0 {
            let at = DEVICE_SLOT_LEN * u64::from(self.sb.devt_slotoff);
            let len = DEVICE_SLOT_LEN * u64::from(self.sb.extra_devices);
            self.check(at, len, "device table")?;
            self.emit(at, len);
        }
        if self.sb.feature_incompat & INCOMPAT_FRAGMENTS != 0 && self.sb.packed_nid != 0 {
            // Mount loads the packed inode; its data (file fragments) is file data.
            let packed = self.visit(self.sb.packed_nid)?;
            self.emit_inode(&packed)?;
        }

        let root = self.visit(self.sb.root_nid)?;
        if root.file_type() != S_IFDIR {
            return Err(invalid(format!(
                "root inode {} is not a directory",
                root.nid
            )));
        }
        self.emit_inode(&root)?;
        let mut queue = VecDeque::from([root]);
        while let Some(dir) = queue.pop_front() {
            self.walk_dir(&dir, &mut queue)?;
        }
        Ok(())
    }

    /// Check that `len` bytes at `at` are inside the image.
    fn check(&self, at: u64, len: u64, what: &str) -> Result<()> {
        match at.checked_add(len) {
            Some(end) if end <= self.image_size => Ok(()),
            _ => Err(invalid(format!(
                "{what} at {at} (+{len} bytes) is beyond the end of the image ({} bytes)",
                self.image_size
            ))),
        }
    }

    fn read(&mut self, at: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.check(at, len, "metadata")?;
        self.budget = self.budget.checked_sub(len).ok_or_else(|| {
            invalid("the metadata walk read more than twice the image size (shared metadata?)")
        })?;
        (self.read_at)(at, buf).map_err(|e| invalid(format!("reading {len} bytes at {at}: {e}")))
    }

    /// Append a range (already checked against the image size), merged with the previous one
    /// when it continues or overlaps it.
    fn emit(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = offset.saturating_add(len);
        if let Some(last) = self.out.last_mut() {
            if (last.offset..=last.end()).contains(&offset) {
                last.len = last.len.max(end - last.offset);
                return;
            }
        }
        self.out.push(Extent { offset, len });
    }

    /// Mark `nid` visited and read its inode.
    fn visit(&mut self, nid: u64) -> Result<Inode> {
        if self.visited.len() >= MAX_INODES {
            return Err(invalid(format!("more than {MAX_INODES} inodes")));
        }
        self.visited.insert(nid);
        let meta_base = u64::from(self.sb.meta_blkaddr) << self.sb.blkszbits;
        let pos = nid
            .checked_mul(NID_SLOT)
            .and_then(|off| off.checked_add(meta_base))
            .ok_or_else(|| invalid(format!("inode {nid} is beyond the end of the image")))?;
        let mut raw = [0u8; EXTENDED_INODE_LEN as usize];
        let (compact, rest) = raw.split_at_mut(COMPACT_INODE_LEN as usize);
        self.read(pos, compact)?;
        let format = le_u16(compact, 0);
        if format & !I_FORMAT_KNOWN != 0 {
            return Err(invalid(format!(
                "inode {nid}: unsupported i_format {format:#x}"
            )));
        }
        let layout = (format >> 1) as u8;
        if layout > LAYOUT_CHUNK_BASED {
            return Err(invalid(format!(
                "inode {nid}: unknown data layout {layout}"
            )));
        }
        let extended = format & 1 != 0;
        if extended {
            self.read(pos + COMPACT_INODE_LEN, rest)?;
        }
        let icount = u64::from(le_u16(&raw, 2));
        let inode = Inode {
            nid,
            pos,
            isize: if extended {
                EXTENDED_INODE_LEN
            } else {
                COMPACT_INODE_LEN
            },
            xattr_size: match icount {
                0 => 0,
                n => XATTR_IBODY_HEADER_LEN + 4 * (n - 1),
            },
            layout,
            mode: le_u16(&raw, 4),
            size: if extended {
                le_u64(&raw, 8)
            } else {
                u64::from(le_u32(&raw, 8))
            },
            i_u: le_u32(&raw, 16),
        };
        self.check(inode.pos, inode.body_end() - inode.pos, "inode")?;
        Ok(inode)
    }

    /// Emit what reading `inode` needs besides its directory's blocks: the inode with its
    /// inline xattrs and inline tail, the shared xattrs it names, and per type the symlink
    /// target, the block map or the compression indexes. Device files, fifos and sockets have
    /// nothing beyond the inode.
    fn emit_inode(&mut self, inode: &Inode) -> Result<()> {
        let ftype = inode.file_type();
        let mut slot = inode.body_end() - inode.pos;
        // The inline tail of a directory or symlink is metadata; a regular file's is file data
        // (and shares the inode's block anyway).
        if ftype == S_IFDIR || ftype == S_IFLNK {
            slot += self.inline_tail(inode)?;
        }
        self.emit(inode.pos, slot);
        self.emit_shared_xattrs(inode)?;
        if !matches!(ftype, S_IFREG | S_IFDIR | S_IFLNK) {
            return Ok(());
        }
        match inode.layout {
            LAYOUT_COMPRESSED_FULL | LAYOUT_COMPRESSED_COMPACT => {
                let (at, len) = self.compression_index(inode)?;
                self.emit(at, len);
            }
            LAYOUT_CHUNK_BASED => {
                let (at, len, _) = self.chunk_map(inode)?;
                self.emit(at, len);
            }
            _ => {}
        }
        if ftype == S_IFLNK {
            for run in self.data_runs(inode, MAX_SYMLINK_LEN)? {
                self.emit(run.physical, run.len);
            }
        }
        Ok(())
    }

    /// Emit the shared xattr entries `inode` refers to.
    fn emit_shared_xattrs(&mut self, inode: &Inode) -> Result<()> {
        if inode.xattr_size == 0 {
            return Ok(());
        }
        let at = inode.pos + inode.isize;
        let mut header = [0u8; XATTR_IBODY_HEADER_LEN as usize];
        self.read(at, &mut header)?;
        let count = usize::from(header[4]);
        if XATTR_IBODY_HEADER_LEN + 4 * count as u64 > inode.xattr_size {
            return Err(invalid(format!(
                "inode {}: {count} shared xattrs do not fit its xattr area",
                inode.nid
            )));
        }
        let mut ids = [0u8; 4 * u8::MAX as usize];
        let ids = &mut ids[..4 * count];
        self.read(at + XATTR_IBODY_HEADER_LEN, ids)?;
        let base = u64::from(self.sb.xattr_blkaddr) << self.sb.blkszbits;
        for id in ids.chunks_exact(4) {
            let entry = base + 4 * u64::from(le_u32(id, 0));
            let mut h = [0u8; XATTR_ENTRY_HEADER_LEN as usize];
            self.read(entry, &mut h)?;
            let len = (XATTR_ENTRY_HEADER_LEN + u64::from(h[0]) + u64::from(le_u16(&h, 2)))
                .next_multiple_of(4);
            self.check(entry, len, "shared xattr")?;
            self.emit(entry, len);
        }
        Ok(())
    }

    /// The range holding a compressed inode's map header and indexes. The number of indexes
    /// is bounded by the file's block count (logical clusters are at least a block), which is
    /// also the count the kernel assumes for compact indexes.
    fn compression_index(&mut self, inode: &Inode) -> Result<(u64, u64)> {
        let header_at = align_up(inode.body_end(), 8)
            .ok_or_else(|| invalid(format!("inode {}: bad index offset", inode.nid)))?;
        let mut header = [0u8; Z_MAP_HEADER_LEN as usize];
        self.read(header_at, &mut header)?;
        let advise = le_u16(&header, 4);
        let blocks = inode.size.div_ceil(self.blksz);
        let len = if header[7] & Z_FRAGMENT_INODE != 0 {
            Z_MAP_HEADER_LEN
        } else if inode.layout == LAYOUT_COMPRESSED_FULL {
            // the map header, 8 reserved bytes, then one index per logical cluster
            2 * Z_MAP_HEADER_LEN + blocks * Z_FULL_INDEX_LEN
        } else {
            let two_byte = advise & Z_ADVISE_COMPACTED_2B != 0;
            Z_MAP_HEADER_LEN + compact_index_len(header_at + Z_MAP_HEADER_LEN, blocks, two_byte)
        };
        // Bounded by the image: a truncated index only costs the lookups past its end.
        Ok((header_at, len.min(self.image_size - header_at)))
    }

    /// A chunk-based inode's block map: `(offset, length, entry size)`.
    fn chunk_map(&self, inode: &Inode) -> Result<(u64, u64, u64)> {
        let format = inode.i_u as u16;
        if format & !(CHUNK_FORMAT_BLKBITS_MASK | CHUNK_FORMAT_INDEXES) != 0 {
            return Err(invalid(format!(
                "inode {}: unsupported chunk format {format:#x}",
                inode.nid
            )));
        }
        let unit = if format & CHUNK_FORMAT_INDEXES != 0 {
            CHUNK_INDEX_LEN
        } else {
            BLOCK_MAP_ENTRY_LEN
        };
        let entries = inode.size.div_ceil(self.chunk_size(inode));
        let at = align_up(inode.body_end(), unit)
            .ok_or_else(|| invalid(format!("inode {}: bad block map offset", inode.nid)))?;
        let len = entries * unit;
        self.check(at, len, "chunk block map")?;
        Ok((at, len, unit))
    }

    fn chunk_size(&self, inode: &Inode) -> u64 {
        // at most 2^(16 + 31)
        self.blksz << (inode.i_u as u16 & CHUNK_FORMAT_BLKBITS_MASK)
    }

    /// Length of a FLAT_INLINE inode's inline tail (its last block, partial or full, stored
    /// right after the inode and its xattrs); 0 for other layouts.
    fn inline_tail(&self, inode: &Inode) -> Result<u64> {
        if inode.layout != LAYOUT_FLAT_INLINE || inode.size == 0 {
            return Ok(0);
        }
        let tail = inode.size - (inode.size.div_ceil(self.blksz) - 1) * self.blksz;
        let at = inode.body_end();
        if at % self.blksz + tail > self.blksz {
            return Err(invalid(format!(
                "inode {}: inline data crosses a block boundary",
                inode.nid
            )));
        }
        self.check(at, tail, "inline data")?;
        Ok(tail)
    }

    /// Where the first `min(size, limit)` bytes of an uncompressed inode's data are, in
    /// logical order (holes left out). Each run starts on a block boundary of the file.
    /// Compressed inodes have none this walk can read.
    fn data_runs(&mut self, inode: &Inode, limit: u64) -> Result<Vec<Run>> {
        let size = inode.size.min(limit);
        let mut runs = Vec::new();
        if size == 0 {
            return Ok(runs);
        }
        let raw = u64::from(inode.i_u) << self.sb.blkszbits;
        match inode.layout {
            LAYOUT_FLAT_PLAIN => {
                self.check(raw, size, "data")?;
                runs.push(Run {
                    logical: 0,
                    physical: raw,
                    len: size,
                });
            }
            LAYOUT_FLAT_INLINE => {
                let tail = self.inline_tail(inode)?;
                let blocks_len = inode.size - tail;
                let head = blocks_len.min(size);
                if head > 0 {
                    self.check(raw, head, "data")?;
                    runs.push(Run {
                        logical: 0,
                        physical: raw,
                        len: head,
                    });
                }
                if size > blocks_len {
                    runs.push(Run {
                        logical: blocks_len,
                        physical: inode.body_end(),
                        len: size - blocks_len,
                    });
                }
            }
            LAYOUT_CHUNK_BASED => {
                let (map, _, unit) = self.chunk_map(inode)?;
                let chunk = self.chunk_size(inode);
                let device_mask = match self.sb.extra_devices {
                    0 => 0,
                    n => (u32::from(n) + 1).next_power_of_two() - 1,
                };
                let mut entry = [0u8; CHUNK_INDEX_LEN as usize];
                for i in 0..size.div_ceil(chunk) {
                    let e = &mut entry[..unit as usize];
                    self.read(map + i * unit, e)?;
                    let (device, blkaddr) = if unit == CHUNK_INDEX_LEN {
                        (u32::from(le_u16(e, 2)) & device_mask, le_u32(e, 4))
                    } else {
                        (0, le_u32(e, 0))
                    };
                    if blkaddr == NULL_ADDR || device != 0 {
                        continue; // a hole, or data on another device
                    }
                    let logical = i * chunk;
                    let physical = u64::from(blkaddr) << self.sb.blkszbits;
                    let len = chunk.min(size - logical);
                    self.check(physical, len, "data")?;
                    runs.push(Run {
                        logical,
                        physical,
                        len,
                    });
                }
            }
            _ => {}
        }
        Ok(runs)
    }

    /// Emit a directory's data, then visit its entries (less `.` and `..`) in order, emitting
    /// their inodes and queueing the subdirectories.
    fn walk_dir(&mut self, dir: &Inode, queue: &mut VecDeque<Inode>) -> Result<()> {
        if dir.size > MAX_DIR_SIZE {
            return Err(invalid(format!(
                "directory inode {} has {} bytes of entries",
                dir.nid, dir.size
            )));
        }
        if matches!(
            dir.layout,
            LAYOUT_COMPRESSED_FULL | LAYOUT_COMPRESSED_COMPACT
        ) {
            tracing::debug!(
                "erofs: not descending into compressed directory inode {}",
                dir.nid
            );
            return Ok(());
        }
        let runs = self.data_runs(dir, MAX_DIR_SIZE)?;
        for run in &runs {
            self.emit(run.physical, run.len);
        }
        let mut block = vec![0u8; self.blksz as usize];
        let mut children = Vec::new();
        for run in &runs {
            // A run splits into whole directory blocks, the last one possibly short.
            let mut done = 0;
            while done < run.len {
                let len = (run.len - done).min(self.blksz);
                let b = &mut block[..len as usize];
                self.read(run.physical + done, b)?;
                children.clear();
                parse_dir_block(b, &mut children).map_err(|e| {
                    invalid(format!(
                        "directory inode {}, block at byte {}: {e}",
                        dir.nid,
                        run.logical + done
                    ))
                })?;
                for &nid in &children {
                    // Seen before: a hard link, or an entry pointing back up the tree.
                    if self.visited.contains(&nid) {
                        continue;
                    }
                    let inode = self.visit(nid)?;
                    self.emit_inode(&inode)?;
                    if inode.file_type() == S_IFDIR {
                        queue.push_back(inode);
                    }
                }
                done += len;
            }
        }
        Ok(())
    }
}

/// Size of compact compression indexes for `lclusters` logical clusters starting at `ebase`
/// (just past the map header): 4-byte entries up to a 32-byte boundary, then (with 2-byte
/// indexes) runs of 16 entries in 32 bytes, then 4-byte entries in packs of two.
fn compact_index_len(ebase: u64, lclusters: u64, two_byte: bool) -> u64 {
    let initial = ((32 - ebase % 32) / 4 % 8).min(lclusters);
    let rest = lclusters - initial;
    let two = if two_byte { rest / 16 * 16 } else { 0 };
    (initial * 4 + two * 2 + (rest - two) * 4).next_multiple_of(8)
}

/// Append the nids of one directory block's entries, skipping `.` and `..`.
fn parse_dir_block(b: &[u8], children: &mut Vec<u64>) -> std::result::Result<(), String> {
    if b.len() < DIRENT_LEN {
        return Err(format!("{} bytes is too short", b.len()));
    }
    let first = usize::from(le_u16(b, 8));
    if first < DIRENT_LEN || first > b.len() {
        return Err(format!("bad name offset {first}"));
    }
    let count = first / DIRENT_LEN;
    for i in 0..count {
        let d = i * DIRENT_LEN;
        let start = usize::from(le_u16(b, d + 8));
        let end = if i + 1 < count {
            usize::from(le_u16(b, d + DIRENT_LEN + 8))
        } else {
            // the last name runs to a NUL or the end of the block
            b.get(start..)
                .and_then(|tail| tail.iter().position(|&c| c == 0))
                .map_or(b.len(), |n| start + n)
        };
        if start < first || end <= start || end > b.len() || end - start > MAX_NAME_LEN {
            return Err(format!("entry {i}: bad name bounds {start}..{end}"));
        }
        let name = &b[start..end];
        if name != b"." && name != b".." {
            children.push(le_u64(b, d));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    //! Real images from `mkfs.erofs` (erofs-utils, installed by `scripts/setup`), checked with
    //! a small independent reader: listing the tree from an image in which every byte outside
    //! the extents is zeroed must give the same result as listing the whole image.

    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::process::Command;

    /// Deterministic incompressible bytes.
    pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
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
    pub(crate) fn mkfs(tree: &Path, out: &Path, opts: &[&str]) -> Option<Vec<u8>> {
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

    /// Whether user xattrs can be set on files under `dir`.
    fn xattrs_supported(dir: &Path) -> bool {
        let probe = dir.join(".xattr-probe");
        std::fs::write(&probe, b"").expect("write probe");
        let ok = xattr::set(&probe, "user.probe", b"1").is_ok();
        std::fs::remove_file(&probe).expect("remove probe");
        ok
    }

    /// The large file's size: several 128 KiB chunks.
    const LARGE: usize = (1 << 20) + 1000;

    /// A tree with nested and empty directories, many small files, a large incompressible
    /// file, a compressible file, symlinks, a hard link, a socket, a directory of 250 entries
    /// spanning several blocks, and (where supported) shared and private xattrs.
    fn sample_tree(root: &Path) {
        let d = |p: &str| std::fs::create_dir_all(root.join(p)).expect("mkdir");
        let f = |p: &str, data: &[u8]| std::fs::write(root.join(p), data).expect("write");
        d("a/b/c/d");
        d("empty");
        d("big");
        d("many");
        for i in 0..40 {
            f(
                &format!("a/small{i}"),
                format!("small file {i}\n").as_bytes(),
            );
            f(&format!("a/b/mid{i}"), &noise(i, 3000 + 100 * i as usize));
        }
        f("a/b/c/d/deep", b"deep\n");
        f("big/large", &noise(99, LARGE));
        let text: Vec<u8> = b"compressible text, one line after another\n"
            .iter()
            .copied()
            .cycle()
            .take(300_000)
            .collect();
        f("big/text", &text);
        for i in 0..250 {
            f(
                &format!("many/entry-with-a-rather-long-name-{i:04}"),
                format!("{i}").as_bytes(),
            );
        }
        std::os::unix::fs::symlink("../small1", root.join("a/b/link")).expect("symlink");
        std::os::unix::fs::symlink("x".repeat(1500), root.join("a/longlink")).expect("symlink");
        std::fs::hard_link(root.join("a/small2"), root.join("a/b/c/hardlink")).expect("link");
        std::os::unix::net::UnixListener::bind(root.join("a/socket")).expect("socket");
        if xattrs_supported(root) {
            // mkfs.erofs shares an xattr that several inodes have: 40 of them, 4 KiB in all,
            // more than fits the superblock's block where erofs-utils 1.5 puts them.
            for i in 0..40 {
                for j in i..i + 3 {
                    let path = root.join(format!("a/small{}", j % 40));
                    let name = format!("user.shared{i}");
                    xattr::set(path, name, &[i as u8; 100]).expect("xattr");
                }
            }
            xattr::set(root.join("a/b"), "user.dir", b"on a directory").expect("xattr");
            xattr::set(root.join("big/large"), "user.own", &[7; 100]).expect("xattr");
        }
    }

    /// One node of a listing: kind, size, symlink target and user xattrs.
    #[derive(Debug, PartialEq, Eq)]
    struct Node {
        kind: char,
        size: u64,
        target: Vec<u8>,
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    }

    /// List a source tree like [`Reader::list`] lists an image.
    fn list_tree(root: &Path) -> BTreeMap<String, Node> {
        fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Node>) {
            for e in std::fs::read_dir(dir).expect("read_dir") {
                let e = e.expect("entry");
                let path = format!("{prefix}/{}", e.file_name().to_string_lossy());
                let md = std::fs::symlink_metadata(e.path()).expect("stat");
                let ft = md.file_type();
                let kind = if ft.is_dir() {
                    'd'
                } else if ft.is_symlink() {
                    'l'
                } else if ft.is_file() {
                    'f'
                } else {
                    's'
                };
                let mut xattrs: Vec<_> = if ft.is_symlink() {
                    Vec::new()
                } else {
                    xattr::list(e.path())
                        .expect("listxattr")
                        .filter_map(|n| {
                            let n = n.to_string_lossy().into_owned();
                            let name = n.strip_prefix("user.")?.as_bytes().to_vec();
                            let value = xattr::get(e.path(), &n).ok()??;
                            Some((name, value))
                        })
                        .collect()
                };
                xattrs.sort();
                let target = if ft.is_symlink() {
                    use std::os::unix::ffi::OsStrExt;
                    let t = std::fs::read_link(e.path()).expect("readlink");
                    t.as_os_str().as_bytes().to_vec()
                } else {
                    Vec::new()
                };
                let size = if ft.is_file() || ft.is_symlink() {
                    md.len()
                } else {
                    0
                };
                out.insert(
                    path.clone(),
                    Node {
                        kind,
                        size,
                        target,
                        xattrs,
                    },
                );
                if ft.is_dir() {
                    walk(&e.path(), &path, out);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, "", &mut out);
        out
    }

    /// A deliberately simple erofs reader for well-formed images (uncompressed directories and
    /// symlinks), independent of the walker. It panics on anything it does not expect.
    pub(crate) struct Reader<'a> {
        img: &'a [u8],
        blksz: usize,
        meta: usize,
        xattr: usize,
        pub(crate) root: u64,
    }

    /// An inode as the reader sees it.
    pub(crate) struct RInode {
        pub(crate) pos: usize,
        body: usize,
        layout: u16,
        mode: u16,
        size: usize,
        i_u: u32,
    }

    impl<'a> Reader<'a> {
        pub(crate) fn new(img: &'a [u8]) -> Reader<'a> {
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

        fn u16(&self, at: usize) -> u16 {
            u16::from_le_bytes(self.img[at..at + 2].try_into().unwrap())
        }

        fn u32(&self, at: usize) -> u32 {
            u32::from_le_bytes(self.img[at..at + 4].try_into().unwrap())
        }

        pub(crate) fn inode(&self, nid: u64) -> RInode {
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
        pub(crate) fn blocks(&self, ino: &RInode) -> Vec<(usize, &'a [u8])> {
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
        pub(crate) fn entries(&self, dir: &RInode) -> Vec<(Vec<u8>, u64, usize)> {
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
        fn xattrs(&self, ino: &RInode) -> Vec<(Vec<u8>, Vec<u8>)> {
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
        fn list(&self) -> BTreeMap<String, Node> {
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

    pub(crate) fn reader(img: &[u8]) -> impl FnMut(u64, &mut [u8]) -> std::io::Result<()> + '_ {
        move |off, buf| {
            let src = usize::try_from(off)
                .ok()
                .and_then(|o| img.get(o..o.checked_add(buf.len())?))
                .ok_or(std::io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    pub(crate) fn extents_of(img: &[u8]) -> Result<Vec<Extent>> {
        metadata_extents(&mut reader(img), img.len() as u64)
    }

    /// `img` with every byte outside `extents` zeroed.
    fn masked(img: &[u8], extents: &[Extent]) -> Vec<u8> {
        let mut out = vec![0u8; img.len()];
        for e in extents {
            let r = e.offset as usize..e.end() as usize;
            out[r.clone()].copy_from_slice(&img[r]);
        }
        out
    }

    /// Image offsets of the block-aligned blocks of `img` that hold a full block of `data`.
    fn blocks_of(img: &[u8], data: &[u8]) -> Vec<usize> {
        let wanted: HashSet<&[u8]> = data.chunks_exact(4096).collect();
        (0..img.len() / 4096)
            .map(|b| b * 4096)
            .filter(|&at| wanted.contains(&img[at..at + 4096]))
            .collect()
    }

    fn covered(extents: &[Extent], at: usize, len: usize) -> bool {
        let (at, end) = (at as u64, (at + len) as u64);
        extents.iter().any(|e| e.offset < end && at < e.end())
    }

    /// `dump.erofs -e` of `path` in `img`: the inode and its file extents, as erofs-utils
    /// reads them (through the block map or the compression indexes).
    fn dump_extents(img: &Path, path: &str) -> String {
        let o = Command::new("dump.erofs")
            .args(["-e", &format!("--path={path}")])
            .arg(img)
            .output()
            .expect("run dump.erofs (erofs-utils)");
        assert!(o.status.success(), "dump.erofs {path}: {o:?}");
        String::from_utf8(o.stdout).unwrap()
    }

    /// The data layout of the inode at `path`.
    fn layout_of(img: &[u8], path: &str) -> u16 {
        let r = Reader::new(img);
        let mut nid = r.root;
        for name in path.split('/') {
            let entries = r.entries(&r.inode(nid));
            nid = entries.iter().find(|e| e.0 == name.as_bytes()).unwrap().1;
        }
        r.inode(nid).layout
    }

    /// Build the sample tree with `opts` and check the extents: the listing survives masking,
    /// matches the source tree, erofs-utils maps files the same in the masked image, and the
    /// large file's data is not covered.
    fn check_image(opts: &[&str]) -> Option<(Vec<u8>, Vec<Extent>)> {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        sample_tree(&tree);
        let img_path = dir.path().join("img");
        let img = mkfs(&tree, &img_path, opts)?;
        assert!(is_erofs(&img[..2048]));
        let extents = extents_of(&img).unwrap();
        for w in extents.windows(2) {
            assert!(
                w[0].end() < w[1].offset || w[1].end() <= w[0].offset || w[1].offset < w[0].offset,
                "unmerged adjacent extents {w:?}"
            );
        }
        assert!(extents
            .iter()
            .all(|e| e.len > 0 && e.end() <= img.len() as u64));

        let full = Reader::new(&img).list();
        assert_eq!(
            full,
            list_tree(&tree),
            "the test reader disagrees with the tree ({opts:?})"
        );
        let part = Reader::new(&masked(&img, &extents)).list();
        assert_eq!(part, full, "metadata outside the extents ({opts:?})");
        if xattrs_supported(dir.path()) {
            assert_eq!(full["/a/small0"].xattrs.len(), 3, "xattrs were not stored");
        }

        let masked_path = dir.path().join("masked");
        std::fs::write(&masked_path, masked(&img, &extents)).unwrap();
        for path in [
            "/big/large",
            "/big/text",
            "/a/b/mid7",
            "/many",
            "/a/longlink",
        ] {
            assert_eq!(
                dump_extents(&masked_path, path),
                dump_extents(&img_path, path),
                "{path} maps differently without the bytes outside the extents ({opts:?})"
            );
        }

        let large = std::fs::read(tree.join("big/large")).unwrap();
        let blocks = blocks_of(&img, &large);
        assert!(
            blocks.len() >= LARGE / 4096,
            "large file data not found ({opts:?})"
        );
        for at in blocks {
            assert!(
                !covered(&extents, at, 4096),
                "file data at {at} is listed ({opts:?})"
            );
        }

        let cs = 128 << 10;
        let chunks: HashSet<u64> = extents
            .iter()
            .flat_map(|e| e.offset / cs..=(e.end() - 1) / cs)
            .collect();
        let bytes: u64 = extents.iter().map(|e| e.len).sum();
        eprintln!(
            "mkfs.erofs {opts:?}: {} bytes, {} extents, {bytes} metadata bytes, \
             {} of {} chunks of 128 KiB",
            img.len(),
            extents.len(),
            chunks.len(),
            (img.len() as u64).div_ceil(cs)
        );
        Some((img, extents))
    }

    #[test]
    fn erofs_plain_image() {
        let (img, _) = check_image(&["-T0", "--all-root"]).expect("mkfs.erofs");
        assert_eq!(layout_of(&img, "big/large"), u16::from(LAYOUT_FLAT_INLINE));
    }

    #[test]
    fn erofs_extended_inodes() {
        // A uid beyond 16 bits needs the 64-byte inode.
        let (img, _) = check_image(&["-T0", "--force-uid=100000"]).expect("mkfs.erofs");
        let r = Reader::new(&img);
        assert_eq!(r.u16(r.inode(r.root).pos) & 1, 1, "not an extended inode");
    }

    #[test]
    fn erofs_chunked_files() {
        let (img, _) =
            check_image(&["-T0", "--all-root", "--chunksize=65536"]).expect("mkfs.erofs");
        assert_eq!(layout_of(&img, "big/large"), u16::from(LAYOUT_CHUNK_BASED));
    }

    #[test]
    fn erofs_compressed_images() {
        for z in ["-zlz4", "-zlz4hc"] {
            match check_image(&["-T0", "--all-root", z]) {
                Some((img, _)) => assert!(
                    [LAYOUT_COMPRESSED_FULL, LAYOUT_COMPRESSED_COMPACT]
                        .map(u16::from)
                        .contains(&layout_of(&img, "big/text")),
                    "{z}: the text file is not compressed"
                ),
                None => eprintln!("this mkfs.erofs cannot {z}: compressed layouts not tested"),
            }
        }
        // the 8-byte (non-compact) indexes
        if check_image(&["-T0", "--all-root", "-zlz4", "-Elegacy-compress"]).is_none() {
            eprintln!("this mkfs.erofs has no -Elegacy-compress: full indexes not tested");
        }
    }

    #[test]
    fn erofs_is_erofs() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        let img = mkfs(&tree, &dir.path().join("img"), &["-T0"]).unwrap();
        assert!(is_erofs(&img));
        assert!(!is_erofs(&img[..1100]));
        assert!(!is_erofs(&[0; 2048]));
        let e = metadata_extents(&mut reader(&[0; 4096]), 4096).unwrap_err();
        assert!(e.to_string().contains("erofs: bad superblock magic"), "{e}");
    }

    /// A small image for the corruption tests.
    fn small_image(dir: &Path) -> Vec<u8> {
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::create_dir_all(tree.join("e")).unwrap();
        std::fs::write(tree.join("a/f"), b"file").unwrap();
        std::fs::write(tree.join("a/b/g"), noise(1, 9000)).unwrap();
        std::os::unix::fs::symlink("a/f", tree.join("l")).unwrap();
        mkfs(&tree, &dir.join("img"), &["-T0", "--all-root"]).unwrap()
    }

    #[test]
    fn erofs_truncated_images() {
        let dir = tempfile::tempdir().unwrap();
        let img = small_image(dir.path());
        assert!(extents_of(&img).is_ok());
        for len in (0..img.len()).step_by(97) {
            let _ = extents_of(&img[..len]);
        }
        // reads fail past the superblock
        let e = metadata_extents(&mut reader(&img[..2048]), img.len() as u64).unwrap_err();
        assert!(e.to_string().contains("reading"), "{e}");
    }

    #[test]
    fn erofs_garbage_after_superblock() {
        let dir = tempfile::tempdir().unwrap();
        let img = small_image(dir.path());
        for seed in 0..200 {
            let mut bad = img[..2048].to_vec();
            bad.extend(noise(seed, 64 << 10));
            let _ = extents_of(&bad);
            // garbage everywhere but the superblock
            let mut bad = noise(seed + 1000, img.len());
            bad[1024..1152].copy_from_slice(&img[1024..1152]);
            let _ = extents_of(&bad);
        }
    }

    #[test]
    fn erofs_random_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let img = small_image(dir.path());
        let extents = extents_of(&img).unwrap();
        let meta: Vec<usize> = extents
            .iter()
            .flat_map(|e| e.offset as usize..e.end() as usize)
            .collect();
        let rnd = noise(7, 3 * 4000);
        let mut bad = img.clone();
        for i in 0..4000 {
            let pick = usize::from(rnd[3 * i]) << 8 | usize::from(rnd[3 * i + 1]);
            let at = meta[pick * meta.len() / 65536];
            bad[at] = rnd[3 * i + 2];
            let _ = extents_of(&bad);
            if i % 10 == 9 {
                bad.copy_from_slice(&img);
            }
        }
    }

    #[test]
    fn erofs_directory_cycles() {
        let dir = tempfile::tempdir().unwrap();
        let img = small_image(dir.path());
        let r = Reader::new(&img);
        let root = r.inode(r.root);
        let nid_of = |entries: &[(Vec<u8>, u64, usize)], name: &[u8]| {
            entries
                .iter()
                .find(|e| e.0 == name)
                .map(|e| (e.1, e.2))
                .unwrap()
        };
        let (a, a_dirent) = nid_of(&r.entries(&root), b"a");
        let (_, b_dirent) = nid_of(&r.entries(&r.inode(a)), b"b");
        let mut bad = img.clone();
        // "a/b" is "a" itself, and "a" is the root.
        bad[b_dirent..b_dirent + 8].copy_from_slice(&a.to_le_bytes());
        bad[a_dirent..a_dirent + 8].copy_from_slice(&r.root.to_le_bytes());
        extents_of(&bad).unwrap();
        // Every directory points at the same (root) data: visited once.
        let mut bad = img.clone();
        let (e, _) = nid_of(&r.entries(&root), b"e");
        let (ia, ie) = (r.inode(a).pos, r.inode(e).pos);
        bad[ia..ia + 32].copy_from_slice(&img[root.pos..root.pos + 32]);
        bad[ie..ie + 32].copy_from_slice(&img[root.pos..root.pos + 32]);
        let _ = extents_of(&bad);
    }

    #[test]
    fn erofs_compact_index_len() {
        // 32-byte aligned start: no 4-byte head; 2-byte runs of 16, then 4-byte packs of 2.
        assert_eq!(compact_index_len(64, 0, true), 0);
        assert_eq!(compact_index_len(64, 1, true), 8);
        assert_eq!(compact_index_len(64, 16, true), 32);
        assert_eq!(compact_index_len(64, 19, true), 32 + 8 + 8);
        assert_eq!(compact_index_len(64, 19, false), 19 * 4 + 4);
        // 8 bytes past a boundary: six 4-byte entries first
        assert_eq!(compact_index_len(72, 6 + 16, true), 24 + 32);
        assert_eq!(compact_index_len(72, 3, true), 16);
    }
}
