//! `bitmap::decode` on arbitrary bytes. Input layout: 8 bytes (LE) give the expected chunk
//! count (taken modulo 2^20 to bound memory), the next 32 the expected image id, and the rest is
//! the bitmap file. It must never panic; when it accepts, there is exactly one bit per chunk and
//! the bits are the file's. `bitmap::peek` (another cache's bitmap, read without binding it to
//! an image: the host index, `gc`) on the same bytes must never panic either, and when it
//! accepts, its bits are the file's, as many as the header says.

use lazyblk_chunkstore::bitmap::{self, Trust};
use lazyblk_format::ImageId;

/// The check, on one input.
pub fn run(data: &[u8]) {
    if data.len() < 40 {
        return;
    }
    let chunk_count = u64::from_le_bytes(data[..8].try_into().unwrap()) % (1 << 20);
    let id = ImageId(data[8..40].try_into().unwrap());
    let file = &data[40..];
    let peeked = bitmap::peek(file);
    if let Ok(bits) = &peeked {
        let units = u64::from_le_bytes(file[16..24].try_into().unwrap());
        assert_eq!(bits.len() as u64, units, "peek: one bit per unit");
        for (i, b) in bits.iter().enumerate() {
            assert_eq!(
                *b,
                file[bitmap::HEADER_LEN + i / 8] >> (i % 8) & 1 == 1,
                "peek: bit {i}"
            );
        }
    }
    let Ok(d) = bitmap::decode(file, &id, chunk_count) else {
        return;
    };
    assert_eq!(d.bits.len() as u64, chunk_count, "one bit per chunk");
    assert_eq!(
        file.len() as u64,
        bitmap::HEADER_LEN as u64 + chunk_count.div_ceil(8),
        "accepted a file of the wrong length"
    );
    assert_eq!(&file[24..56], &id.0[..], "accepted another image's bitmap");
    assert_eq!(
        peeked.as_ref().ok(),
        Some(&d.bits),
        "peek and decode disagree"
    );
    let raw = &file[bitmap::HEADER_LEN..];
    for i in 0..chunk_count as usize {
        assert_eq!(d.bits[i], raw[i / 8] >> (i % 8) & 1 == 1, "bit {i}");
    }
    if d.trust == Trust::Clean {
        assert_eq!(file[12] & 1, 1, "trusted a file not closed cleanly");
        for i in chunk_count as usize..raw.len() * 8 {
            assert_eq!(
                raw[i / 8] >> (i % 8) & 1,
                0,
                "trusted a file with bit {i} set past the end"
            );
        }
    }
}
