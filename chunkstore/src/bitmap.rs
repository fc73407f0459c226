//! The persistent presence bitmap of a cache.
//!
//! Layout (little endian): `magic "LZBLKBMP"`, `version u32`, `flags u32` (bit 0: closed
//! cleanly), `chunk_count u64`, `image id [32]`, `checksum u64` (first 8 bytes of the BLAKE3 of
//! the bits, valid only when the clean flag is set), then `ceil(chunk_count / 8)` bytes of bits,
//! least significant bit first.
//!
//! While a store is open the header says "dirty" and bits are updated in place, only ever after
//! the chunk data they cover is durable (see `docs/DESIGN.md`). A bitmap found dirty, or clean with
//! a bad checksum, is not trusted: every chunk it claims present is re-verified before use.

use crate::error::{Error, Result};
use bitvec::prelude::*;
use lazyblk_format::ImageId;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Magic bytes of a bitmap file.
pub const MAGIC: &[u8; 8] = b"LZBLKBMP";
/// Bitmap format version.
pub const VERSION: u32 = 1;
/// Header length.
pub const HEADER_LEN: usize = 64;
const FLAG_CLEAN: u32 = 1;

/// Whether the bits of a decoded bitmap can be trusted as they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Closed cleanly and the checksum matches.
    Clean,
    /// Not closed cleanly (crash, kill, power loss) or the checksum is wrong: re-verify.
    Verify,
}

/// A decoded bitmap file.
#[derive(Debug)]
pub struct Decoded {
    /// The presence bits.
    pub bits: BitVec<u8, Lsb0>,
    /// Whether they can be trusted.
    pub trust: Trust,
}

fn checksum(bits: &[u8]) -> [u8; 8] {
    blake3::hash(bits).as_bytes()[..8]
        .try_into()
        .expect("8 bytes")
}

/// Encode a header.
fn header(id: &ImageId, chunk_count: u64, clean: Option<&[u8]>) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    if let Some(bits) = clean {
        h[12..16].copy_from_slice(&FLAG_CLEAN.to_le_bytes());
        h[56..64].copy_from_slice(&checksum(bits));
    }
    h[16..24].copy_from_slice(&chunk_count.to_le_bytes());
    h[24..56].copy_from_slice(&id.0);
    h
}

/// Decode bitmap file bytes, checking they belong to image `id` with `chunk_count` chunks.
pub fn decode(b: &[u8], id: &ImageId, chunk_count: u64) -> std::result::Result<Decoded, String> {
    peek_header(b)?;
    let flags = u32::from_le_bytes(b[12..16].try_into().expect("4"));
    if flags & !FLAG_CLEAN != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let n = u64::from_le_bytes(b[16..24].try_into().expect("8"));
    if b[24..56] != id.0 {
        return Err(format!(
            "belongs to another image (sha256:{})",
            hex::encode(&b[24..56])
        ));
    }
    if n != chunk_count {
        return Err(format!("has {n} chunks, the image has {chunk_count}"));
    }
    let want = HEADER_LEN as u64 + chunk_count.div_ceil(8);
    if b.len() as u64 != want {
        return Err(format!("is {} bytes, expected {want}", b.len()));
    }
    let raw = &b[HEADER_LEN..];
    let trust = if flags & FLAG_CLEAN != 0 && b[56..64] == checksum(raw) {
        Trust::Clean
    } else {
        Trust::Verify
    };
    let mut bits = BitVec::<u8, Lsb0>::from_slice(raw);
    bits.truncate(chunk_count as usize);
    if trust == Trust::Clean && raw.len() as u64 * 8 > chunk_count {
        // Bits past the end must be zero in a clean file.
        let tail = BitSlice::<u8, Lsb0>::from_slice(raw);
        if tail[chunk_count as usize..].any() {
            return Err("bits set past the last chunk".into());
        }
    }
    Ok(Decoded { bits, trust })
}

