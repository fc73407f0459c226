//! `PrefetchPack::decode` on arbitrary bytes (a prefetch pack is fetched from next to the
//! manifest, and may be hostile when it is not pinned). Input layout: 8 bytes (LE) give the
//! image size (mod 2^32, so the pack's block checks are reachable), the next 32 the image id,
//! and the rest is the pack file. It must never panic; what it accepts re-encodes to the exact
//! input, names only blocks of that image in ascending order, and its frames fill its blob.

use lazyblk_format::{ImageId, PrefetchPack, PACK_BLOCK};

/// The check, on one input.
pub fn run(data: &[u8]) {
    if data.len() < 40 {
        return;
    }
    let image_size = u64::from_le_bytes(data[..8].try_into().unwrap()) & 0xffff_ffff;
    let id = ImageId(data[8..40].try_into().unwrap());
    let file = &data[40..];
    let Ok(p) = PrefetchPack::decode(file, &id, image_size) else {
        return;
    };
    assert!(p.image == id, "accepted another image's pack");
    assert!(
        p.encode() == file,
        "accepted pack does not re-encode to its input"
    );
    let blocks = &p.pack.blocks;
    assert!(
        blocks.windows(2).all(|w| w[0] < w[1]),
        "blocks out of order"
    );
    assert!(
        blocks
            .iter()
            .all(|&b| u64::from(b) < image_size.div_ceil(PACK_BLOCK)),
        "block beyond the image"
    );
    assert_eq!(
        p.pack.stored_bytes(),
        p.blob_size,
        "frames do not fill the blob"
    );
    let mut at = 0;
    for f in &p.pack.frames {
        assert_eq!(f.blob_offset, at, "frames not back to back");
        at += u64::from(f.stored_len);
    }
}
