//! lazyblk images in a real Docker registry (Debian's `docker-registry`) end to end: `push` of
//! a build directory, then the chunk store reading the image by reference (`add <ref>` and
//! `cat <ref>` do exactly this), a prefetch pack pushed over it, recover-style pinning, a slow
//! cold read through tokens that keep expiring, blobs redirected to an object store, and bad
//! input that must fail with one clear line and leave nothing cached.

use lazyblk_blocksource::BlockSource;
use lazyblk_builder::{build_image, build_prefetch_pack, BuildOptions};
use lazyblk_chunkstore::{ChunkStore, Location, StoreOptions};
use lazyblk_registry::{Client, ClientOptions, CredentialSource, PushOutcome, Reference, Secret};
use lazyblk_remote::RegistryLocation;
use lazyblk_tests::registry::{Front, ObjectStore, Registry, RegistryAuth, TokenRegistry};
use lazyblk_tests::sample_image;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A built image of `size` bytes in `dir/out`; its bytes.
fn built(dir: &Path, size: usize, seed: u64) -> Vec<u8> {
    let image = sample_image(size, seed);
    let raw = dir.join("image.raw");
    std::fs::write(&raw, &image).unwrap();
    let opts = BuildOptions {
        chunk_size: 16 << 10,
        ..BuildOptions::default()
    };
    build_image(&raw, &dir.join("out"), &opts, |_| {}).unwrap();
    image
}

fn location(r: &str) -> Location {
    let l = Location::parse(r);
    assert!(matches!(l, Location::Registry(_)), "{r} is a reference");
    l
}

fn store_opts(cache: &Path, credentials: CredentialSource) -> StoreOptions {
    let mut o = StoreOptions {
        cache_root: cache.to_path_buf(),
        readahead_bytes: 0,
        ..Default::default()
    };
    o.registry.credentials = credentials;
    o.registry.hosts_dir = Some(cache.join("no-hosts.d"));
    o
}

fn read_all(s: &ChunkStore, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    s.read_at(0, &mut out).unwrap();
    out
}

fn push(client: &Client, dir: &Path, r: &str) -> lazyblk_builder::PushSummary {
    let r = Reference::parse(r).unwrap();
    rt().block_on(lazyblk_builder::push(client, dir, &r, None, &|_, _| {}))
        .unwrap()
}

#[test]
fn a_pushed_image_reads_back_exactly_by_tag_and_by_digest() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(&dir.path().join("reg"), &RegistryAuth::None);
    let image = built(dir.path(), 3 << 20, 7);
    let client = Client::new(ClientOptions::default()).unwrap();
    let tag = format!("{}/lazy/img:v1", reg.host());
    let first = push(&client, &dir.path().join("out"), &tag);
    // Pushing again sends nothing and gives the same manifest digest (deterministic bytes).
    let again = push(&client, &dir.path().join("out"), &tag);
    assert_eq!(first.digest, again.digest);
    assert!(again.files.iter().all(|(_, o)| *o == PushOutcome::Exists));
    assert!(first.files.iter().any(|(f, _)| f.name == "blob"));

    let cache = dir.path().join("cache");
    let s = ChunkStore::open(
        &location(&tag),
        store_opts(&cache, CredentialSource::Anonymous),
    )
    .unwrap();
    assert_eq!(s.id(), first.image);
    assert_eq!(
        s.open_report().resolved.as_deref(),
        Some(first.digest.as_str()),
        "the reference resolved to the manifest pushed"
    );
    assert_eq!(read_all(&s, image.len()), image);
    let fetched = s.stats().chunks_fetched;
    assert!(fetched > 0);
    drop(s);
    // By digest (what `recover` uses): the cache serves, nothing is fetched again.
    let pinned = format!("{}/lazy/img@{}", reg.host(), first.digest);
    let s = ChunkStore::open(
        &location(&pinned),
        store_opts(&cache, CredentialSource::Anonymous),
    )
    .unwrap();
    assert_eq!(read_all(&s, image.len()), image);
    assert_eq!(s.stats().chunks_fetched, 0);
}

