//! The lazyblk image format: a manifest and a blob of independently compressed chunks.
//!
//! See `docs/FORMAT.md` for the byte layout. This module holds the one encoder and the one
//! decoder of manifests, shared by `lazyblk build` and the chunk store; the decoder is fuzzed
//! (`fuzz/fuzz_targets/manifest.rs`) and never trusts a length before checking it against the
//! input size.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::fmt;

/// Magic bytes at the start of every manifest.
pub const MAGIC: &[u8; 8] = b"LZBLKMAN";
/// The manifest format version written and read by this build.
pub const VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Size of one unique-chunk entry: a 32-byte digest and a `u32` whose top bit marks a raw
/// (uncompressed) chunk and whose low 31 bits are the stored length. Blob offsets are implied:
/// entries are stored in blob order, back to back.
pub const ENTRY_LEN: usize = 36;
const RAW_FLAG: u32 = 1 << 31;
/// Smallest chunk size allowed.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk size allowed.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Default chunk size (justified in `docs/FORMAT.md`).
pub const DEFAULT_CHUNK_SIZE: u32 = 128 << 10;
const COMPRESSION_ZSTD: u8 = 1;
/// Header flag: a metadata pack section follows the entries.
const FLAG_META_PACK: u32 = 1;
/// Size of one metadata pack block: the block size the store exposes to frontends, so every
/// read of the device covers whole pack blocks.
pub const PACK_BLOCK: u64 = 4096;
const PACK_BLOCK_SHIFT: u32 = 12;
/// Fixed part of the pack section.
const PACK_HEADER_LEN: usize = 24;
/// Default number of pack blocks per frame (256 KiB of raw blocks per zstd frame).
pub const DEFAULT_PACK_FRAME_BLOCKS: u32 = 64;
/// Largest number of pack blocks per frame (4 MiB of raw blocks).
pub const MAX_PACK_FRAME_BLOCKS: u32 = 1024;
const DIGEST_BLAKE3: u8 = 1;

/// How a unique chunk is stored in the blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// A zstd frame.
    Zstd,
    /// The raw bytes (compression did not help).
    Raw,
}

/// One stored (unique) chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// BLAKE3 digest of the uncompressed bytes.
    pub digest: [u8; 32],
    /// Offset of the stored bytes in the blob (implied by the entry order in the encoding).
    pub blob_offset: u64,
    /// Length of the stored bytes in the blob.
    pub stored_len: u32,
    /// How the bytes are stored.
    pub encoding: Encoding,
}

/// Where chunk `i` of the image comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkRef<'a> {
    /// An all-zero chunk: not stored, reads as zeros.
    Zero,
    /// A stored chunk.
    Stored(&'a Entry),
}

/// The identity of an image: the SHA-256 of its manifest bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageId(pub [u8; 32]);

impl ImageId {
    /// Digest of manifest bytes.
    pub fn of(manifest_bytes: &[u8]) -> ImageId {
        ImageId(Sha256::digest(manifest_bytes).into())
    }

    /// Lower-case hex without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse `sha256:<64 hex>` (the prefix is optional).
    pub fn parse(s: &str) -> Result<ImageId> {
        let h = s.strip_prefix("sha256:").unwrap_or(s);
        let bytes = hex::decode(h)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| Error::Invalid(format!("not a sha256 digest: {s}")))?;
        Ok(ImageId(bytes))
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A decoded manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Size of the raw image in bytes.
    pub image_size: u64,
    /// Chunk size in bytes (power of two).
    pub chunk_size: u32,
    /// Size of the blob in bytes.
    pub blob_size: u64,
    /// Name of the blob, relative to the manifest's location.
    pub blob_name: String,
    /// For each chunk: 0 for an all-zero chunk, `k` for `entries[k - 1]`.
    pub map: Vec<u32>,
    /// The unique stored chunks.
    pub entries: Vec<Entry>,
    /// The metadata pack, if the image has one.
    pub pack: Option<MetaPack>,
}

/// The metadata pack: copies of scattered 4 KiB blocks of the image (an erofs image's inodes,
/// directories, xattrs and the like), stored together in a few frames at the end of the blob,
/// so a lazy client can fetch all of the file-system metadata with a few requests instead of
/// every chunk it is scattered over. The blocks stay where they are in the image too: the pack
/// is a second, denser source of the same bytes, pinned by the manifest like every chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaPack {
    /// Image block numbers (offset / [`PACK_BLOCK`]), strictly ascending.
    pub blocks: Vec<u32>,
    /// Blocks per frame: frame `f` holds the blocks at positions
    /// `f * frame_blocks .. (f + 1) * frame_blocks` of `blocks`, back to back.
    pub frame_blocks: u32,
    /// One stored frame per group of blocks, in blob order after the chunk entries; the digest
    /// is of the frame's raw (concatenated) blocks.
    pub frames: Vec<Entry>,
}

impl MetaPack {
    /// Positions (in `blocks`) of the blocks of frame `f`.
    pub fn frame_positions(&self, f: usize) -> std::ops::Range<usize> {
        let fb = self.frame_blocks as usize;
        f * fb..((f + 1) * fb).min(self.blocks.len())
    }

    /// The frame holding the block at position `pos`.
    pub fn frame_of(&self, pos: usize) -> usize {
        pos / self.frame_blocks as usize
    }

