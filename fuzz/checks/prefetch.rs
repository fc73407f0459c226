//! `PrefetchList::decode` on arbitrary bytes (the list is fetched from the same untrusted place
//! as the manifest). Input layout: 8 bytes (LE) give the image's chunk count, the next 32 the
//! image id, and the rest is the list file. It must never panic; what it accepts re-encodes to
//! the exact input and names only chunks of that image.

use lazyblk_format::{ImageId, PrefetchList};

/// The check, on one input.
pub fn run(data: &[u8]) {
    if data.len() < 40 {
        return;
    }
    let chunk_count = u64::from_le_bytes(data[..8].try_into().unwrap());
    let id = ImageId(data[8..40].try_into().unwrap());
    let file = &data[40..];
    let Ok(p) = PrefetchList::decode(file, &id, chunk_count) else {
        return;
    };
    assert!(p.image == id, "accepted another image's list");
    assert!(
        p.encode() == file,
        "accepted list does not re-encode to its input"
    );
    assert!(
        p.chunks.iter().all(|&c| u64::from(c) < chunk_count),
        "chunk beyond the image"
    );
}
