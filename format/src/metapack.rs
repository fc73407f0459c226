//! The metadata pack section: scattered 4 KiB blocks stored densely in a few frames, shared by
//! the manifest and the prefetch pack.

use crate::codec::*;
use crate::error::Result;
use crate::manifest::*;

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
    /// `f * frame_blocks .. (f + 1) * frame_blocks` of `blocks`, back to back (in a pack as
    /// encoded; see `merged`).
    pub frame_blocks: u32,
    /// One stored frame per group of blocks, in blob order after the chunk entries; the digest
    /// is of the frame's raw (concatenated) blocks.
    pub frames: Vec<Entry>,
    /// `None` in a pack as encoded. Two packs merged in memory ([`MetaPack::merge`]: the
    /// metadata pack and a prefetch pack that extends it) keep every frame as it was, so a
    /// frame's blocks are no longer consecutive positions of `blocks`: this says which are.
    pub merged: Option<std::sync::Arc<MergedFrames>>,
}

/// The frames of a [merged](MetaPack::merge) pack: which blocks each holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergedFrames {
    /// The frame of each position of `blocks`.
    frame_of: Vec<u32>,
    /// The blocks of every frame, frame by frame (each frame's ascending).
    members: Vec<u32>,
    /// Where each frame's blocks start in `members` (one more entry than frames).
    starts: Vec<u32>,
}

impl MetaPack {
    /// Positions (in `blocks`) of the blocks of frame `f`, in a pack as encoded (not merged).
    pub fn frame_positions(&self, f: usize) -> std::ops::Range<usize> {
        debug_assert!(self.merged.is_none(), "positions of a merged pack's frame");
        let fb = self.frame_blocks as usize;
        f * fb..((f + 1) * fb).min(self.blocks.len())
    }

    /// The image blocks of frame `f`, ascending: its raw bytes are theirs, back to back.
    pub fn frame_members(&self, f: usize) -> &[u32] {
        match &self.merged {
            None => &self.blocks[self.frame_positions(f)],
            Some(m) => &m.members[m.starts[f] as usize..m.starts[f + 1] as usize],
        }
    }

    /// The frame holding the block at position `pos`.
    pub fn frame_of(&self, pos: usize) -> usize {
        match &self.merged {
            None => pos / self.frame_blocks as usize,
            Some(m) => m.frame_of[pos] as usize,
        }
    }

    /// Length of the raw bytes of frame `f` of an image of `image_size` bytes (the image's
    /// last block may be short).
    pub fn frame_raw_len(&self, f: usize, image_size: u64) -> u64 {
        self.frame_members(f)
            .iter()
            .map(|&b| (image_size - u64::from(b) * PACK_BLOCK).min(PACK_BLOCK))
            .sum()
    }

    /// `first`'s frames, then `then`'s, as one pack: a block is looked up in both, and each
    /// frame keeps its blocks and its entry. The two must not share a block (`Err` names the
    /// first one they share). Merged packs live in memory only: they are never encoded.
    pub fn merge(first: &MetaPack, then: &MetaPack) -> std::result::Result<MetaPack, u32> {
        let blocks = first.blocks.len() + then.blocks.len();
        let mut members = Vec::with_capacity(blocks);
        let mut starts = Vec::with_capacity(first.frames.len() + then.frames.len() + 1);
        // Every block with its frame, sorted into block order below.
        let mut all: Vec<(u32, u32)> = Vec::with_capacity(blocks);
        for p in [first, then] {
            for f in 0..p.frames.len() {
                let frame = starts.len() as u32;
                starts.push(members.len() as u32);
                members.extend_from_slice(p.frame_members(f));
                all.extend(p.frame_members(f).iter().map(|&b| (b, frame)));
            }
        }
        starts.push(members.len() as u32);
        all.sort_unstable();
        if let Some(w) = all.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(w[0].0);
        }
        Ok(MetaPack {
            blocks: all.iter().map(|&(b, _)| b).collect(),
            frame_blocks: first.frame_blocks.max(then.frame_blocks),
            frames: first.frames.iter().chain(&then.frames).copied().collect(),
            merged: Some(std::sync::Arc::new(MergedFrames {
                frame_of: all.iter().map(|&(_, f)| f).collect(),
                members,
                starts,
            })),
        })
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

/// Bytes of the encoded pack section of `p`: its header, the block numbers, padding to 8 and
/// the frame entries.
pub(crate) fn pack_section_len(p: &MetaPack) -> usize {
    pad8(PACK_HEADER_LEN + 4 * p.blocks.len()) + ENTRY_LEN * p.frames.len()
}

/// Write the pack section of `p` at `pack_at` (8-aligned) of `out` (zeroed, long enough).
pub(crate) fn encode_pack_section(out: &mut [u8], pack_at: usize, p: &MetaPack) {
    debug_assert!(p.merged.is_none(), "a merged pack is never encoded");
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
pub(crate) struct PackLayout {
    pub(crate) pack_at: usize,
    pub(crate) frame_blocks: u32,
    pub(crate) blocks: usize,
    pub(crate) frames: usize,
    pub(crate) frames_at: usize,
    /// End of the section (the frame entries' end).
    pub(crate) end: u64,
}

impl PackLayout {
    /// Read and check the fixed part of the pack section at `pack_at` of `b`.
    pub(crate) fn read(b: &[u8], pack_at: u64, image_size: u64) -> Result<PackLayout> {
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
    pub(crate) fn decode(
        &self,
        b: &[u8],
        image_size: u64,
        mut blob_offset: u64,
    ) -> Result<MetaPack> {
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
            merged: None,
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