    /// Length of the raw bytes of frame `f` of an image of `image_size` bytes (the image's
    /// last block may be short).
    pub fn frame_raw_len(&self, f: usize, image_size: u64) -> u64 {
        self.blocks[self.frame_positions(f)]
            .iter()
            .map(|&b| (image_size - u64::from(b) * PACK_BLOCK).min(PACK_BLOCK))
            .sum()
    }

    /// If every block of `first..=last` is in the pack, their positions in `blocks`.
    pub fn covers(&self, first: u64, last: u64) -> Option<std::ops::Range<usize>> {
        let n = last.checked_sub(first)? as usize + 1;
        let first = u32::try_from(first).ok()?;
        let pos = self.blocks.binary_search(&first).ok()?;
        let end = pos.checked_add(n)?;
        // Strictly ascending: n entries from `first` are consecutive iff the n-th is first + n - 1.
        (end <= self.blocks.len()
            && u64::from(self.blocks[end - 1]) == u64::from(first) + n as u64 - 1)
            .then_some(pos..end)
    }

    /// Positions of the pack blocks in `first..=last` (maybe none).
    pub fn within(&self, first: u64, last: u64) -> std::ops::Range<usize> {
        let lo = self.blocks.partition_point(|&b| u64::from(b) < first);
        let hi = self.blocks.partition_point(|&b| u64::from(b) <= last);
        lo..hi.max(lo)
    }

    /// Sum of the stored bytes of the frames.
    pub fn stored_bytes(&self) -> u64 {
        self.frames.iter().map(|e| u64::from(e.stored_len)).sum()
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Manifest(msg.into())
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Digest, stored length and encoding of the 36-byte entry at `at`.
fn read_entry(b: &[u8], at: usize) -> ([u8; 32], u32, Encoding) {
    let digest: [u8; 32] = b[at..at + 32].try_into().expect("32 bytes");
    let word = le_u32(b, at + 32);
    let encoding = if word & RAW_FLAG != 0 {
        Encoding::Raw
    } else {
        Encoding::Zstd
    };
    (digest, word & !RAW_FLAG, encoding)
}

fn put_entry(out: &mut [u8], at: usize, e: &Entry) {
    out[at..at + 32].copy_from_slice(&e.digest);
    let word = e.stored_len
        | match e.encoding {
            Encoding::Zstd => 0,
            Encoding::Raw => RAW_FLAG,
        };
    out[at + 32..at + 36].copy_from_slice(&word.to_le_bytes());
}

/// Bytes of the encoded pack section of `p`: its header, the block numbers, padding to 8 and
/// the frame entries.
fn pack_section_len(p: &MetaPack) -> usize {
    pad8(PACK_HEADER_LEN + 4 * p.blocks.len()) + ENTRY_LEN * p.frames.len()
}

/// Write the pack section of `p` at `pack_at` (8-aligned) of `out` (zeroed, long enough).
fn encode_pack_section(out: &mut [u8], pack_at: usize, p: &MetaPack) {
    out[pack_at..pack_at + 4].copy_from_slice(&PACK_BLOCK_SHIFT.to_le_bytes());
    out[pack_at + 4..pack_at + 8].copy_from_slice(&p.frame_blocks.to_le_bytes());
    out[pack_at + 8..pack_at + 16].copy_from_slice(&(p.blocks.len() as u64).to_le_bytes());
    out[pack_at + 16..pack_at + 24].copy_from_slice(&(p.frames.len() as u64).to_le_bytes());
    for (i, b) in p.blocks.iter().enumerate() {
        let at = pack_at + PACK_HEADER_LEN + 4 * i;
        out[at..at + 4].copy_from_slice(&b.to_le_bytes());
    }
    let frames_at = pad8(pack_at + PACK_HEADER_LEN + 4 * p.blocks.len());
    for (i, e) in p.frames.iter().enumerate() {
        put_entry(out, frames_at + ENTRY_LEN * i, e);
    }
}

/// Where the parts of an encoded pack section lie, checked against the input length and the
/// image before anything is allocated.
struct PackLayout {
    pack_at: usize,
    frame_blocks: u32,
    blocks: usize,
    frames: usize,
    frames_at: usize,
    /// End of the section (the frame entries' end).
    end: u64,
}

impl PackLayout {
    /// Read and check the fixed part of the pack section at `pack_at` of `b`.
    fn read(b: &[u8], pack_at: u64, image_size: u64) -> Result<PackLayout> {
        if pack_at + PACK_HEADER_LEN as u64 > b.len() as u64 {
            return Err(bad(format!(
                "length is {} bytes, too short for the metadata pack header",
                b.len()
            )));
        }
        let pack_at = pack_at as usize;
        let shift = le_u32(b, pack_at);
        let frame_blocks = le_u32(b, pack_at + 4);
        let blocks = le_u64(b, pack_at + 8);
        let frames = le_u64(b, pack_at + 16);
        if shift != PACK_BLOCK_SHIFT {
            return Err(bad(format!(
                "metadata pack: unsupported block shift {shift}"
            )));
        }
        if !(1..=MAX_PACK_FRAME_BLOCKS).contains(&frame_blocks) {
            return Err(bad(format!(
                "metadata pack: invalid blocks per frame {frame_blocks}"
            )));
        }
        if blocks == 0 || blocks > image_size.div_ceil(PACK_BLOCK) {
            return Err(bad(format!(
                "metadata pack: {blocks} blocks for an image of {image_size} bytes"
            )));
        }
        if frames != blocks.div_ceil(u64::from(frame_blocks)) {
            return Err(bad(format!(
                "metadata pack: {frames} frames for {blocks} blocks of {frame_blocks}"
            )));
        }
        let frames_at = ((pack_at + PACK_HEADER_LEN) as u64 + 4 * blocks).div_ceil(8) * 8;
        Ok(PackLayout {
            pack_at,
            frame_blocks,
            blocks: blocks as usize,
            frames: frames as usize,
            frames_at: frames_at as usize,
            end: frames_at + ENTRY_LEN as u64 * frames,
        })
    }

    /// Decode the section (whose bytes `b` holds up to `end`); the frames are stored back to
    /// back from `blob_offset`.
    fn decode(&self, b: &[u8], image_size: u64, mut blob_offset: u64) -> Result<MetaPack> {
        let blocks_at = self.pack_at + PACK_HEADER_LEN;
        if b[blocks_at + 4 * self.blocks..self.frames_at]
            .iter()
            .any(|&x| x != 0)
        {
            return Err(bad("padding bytes are not zero"));
        }
        let image_blocks = image_size.div_ceil(PACK_BLOCK);
        let mut blocks = Vec::with_capacity(self.blocks);
        for i in 0..self.blocks {
            let blk = le_u32(b, blocks_at + 4 * i);
            if u64::from(blk) >= image_blocks {
                return Err(bad(format!(
                    "metadata pack: block {blk} is beyond the image"
                )));
            }
            if blocks.last().is_some_and(|&prev| prev >= blk) {
                return Err(bad(format!("metadata pack: block {blk} is out of order")));
            }
            blocks.push(blk);
        }
        let mut p = MetaPack {
            blocks,
            frame_blocks: self.frame_blocks,
            frames: Vec::with_capacity(self.frames),
        };
        for f in 0..self.frames {
            let (digest, stored_len, encoding) = read_entry(b, self.frames_at + ENTRY_LEN * f);
            let raw = p.frame_raw_len(f, image_size);
            let max = raw + (raw >> 7) + 4096;
            if stored_len == 0
                || u64::from(stored_len) > max
                || (encoding == Encoding::Raw && u64::from(stored_len) != raw)
            {
                return Err(bad(format!(
                    "metadata pack frame {f}: invalid stored length {stored_len}"
                )));
            }
            p.frames.push(Entry {
                digest,
                blob_offset,
                stored_len,
                encoding,
            });
            blob_offset += u64::from(stored_len);
        }
        Ok(p)
    }
}

/// Whether `name` is acceptable as a blob name (a single relative path component).
pub fn valid_blob_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && name.chars().all(|c| !c.is_control())
}

impl Manifest {
    /// Number of chunks in the image.
    pub fn chunk_count(&self) -> u64 {
        self.map.len() as u64
    }