#[test]
fn htpasswd_credentials_come_from_a_creds_file_and_never_show() {
    let dir = tempfile::tempdir().unwrap();
    let password = "s3cret-never-printed";
    let reg = Registry::start(
        &dir.path().join("reg"),
        &RegistryAuth::Htpasswd {
            user: "lazy".into(),
            password: password.into(),
        },
    );
    let image = built(dir.path(), 1 << 20, 8);
    let client = Client::new(ClientOptions {
        credentials: CredentialSource::Basic {
            username: "lazy".into(),
            password: Secret::new(password),
        },
        ..Default::default()
    })
    .unwrap();
    let tag = format!("{}/private/img:v1", reg.host());
    push(&client, &dir.path().join("out"), &tag);
    let creds = dir.path().join("creds");
    std::fs::write(&creds, format!("lazy:{password}\n")).unwrap();
    let cache = dir.path().join("cache");
    let s = ChunkStore::open(
        &location(&tag),
        store_opts(&cache, CredentialSource::CredsFile(creds.clone())),
    )
    .unwrap();
    assert_eq!(read_all(&s, image.len()), image);
    drop(s);
    // Wrong credentials: one clear line that names the repository, not the secret; no cache.
    let bad = dir.path().join("bad-creds");
    std::fs::write(&bad, "lazy:wrong-password\n").unwrap();
    let cache2 = dir.path().join("cache2");
    let e = ChunkStore::open(
        &location(&tag),
        store_opts(&cache2, CredentialSource::CredsFile(bad)),
    )
    .err()
    .expect("wrong credentials fail")
    .to_string();
    assert!(!e.contains('\n') && e.contains("private/img"), "{e}");
    assert!(
        !e.contains("wrong-password") && !e.contains(password),
        "{e}"
    );
    assert!(!cache2.exists() || std::fs::read_dir(&cache2).unwrap().next().is_none());
    // Stats and the open report hold no secret either.
    let s = ChunkStore::open(
        &location(&tag),
        store_opts(&cache, CredentialSource::CredsFile(creds)),
    )
    .unwrap();
    let shown = format!("{:?} {:?}", s.stats(), s.open_report());
    assert!(!shown.contains(password), "{shown}");
}

/// A token-auth registry whose tokens the registry itself takes for ~2 s (the JWT's `exp` is 58 s
/// in the past and distribution allows 60 s of clock skew) while the issuer announces 2 s: the
/// store reads the image cold, whole, in 64 KiB pieces over ~8 s, through at least three
/// expiries, with its credentials from a creds file. Exact bytes, no error, ≥ 4 tokens issued.
#[test]
fn a_slow_cold_read_crosses_token_expiries() {
    let dir = tempfile::tempdir().unwrap();
    let (user, password) = ("lazy", "t0ken-pa55");
    let t = TokenRegistry::start(&dir.path().join("reg"), user, password, -58, 2);
    let image = built(dir.path(), 1 << 20, 11);
    let client = Client::new(ClientOptions {
        credentials: CredentialSource::Basic {
            username: user.into(),
            password: Secret::new(password),
        },
        ..Default::default()
    })
    .unwrap();
    let tag = format!("{}/tok/img:v1", t.registry.host());
    push(&client, &dir.path().join("out"), &tag);
    let creds = dir.path().join("creds");
    std::fs::write(&creds, format!("{user}:{password}\n")).unwrap();
    let before = t.issuer.issued.load(Ordering::SeqCst);
    let s = ChunkStore::open(
        &location(&tag),
        store_opts(
            &dir.path().join("cache"),
            CredentialSource::CredsFile(creds),
        ),
    )
    .unwrap();
    let t0 = Instant::now();
    let step = 64 << 10;
    let mut got = vec![0u8; image.len()];
    for (i, piece) in got.chunks_mut(step).enumerate() {
        s.read_at((i * step) as u64, piece)
            .unwrap_or_else(|e| panic!("read at {}: {e}", i * step));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        t0.elapsed() > Duration::from_secs(7),
        "read too fast: {:?}",
        t0.elapsed()
    );
    assert!(got == image, "the bytes read differ from the image");
    let st = s.stats();
    // No retry by the store either: every renewal happened inside the registry client.
    assert_eq!(
        (st.failed_ios, st.verify_failures, st.retries),
        (0, 0, 0),
        "{st:?}"
    );
    assert!(st.chunks_fetched > 0, "{st:?}");
    let issued = t.issuer.issued.load(Ordering::SeqCst) - before;
    assert!(
        issued >= 4,
        "only {issued} tokens issued over {:?}",
        t0.elapsed()
    );
    assert_eq!(t.issuer.refused.load(Ordering::SeqCst), 0);
}

