//! Structure-aware round trip: build a manifest that obeys every rule of the format from the
//! fuzzer's bytes (via `arbitrary`), then `encode` -> `decode` must give it back unchanged, and
//! re-encoding must give the same bytes.
//!
//! The generator below is written from the format's rules, not from the decoder, and builds
//! only valid manifests, so a rejection is reported as a failure (rather than skipped): either
//! the decoder refuses something the format allows, or the generator breaks a rule; the panic
//! message says which rule the decoder named. Rules followed:
//! * chunk size a power of two in 4 KiB..=64 MiB; chunk count = ceil(image size / chunk size);
//! * map entries are 0 (zero chunk) or 1..=unique, and every entry is used by some chunk;
//! * 0 < stored_len <= chunk_size + chunk_size/128 + 4096; entries lie back to back in the blob
//!   from offset 0 and their lengths add up to blob_size (offsets are implied by the encoding);
//! * a Raw entry is stored uncompressed, so its stored_len equals the length of every chunk that
//!   uses it (an entry shared by full chunks and the short last chunk can only be Zstd);
//! * the blob name is 1..=255 bytes, one path component (no '/' or '\'), not "." or "..", and
//!   has no control characters;
//! * an optional metadata pack: 1.. strictly ascending 4 KiB block numbers inside the image,
//!   1..=1024 blocks per frame, one frame per group, stored after the entries with the same
//!   length rules against the frame's raw length (its blocks, the image's last one maybe short);
//! * optional shared blobs: the first entries cut at entry boundaries into 1.. non-empty
//!   groups, each a blob of its own with a distinct valid name (not the own blob's), before
//!   the own blob; the pack's frames are in the own blob.

use arbitrary::{Arbitrary, Result, Unstructured};
use lazyblk_format::{
    Encoding, Entry, Manifest, MetaPack, SharedBlob, MAX_CHUNK_SIZE, MAX_PACK_FRAME_BLOCKS,
    MIN_CHUNK_SIZE, PACK_BLOCK,
};
use std::collections::HashMap;

/// Keeps one input cheap: a manifest of at most this many chunks (~16 KiB of map).
const MAX_CHUNKS: u32 = 4096;

pub struct ValidManifest(Manifest);

impl std::fmt::Debug for ValidManifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.0;
        write!(
            f,
            "Manifest {{ image_size: {}, chunk_size: {}, blob_size: {}, blob_name: {:?}, chunks: {}, entries: {} }}",
            m.image_size,
            m.chunk_size,
            m.blob_size,
            m.blob_name,
            m.map.len(),
            m.entries.len()
        )
    }
}

fn blob_name(u: &mut Unstructured<'_>) -> Result<String> {
    let s: &str = u.arbitrary()?;
    let mut name = String::new();
    for c in s
        .chars()
        .filter(|&c| c != '/' && c != '\\' && !c.is_control())
    {
        if name.len() + c.len_utf8() > 255 {
            break;
        }
        name.push(c);
    }
    if name.is_empty() || name == "." || name == ".." {
        name = "blob".into();
    }
    Ok(name)
}

impl<'a> Arbitrary<'a> for ValidManifest {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let shift_lo = MIN_CHUNK_SIZE.trailing_zeros();
        let shift_hi = MAX_CHUNK_SIZE.trailing_zeros();
        let chunk_size = 1u32 << u.int_in_range(shift_lo..=shift_hi)?;
        let cs = u64::from(chunk_size);
        let chunk_count = u64::from(u.int_in_range(0..=MAX_CHUNKS)?);
        let image_size = match chunk_count {
            0 => 0,
            n => (n - 1) * cs + u64::from(u.int_in_range(1..=chunk_size)?),
        };
        let chunk_len = |i: u64| (image_size - i * cs).min(cs) as u32;

        // Map: draw labels, then number the nonzero ones 1, 2, ... in order of first use, so
        // that every entry is used by at least one chunk.
        let labels = u.int_in_range(0..=chunk_count as u32)?;
        let mut number: HashMap<u32, u32> = HashMap::new();
        let mut map = Vec::with_capacity(chunk_count as usize);
        for _ in 0..chunk_count {
            let label = u.int_in_range(0..=labels)?;
            let k = if label == 0 {
                0
            } else {
                let next = number.len() as u32 + 1;
                *number.entry(label).or_insert(next)
            };
            map.push(k);
        }
        let unique = number.len();