    /// Uncompressed length of chunk `i` (the last one may be short).
    pub fn chunk_len(&self, i: u64) -> u32 {
        let start = i * u64::from(self.chunk_size);
        (self.image_size - start).min(u64::from(self.chunk_size)) as u32
    }

    /// Byte offset of chunk `i` in the image.
    pub fn chunk_offset(&self, i: u64) -> u64 {
        i * u64::from(self.chunk_size)
    }

    /// Where chunk `i` comes from.
    pub fn chunk(&self, i: u64) -> ChunkRef<'_> {
        match self.map[i as usize] {
            0 => ChunkRef::Zero,
            k => ChunkRef::Stored(&self.entries[k as usize - 1]),
        }
    }

    /// Whether entries, then the pack's frames, are back to back from offset 0 (the only
    /// layout the encoding can hold).
    pub fn entries_contiguous(&self) -> bool {
        let mut at = 0u64;
        let frames = self.pack.iter().flat_map(|p| p.frames.iter());
        self.entries.iter().chain(frames).all(|e| {
            let ok = e.blob_offset == at;
            at += u64::from(e.stored_len);
            ok
        }) && at == self.blob_size
    }

    /// Sum of stored bytes of all unique chunks (without the metadata pack).
    pub fn stored_bytes(&self) -> u64 {
        self.entries.iter().map(|e| u64::from(e.stored_len)).sum()
    }

    /// Frames of the metadata pack (0 without one).
    pub fn frame_count(&self) -> u64 {
        self.pack.as_ref().map_or(0, |p| p.frames.len() as u64)
    }

    /// Units a cache tracks (one presence bit each): the chunks, then the pack's frames.
    pub fn unit_count(&self) -> u64 {
        self.chunk_count() + self.frame_count()
    }

    /// Pack frames as units: `chunk_count + f` for frame `f`.
    pub fn frame_units(&self) -> std::ops::Range<u64> {
        self.chunk_count()..self.unit_count()
    }

    /// Blocks of 4 KiB in the image (the last may be short).
    pub fn block_count(&self) -> u64 {
        self.image_size.div_ceil(PACK_BLOCK)
    }