/// A registry that redirects blob reads to an object store (the harness' `Front` before a real
/// registry with htpasswd, and `ObjectStore` serving its files): the store reads the image
/// through the front, exactly, and the registry's `Authorization` never reaches the object store.
#[test]
fn blobs_redirected_to_an_object_store_read_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (user, password) = ("lazy", "redirect-pa55");
    let reg = Registry::start(
        &dir.path().join("reg"),
        &RegistryAuth::Htpasswd {
            user: user.into(),
            password: password.into(),
        },
    );
    let image = built(dir.path(), 2 << 20, 12);
    let client = Client::new(ClientOptions {
        credentials: CredentialSource::Basic {
            username: user.into(),
            password: Secret::new(password),
        },
        ..Default::default()
    })
    .unwrap();
    push(
        &client,
        &dir.path().join("out"),
        &format!("{}/redir/img:v1", reg.host()),
    );
    let store = ObjectStore::start(&reg.storage);
    let front = Front::start(reg.port, &store.server.url());
    let creds = dir.path().join("creds");
    std::fs::write(&creds, format!("{user}:{password}\n")).unwrap();
    let s = ChunkStore::open(
        &location(&format!("{}/redir/img:v1", front.host())),
        store_opts(
            &dir.path().join("cache"),
            CredentialSource::CredsFile(creds),
        ),
    )
    .unwrap();
    assert!(
        read_all(&s, image.len()) == image,
        "the bytes read differ from the image"
    );
    assert!(s.stats().chunks_fetched > 0);
    assert!(
        front.redirected.load(Ordering::SeqCst) > 0,
        "no blob was redirected"
    );
    assert!(
        store.served.load(Ordering::SeqCst) > 0,
        "the object store served nothing"
    );
    assert!(
        !store.saw_authorization.load(Ordering::SeqCst),
        "the registry's Authorization reached the object store"
    );
}

