//! The chunk store against a real nginx and against the fault-injecting server.

mod fetch;
mod hostindex;
mod hostlimit;
mod open;
mod pack;
mod pagecache;
mod policy;

use lazyblk_blocksource::{BlockError, BlockSource};
use lazyblk_builder::{build_image, build_prefetch_pack, BuildOptions, BuildSummary, PackBlocks};
use lazyblk_chunkstore::{ChunkStore, Error, Location, StoreOptions};
use lazyblk_format::{BlockList, ChunkRef, ImageId, Manifest, PACK_FILE};
use lazyblk_remote::HttpOptions;
use lazyblk_tests::fault::{Fault, FaultServer};
use lazyblk_tests::nginx::Nginx;
use lazyblk_tests::sample_image;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct Fixture {
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) root: PathBuf,
    pub(crate) serve: PathBuf,
    pub(crate) image: Vec<u8>,
    pub(crate) id: ImageId,
    pub(crate) chunk_size: u32,
}

pub(crate) fn fixture(size: usize, chunk_size: u32, seed: u64) -> Fixture {
    let build = BuildOptions {
        chunk_size,
        ..Default::default()
    };
    fixture_built(size, seed, &build).0
}

/// A sample image of `size` bytes built with `build` into `www/`.
pub(crate) fn fixture_built(
    size: usize,
    seed: u64,
    build: &BuildOptions,
) -> (Fixture, BuildSummary) {
    fixture_of(sample_image(size, seed), build)
}

/// `image` built with `build` into `www/`.
pub(crate) fn fixture_of(image: Vec<u8>, build: &BuildOptions) -> (Fixture, BuildSummary) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    std::fs::write(root.join("raw.img"), &image).unwrap();
    let serve = root.join("www");
    let s = build_image(&root.join("raw.img"), &serve, build, |_| {}).unwrap();
    let f = Fixture {
        _dir: dir,
        root,
        serve,
        image,
        id: s.id,
        chunk_size: build.chunk_size,
    };
    (f, s)
}

pub(crate) fn opts(f: &Fixture) -> StoreOptions {
    StoreOptions {
        cache_root: f.root.join("cache"),
        http: HttpOptions {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        },
        io_deadline: Some(Duration::from_secs(20)),
        ..Default::default()
    }
}

pub(crate) fn padded(image: &[u8]) -> Arc<Vec<u8>> {
    let mut v = image.to_vec();
    v.resize(image.len().div_ceil(4096) * 4096, 0);
    Arc::new(v)
}

pub(crate) fn read_all(store: &ChunkStore, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    for (i, c) in buf.chunks_mut(300_000).enumerate() {
        store.read_at(i as u64 * 300_000, c).unwrap();
    }
    buf
}

pub(crate) fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A store over `srv` with the test options and a readahead window of `chunks`.
pub(crate) fn open_with_readahead(f: &Fixture, srv: &FaultServer, chunks: u64) -> ChunkStore {
    let o = StoreOptions {
        readahead_bytes: chunks * u64::from(f.chunk_size),
        ..opts(f)
    };
    ChunkStore::open(&Location::parse(&srv.url("manifest")), o).unwrap()
}

/// First stored chunk at or after `from` whose next `n` chunks are stored too (so a miss there
/// with readahead is one multi-chunk request).
pub(crate) fn stored_run_start(store: &ChunkStore, from: u64, n: u64) -> u64 {
    let m = store.manifest();
    (from..m.chunk_count() - n)
        .find(|&i| (i..i + n).all(|c| matches!(m.chunk(c), ChunkRef::Stored(_))))
        .expect("a run of stored chunks")
}

/// A 2 MiB image in 64 KiB chunks whose every 7th 4 KiB block (74 blocks, spread over all 32
/// chunks, blocks 0 to 511) is in the metadata pack, in frames of 64 blocks (frame 1: blocks
/// 448 to 511).
pub(crate) fn fixture_with_pack(seed: u64) -> (Fixture, Vec<u64>) {
    let blocks: Vec<u64> = (0..512).step_by(7).collect();
    let build = BuildOptions {
        chunk_size: 64 << 10,
        metadata_pack: PackBlocks::Blocks(blocks.clone()),
        ..Default::default()
    };
    let (f, s) = fixture_built(2 << 20, seed, &build);
    assert_eq!(s.pack_blocks, 74);
    (f, blocks)
}

pub(crate) fn read_block(store: &ChunkStore, b: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    store.read_at(b * 4096, &mut buf).unwrap();
    buf
}

pub(crate) fn image_block(f: &Fixture, b: u64) -> &[u8] {
    &f.image[b as usize * 4096..(b as usize + 1) * 4096]
}