/// The durable bits of another cache's bitmap file, as bytes read from it, without binding them
/// to an image (the host index and `gc` read the bitmaps of caches they do not own; a chunk's
/// bit is at its index whatever prefetch pack decided the units after the chunks). Checks the
/// magic, the version and the length the header's unit count gives.
pub fn peek(b: &[u8]) -> std::result::Result<BitVec<u8, Lsb0>, String> {
    let units = peek_header(b)?;
    let want = HEADER_LEN as u64 + units.div_ceil(8);
    if b.len() as u64 != want {
        return Err(format!("is {} bytes, expected {want}", b.len()));
    }
    let mut bits = BitVec::<u8, Lsb0>::from_slice(&b[HEADER_LEN..]);
    bits.truncate(units as usize);
    Ok(bits)
}

/// The unit count of a bitmap header (magic and version checked).
fn peek_header(b: &[u8]) -> std::result::Result<u64, String> {
    if b.len() < HEADER_LEN {
        return Err(format!("truncated ({} bytes)", b.len()));
    }
    if &b[0..8] != MAGIC {
        return Err("bad magic".into());
    }
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4"));
    if version != VERSION {
        return Err(format!("unknown version {version}"));
    }
    Ok(u64::from_le_bytes(b[16..24].try_into().expect("8")))
}

/// Whether the durable bit of unit `i` is set in the bitmap file at `path` (another cache's,
/// read from the file itself: never its owner's memory), reading the header and the one byte.
/// An error says why the file cannot answer (missing, not a bitmap, `i` past its units).
pub fn durable_bit(path: &Path, i: u64) -> std::result::Result<bool, String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    let mut h = [0u8; HEADER_LEN];
    f.read_exact_at(&mut h, 0)
        .map_err(|e| format!("header: {e}"))?;
    let units = peek_header(&h)?;
    if i >= units {
        return Err(format!("has {units} units, asked for {i}"));
    }
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, HEADER_LEN as u64 + i / 8)
        .map_err(|e| format!("bits: {e}"))?;
    Ok(byte[0] & (1 << (i % 8)) != 0)
}

/// An open bitmap file, holding the durable copy of the bits.
pub struct BitmapFile {
    path: PathBuf,
    file: File,
    id: ImageId,
    durable: BitVec<u8, Lsb0>,
}