#[test]
fn a_prefetch_pack_pushed_over_the_image_is_used_by_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(&dir.path().join("reg"), &RegistryAuth::None);
    let image = built(dir.path(), 2 << 20, 9);
    let out = dir.path().join("out");
    let client = Client::new(ClientOptions::default()).unwrap();
    let tag = format!("{}/lazy/packed:v1", reg.host());
    let first = push(&client, &out, &tag);
    // A pack of a few blocks (as `trace --pack` writes it), pushed over the image.
    let m =
        lazyblk_format::Manifest::decode(&std::fs::read(out.join("manifest")).unwrap()).unwrap();
    let raw = dir.path().join("image.raw");
    let f = std::fs::File::open(&raw).unwrap();
    let blocks = vec![0u64, 3, 17, 100];
    let pack_dir = dir.path().join("trace");
    std::fs::create_dir_all(&pack_dir).unwrap();
    let pack_path = pack_dir.join("prefetch.pack");
    let mut read = |at: u64, buf: &mut [u8]| std::os::unix::fs::FileExt::read_exact_at(&f, buf, at);
    build_prefetch_pack(first.image, &m, &blocks, &mut read, &pack_path, 3).unwrap();
    let r = Reference::parse(&tag).unwrap();
    let second = rt()
        .block_on(lazyblk_builder::push_pack(
            &client,
            &pack_path,
            &r,
            &|_, _| {},
        ))
        .unwrap();
    assert_ne!(second.digest, first.digest);
    assert_eq!(
        second.image, first.image,
        "the same image, another manifest"
    );
    let sent: Vec<_> = second
        .files
        .iter()
        .filter(|(_, o)| *o != PushOutcome::Exists)
        .map(|(f, _)| f.name.clone())
        .collect();
    assert_eq!(
        sent.len(),
        2,
        "only the pack and its blob were sent: {sent:?}"
    );
    let s = ChunkStore::open(
        &location(&tag),
        store_opts(&dir.path().join("cache"), CredentialSource::Anonymous),
    )
    .unwrap();
    assert!(
        s.open_report().prefetch_pack.is_some(),
        "the pushed pack is in use"
    );
    assert_eq!(read_all(&s, image.len()), image);
}

#[test]
fn bad_references_fail_with_one_line_and_cache_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(&dir.path().join("reg"), &RegistryAuth::None);
    built(dir.path(), 1 << 20, 10);
    let client = Client::new(ClientOptions::default()).unwrap();
    let tag = format!("{}/lazy/img:v1", reg.host());
    let pushed = push(&client, &dir.path().join("out"), &tag);
    let cache = dir.path().join("cache");
    let open = |r: &str| {
        ChunkStore::open(
            &location(r),
            store_opts(&cache, CredentialSource::Anonymous),
        )
        .err()
        .unwrap_or_else(|| panic!("{r} opened"))
        .to_string()
    };
    let cases = [
        (format!("{}/nope/img:v1", reg.host()), "nope/img"),
        (format!("{}/lazy/img:v9", reg.host()), "v9"),
        (
            format!("{}/lazy/img@sha256:{}", reg.host(), "0".repeat(64)),
            "lazy/img",
        ),
    ];
    for (r, names) in &cases {
        let e = open(r);
        assert!(!e.contains('\n') && e.contains(names), "{r}: {e}");
    }
    // An ordinary container image has no lazy version: the error says how to make one.
    let plain = format!("{}/plain/img:v1", reg.host());
    let pr = Reference::parse(&plain).unwrap();
    rt().block_on(async {
        let cfg = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let cd = lazyblk_registry::manifest::sha256_digest(cfg);
        client
            .push_blob(&pr, &cd, cfg.len() as u64, lazyblk_registry::BlobSource::Bytes(bytes::Bytes::from_static(cfg)), None)
            .await
            .unwrap();
        let m = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cfg.len()}, "layers": []});
        client
            .push_manifest(&pr, "v1", "application/vnd.oci.image.manifest.v1+json", serde_json::to_vec(&m).unwrap().into())
            .await
            .unwrap();
    });
    let e = open(&plain);
    assert!(
        e.contains("not a lazyblk image") && e.contains("lazyblk convert"),
        "{e}"
    );
    // Nothing was cached by any of them.
    let dirs: Vec<_> = std::fs::read_dir(&cache)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(dirs.is_empty(), "{dirs:?}");
    // The good one still opens.
    let ok = format!("{}/lazy/img@{}", reg.host(), pushed.digest);
    ChunkStore::open(
        &location(&ok),
        store_opts(&cache, CredentialSource::Anonymous),
    )
    .unwrap();
}

#[test]
fn registry_locations_name_their_file() {
    let Location::Registry(RegistryLocation { reference, name }) =
        Location::parse("127.0.0.1:5000/a/b:v1").sibling("prefetch")
    else {
        panic!()
    };
    assert_eq!(reference.to_string(), "127.0.0.1:5000/a/b:v1");
    assert_eq!(name, "prefetch");
}