    /// Encode to bytes (the image identity is [`ImageId::of`] these bytes).
    pub fn encode(&self) -> Vec<u8> {
        let name = self.blob_name.as_bytes();
        let map_at = pad8(HEADER_LEN + name.len());
        let entries_at = pad8(map_at + 4 * self.map.len());
        let pack_at = pad8(entries_at + ENTRY_LEN * self.entries.len());
        let total = match &self.pack {
            Some(p) => pack_at + pack_section_len(p),
            None => entries_at + ENTRY_LEN * self.entries.len(),
        };
        let mut out = vec![0u8; total];
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        if self.pack.is_some() {
            out[12..16].copy_from_slice(&FLAG_META_PACK.to_le_bytes());
        }
        out[16..20].copy_from_slice(&self.chunk_size.to_le_bytes());
        out[20] = COMPRESSION_ZSTD;
        out[21] = DIGEST_BLAKE3;
        out[24..32].copy_from_slice(&self.image_size.to_le_bytes());
        out[32..40].copy_from_slice(&(self.map.len() as u64).to_le_bytes());
        out[40..48].copy_from_slice(&(self.entries.len() as u64).to_le_bytes());
        out[48..56].copy_from_slice(&self.blob_size.to_le_bytes());
        out[56..58].copy_from_slice(&(name.len() as u16).to_le_bytes());
        out[HEADER_LEN..HEADER_LEN + name.len()].copy_from_slice(name);
        for (i, k) in self.map.iter().enumerate() {
            out[map_at + 4 * i..map_at + 4 * i + 4].copy_from_slice(&k.to_le_bytes());
        }
        for (i, e) in self.entries.iter().enumerate() {
            put_entry(&mut out, entries_at + ENTRY_LEN * i, e);
        }
        if let Some(p) = &self.pack {
            encode_pack_section(&mut out, pack_at, p);
        }
        out
    }