impl BitmapFile {
    /// Create or truncate the file with all bits clear, marked dirty.
    pub fn create(path: &Path, id: ImageId, chunk_count: u64) -> Result<BitmapFile> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let mut b = BitmapFile {
            path: path.to_path_buf(),
            file,
            id,
            durable: bitvec![u8, Lsb0; 0; chunk_count as usize],
        };
        b.write_all(false)?;
        Ok(b)
    }

    /// Open an existing file. Returns the file (now marked dirty) and how far it is trusted.
    pub fn open(path: &Path, id: ImageId, chunk_count: u64) -> Result<(BitmapFile, Trust)> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let d = decode(&bytes, &id, chunk_count).map_err(|detail| Error::Cache {
            path: path.to_path_buf(),
            detail,
        })?;
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let b = BitmapFile {
            path: path.to_path_buf(),
            file,
            id,
            durable: d.bits,
        };
        b.write_header(None)?;
        Ok((b, d.trust))
    }

    /// The durable bits.
    pub fn bits(&self) -> &BitSlice<u8, Lsb0> {
        &self.durable
    }

    fn write_header(&self, clean: Option<&[u8]>) -> Result<()> {
        let h = header(&self.id, self.durable.len() as u64, clean);
        self.file
            .write_all_at(&h, 0)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| Error::io(&self.path, e))
    }

    fn write_all(&mut self, clean: bool) -> Result<()> {
        let raw = self.durable.as_raw_slice().to_vec();
        self.file
            .write_all_at(&raw, HEADER_LEN as u64)
            .and_then(|_| self.file.set_len((HEADER_LEN + raw.len()) as u64))
            .and_then(|_| self.file.sync_data())
            .map_err(|e| Error::io(&self.path, e))?;
        self.write_header(if clean { Some(&raw) } else { None })
    }

    /// Set or clear bits and make the change durable. The data the set bits cover must already
    /// be durable.
    pub fn update(&mut self, set: &[u64], clear: &[u64]) -> Result<()> {
        if set.is_empty() && clear.is_empty() {
            return Ok(());
        }
        let mut lo = usize::MAX;
        let mut hi = 0usize;
        for (list, v) in [(set, true), (clear, false)] {
            for &i in list {
                self.durable.set(i as usize, v);
                lo = lo.min(i as usize / 8);
                hi = hi.max(i as usize / 8);
            }
        }
        let raw = &self.durable.as_raw_slice()[lo..=hi];
        self.file
            .write_all_at(raw, (HEADER_LEN + lo) as u64)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Rewrite everything and mark the file cleanly closed.
    pub fn close_clean(mut self) -> Result<()> {
        self.write_all(true)
    }

    /// Rewrite everything and mark the file clean, keeping it open. A later [`update`] changes
    /// bits in place without touching the header, so the checksum no longer matches and the
    /// next open re-verifies: clean only as long as nothing changed since.
    ///
    /// [`update`]: BitmapFile::update
    pub fn mark_clean(&mut self) -> Result<()> {
        self.write_all(true)
    }

    /// Replace all bits (after a re-verification) and make them durable.
    pub fn replace(&mut self, bits: BitVec<u8, Lsb0>) -> Result<()> {
        self.durable = bits;
        self.write_all(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_roundtrip_and_dirty_detection() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bitmap");
        let id = ImageId([3; 32]);
        let mut b = BitmapFile::create(&p, id, 20).unwrap();
        b.update(&[1, 19], &[]).unwrap();
        // Open while "running": dirty.
        let d = decode(&std::fs::read(&p).unwrap(), &id, 20).unwrap();
        assert_eq!(d.trust, Trust::Verify);
        assert!(d.bits[1] && d.bits[19] && !d.bits[2]);
        b.close_clean().unwrap();
        let d = decode(&std::fs::read(&p).unwrap(), &id, 20).unwrap();
        assert_eq!(d.trust, Trust::Clean);
        assert_eq!(d.bits.count_ones(), 2);
        // Flip a bit: checksum catches it.
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[HEADER_LEN] ^= 0x4;
        assert_eq!(decode(&bytes, &id, 20).unwrap().trust, Trust::Verify);
        // Another image, truncation, wrong chunk count.
        assert!(decode(&bytes, &ImageId([4; 32]), 20)
            .unwrap_err()
            .contains("another image"));
        assert!(decode(&bytes[..66], &id, 20).is_err());
        assert!(decode(&bytes, &id, 21).is_err());
        // Reopen marks dirty again.
        let (_b, trust) = BitmapFile::open(&p, id, 20).unwrap();
        assert_eq!(trust, Trust::Clean);
        let d = decode(&std::fs::read(&p).unwrap(), &id, 20).unwrap();
        assert_eq!(d.trust, Trust::Verify);
    }

    #[test]
    fn peek_and_durable_bit_read_another_cache_s_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bitmap");
        let mut b = BitmapFile::create(&p, ImageId([5; 32]), 20).unwrap();
        b.update(&[0, 9, 19], &[]).unwrap();
        let bits = peek(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(bits.len(), 20);
        assert_eq!(bits.iter_ones().collect::<Vec<_>>(), [0, 9, 19]);
        assert_eq!(durable_bit(&p, 9), Ok(true));
        assert_eq!(durable_bit(&p, 10), Ok(false));
        assert!(durable_bit(&p, 20).unwrap_err().contains("20 units"));
        b.update(&[], &[9]).unwrap();
        assert_eq!(durable_bit(&p, 9), Ok(false));
        // Not a bitmap, truncated, missing.
        let mut bytes = std::fs::read(&p).unwrap();
        assert!(peek(&bytes[..HEADER_LEN + 1]).is_err());
        bytes[0] = b'X';
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(peek(&bytes).unwrap_err(), "bad magic");
        assert_eq!(durable_bit(&p, 0).unwrap_err(), "bad magic");
        assert!(durable_bit(&dir.path().join("none"), 0).is_err());
    }
}
