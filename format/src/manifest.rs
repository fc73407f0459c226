//! The manifest: the image's chunk table (one encoder, one fuzzed decoder).
//!
//! See `docs/FORMAT.md` for the byte layout. The decoder is fuzzed
//! (`fuzz/fuzz_targets/manifest.rs`) and never trusts a length before checking it against the
//! input size.

use crate::codec::*;
use crate::error::{Error, Result};
use crate::metapack::*;

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
pub(crate) const RAW_FLAG: u32 = 1 << 31;
/// Largest manifest a reader accepts.
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// Smallest chunk size allowed.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk size allowed.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Default chunk size (justified in `docs/FORMAT.md`).
pub const DEFAULT_CHUNK_SIZE: u32 = 128 << 10;
pub(crate) const COMPRESSION_ZSTD: u8 = 1;
/// Header flag: a metadata pack section follows the entries.
pub(crate) const FLAG_META_PACK: u32 = 1;
/// Header flag: a shared-blob section follows the entries (before any pack section).
pub(crate) const FLAG_SHARED_BLOBS: u32 = 2;
/// Most shared blobs one manifest may name (one per source layer, at most).
pub const MAX_SHARED_BLOBS: usize = 4096;
/// Fixed part of one shared-blob record: `u64` size, `u16` name length, 6 zero bytes.
const SHARED_RECORD_LEN: usize = 16;
/// Size of one metadata pack block: the block size the store exposes to frontends, so every
/// read of the device covers whole pack blocks.
pub const PACK_BLOCK: u64 = 4096;
pub(crate) const PACK_BLOCK_SHIFT: u32 = 12;
/// Fixed part of the pack section.
pub(crate) const PACK_HEADER_LEN: usize = 24;
/// Default number of pack blocks per frame (256 KiB of raw blocks per zstd frame).
pub const DEFAULT_PACK_FRAME_BLOCKS: u32 = 64;
/// Largest number of pack blocks per frame (4 MiB of raw blocks).
pub const MAX_PACK_FRAME_BLOCKS: u32 = 1024;
pub(crate) const DIGEST_BLAKE3: u8 = 1;

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

/// A blob of its own that holds part of an image's stored chunks, the same bytes in every
/// image that names it: a converted image's data of one source layer (`lazyblk convert`), so
/// a registry stores it once and a host fetches it once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedBlob {
    /// Its name, relative to the manifest's location (a content-derived name).
    pub name: String,
    /// Its size in bytes (more than 0).
    pub size: u64,
}

/// Where chunk `i` of the image comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkRef<'a> {
    /// An all-zero chunk: not stored, reads as zeros.
    Zero,
    /// A stored chunk.
    Stored(&'a Entry),
}

