//! `BlockList::decode` on arbitrary bytes (a block list is handed to `lazyblk build
//! --pack-blocks`, and may come from anywhere). It must never panic; what it accepts re-encodes
//! to the exact input and is strictly ascending.

use lazyblk_format::BlockList;

/// The check, on one input.
pub fn run(data: &[u8]) {
    let Ok(l) = BlockList::decode(data) else {
        return;
    };
    assert!(
        l.encode() == data,
        "accepted list does not re-encode to its input"
    );
    assert!(
        l.blocks.windows(2).all(|w| w[0] < w[1]),
        "accepted blocks out of order"
    );
}
