//! The header of a COW layer's `bitmap` file: written once, when the layer is created, and never
//! changed afterwards (so a crash can never tear it).

/// Bytes reserved for the header; the presence bits start at this offset.
pub const HEADER_LEN: u64 = 4096;
const MAGIC: &[u8; 8] = b"LZBKCOW1";
const VERSION: u32 = 1;
/// Longest identity string stored in the header.
pub const MAX_IDENTITY: usize = 1024;

/// What a COW layer was created for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// COW granularity in bytes.
    pub block_size: u32,
    /// Size of the device in bytes.
    pub size: u64,
    /// Number of blocks (`size` rounded up to `block_size`).
    pub blocks: u64,
    /// Identity of the base image (e.g. `sha256:...`), checked when the layer is reopened.
    pub identity: String,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Header {
    /// Serialize into exactly [`HEADER_LEN`] bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..32].copy_from_slice(&self.blocks.to_le_bytes());
        let id = self.identity.as_bytes();
        let n = id.len().min(MAX_IDENTITY);
        b[32..34].copy_from_slice(&(n as u16).to_le_bytes());
        b[34..34 + n].copy_from_slice(&id[..n]);
        let sum = fnv1a(&b[..HEADER_LEN as usize - 8]);
        b[HEADER_LEN as usize - 8..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parse a header; `Err` says what is wrong with it.
    pub fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_LEN as usize {
            return Err(format!(
                "header is {} bytes, expected {HEADER_LEN}",
                b.len()
            ));
        }
        let b = &b[..HEADER_LEN as usize];
        if &b[0..8] != MAGIC {
            return Err("not a lazyblk COW bitmap (bad magic)".into());
        }
        let sum = u64::from_le_bytes(b[HEADER_LEN as usize - 8..].try_into().expect("8 bytes"));
        if sum != fnv1a(&b[..HEADER_LEN as usize - 8]) {
            return Err("header checksum mismatch".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!("unsupported COW format version {version}"));
        }
        let n = usize::from(u16::from_le_bytes([b[32], b[33]]));
        if n > MAX_IDENTITY {
            return Err("identity too long".into());
        }
        let identity =
            String::from_utf8(b[34..34 + n].to_vec()).map_err(|_| "identity is not UTF-8")?;
        let h = Header {
            block_size: u32_at(12),
            size: u64_at(16),
            blocks: u64_at(24),
            identity,
        };
        if !h.block_size.is_power_of_two()
            || h.block_size < 512
            || h.blocks != h.size.div_ceil(u64::from(h.block_size))
        {
            return Err("inconsistent geometry in the header".into());
        }
        Ok(h)
    }

    /// Length of the bitmap file: header plus one bit per block, in whole 64-bit words.
    pub fn file_len(&self) -> u64 {
        HEADER_LEN + self.words() as u64 * 8
    }

    /// Number of 64-bit words of presence bits.
    pub fn words(&self) -> usize {
        self.blocks.div_ceil(64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let h = Header {
            block_size: 4096,
            size: 10 << 20,
            blocks: (10 << 20) / 4096,
            identity: "sha256:abc".into(),
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b).unwrap(), h);
        for i in [0usize, 9, 20, 40, 4090] {
            let mut c = b.clone();
            c[i] ^= 1;
            assert!(Header::decode(&c).is_err(), "flip at {i} not detected");
        }
        assert!(Header::decode(&b[..100]).is_err());
    }
}
