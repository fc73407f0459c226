//! Prefetch lists (chunks in first-access order) and block lists (4 KiB blocks a workload read):
//! one `u32` list layout for both.

use crate::codec::le_u32;
use crate::error::{Error, Result};
use crate::id::ImageId;

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
pub(crate) fn encode_u32_list(magic: &[u8; 8], image: &ImageId, values: &[u32]) -> Vec<u8> {
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
pub(crate) fn decode_u32_list(
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
