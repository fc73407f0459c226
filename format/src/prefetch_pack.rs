//! The prefetch pack: a workload's blocks, densely, in a blob of their own next to the image.

use crate::codec::*;
use crate::error::{Error, Result};
use crate::id::ImageId;
use crate::manifest::*;
use crate::metapack::*;

/// Magic bytes of a prefetch pack.
pub const PACK_MAGIC: &[u8; 8] = b"LZBLKPP1";
/// File name of the prefetch pack, served next to the manifest (its blob next to it, under the
/// name the pack gives).
pub const PACK_FILE: &str = "prefetch.pack";
pub(crate) const PACK_FILE_HEADER_LEN: usize = 72;
/// Header flag: the pack extends the image's metadata pack (see [`PrefetchPack::extends`]).
pub const PACK_FLAG_EXTENDS: u32 = 1;

/// A prefetch pack: the 4 KiB blocks a workload read (`lazyblk trace --pack`), stored densely
/// in frames in a blob of their own, published next to an image without changing it, so a
/// container start fetches a few frames instead of every chunk it touches.
///
/// A pack that [extends](PrefetchPack::extends) the image's metadata pack holds none of its
/// blocks: a store fetches the metadata pack's frames first and this pack's after them, so a
/// metadata read never waits behind the workload's data blocks. A pack without the flag (as
/// written before it existed) holds the metadata blocks too and replaces the metadata pack.
///
/// The chunk digests cannot vouch for single blocks: the frames are pinned by this file, and
/// this file is pinned by its own SHA-256 (`add --pack-digest`), or trusted like an unpinned
/// manifest. Layout (little endian): magic `LZBLKPP1`, version (`u32`, 1), flags (`u32`, 0),
/// the image id (32 bytes), the image size (`u64`), the blob size (`u64`), the blob name length
/// (`u16`), 6 zero bytes, the name, zero padding to 8, then a pack section laid out like the
/// manifest's, its frames back to back from offset 0 of the blob. Flags: bit 0,
/// [`PACK_FLAG_EXTENDS`]; the others are zero.
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
    /// Whether the pack adds to the image's metadata pack ([`PACK_FLAG_EXTENDS`]): none of
    /// its blocks is in it, and its frames are fetched after the metadata pack's. Otherwise
    /// it replaces the metadata pack.
    pub extends: bool,
}

impl PrefetchPack {
    /// Encode to bytes (the pack's identity is [`ImageId::of`] these bytes).
    pub fn encode(&self) -> Vec<u8> {
        let name = self.blob_name.as_bytes();
        let pack_at = pad8(PACK_FILE_HEADER_LEN + name.len());
        let mut out = vec![0u8; pack_at + pack_section_len(&self.pack)];
        out[0..8].copy_from_slice(PACK_MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        if self.extends {
            out[12..16].copy_from_slice(&PACK_FLAG_EXTENDS.to_le_bytes());
        }
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
        if le_u32(b, 8) != VERSION || le_u32(b, 12) & !PACK_FLAG_EXTENDS != 0 {
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
            extends: le_u32(b, 12) & PACK_FLAG_EXTENDS != 0,
        })
    }

    /// The manifest `m` of the image as a store uses it with this pack: its frames placed
    /// after the image's blob (`blob_size` grows by the pack's blob: a remote that reads the
    /// two blobs as one serves them). A pack that extends the metadata pack is
    /// [merged](MetaPack::merge) after it (the metadata frames stay the first units); another
    /// replaces it. An extending pack that holds a block of the metadata pack is an error.
    pub fn apply(&self, m: &Manifest) -> Result<Manifest> {
        let base = m.blob_size;
        let mut pack = self.pack.clone();
        for f in &mut pack.frames {
            f.blob_offset += base;
        }
        let pack = match (&m.pack, self.extends) {
            (Some(meta), true) => MetaPack::merge(meta, &pack).map_err(|b| {
                Error::Invalid(format!(
                    "malformed prefetch pack: block {b} is in the image's metadata pack too"
                ))
            })?,
            _ => pack,
        };
        Ok(Manifest {
            blob_size: base + self.blob_size,
            pack: Some(pack),
            ..m.clone()
        })
    }
}

#[cfg(test)]
mod prefetch_pack_tests {
    use super::*;

    fn sample() -> (Manifest, PrefetchPack) {
        let m = crate::manifest::tests::sample();
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
                merged: None,
            },
            extends: false,
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
        let eff = p.apply(&m).unwrap();
        assert_eq!(eff.blob_size, 370);
        let ep = eff.pack.as_ref().unwrap();
        assert_eq!(ep.frames[0].blob_offset, 300);
        assert_eq!(ep.frames[1].blob_offset, 330);
        assert!(eff.entries_contiguous());
        assert_eq!(eff.unit_count(), m.chunk_count() + 2);
    }

    #[test]
    fn an_extending_pack_merges_after_the_metadata_pack() {
        // The metadata pack: blocks 0 and 2 in frame 0, block 3 in frame 1; the prefetch pack
        // adds block 1 in a frame of its own.
        let m = crate::manifest::tests::sample_with_pack();
        let mut p = PrefetchPack {
            image: ImageId::of(&m.encode()),
            image_size: m.image_size,
            blob_name: "prefetch.pack.blob".into(),
            blob_size: 30,
            pack: MetaPack {
                blocks: vec![1],
                frame_blocks: 64,
                frames: vec![Entry {
                    digest: [7; 32],
                    blob_offset: 0,
                    stored_len: 30,
                    encoding: Encoding::Zstd,
                }],
                merged: None,
            },
            extends: true,
        };
        let b = p.encode();
        assert_eq!(le_u32(&b, 12), PACK_FLAG_EXTENDS);
        assert_eq!(PrefetchPack::decode(&b, &p.image, m.image_size).unwrap(), p);
        let mut other_flags = b.clone();
        other_flags[12] = 2;
        assert!(PrefetchPack::decode(&other_flags, &p.image, m.image_size).is_err());

        let eff = p.apply(&m).unwrap();
        assert_eq!(eff.blob_size, 480);
        assert!(eff.entries_contiguous(), "metadata frames, then the pack's");
        assert_eq!(eff.frame_count(), 3);
        let ep = eff.pack.as_ref().unwrap();
        assert_eq!(ep.blocks, vec![0, 1, 2, 3]);
        assert_eq!(ep.frame_members(0), &[0, 2]);
        assert_eq!(ep.frame_members(1), &[3]);
        assert_eq!(ep.frame_members(2), &[1]);
        assert_eq!(ep.frames[2].blob_offset, 450);
        assert_eq!((ep.frame_of(0), ep.frame_of(1), ep.frame_of(3)), (0, 2, 1));
        assert_eq!(ep.frame_raw_len(2, m.image_size), 4096);
        assert_eq!(ep.frame_raw_len(1, m.image_size), 100);
        assert_eq!(ep.covers(0, 3), Some(0..4));
        assert_eq!(ep.frame_of(2), 0);

        // Without the flag the same pack replaces the metadata pack.
        p.extends = false;
        assert_eq!(p.apply(&m).unwrap().pack.unwrap().blocks, vec![1]);
        // An extending pack may not repeat a metadata block.
        p.extends = true;
        p.pack.blocks = vec![2];
        let e = p.apply(&m).unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed prefetch pack: block 2 is in the image's metadata pack too"
        );
    }
}