/// A decoded manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Size of the raw image in bytes.
    pub image_size: u64,
    /// Chunk size in bytes (power of two).
    pub chunk_size: u32,
    /// Size of the blob in bytes: the *stored* blob, that is the shared blobs (in order) and
    /// then the image's own blob, read as one.
    pub blob_size: u64,
    /// Name of the image's own blob, relative to the manifest's location.
    pub blob_name: String,
    /// Blobs shared with other images, placed before the own blob in the stored blob (empty
    /// for an image built in one blob). An entry never spans two of them.
    pub shared: Vec<SharedBlob>,
    /// For each chunk: 0 for an all-zero chunk, `k` for `entries[k - 1]`.
    pub map: Vec<u32>,
    /// The unique stored chunks.
    pub entries: Vec<Entry>,
    /// The metadata pack, if the image has one.
    pub pack: Option<MetaPack>,
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

    /// Where each blob lies in the stored blob: the shared ones in order, then the own blob
    /// (name, offset, size).
    pub fn blob_parts(&self) -> Vec<(&str, u64, u64)> {
        let mut at = 0u64;
        let mut v = Vec::with_capacity(self.shared.len() + 1);
        for b in &self.shared {
            v.push((b.name.as_str(), at, b.size));
            at = at.saturating_add(b.size);
        }
        v.push((
            self.blob_name.as_str(),
            at,
            self.blob_size.saturating_sub(at),
        ));
        v
    }

    /// Size of the image's own blob (the stored blob without the shared ones).
    pub fn own_blob_size(&self) -> u64 {
        self.blob_size.saturating_sub(
            self.shared
                .iter()
                .fold(0u64, |a, b| a.saturating_add(b.size)),
        )
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
        let entries_end = entries_at + ENTRY_LEN * self.entries.len();
        let shared_at = pad8(entries_end);
        let shared_end = match self.shared.is_empty() {
            true => entries_end,
            false => shared_section_end(shared_at, &self.shared),
        };
        let pack_at = pad8(shared_end);
        let total = match &self.pack {
            Some(p) => pack_at + pack_section_len(p),
            None => shared_end,
        };
        let mut out = vec![0u8; total];
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.pack.is_some() {
            FLAG_META_PACK
        } else {
            0
        } | if self.shared.is_empty() {
            0
        } else {
            FLAG_SHARED_BLOBS
        };
        out[12..16].copy_from_slice(&flags.to_le_bytes());
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
        if !self.shared.is_empty() {
            out[shared_at..shared_at + 4]
                .copy_from_slice(&(self.shared.len() as u32).to_le_bytes());
            let mut at = shared_at + 8;
            for b in &self.shared {
                out[at..at + 8].copy_from_slice(&b.size.to_le_bytes());
                out[at + 8..at + 10].copy_from_slice(&(b.name.len() as u16).to_le_bytes());
                at += SHARED_RECORD_LEN;
                out[at..at + b.name.len()].copy_from_slice(b.name.as_bytes());
                at = pad8(at + b.name.len());
            }
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
        if flags & !(FLAG_META_PACK | FLAG_SHARED_BLOBS) != 0 {
            return Err(bad("unknown flags set"));
        }
        let has_pack = flags & FLAG_META_PACK != 0;
        let has_shared = flags & FLAG_SHARED_BLOBS != 0;
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
        let mut shared = Vec::new();
        if has_shared {
            let (blobs, end) = read_shared_section(b, entries_end.div_ceil(8) * 8)?;
            shared = blobs;
            total = end;
        }
        let mut pack_layout = None;
        if has_pack {
            let layout = PackLayout::read(b, total.div_ceil(8) * 8, image_size)?;
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
                let before = match has_shared {
                    true => shared_section_end(pad8(entries_end as usize), &shared),
                    false => entries_end as usize,
                };
                if b[before..layout.pack_at].iter().any(|&x| x != 0) {
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
        if shared.iter().any(|s| s.name == blob_name) {
            return Err(bad(format!("shared blob {blob_name:?} is the own blob")));
        }
        let m = Manifest {
            image_size,
            chunk_size,
            blob_size,
            blob_name,
            shared,
            map,
            entries,
            pack,
        };
        m.check_blob_parts()?;
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

impl Manifest {
    /// The shared blobs lie inside the stored blob, no entry spans two blobs, and the pack's
    /// frames are in the own blob.
    fn check_blob_parts(&self) -> Result<()> {
        if self.shared.is_empty() {
            return Ok(());
        }
        let parts = self.blob_parts();
        let shared_end = parts.last().expect("the own blob").1;
        if shared_end > self.blob_size {
            return Err(bad(format!(
                "shared blobs add up to {shared_end} bytes, more than the blob's {}",
                self.blob_size
            )));
        }
        let mut part = 0;
        for (i, e) in self.entries.iter().enumerate() {
            while e.blob_offset >= parts[part].1 + parts[part].2 && part + 1 < parts.len() {
                part += 1;
            }
            let (name, at, len) = parts[part];
            if e.blob_offset + u64::from(e.stored_len) > at.saturating_add(len) {
                return Err(bad(format!("entry {i} spans the end of blob {name:?}")));
            }
        }
        if let Some(p) = &self.pack {
            if p.frames.first().is_some_and(|f| f.blob_offset < shared_end) {
                return Err(bad("a pack frame lies in a shared blob"));
            }
        }
        Ok(())
    }
}

/// End of a shared-blob section at `at` holding `blobs`.
fn shared_section_end(at: usize, blobs: &[SharedBlob]) -> usize {
    blobs.iter().fold(at + 8, |end, b| {
        pad8(end + SHARED_RECORD_LEN + b.name.len())
    })
}

/// The shared-blob section at `at`: its blobs and where it ends. Every length is checked
/// against the input before it is used.
fn read_shared_section(b: &[u8], at: u64) -> Result<(Vec<SharedBlob>, u64)> {
    let short = || bad("the shared-blob section is truncated");
    let at = usize::try_from(at).map_err(|_| short())?;
    if b.len() < at.saturating_add(8) {
        return Err(short());
    }
    let count = le_u32(b, at) as usize;
    if count == 0 || count > MAX_SHARED_BLOBS {
        return Err(bad(format!("invalid shared blob count {count}")));
    }
    if le_u32(b, at + 4) != 0 {
        return Err(bad("reserved shared-blob bytes are not zero"));
    }
    let mut blobs: Vec<SharedBlob> = Vec::with_capacity(count);
    let mut pos = at + 8;
    for i in 0..count {
        if b.len() < pos + SHARED_RECORD_LEN {
            return Err(short());
        }
        let size = le_u64(b, pos);
        let name_len = usize::from(u16::from_le_bytes([b[pos + 8], b[pos + 9]]));
        if b[pos + 10..pos + SHARED_RECORD_LEN].iter().any(|&x| x != 0) {
            return Err(bad("reserved shared-blob bytes are not zero"));
        }
        let name_at = pos + SHARED_RECORD_LEN;
        let end = pad8(name_at + name_len);
        if b.len() < end {
            return Err(short());
        }
        let name = std::str::from_utf8(&b[name_at..name_at + name_len])
            .map_err(|_| bad(format!("shared blob {i}: name is not UTF-8")))?;
        if !valid_blob_name(name) {
            return Err(bad(format!("shared blob {i}: invalid name {name:?}")));
        }
        if size == 0 {
            return Err(bad(format!("shared blob {name:?} is empty")));
        }
        if b[name_at + name_len..end].iter().any(|&x| x != 0) {
            return Err(bad("padding bytes are not zero"));
        }
        if blobs.iter().any(|s| s.name == name) {
            return Err(bad(format!("shared blob {name:?} is named twice")));
        }
        blobs.push(SharedBlob {
            name: name.to_string(),
            size,
        });
        pos = end;
    }
    Ok((blobs, pos as u64))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::id::ImageId;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            image_size: 3 * 4096 + 100,
            chunk_size: 4096,
            blob_size: 300,
            blob_name: "blob".into(),
            shared: Vec::new(),
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
    pub(crate) fn sample_with_pack() -> Manifest {
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
            merged: None,
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
        v[12] |= 4;
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

    /// `sample` whose first entry is in a shared blob of its own.
    fn sample_shared() -> Manifest {
        let mut m = sample();
        m.shared = vec![SharedBlob {
            name: "data-1".into(),
            size: 200,
        }];
        m
    }

    #[test]
    fn shared_blobs_roundtrip_and_checks() {
        let m = sample_shared();
        let b = m.encode();
        assert_eq!(Manifest::decode(&b).unwrap(), m);
        assert_eq!(m.blob_parts(), vec![("data-1", 0, 200), ("blob", 200, 100)]);
        assert_eq!(m.own_blob_size(), 100);
        for n in 0..b.len() {
            assert!(Manifest::decode(&b[..n]).is_err(), "truncated to {n}");
        }
        let reject = |m: &Manifest, what: &str| {
            let e = Manifest::decode(&m.encode()).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        };
        let mut bad = sample_shared();
        bad.shared[0].size = 150;
        reject(&bad, "spans the end");
        let mut bad = sample_shared();
        bad.shared[0].size = 400;
        reject(&bad, "add up to");
        let mut bad = sample_shared();
        bad.shared[0].name = "blob".into();
        reject(&bad, "own blob");
        let mut bad = sample_shared();
        bad.shared.push(bad.shared[0].clone());
        reject(&bad, "named twice");
        let mut bad = sample_shared();
        bad.shared[0].name = "a/b".into();
        reject(&bad, "invalid name");
        // With a pack: its frames must be in the own blob.
        let mut m = sample_with_pack();
        m.shared = vec![SharedBlob {
            name: "data-1".into(),
            size: 300,
        }];
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        m.shared[0].size = 350;
        reject(&m, "pack frame");
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