        // The one chunk length shared by all users of each entry, if there is one.
        let mut len_of: Vec<Option<Option<u32>>> = vec![None; unique];
        for (i, &k) in map.iter().enumerate() {
            if k > 0 {
                let l = chunk_len(i as u64);
                let slot = &mut len_of[k as usize - 1];
                *slot = match *slot {
                    None => Some(Some(l)),
                    Some(Some(prev)) if prev == l => Some(Some(l)),
                    _ => Some(None),
                };
            }
        }

        let max_stored = (cs + (cs >> 7) + 4096) as u32;
        let mut blob_offset = 0u64;
        let mut entries = Vec::with_capacity(unique);
        for shared_len in len_of {
            let digest: [u8; 32] = u.arbitrary()?;
            let (stored_len, encoding) = match shared_len.flatten() {
                Some(l) if u.arbitrary::<bool>()? => (l, Encoding::Raw),
                _ => (u.int_in_range(1..=max_stored)?, Encoding::Zstd),
            };
            entries.push(Entry {
                digest,
                blob_offset,
                stored_len,
                encoding,
            });
            blob_offset += u64::from(stored_len);
        }
        // Optional shared blobs: groups of the first entries, cut at entry boundaries.
        let mut shared = Vec::new();
        if !entries.is_empty() && u.ratio(1, 3)? {
            let mut at = 0usize;
            while at < entries.len() && shared.len() < 4 {
                let n = u.int_in_range(1..=entries.len() - at)?;
                let size = entries[at..at + n]
                    .iter()
                    .map(|e| u64::from(e.stored_len))
                    .sum();
                shared.push(SharedBlob {
                    name: format!("shared-{}", shared.len()),
                    size,
                });
                at += n;
                if u.arbitrary::<bool>()? {
                    break;
                }
            }
        }
        // An optional metadata pack: ascending blocks inside the image, frames after the
        // entries, raw frames exactly as long as their blocks.
        let image_blocks = image_size.div_ceil(PACK_BLOCK);
        let pack = if image_blocks > 0 && u.arbitrary::<bool>()? {
            let frame_blocks = u.int_in_range(1..=MAX_PACK_FRAME_BLOCKS)?;
            let mut blocks = Vec::new();
            let mut next = u64::from(u.int_in_range(0..=7u32)?);
            while next < image_blocks.min(u64::from(u32::MAX)) && blocks.len() < 4096 {
                blocks.push(next as u32);
                next += 1 + u64::from(u.int_in_range(0..=15u32)?);
                if blocks.len() > 1 && u.ratio(1, 8)? {
                    break;
                }
            }
            if blocks.is_empty() {
                // A pack holds at least one block (the first one drawn lay past the image).
                blocks.push(0);
            }
            let mut p = MetaPack {
                blocks,
                frame_blocks,
                frames: Vec::new(),
                merged: None,
            };
            for f in 0..p.blocks.len().div_ceil(frame_blocks as usize) {
                let raw = p.frame_raw_len(f, image_size);
                let (stored_len, encoding) = if u.arbitrary::<bool>()? {
                    (raw as u32, Encoding::Raw)
                } else {
                    (
                        u.int_in_range(1..=(raw + (raw >> 7) + 4096) as u32)?,
                        Encoding::Zstd,
                    )
                };
                p.frames.push(Entry {
                    digest: u.arbitrary()?,
                    blob_offset,
                    stored_len,
                    encoding,
                });
                blob_offset += u64::from(stored_len);
            }
            Some(p)
        } else {
            None
        };
        let blob_size = blob_offset;
        let mut name = blob_name(u)?;
        if name.starts_with("shared-") {
            name = "blob".into();
        }
        Ok(ValidManifest(Manifest {
            image_size,
            chunk_size,
            blob_size,
            blob_name: name,
            shared,
            map,
            entries,
            pack,
        }))
    }
}

/// The check, on one input.
pub fn run(v: ValidManifest) {
    let m = &v.0;
    assert!(
        m.entries_contiguous(),
        "generator bug: entries not back to back"
    );
    let bytes = m.encode();
    let back = match Manifest::decode(&bytes) {
        Ok(back) => back,
        Err(e) => panic!("decode rejected a valid manifest: {e}\n{v:?}"),
    };
    assert!(back == *m, "decode(encode(m)) != m for {v:?}");
    assert!(
        back.encode() == bytes,
        "re-encoding changed the bytes for {v:?}"
    );
    // One byte short or one byte long can never be valid.
    assert!(
        Manifest::decode(&bytes[..bytes.len() - 1]).is_err(),
        "truncated manifest accepted"
    );
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(
        Manifest::decode(&longer).is_err(),
        "manifest with a trailing byte accepted"
    );
}
