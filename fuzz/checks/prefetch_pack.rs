//! `PrefetchPack::decode` on arbitrary bytes (a prefetch pack is fetched from next to the
//! manifest, and may be hostile when it is not pinned). Input layout: 8 bytes (LE) give the
//! image size (mod 2^32, so the pack's block checks are reachable), the next 32 the image id,
//! and the rest is the pack file. It must never panic; what it accepts re-encodes to the exact
//! input, names only blocks of that image in ascending order, and its frames fill its blob; and
//! split in two and merged back ([`MetaPack::merge`], as an extending pack is merged after the
//! metadata pack), it is the same pack.

use lazyblk_format::{ImageId, MetaPack, PrefetchPack, PACK_BLOCK};

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
    merge_of_a_split_is_the_pack(&p.pack, usize::from(data[0]));
}

/// Split the accepted pack after `k` frames (mod their number) and merge the two halves back
/// (as an extending prefetch pack is merged after a metadata pack): every block must be found
/// in the frame that held it, and each frame must hold exactly its blocks. Merging a pack with
/// itself must fail naming its first block.
fn merge_of_a_split_is_the_pack(pack: &MetaPack, k: usize) {
    let frames = pack.frames.len();
    if frames == 0 {
        return;
    }
    let k = k % frames;
    let half = |fs: std::ops::Range<usize>| MetaPack {
        blocks: fs
            .clone()
            .flat_map(|f| pack.frame_members(f).to_vec())
            .collect(),
        frame_blocks: pack.frame_blocks,
        frames: pack.frames[fs].to_vec(),
        merged: None,
    };
    let m = MetaPack::merge(&half(0..k), &half(k..frames)).expect("halves share no block");
    assert_eq!(m.blocks, pack.blocks, "merged blocks differ");
    assert_eq!(m.frames, pack.frames, "merged frames differ");
    for f in 0..frames {
        assert_eq!(
            m.frame_members(f),
            pack.frame_members(f),
            "frame {f}'s blocks"
        );
    }
    for pos in 0..pack.blocks.len() {
        assert_eq!(
            m.frame_of(pos),
            pack.frame_of(pos),
            "the frame of position {pos}"
        );
    }
    if let Some(&b) = pack.blocks.first() {
        assert_eq!(
            MetaPack::merge(pack, pack),
            Err(b),
            "a block in both halves"
        );
    }
}
