//! A fleet behind a caching mirror: 16 clients with cold caches read the same lazyblk image
//! through one nginx `proxy_cache` mirror (slice module) in front of a real docker-registry.
//! The origin serves the image's blob about once; then the mirror is killed in the middle of
//! the reads and every client finishes with the right bytes from the origin.

use lazyblk_blocksource::BlockSource;
use lazyblk_builder::{build_image, BuildOptions};
use lazyblk_chunkstore::{ChunkStore, Location, StoreOptions};
use lazyblk_registry::{Client, ClientOptions, CredentialSource, Reference};
use lazyblk_tests::nginx::Nginx;
use lazyblk_tests::registry::{Registry, RegistryAuth};
use lazyblk_tests::sample_image;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const CLIENTS: usize = 16;

fn opts(cache: &Path, mirror: &str) -> StoreOptions {
    let mut o = StoreOptions {
        cache_root: cache.to_path_buf(),
        ..Default::default()
    };
    o.registry.credentials = CredentialSource::Anonymous;
    o.registry.hosts_dir = Some(cache.join("no-hosts.d"));
    o.registry.mirrors = vec![format!("http://{mirror}")];
    o.registry.mirror_backoff = std::time::Duration::from_secs(600);
    o
}

/// Read the whole image in 256 KiB pieces, counting bytes read into `progress`.
fn read_whole(s: &ChunkStore, len: usize, progress: &AtomicU64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for (i, piece) in out.chunks_mut(256 << 10).enumerate() {
        s.read_at((i * (256 << 10)) as u64, piece)
            .unwrap_or_else(|e| panic!("read at {}: {e}", i * (256 << 10)));
        progress.fetch_add(piece.len() as u64, Ordering::Relaxed);
    }
    out
}

/// Open `CLIENTS` stores (cold caches under `root`) on `tag` through `mirror` and read the
/// image with all of them at once; `during` runs once a quarter of all the bytes are read.
fn fleet(root: &Path, tag: &str, mirror: &str, image: &Arc<Vec<u8>>, during: impl FnOnce()) {
    let progress = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (cache, tag, mirror) = (
                root.join(format!("c{i}")),
                tag.to_string(),
                mirror.to_string(),
            );
            let (image, progress) = (image.clone(), progress.clone());
            std::thread::spawn(move || {
                let s = ChunkStore::open(&Location::parse(&tag), opts(&cache, &mirror))
                    .unwrap_or_else(|e| panic!("client {i}: {e}"));
                let got = read_whole(&s, image.len(), &progress);
                assert!(got == *image, "client {i} read wrong bytes");
            })
        })
        .collect();
    let total = (CLIENTS * image.len()) as u64;
    let t0 = std::time::Instant::now();
    while progress.load(Ordering::Relaxed) < total / 4 {
        assert!(t0.elapsed().as_secs() < 300, "the fleet made no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    during();
    for r in readers {
        r.join().expect("a client failed");
    }
}

#[test]
fn sixteen_cold_clients_behind_a_caching_mirror_fetch_the_blob_about_once() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(&dir.path().join("reg"), &RegistryAuth::None);
    // The origin as the fleet sees it: a plain proxy whose access log counts what it served.
    let mut origin = Nginx::proxy(reg.port, &dir.path().join("origin"));
    let image = Arc::new(sample_image(24 << 20, 21));
    let raw = dir.path().join("image.raw");
    std::fs::write(&raw, &*image).unwrap();
    let out = dir.path().join("out");
    build_image(&raw, &out, &BuildOptions::default(), |_| {}).unwrap();
    let blob_size = std::fs::metadata(out.join("blob")).unwrap().len();
    let tag = format!("{}/fleet/img:v1", origin.host());
    let client = Client::new(ClientOptions::default()).unwrap();
    let r = Reference::parse(&tag).unwrap();
    let pushed = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(lazyblk_builder::push(&client, &out, &r, None, &|_, _| {}))
        .unwrap();
    let blob_digest = pushed
        .files
        .iter()
        .find(|(f, _)| f.name == "blob")
        .map(|(f, _)| f.digest.clone())
        .unwrap();
    let blob_path = format!("/blobs/{blob_digest}");
    let before = origin.served_matching(&blob_path).1;

    let mirror = Nginx::caching_mirror(origin.port, &dir.path().join("mirror"));
    fleet(
        &dir.path().join("fleet1"),
        &tag,
        &mirror.host(),
        &image,
        || {},
    );
    let from_origin = origin.served_matching(&blob_path).1 - before;
    let through_mirror = mirror.served_matching(&blob_path).1;
    eprintln!(
        "blob {blob_size} bytes: the origin served {from_origin}, the mirror {through_mirror} to {CLIENTS} clients"
    );
    assert!(
        through_mirror >= CLIENTS as u64 * blob_size * 9 / 10,
        "the clients did not read through the mirror ({through_mirror} bytes)"
    );
    assert!(
        from_origin * 10 <= blob_size * 12,
        "the origin served {from_origin} bytes of a {blob_size}-byte blob to the fleet (> 1.2x)"
    );

    // A second fleet on a fresh mirror: the mirror dies a quarter of the way through.
    let mut mirror2 = Nginx::caching_mirror(origin.port, &dir.path().join("mirror2"));
    let host2 = mirror2.host();
    fleet(&dir.path().join("fleet2"), &tag, &host2, &image, || {
        mirror2.kill()
    });
    let (_, after) = origin.served_matching(&blob_path);
    assert!(
        after > before + from_origin,
        "after the mirror died the clients did not go on at the origin"
    );
    origin.kill();
}
