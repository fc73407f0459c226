//! Where an erofs image keeps its file-system metadata, for a build-time prefetch list.
//!
//! mkfs.erofs (erofs-utils 1.5) allocates inode, directory and file-data blocks from one
//! allocator as it goes, so the metadata of a large tree is spread all over the image and a lazy
//! `ls -lR` misses on chunk after chunk. [`metadata_extents`] walks the file system from the root
//! directory, breadth first, and returns the byte ranges that such a walk reads, in the order it
//! first needs them: the superblock, every reachable inode (with its inline xattrs and, for
//! directories and symlinks, its inline tail), the shared xattrs inodes refer to, the data
//! blocks of directories and symlinks, and the block maps and compression indexes of files.
//! File data is never included. `lazyblk build` stores the blocks they touch in the
//! metadata pack ([`crate::MetaPack`]).
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

#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;