    /// Decode and fully validate manifest bytes.
    pub fn decode(b: &[u8]) -> Result<Manifest> {
        if b.len() < HEADER_LEN {
            return Err(bad(format!("{} bytes is shorter than the header", b.len())));
        }
        if &b[0..8] != MAGIC {
            return Err(bad("bad magic (not a lazyblk manifest)"));
        }
        let version = le_u32(b, 8);
        if version != VERSION {
            return Err(Error::ManifestVersion {
                found: version,
                supported: VERSION,
            });
        }
        let flags = le_u32(b, 12);
        if flags & !FLAG_META_PACK != 0 {
            return Err(bad("unknown flags set"));
        }
        let has_pack = flags & FLAG_META_PACK != 0;
        let chunk_size = le_u32(b, 16);
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(bad(format!("invalid chunk size {chunk_size}")));
        }
        if b[20] != COMPRESSION_ZSTD || b[21] != DIGEST_BLAKE3 {
            return Err(bad("unknown compression or digest algorithm"));
        }
        if b[22..24] != [0, 0] || b[58..64].iter().any(|&x| x != 0) {
            return Err(bad("reserved header bytes are not zero"));
        }
        let image_size = le_u64(b, 24);
        let chunk_count = le_u64(b, 32);
        let unique = le_u64(b, 40);
        let blob_size = le_u64(b, 48);
        let name_len = usize::from(u16::from_le_bytes([b[56], b[57]]));
        if chunk_count != image_size.div_ceil(u64::from(chunk_size)) {
            return Err(bad(format!(
                "chunk count {chunk_count} does not fit image size {image_size}"
            )));
        }
        if chunk_count > u64::from(u32::MAX) || unique > chunk_count {
            return Err(bad("too many chunks"));
        }
        // Check the total length before allocating anything.
        let map_at = pad8(HEADER_LEN + name_len);
        let entries_at = (map_at as u64)
            .checked_add(4 * chunk_count)
            .map(|x| x.div_ceil(8) * 8);
        let entries_end = entries_at.and_then(|e| e.checked_add(ENTRY_LEN as u64 * unique));
        let (entries_at, entries_end) = match (entries_at, entries_end) {
            (Some(e), Some(t)) => (e as usize, t),
            _ => return Err(bad("size overflow")),
        };
        let mut total = entries_end;
        let mut pack_layout = None;
        if has_pack {
            let layout = PackLayout::read(b, entries_end.div_ceil(8) * 8, image_size)?;
            total = layout.end;
            pack_layout = Some(layout);
        }
        if total != b.len() as u64 {
            return Err(bad(format!(
                "length is {} bytes, the header implies {total}",
                b.len()
            )));
        }
        let blob_name = std::str::from_utf8(&b[HEADER_LEN..HEADER_LEN + name_len])
            .map_err(|_| bad("blob name is not UTF-8"))?
            .to_string();
        if !valid_blob_name(&blob_name) {
            return Err(bad(format!("invalid blob name {blob_name:?}")));
        }
        if b[HEADER_LEN + name_len..map_at].iter().any(|&x| x != 0)
            || b[map_at + 4 * chunk_count as usize..entries_at]
                .iter()
                .any(|&x| x != 0)
        {
            return Err(bad("padding bytes are not zero"));
        }
        let mut map = Vec::with_capacity(chunk_count as usize);
        let mut used = vec![false; unique as usize];
        for i in 0..chunk_count as usize {
            let k = le_u32(b, map_at + 4 * i);
            if u64::from(k) > unique {
                return Err(bad(format!("chunk {i} refers to missing entry {k}")));
            }
            if k > 0 {
                used[k as usize - 1] = true;
            }
            map.push(k);
        }
        if used.iter().any(|u| !u) {
            return Err(bad("an entry is referenced by no chunk"));
        }
        let max_stored = u64::from(chunk_size) + (u64::from(chunk_size) >> 7) + 4096;
        let mut entries = Vec::with_capacity(unique as usize);
        let mut blob_offset = 0u64;
        for i in 0..unique as usize {
            let (digest, stored_len, encoding) = read_entry(b, entries_at + ENTRY_LEN * i);
            if stored_len == 0 || u64::from(stored_len) > max_stored {
                return Err(bad(format!(
                    "entry {i}: invalid stored length {stored_len}"
                )));
            }
            entries.push(Entry {
                digest,
                blob_offset,
                stored_len,
                encoding,
            });
            blob_offset += u64::from(stored_len);
        }
        let pack = match pack_layout {
            None => None,
            Some(layout) => {
                if b[entries_end as usize..layout.pack_at]
                    .iter()
                    .any(|&x| x != 0)
                {
                    return Err(bad("padding bytes are not zero"));
                }
                let p = layout.decode(b, image_size, blob_offset)?;
                blob_offset += p.stored_bytes();
                Some(p)
            }
        };
        if blob_offset != blob_size {
            return Err(bad(format!(
                "entries add up to {blob_offset} blob bytes, the header says {blob_size}"
            )));
        }
        let m = Manifest {
            image_size,
            chunk_size,
            blob_size,
            blob_name,
            map,
            entries,
            pack,
        };
        // A raw entry's length must equal the length of every chunk that uses it.
        for i in 0..m.chunk_count() {
            if let ChunkRef::Stored(e) = m.chunk(i) {
                if e.encoding == Encoding::Raw && e.stored_len != m.chunk_len(i) {
                    return Err(bad(format!("chunk {i}: raw entry has the wrong length")));
                }
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn sample() -> Manifest {
        Manifest {
            image_size: 3 * 4096 + 100,
            chunk_size: 4096,
            blob_size: 300,
            blob_name: "blob".into(),
            map: vec![1, 0, 1, 2],
            entries: vec![
                Entry {
                    digest: [7; 32],
                    blob_offset: 0,
                    stored_len: 200,
                    encoding: Encoding::Zstd,
                },
                Entry {
                    digest: [9; 32],
                    blob_offset: 200,
                    stored_len: 100,
                    encoding: Encoding::Raw,
                },
            ],
            pack: None,
        }
    }

    /// `sample` with a pack of blocks 0, 2, 3 in frames of 2 blocks (the second frame raw: the
    /// last block is 100 bytes).
    fn sample_with_pack() -> Manifest {
        let mut m = sample();
        m.pack = Some(MetaPack {
            blocks: vec![0, 2, 3],
            frame_blocks: 2,
            frames: vec![
                Entry {
                    digest: [1; 32],
                    blob_offset: 300,
                    stored_len: 50,
                    encoding: Encoding::Zstd,
                },
                Entry {
                    digest: [2; 32],
                    blob_offset: 350,
                    stored_len: 100,
                    encoding: Encoding::Raw,
                },
            ],
        });
        m.blob_size = 450;
        m
    }

    #[test]
    fn pack_roundtrip_lookup_and_checks() {
        let m = sample_with_pack();
        let b = m.encode();
        assert_eq!(Manifest::decode(&b).unwrap(), m);
        assert!(m.entries_contiguous());
        assert_eq!(m.frame_count(), 2);
        let p = m.pack.as_ref().unwrap();
        assert_eq!(p.frame_raw_len(0, m.image_size), 8192);
        assert_eq!(p.frame_raw_len(1, m.image_size), 100);
        assert_eq!(p.covers(2, 3), Some(1..3));
        assert_eq!(p.covers(0, 0), Some(0..1));
        assert_eq!(p.covers(0, 2), None, "block 1 is not in the pack");
        assert_eq!(p.covers(1, 1), None);
        assert_eq!(p.covers(3, 4), None);
        assert_eq!(p.within(1, 3), 1..3);
        assert_eq!(p.within(1, 1), 1..1);
        assert_eq!(p.frame_of(2), 1);
        assert_eq!(p.frame_positions(1), 2..3);
        for n in 0..b.len() {
            assert!(Manifest::decode(&b[..n]).is_err(), "truncated to {n}");
        }
        let reject = |m: &Manifest, what: &str| {
            let e = Manifest::decode(&m.encode()).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        };
        let mut bad = sample_with_pack();
        bad.pack.as_mut().unwrap().blocks = vec![0, 3, 2];
        reject(&bad, "out of order");
        let mut bad = sample_with_pack();
        bad.pack.as_mut().unwrap().blocks = vec![0, 2, 4];
        reject(&bad, "beyond the image");
        let mut bad = sample_with_pack();
        bad.pack.as_mut().unwrap().frames[1].stored_len = 99; // raw, must be 100
        bad.blob_size = 449;
        reject(&bad, "frame 1");
        let mut bad = sample_with_pack();
        bad.blob_size = 451;
        reject(&bad, "blob bytes");
        let mut bad = sample_with_pack();
        bad.pack.as_mut().unwrap().frame_blocks = 3; // 1 frame for 3 blocks, 2 given
        reject(&bad, "frames for");
        let mut bad = sample_with_pack();
        bad.pack.as_mut().unwrap().frame_blocks = MAX_PACK_FRAME_BLOCKS + 1;
        reject(&bad, "blocks per frame");
        let mut bad = sample_with_pack();
        bad.pack.as_mut().unwrap().blocks.clear();
        bad.pack.as_mut().unwrap().frames.clear();
        bad.blob_size = 300;
        reject(&bad, "0 blocks");
        // An unknown flag next to the pack flag.
        let mut v = b.clone();
        v[12] |= 2;
        assert!(Manifest::decode(&v)
            .unwrap_err()
            .to_string()
            .contains("flags"));
        // The block shift must be 12.
        let mut v = b.clone();
        let pack_at = b.len() - 2 * ENTRY_LEN - pad8(PACK_HEADER_LEN + 12);
        assert_eq!(le_u32(&v, pack_at), 12);
        v[pack_at] = 9;
        assert!(Manifest::decode(&v)
            .unwrap_err()
            .to_string()
            .contains("shift"));
    }

    #[test]
    fn roundtrip() {
        let m = sample();
        let b = m.encode();
        assert_eq!(Manifest::decode(&b).unwrap(), m);
        assert_eq!(m.chunk_len(3), 100);
        assert_eq!(m.chunk(1), ChunkRef::Zero);
    }

    #[test]
    fn rejects_every_truncation_and_bad_fields() {
        let b = sample().encode();
        for n in 0..b.len() {
            assert!(Manifest::decode(&b[..n]).is_err(), "truncated to {n}");
        }
        let mut v = b.clone();
        v[8] = 2;
        assert!(matches!(
            Manifest::decode(&v),
            Err(Error::ManifestVersion { found: 2, .. })
        ));
        let mut v = b.clone();
        v[0] = b'X';
        assert!(Manifest::decode(&v)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        // entry beyond blob
        let mut m = sample();
        m.blob_size = 250;
        assert!(Manifest::decode(&m.encode()).is_err());
        // dangling map reference
        let mut m = sample();
        m.map[1] = 3;
        assert!(Manifest::decode(&m.encode()).is_err());
        // raw entry with wrong length
        let mut m = sample();
        m.map = vec![2, 0, 1, 1];
        assert!(Manifest::decode(&m.encode()).is_err());
    }

    #[test]
    fn image_id_parse_display() {
        let id = ImageId::of(b"x");
        assert_eq!(ImageId::parse(&id.to_string()).unwrap(), id);
        assert!(ImageId::parse("sha256:zz").is_err());
    }
}

/// Magic bytes of a prefetch list.
pub const PREFETCH_MAGIC: &[u8; 8] = b"LZBLKPF1";
/// File name of the prefetch list, served next to the manifest.
pub const PREFETCH_FILE: &str = "prefetch";

/// Chunks to fetch first, in order (recorded by `lazyblk trace`). Layout: magic `LZBLKPF1`,
/// image id (32 bytes), count (`u32`), then `count` chunk indices (`u32`), little endian.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefetchList {
    /// The image the list belongs to.
    pub image: ImageId,
    /// Chunk indices in first-access order.
    pub chunks: Vec<u32>,
}

/// The layout shared by prefetch and block lists: `magic` (8 bytes), an image id (32 bytes), a
/// `u32` count, then `count` `u32` values, little endian.
fn encode_u32_list(magic: &[u8; 8], image: &ImageId, values: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(44 + 4 * values.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&image.0);
    out.extend_from_slice(&(values.len() as u32).to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Decode [`encode_u32_list`]'s layout: the image id and the values, each passed through
/// `check` (which names what is wrong with it); errors read "malformed `what`: ...".
fn decode_u32_list(
    b: &[u8],
    magic: &[u8; 8],
    what: &str,
    mut check: impl FnMut(u32) -> std::result::Result<(), String>,
) -> Result<(ImageId, Vec<u32>)> {
    let bad = |m: String| Error::Invalid(format!("malformed {what}: {m}"));
    if b.len() < 44 || &b[0..8] != magic {
        return Err(bad("bad magic or truncated header".into()));
    }
    let image = ImageId(b[8..40].try_into().expect("32 bytes"));
    let n = le_u32(b, 40) as usize;
    if b.len() as u64 != 44 + 4 * n as u64 {
        return Err(bad(format!("{} bytes for {n} entries", b.len())));
    }
    let mut values = Vec::with_capacity(n);
    for i in 0..n {
        let v = le_u32(b, 44 + 4 * i);
        check(v).map_err(bad)?;
        values.push(v);
    }
    Ok((image, values))
}

impl PrefetchList {
    /// Encode to bytes.
    pub fn encode(&self) -> Vec<u8> {
        encode_u32_list(PREFETCH_MAGIC, &self.image, &self.chunks)
    }

    /// Decode and validate against the image it must belong to.
    pub fn decode(b: &[u8], image: &ImageId, chunk_count: u64) -> Result<PrefetchList> {
        if b.len() >= 40 && b[8..40] != image.0 && &b[0..8] == PREFETCH_MAGIC {
            return Err(Error::Invalid(format!(
                "malformed prefetch list: it belongs to image sha256:{}",
                hex::encode(&b[8..40])
            )));
        }
        let (_, chunks) = decode_u32_list(b, PREFETCH_MAGIC, "prefetch list", |c| {
            if u64::from(c) >= chunk_count {
                Err(format!("chunk {c} is beyond the image"))
            } else {
                Ok(())
            }
        })?;
        Ok(PrefetchList {
            image: *image,
            chunks,
        })
    }
}

#[cfg(test)]
mod prefetch_tests {
    use super::*;

    #[test]
    fn prefetch_roundtrip_and_checks() {
        let id = ImageId([5; 32]);
        let p = PrefetchList {
            image: id,
            chunks: vec![3, 1, 2],
        };
        let b = p.encode();
        assert_eq!(PrefetchList::decode(&b, &id, 4).unwrap(), p);
        assert!(PrefetchList::decode(&b, &id, 3).is_err());
        assert!(PrefetchList::decode(&b, &ImageId([6; 32]), 4).is_err());
        assert!(PrefetchList::decode(&b[..b.len() - 1], &id, 4).is_err());
    }
}

/// Magic bytes of a block list.
pub const BLOCK_LIST_MAGIC: &[u8; 8] = b"LZBLKBL1";

/// 4 KiB blocks of an image that a workload read (recorded by `lazyblk trace --blocks`), for
/// `lazyblk build --pack-blocks`: stored in the metadata pack of the rebuilt image, they are
/// fetched with a few requests at `add`, at block rather than chunk granularity. Layout: magic
/// `LZBLKBL1`, the id of the image it was recorded on (32 bytes), count (`u32`), then `count`
/// strictly ascending block numbers (`u32`, offset / 4096), little endian.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockList {
    /// The image the blocks were read from.
    pub image: ImageId,
    /// Block numbers, strictly ascending.
    pub blocks: Vec<u32>,
}

impl BlockList {
    /// Encode to bytes.
    pub fn encode(&self) -> Vec<u8> {
        encode_u32_list(BLOCK_LIST_MAGIC, &self.image, &self.blocks)
    }

    /// Decode and validate (magic, length, order).
    pub fn decode(b: &[u8]) -> Result<BlockList> {
        let mut prev: Option<u32> = None;
        let (image, blocks) = decode_u32_list(b, BLOCK_LIST_MAGIC, "block list", |blk| {
            if prev.is_some_and(|p| p >= blk) {
                return Err(format!("block {blk} is out of order"));
            }
            prev = Some(blk);
            Ok(())
        })?;
        Ok(BlockList { image, blocks })
    }
}

#[cfg(test)]
mod block_list_tests {
    use super::*;

    #[test]
    fn block_list_roundtrip_and_checks() {
        let l = BlockList {
            image: ImageId([3; 32]),
            blocks: vec![0, 5, 6, 900],
        };
        let b = l.encode();
        assert_eq!(BlockList::decode(&b).unwrap(), l);
        for n in 0..b.len() {
            assert!(BlockList::decode(&b[..n]).is_err(), "truncated to {n}");
        }
        let mut v = b.clone();
        v[48..52].copy_from_slice(&7u32.to_le_bytes()); // 7, 5: out of order
        let e = BlockList::decode(&v).unwrap_err().to_string();
        assert!(e.contains("out of order"), "{e}");
        let mut v = b;
        v[0] = b'X';
        assert!(BlockList::decode(&v)
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }
}

/// Magic bytes of a prefetch pack.
pub const PACK_MAGIC: &[u8; 8] = b"LZBLKPP1";
/// File name of the prefetch pack, served next to the manifest (its blob next to it, under the
/// name the pack gives).
pub const PACK_FILE: &str = "prefetch.pack";
const PACK_FILE_HEADER_LEN: usize = 72;

/// A prefetch pack: the 4 KiB blocks a workload read (`lazyblk trace --pack`), stored densely
/// in frames in a blob of their own, published next to an image without changing it. An image
/// opened with a prefetch pack uses its pack *instead of* the manifest's metadata pack (the
/// trace writes the metadata blocks into it too), so a container start fetches a few frames
/// instead of every chunk it touches.
///
/// The chunk digests cannot vouch for single blocks: the frames are pinned by this file, and
/// this file is pinned by its own SHA-256 (`add --pack-digest`), or trusted like an unpinned
/// manifest. Layout (little endian): magic `LZBLKPP1`, version (`u32`, 1), flags (`u32`, 0),
/// the image id (32 bytes), the image size (`u64`), the blob size (`u64`), the blob name length
/// (`u16`), 6 zero bytes, the name, zero padding to 8, then a pack section laid out like the
/// manifest's, its frames back to back from offset 0 of the blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefetchPack {
    /// The image the pack belongs to.
    pub image: ImageId,
    /// Size of that image in bytes.
    pub image_size: u64,
    /// Name of the pack's blob, relative to the pack's location.
    pub blob_name: String,
    /// Size of the pack's blob.
    pub blob_size: u64,
    /// The blocks and frames (frame offsets are in the pack's blob).
    pub pack: MetaPack,
}

impl PrefetchPack {
    /// Encode to bytes (the pack's identity is [`ImageId::of`] these bytes).
    pub fn encode(&self) -> Vec<u8> {
        let name = self.blob_name.as_bytes();
        let pack_at = pad8(PACK_FILE_HEADER_LEN + name.len());
        let mut out = vec![0u8; pack_at + pack_section_len(&self.pack)];
        out[0..8].copy_from_slice(PACK_MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[16..48].copy_from_slice(&self.image.0);
        out[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        out[56..64].copy_from_slice(&self.blob_size.to_le_bytes());
        out[64..66].copy_from_slice(&(name.len() as u16).to_le_bytes());
        out[PACK_FILE_HEADER_LEN..PACK_FILE_HEADER_LEN + name.len()].copy_from_slice(name);
        encode_pack_section(&mut out, pack_at, &self.pack);
        out
    }

    /// Decode and validate against the image it must belong to (id and size).
    pub fn decode(b: &[u8], image: &ImageId, image_size: u64) -> Result<PrefetchPack> {
        let bad = |m: String| Error::Invalid(format!("malformed prefetch pack: {m}"));
        if b.len() < PACK_FILE_HEADER_LEN || &b[0..8] != PACK_MAGIC {
            return Err(bad("bad magic or truncated header".into()));
        }
        if le_u32(b, 8) != VERSION || le_u32(b, 12) != 0 {
            return Err(bad("unsupported version or flags".into()));
        }
        if b[16..48] != image.0 {
            return Err(bad(format!(
                "it belongs to image sha256:{}",
                hex::encode(&b[16..48])
            )));
        }
        if le_u64(b, 48) != image_size {
            return Err(bad(format!(
                "made for an image of {} bytes, this one has {image_size}",
                le_u64(b, 48)
            )));
        }
        if b[66..72].iter().any(|&x| x != 0) {
            return Err(bad("reserved header bytes are not zero".into()));
        }
        let blob_size = le_u64(b, 56);
        let name_len = usize::from(u16::from_le_bytes([b[64], b[65]]));
        let pack_at = pad8(PACK_FILE_HEADER_LEN + name_len);
        // The section's own errors, without the "malformed manifest" of the manifest decoder.
        let section = |e: Error| match e {
            Error::Manifest(m) => bad(m),
            other => other,
        };
        let layout = PackLayout::read(b, pack_at as u64, image_size).map_err(section)?;
        if layout.end != b.len() as u64 {
            return Err(bad(format!(
                "length is {} bytes, the header implies {}",
                b.len(),
                layout.end
            )));
        }
        let blob_name =
            std::str::from_utf8(&b[PACK_FILE_HEADER_LEN..PACK_FILE_HEADER_LEN + name_len])
                .ok()
                .filter(|n| valid_blob_name(n) && *n != PACK_FILE)
                .ok_or_else(|| bad("invalid blob name".into()))?
                .to_string();
        if b[PACK_FILE_HEADER_LEN + name_len..pack_at]
            .iter()
            .any(|&x| x != 0)
        {
            return Err(bad("padding bytes are not zero".into()));
        }
        let pack = layout.decode(b, image_size, 0).map_err(section)?;
        if pack.stored_bytes() != blob_size {
            return Err(bad(format!(
                "frames add up to {} blob bytes, the header says {blob_size}",
                pack.stored_bytes()
            )));
        }
        Ok(PrefetchPack {
            image: *image,
            image_size,
            blob_name,
            blob_size,
            pack,
        })
    }

    /// The manifest `m` of the image as a store uses it with this pack: the pack replaces the
    /// manifest's metadata pack, its frames placed after the image's blob (`blob_size` grows
    /// by the pack's blob: a remote that reads the two blobs as one serves them).
    pub fn apply(&self, m: &Manifest) -> Manifest {
        let base = m.blob_size;
        let mut pack = self.pack.clone();
        for f in &mut pack.frames {
            f.blob_offset += base;
        }
        Manifest {
            blob_size: base + self.blob_size,
            pack: Some(pack),
            ..m.clone()
        }
    }
}

#[cfg(test)]
mod prefetch_pack_tests {
    use super::*;

    fn sample() -> (Manifest, PrefetchPack) {
        let m = super::tests::sample();
        let p = PrefetchPack {
            image: ImageId::of(&m.encode()),
            image_size: m.image_size,
            blob_name: "prefetch.pack.blob".into(),
            blob_size: 70,
            pack: MetaPack {
                blocks: vec![1, 3],
                frame_blocks: 1,
                frames: vec![
                    Entry {
                        digest: [4; 32],
                        blob_offset: 0,
                        stored_len: 30,
                        encoding: Encoding::Zstd,
                    },
                    Entry {
                        digest: [5; 32],
                        blob_offset: 30,
                        stored_len: 40,
                        encoding: Encoding::Zstd,
                    },
                ],
            },
        };
        (m, p)
    }

    #[test]
    fn prefetch_pack_roundtrip_apply_and_checks() {
        let (m, p) = sample();
        let b = p.encode();
        assert_eq!(PrefetchPack::decode(&b, &p.image, m.image_size).unwrap(), p);
        for n in 0..b.len() {
            assert!(
                PrefetchPack::decode(&b[..n], &p.image, m.image_size).is_err(),
                "truncated to {n}"
            );
        }
        let e = PrefetchPack::decode(&b, &ImageId([1; 32]), m.image_size).unwrap_err();
        assert!(e.to_string().contains("belongs to image"), "{e}");
        let e = PrefetchPack::decode(&b, &p.image, m.image_size + 1).unwrap_err();
        assert!(e.to_string().contains("bytes"), "{e}");
        let mut v = p.clone();
        v.blob_size = 71;
        let e = PrefetchPack::decode(&v.encode(), &p.image, m.image_size).unwrap_err();
        assert!(e.to_string().contains("add up to"), "{e}");
        let mut v = p.clone();
        v.blob_name = "../x".into();
        assert!(PrefetchPack::decode(&v.encode(), &p.image, m.image_size).is_err());
        let mut v = p.clone();
        v.pack.blocks = vec![3, 1];
        let e = PrefetchPack::decode(&v.encode(), &p.image, m.image_size).unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed prefetch pack: metadata pack: block 1 is out of order"
        );

        // Applied: the pack's frames follow the image's blob (back to back with its entries,
        // as this image has no metadata pack of its own).
        let eff = p.apply(&m);
        assert_eq!(eff.blob_size, 370);
        let ep = eff.pack.as_ref().unwrap();
        assert_eq!(ep.frames[0].blob_offset, 300);
        assert_eq!(ep.frames[1].blob_offset, 330);
        assert!(eff.entries_contiguous());
        assert_eq!(eff.unit_count(), m.chunk_count() + 2);
    }
}
