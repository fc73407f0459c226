//! The registry client (`lazyblk-registry`) against a real Docker registry (Debian's
//! `docker-registry`, distribution 2.8) on loopback: anonymous, htpasswd and token auth (tokens
//! that expire during a read), errors, redirects to an object store, broken mirrors, and HTTPS
//! with a self-signed certificate.
//! These tests need `docker-registry` and `htpasswd` (scripts/setup installs them) and fail
//! without them.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lazyblk_registry::manifest::{sha256_digest, OCI_INDEX, OCI_MANIFEST};
use lazyblk_registry::{
    link, BlobSource, Client, ClientOptions, CredentialSource, ErrorClass, ErrorKind, Platform,
    PushOutcome, Reference, Secret,
};
use lazyblk_tests::registry::{
    broken_mirror, lying_mirror, Front, ObjectStore, ReferrersFront, Registry, RegistryAuth,
    TokenRegistry,
};
use lazyblk_tests::sample_image;

const USER: &str = "lazy";
const PASSWORD: &str = "pa55-w0rd-never-shown";

fn options(dir: &std::path::Path, credentials: CredentialSource) -> ClientOptions {
    let hosts = dir.join("certs.d");
    std::fs::create_dir_all(&hosts).unwrap();
    ClientOptions {
        credentials,
        hosts_dir: Some(hosts),
        ..Default::default()
    }
}

fn basic() -> CredentialSource {
    CredentialSource::Basic {
        username: USER.into(),
        password: Secret::new(PASSWORD),
    }
}

fn reference(host: &str, repo: &str, tag: &str) -> Reference {
    Reference::parse(&format!("{host}/{repo}:{tag}")).unwrap()
}

/// Push a one-layer OCI image; returns (manifest digest, manifest bytes, layer digest).
async fn push_image(c: &Client, r: &Reference, layer: &[u8]) -> (String, Bytes, String) {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let cd = sha256_digest(config);
    let ld = sha256_digest(layer);
    c.push_blob(
        r,
        &cd,
        config.len() as u64,
        BlobSource::Bytes(Bytes::from_static(config)),
        None,
    )
    .await
    .unwrap();
    c.push_blob(
        r,
        &ld,
        layer.len() as u64,
        BlobSource::Bytes(Bytes::copy_from_slice(layer)),
        None,
    )
    .await
    .unwrap();
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}],
    });
    let bytes = Bytes::from(serde_json::to_vec(&m).unwrap());
    let d = c
        .push_manifest(r, r.tag().unwrap(), OCI_MANIFEST, bytes.clone())
        .await
        .unwrap();
    assert_eq!(d, sha256_digest(&bytes));
    (d, bytes, ld)
}

async fn read(c: &Client, r: &Reference, d: &str, off: u64, len: u64) -> Vec<u8> {
    let mut v = Vec::new();
    c.read_blob_range(r, d, off, len, &mut |b| v.extend_from_slice(&b))
        .await
        .unwrap_or_else(|e| panic!("read {off}+{len}: {e}"));
    v
}

fn assert_one_line(e: &lazyblk_registry::RegistryError, must: &[&str]) {
    let s = e.to_string();
    assert!(!s.contains('\n'), "not one line: {s}");
    assert!(
        !s.contains(PASSWORD) && !format!("{e:?}").contains(PASSWORD),
        "password shown: {s}"
    );
    for m in must {
        assert!(s.contains(m), "{s:?} does not name {m:?}");
    }
}

#[tokio::test]
async fn anonymous_push_resolve_and_range_reads() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path(), &RegistryAuth::None);
    let c = Client::new(ClientOptions {
        chunk_size: 1 << 20,
        ..options(dir.path(), CredentialSource::Anonymous)
    })
    .unwrap();
    let r = reference(&reg.host(), "lazy/img", "v1");
    let layer = sample_image(3 << 20, 1);
    let (md, mbytes, ld) = push_image(&c, &r, &layer).await;

    // Resolve by tag and by digest.
    let res = c.resolve(&r).await.unwrap();
    assert_eq!(
        (res.digest.as_str(), res.media_type.as_str(), &res.bytes),
        (md.as_str(), OCI_MANIFEST, &mbytes)
    );
    let res = c.resolve(&r.with_digest(&md).unwrap()).await.unwrap();
    assert_eq!(res.bytes, mbytes);

    // Sizes and ranges, including one byte and the last byte.
    assert_eq!(c.blob_size(&r, &ld).await.unwrap(), layer.len() as u64);
    let n = layer.len() as u64;
    assert_eq!(read(&c, &r, &ld, 0, 1).await, &layer[..1]);
    assert_eq!(read(&c, &r, &ld, n - 1, 1).await, &layer[layer.len() - 1..]);
    assert_eq!(
        read(&c, &r, &ld, 12345, 300_000).await,
        &layer[12345..312_345]
    );
    assert_eq!(read(&c, &r, &ld, 0, n).await, layer);
    let small = c.get_blob(&r, &sha256_digest(br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#), 1 << 20).await.unwrap();
    assert!(small.starts_with(b"{\"architecture\""));
    // A range beyond the blob is a permanent error.
    let mut sink = |_b: Bytes| {};
    let e = c
        .read_blob_range(&r, &ld, n + 10, 5, &mut sink)
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");

    // Pushing again finds it; another repository mounts it; a mount from a repository without
    // the blob falls back to an upload.
    let again = c
        .push_blob(
            &r,
            &ld,
            n,
            BlobSource::Bytes(Bytes::from(layer.clone())),
            None,
        )
        .await
        .unwrap();
    assert_eq!(again, PushOutcome::Exists);
    let r2 = reference(&reg.host(), "other/img", "v1");
    let m = c
        .push_blob(
            &r2,
            &ld,
            n,
            BlobSource::Bytes(Bytes::from(layer.clone())),
            Some("lazy/img"),
        )
        .await
        .unwrap();
    assert_eq!(m, PushOutcome::Mounted);
    let fresh = sample_image(100_000, 9);
    let fd = sha256_digest(&fresh);
    let m = c
        .push_blob(
            &r2,
            &fd,
            fresh.len() as u64,
            BlobSource::Bytes(Bytes::from(fresh.clone())),
            Some("lazy/img"),
        )
        .await
        .unwrap();
    assert_eq!(m, PushOutcome::Uploaded);
    assert_eq!(read(&c, &r2, &fd, 0, fresh.len() as u64).await, fresh);

    // Chunked upload from a file (1 MiB pieces).
    let big = sample_image((3 << 20) + 12345, 2);
    let bd = sha256_digest(&big);
    let path = dir.path().join("big");
    std::fs::write(&path, &big).unwrap();
    let out = c
        .push_blob(&r, &bd, big.len() as u64, BlobSource::File(path), None)
        .await
        .unwrap();
    assert_eq!(out, PushOutcome::UploadedChunked(4));
    assert_eq!(read(&c, &r, &bd, 0, big.len() as u64).await, big);
    // A wrong digest for the data is refused.
    let e = c
        .push_blob(
            &r,
            &sha256_digest(b"nope"),
            3,
            BlobSource::Bytes(Bytes::from_static(b"abc")),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DigestMismatch, "{e}");

    // Tags and referrers (the tag schema fallback: distribution 2.8 has no referrers API).
    c.push_manifest(&r, "v2", OCI_MANIFEST, mbytes.clone())
        .await
        .unwrap();
    let mut tags = c.list_tags(&r).await.unwrap();
    tags.sort();
    assert_eq!(tags, ["v1", "v2"]);
    assert!(c.referrers(&r, &md, None).await.unwrap().is_empty());
    let referrer = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": md, "size": mbytes.len(),
                        "artifactType": "application/vnd.lazyblk.test"}],
    });
    let tag = format!("sha256-{}", &md["sha256:".len()..]);
    c.push_manifest(
        &r,
        &tag,
        OCI_INDEX,
        Bytes::from(serde_json::to_vec(&referrer).unwrap()),
    )
    .await
    .unwrap();
    let refs = c.referrers(&r, &md, None).await.unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].digest().to_string(), md);
    assert_eq!(
        c.referrers(&r, &md, Some("application/vnd.lazyblk.test"))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(c
        .referrers(&r, &md, Some("other/type"))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn errors_name_the_thing() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path(), &RegistryAuth::None);
    let c = Client::new(options(dir.path(), CredentialSource::Anonymous)).unwrap();
    let r = reference(&reg.host(), "foo/bar", "v1");
    let (md, _, ld) = push_image(&c, &r, b"layer").await;
    let host = reg.host();

    let e = c
        .resolve(&reference(&host, "no/such", "v1"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.class()),
        (ErrorKind::NotFound, ErrorClass::Permanent)
    );
    assert_one_line(
        &e,
        &[
            &format!("registry {host}"),
            "repository \"no/such\"",
            "tag \"v1\"",
            "unknown",
        ],
    );

    let e = c
        .resolve(&reference(&host, "foo/bar", "nope"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_one_line(
        &e,
        &[
            &format!("registry {host}: repository \"foo/bar\": manifest unknown"),
            "tag \"nope\"",
        ],
    );

    let missing = sha256_digest(b"missing");
    let e = c.blob_size(&r, &missing).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_one_line(&e, &["repository \"foo/bar\"", &missing]);
    let e = c
        .read_blob_range(&r, &missing, 0, 1, &mut |_| {})
        .await
        .unwrap_err();
    assert_one_line(&e, &["repository \"foo/bar\"", &missing, "unknown"]);

    // Over the manifest limit.
    let small = Client::new(ClientOptions {
        manifest_limit: 100,
        ..options(dir.path(), CredentialSource::Anonymous)
    })
    .unwrap();
    let e = small.resolve(&r).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.class()),
        (ErrorKind::TooLarge, ErrorClass::Permanent)
    );
    assert_one_line(
        &e,
        &["repository \"foo/bar\"", "tag \"v1\"", "100-byte limit"],
    );

    // Wrong media type and a pinned digest mismatch, through a front that alters manifests.
    let store = ObjectStore::start(&reg.storage);
    let front = Front::start(reg.port, &store.server.url());
    let fr = reference(&front.host(), "foo/bar", "v1");
    assert_eq!(c.resolve(&fr).await.unwrap().digest, md);
    front.knobs.wrong_media_type.store(true, Ordering::SeqCst);
    let e = c.resolve(&fr).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.class()),
        (ErrorKind::MediaType, ErrorClass::Permanent)
    );
    assert_one_line(
        &e,
        &[
            "repository \"foo/bar\"",
            "tag \"v1\"",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
        ],
    );
    front.knobs.wrong_media_type.store(false, Ordering::SeqCst);
    front.knobs.tamper_manifest.store(true, Ordering::SeqCst);
    let e = c.resolve(&fr.with_digest(&md).unwrap()).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.class()),
        (ErrorKind::DigestMismatch, ErrorClass::Permanent)
    );
    assert_one_line(&e, &["repository \"foo/bar\"", &md, "pinned digest"]);
    // By tag, the registry's Docker-Content-Digest catches it.
    let e = c.resolve(&fr).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DigestMismatch, "{e}");
    assert_one_line(&e, &["Docker-Content-Digest"]);
    let _ = ld;

    // A registry that is not there: transient, naming the host.
    let gone = reference(
        &format!("127.0.0.1:{}", lazyblk_tests::free_port()),
        "foo/bar",
        "v1",
    );
    let e = c.resolve(&gone).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.class()),
        (ErrorKind::Connect, ErrorClass::Transient)
    );
    assert_one_line(
        &e,
        &[
            &format!("registry {}", gone.registry()),
            "repository \"foo/bar\"",
        ],
    );
}

#[tokio::test]
async fn htpasswd_basic_auth() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(
        dir.path(),
        &RegistryAuth::Htpasswd {
            user: USER.into(),
            password: PASSWORD.into(),
        },
    );
    let c = Client::new(options(dir.path(), basic())).unwrap();
    let r = reference(&reg.host(), "foo/bar", "v1");
    let layer = sample_image(500_000, 3);
    let (md, _, ld) = push_image(&c, &r, &layer).await;
    assert_eq!(c.resolve(&r).await.unwrap().digest, md);
    assert_eq!(read(&c, &r, &ld, 1000, 2000).await, &layer[1000..3000]);

    let wrong = CredentialSource::Basic {
        username: USER.into(),
        password: Secret::new("wrong-password-x"),
    };
    let bad = Client::new(options(dir.path(), wrong)).unwrap();
    let e = bad.resolve(&r).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.class()),
        (ErrorKind::Auth, ErrorClass::Permanent)
    );
    assert_one_line(
        &e,
        &[
            &format!("registry {}", reg.host()),
            "repository \"foo/bar\"",
            "authentication failed",
            "401",
            "credentials from static",
        ],
    );
    assert!(!e.to_string().contains("wrong-password-x"));

    // Credentials from a creds file, and none at all.
    let cf = dir.path().join("creds");
    std::fs::write(&cf, format!("{USER}:{PASSWORD}\n")).unwrap();
    let c2 = Client::new(options(dir.path(), CredentialSource::CredsFile(cf))).unwrap();
    assert_eq!(c2.resolve(&r).await.unwrap().digest, md);
    let anon = Client::new(options(dir.path(), CredentialSource::Anonymous)).unwrap();
    let e = anon.resolve(&r).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth);
    assert_one_line(&e, &["anonymous"]);
}

/// A registry with `auth: token` and an issuer whose JWTs live `lifetime` s while it announces
/// `expires_in` s.
fn token_setup(dir: &std::path::Path, lifetime: i64, expires_in: u64) -> TokenRegistry {
    TokenRegistry::start(dir, USER, PASSWORD, lifetime, expires_in)
}

#[tokio::test]
async fn token_auth_reads_across_expiries() {
    let dir = tempfile::tempdir().unwrap();
    let t = token_setup(dir.path(), 2, 2);
    let c = Client::new(options(dir.path(), basic())).unwrap();
    let r = reference(&t.registry.host(), "tok/img", "v1");
    let layer = sample_image(4 << 20, 4);
    let (md, _, ld) = push_image(&c, &r, &layer).await;
    assert_eq!(c.resolve(&r).await.unwrap().digest, md);
    let before = t.issuer.issued.load(Ordering::SeqCst);
    // 64 KiB ranges with pauses: ~8 s, four times the token lifetime.
    let t0 = Instant::now();
    let mut got = Vec::new();
    let step = 64 << 10;
    let mut off = 0u64;
    while off < layer.len() as u64 {
        let n = step.min(layer.len() as u64 - off);
        got.extend(read(&c, &r, &ld, off, n).await);
        off += n;
        tokio::time::sleep(Duration::from_millis(125)).await;
    }
    assert!(
        t0.elapsed() > Duration::from_secs(7),
        "read too fast: {:?}",
        t0.elapsed()
    );
    assert_eq!(got, layer);
    let pull_tokens = t.issuer.issued.load(Ordering::SeqCst) - before;
    assert!(
        pull_tokens >= 4,
        "only {pull_tokens} token fetches over {:?}",
        t0.elapsed()
    );
    assert_eq!(t.issuer.refused.load(Ordering::SeqCst), 0);
}

/// The registry refuses a token the client still believes valid (the issuer announces an hour;
/// the JWT's `exp` is such that distribution, which allows 60 s of clock skew, takes it for 2 s):
/// the 401 in the middle of a read is answered with a fresh token and the read goes on.
#[tokio::test]
async fn token_refused_mid_read_is_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let t = token_setup(dir.path(), -58, 3600);
    let c = Client::new(options(dir.path(), basic())).unwrap();
    let r = reference(&t.registry.host(), "tok/img", "v1");
    let layer = sample_image(1 << 20, 5);
    let (_, _, ld) = push_image(&c, &r, &layer).await;
    assert_eq!(read(&c, &r, &ld, 0, 1000).await, &layer[..1000]);
    let before = t.issuer.issued.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        read(&c, &r, &ld, 1000, layer.len() as u64 - 1000).await,
        &layer[1000..]
    );
    assert_eq!(
        t.issuer.issued.load(Ordering::SeqCst),
        before + 1,
        "the refused token was not renewed once"
    );
}

#[tokio::test]
async fn token_concurrent_reads_share_one_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let t = token_setup(dir.path(), 300, 300);
    let pusher = Client::new(options(dir.path(), basic())).unwrap();
    let r = reference(&t.registry.host(), "tok/img", "v1");
    let layer = sample_image(1 << 20, 6);
    let (_, _, ld) = push_image(&pusher, &r, &layer).await;
    let c = Client::new(options(dir.path(), basic())).unwrap();
    let before = t.issuer.issued.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let (c, r, ld) = (c.clone(), r.clone(), ld.clone());
        tasks.push(tokio::spawn(async move {
            let mut v = Vec::new();
            c.read_blob_range(&r, &ld, i * 1000, 1000, &mut |b| v.extend_from_slice(&b))
                .await
                .map(|()| v)
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().unwrap(), &layer[i * 1000..(i + 1) * 1000]);
    }
    assert_eq!(
        t.issuer.issued.load(Ordering::SeqCst) - before,
        1,
        "concurrent requests did not share the token fetch"
    );
    assert_eq!(c.token_fetches(), 1);
}

#[tokio::test]
async fn token_wrong_credentials_and_service_down() {
    let dir = tempfile::tempdir().unwrap();
    let t = token_setup(dir.path(), 60, 60);
    let r = reference(&t.registry.host(), "tok/img", "v1");
    let wrong = CredentialSource::Basic {
        username: USER.into(),
        password: Secret::new("not-the-password"),
    };
    let c = Client::new(options(dir.path(), wrong)).unwrap();
    let e = c.resolve(&r).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.class()),
        (ErrorKind::Auth, ErrorClass::Permanent)
    );
    assert_one_line(
        &e,
        &[
            "repository \"tok/img\"",
            "token service",
            "401",
            "credentials from static",
        ],
    );
    assert!(!e.to_string().contains("not-the-password"));

    // The token service goes away.
    let TokenRegistry {
        issuer,
        registry: reg,
    } = t;
    drop(issuer);
    std::thread::sleep(Duration::from_millis(100));
    let c = Client::new(options(dir.path(), basic())).unwrap();
    let e = c.resolve(&r).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.class()),
        (ErrorKind::Connect, ErrorClass::Transient),
        "{e}"
    );
    assert_one_line(
        &e,
        &[
            &format!("registry {}", reg.host()),
            "token service http://127.0.0.1:",
        ],
    );
}

#[tokio::test]
async fn redirects_to_an_object_store() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(
        dir.path(),
        &RegistryAuth::Htpasswd {
            user: USER.into(),
            password: PASSWORD.into(),
        },
    );
    let direct = Client::new(options(dir.path(), basic())).unwrap();
    let r = reference(&reg.host(), "redir/img", "v1");
    let layer = sample_image(2 << 20, 7);
    let (md, _, ld) = push_image(&direct, &r, &layer).await;

    let store = ObjectStore::start(&reg.storage);
    let front = Front::start(reg.port, &store.server.url());
    let c = Client::new(options(dir.path(), basic())).unwrap();
    let fr = reference(&front.host(), "redir/img", "v1");
    assert_eq!(c.resolve(&fr).await.unwrap().digest, md);
    let n = layer.len() as u64;
    assert_eq!(c.blob_size(&fr, &ld).await.unwrap(), n);
    let redirected_after_head = front.redirected.load(Ordering::SeqCst);
    assert_eq!(read(&c, &fr, &ld, 0, 1).await, &layer[..1]);
    assert_eq!(
        read(&c, &fr, &ld, n - 1, 1).await,
        &layer[layer.len() - 1..]
    );
    assert_eq!(
        read(&c, &fr, &ld, 4096, 100_000).await,
        &layer[4096..104_096]
    );
    // The redirect was remembered: one trip through the front for three reads.
    assert_eq!(
        front.redirected.load(Ordering::SeqCst) - redirected_after_head,
        1
    );
    // The pre-signed URL "expires": the client goes back through the registry.
    store.fail_next.store(1, Ordering::SeqCst);
    assert_eq!(read(&c, &fr, &ld, 7, 70_000).await, &layer[7..70_007]);
    assert_eq!(
        front.redirected.load(Ordering::SeqCst) - redirected_after_head,
        2
    );
    // A server that ignores Range and sends the whole blob with 200.
    store.ignore_range.store(true, Ordering::SeqCst);
    assert_eq!(
        read(&c, &fr, &ld, 1_000_000, 5000).await,
        &layer[1_000_000..1_005_000]
    );
    assert_eq!(
        read(&c, &fr, &ld, n - 3, 3).await,
        &layer[layer.len() - 3..]
    );
    assert_eq!(c.get_blob(&fr, &ld, 4 << 20).await.unwrap(), layer);
    store.ignore_range.store(false, Ordering::SeqCst);
    assert!(store.served.load(Ordering::SeqCst) >= 5);
    assert!(
        !store.saw_authorization.load(Ordering::SeqCst),
        "the registry's Authorization reached the object store"
    );

    // A redirect loop.
    front.knobs.redirect_loop.store(true, Ordering::SeqCst);
    let c2 = Client::new(options(dir.path(), basic())).unwrap();
    let e = c2
        .read_blob_range(&fr, &ld, 0, 10, &mut |_| {})
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.class()),
        (ErrorKind::RedirectLoop, ErrorClass::Permanent)
    );
    assert_one_line(
        &e,
        &[
            "repository \"redir/img\"",
            &ld,
            "redirect loop",
            "more than 10",
        ],
    );
}

#[tokio::test]
async fn dead_and_broken_mirrors_fall_back_to_the_origin() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path(), &RegistryAuth::None);
    let c = Client::new(options(dir.path(), CredentialSource::Anonymous)).unwrap();
    let r = reference(&reg.host(), "mir/img", "v1");
    let layer = sample_image(300_000, 8);
    let (md, _, ld) = push_image(&c, &r, &layer).await;

    let broken = broken_mirror();
    let dead = format!("http://127.0.0.1:{}", lazyblk_tests::free_port());
    let m = Client::new(ClientOptions {
        mirrors: vec![dead.clone(), broken.url()],
        ..options(dir.path(), CredentialSource::Anonymous)
    })
    .unwrap();
    assert_eq!(m.resolve(&r).await.unwrap().digest, md);
    assert_eq!(read(&m, &r, &ld, 10, 20_000).await, &layer[10..20_010]);
    let st = m.endpoints(&r).unwrap();
    assert_eq!(st.len(), 3);
    assert!(
        st[0].down && st[1].down && !st[2].down && st[2].origin,
        "{st:?}"
    );
    // Marked down: the next reads do not ask them again.
    let asked = broken.requests.load(Ordering::SeqCst);
    assert_eq!(read(&m, &r, &ld, 0, 300_000).await, layer);
    assert_eq!(broken.requests.load(Ordering::SeqCst), asked);

    // The same through containerd's hosts.toml.
    let hosts = dir.path().join("hosts");
    std::fs::create_dir_all(hosts.join(reg.host())).unwrap();
    std::fs::write(
        hosts.join(reg.host()).join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n\n[host.\"{dead}\"]\n",
            reg.host(),
            broken.url()
        ),
    )
    .unwrap();
    let h = Client::new(ClientOptions {
        hosts_dir: Some(hosts),
        credentials: CredentialSource::Anonymous,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(h.resolve(&r).await.unwrap().digest, md);
    assert_eq!(read(&h, &r, &ld, 0, 1).await, &layer[..1]);
    let st = h.endpoints(&r).unwrap();
    assert_eq!(
        st.iter().map(|e| e.down).collect::<Vec<_>>(),
        [true, true, false],
        "{st:?}"
    );
}

/// A mirror that lacks the image (an empty registry: 404 "manifest unknown") answers: the
/// origin serves it, and the mirror is not marked down for it (a pull-through cache misses
/// things all the time, referrers tags above all).
#[tokio::test]
async fn a_mirror_without_the_image_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path(), &RegistryAuth::None);
    let mdir = tempfile::tempdir().unwrap();
    let empty = Registry::start(mdir.path(), &RegistryAuth::None);
    let c = Client::new(options(dir.path(), CredentialSource::Anonymous)).unwrap();
    let r = reference(&reg.host(), "miss/img", "v1");
    let layer = sample_image(100_000, 4);
    let (md, _, ld) = push_image(&c, &r, &layer).await;
    let m = Client::new(ClientOptions {
        mirrors: vec![format!("http://{}", empty.host())],
        ..options(dir.path(), CredentialSource::Anonymous)
    })
    .unwrap();
    assert_eq!(m.resolve(&r).await.unwrap().digest, md);
    let st = m.endpoints(&r).unwrap();
    assert!(!st[0].down && !st[0].origin, "{st:?}");
    assert_eq!(read(&m, &r, &ld, 0, 1000).await, &layer[..1000]);
}

/// A mirror serves bytes that do not verify: the caller reports it and the next read comes from
/// the origin.
#[tokio::test]
async fn reported_bad_mirror_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(dir.path(), &RegistryAuth::None);
    let c = Client::new(options(dir.path(), CredentialSource::Anonymous)).unwrap();
    let r = reference(&reg.host(), "liar/img", "v1");
    let layer = sample_image(200_000, 10);
    let (md, _, ld) = push_image(&c, &r, &layer).await;
    let liar = lying_mirror(reg.port);
    let m = Client::new(ClientOptions {
        mirrors: vec![liar.url()],
        ..options(dir.path(), CredentialSource::Anonymous)
    })
    .unwrap();
    // Manifests through the mirror are fine (and verified by the client itself).
    assert_eq!(m.resolve(&r).await.unwrap().digest, md);
    let bad = read(&m, &r, &ld, 100, 5000).await;
    assert_ne!(bad, &layer[100..5100]);
    assert!(m.report_bad_blob(&r, &ld), "the mirror was not blamed");
    assert!(m.endpoints(&r).unwrap()[0].down);
    // Each endpoint's share of a read is reported by its origin (no path), mirror or not.
    let mut served = Vec::new();
    let mut v = Vec::new();
    m.read_blob_range_served(
        &r,
        &ld,
        100,
        5000,
        &mut |b| v.extend_from_slice(&b),
        &mut |o, mirror, n| served.push((o.to_string(), mirror, n)),
    )
    .await
    .unwrap();
    assert_eq!(v, &layer[100..5100]);
    assert_eq!(served, [(format!("http://{}", reg.host()), false, 5000)]);
    // The origin served it: nothing to blame.
    assert!(!m.report_bad_blob(&r, &ld));
    let liar2 = lying_mirror(reg.port);
    let m2 = Client::new(ClientOptions {
        mirrors: vec![liar2.url()],
        ..options(dir.path(), CredentialSource::Anonymous)
    })
    .unwrap();
    let mut served = Vec::new();
    m2.read_blob_range_served(&r, &ld, 0, 3000, &mut |_| {}, &mut |o, mirror, n| {
        served.push((o.to_string(), mirror, n))
    })
    .await
    .unwrap();
    let mirror_origin = liar2.url().trim_end_matches('/').to_string();
    assert_eq!(served, [(mirror_origin, true, 3000)]);
}

/// A registry serving HTTPS with a self-signed certificate for 127.0.0.1: trusted through
/// `ca_file`; refused without it in one line naming the host and the certificate problem;
/// accepted with `insecure`.
#[tokio::test]
async fn tls_ca_file_and_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start_tls(dir.path(), &RegistryAuth::None);
    let cert = reg.cert.clone().unwrap();
    // 127.0.0.1 defaults to plain HTTP: ask for HTTPS.
    let tls = |ca_file: Option<std::path::PathBuf>, insecure: bool| {
        Client::new(ClientOptions {
            plain_http: Some(false),
            ca_file,
            insecure,
            ..options(dir.path(), CredentialSource::Anonymous)
        })
        .unwrap()
    };
    let r = reference(&reg.host(), "lazy/tls", "v1");
    let layer = sample_image(300 << 10, 11);
    let trusted = tls(Some(cert.clone()), false);
    let (md, _, ld) = push_image(&trusted, &r, &layer).await;
    assert_eq!(trusted.resolve(&r).await.unwrap().digest, md);
    assert_eq!(read(&trusted, &r, &ld, 1000, 5000).await, layer[1000..6000]);
    assert_eq!(
        trusted.blob_size(&r, &ld).await.unwrap(),
        layer.len() as u64
    );

    // No CA: every request fails, permanently, in one line naming the host and the problem.
    let untrusted = tls(None, false);
    let e = untrusted.resolve(&r).await.unwrap_err();
    assert_one_line(
        &e,
        &[&reg.host(), "TLS certificate", "UnknownIssuer", "--ca-file"],
    );
    assert_eq!(
        (e.kind(), e.class()),
        (ErrorKind::Certificate, ErrorClass::Permanent),
        "{e}"
    );
    let e = untrusted
        .read_blob_range(&r, &ld, 0, 10, &mut |_| {})
        .await
        .unwrap_err();
    assert_one_line(&e, &[&reg.host(), "TLS certificate"]);
    assert_eq!(e.kind(), ErrorKind::Certificate, "{e}");

    // Insecure: no verification.
    let insecure = tls(None, true);
    assert_eq!(read(&insecure, &r, &ld, 0, 4096).await, layer[..4096]);

    // Plain HTTP to the TLS port fails too (Go answers 400), without hanging.
    let plain = Client::new(options(dir.path(), CredentialSource::Anonymous)).unwrap();
    let e = plain.resolve(&r).await.unwrap_err();
    assert_one_line(&e, &[&reg.host()]);
}

/// An artifact manifest of `artifact` referring to `subject` (one layer, `layer`), made at
/// `created`, with `extra` annotations.
fn referrer(
    artifact: &str,
    subject: (&str, usize),
    layer: (&str, usize),
    created: &str,
    extra: &[(&str, &str)],
) -> Bytes {
    let mut annotations = serde_json::json!({ link::CREATED: created });
    for (k, v) in extra {
        annotations[*k] = (*v).into();
    }
    let m = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2,
                   "digest": sha256_digest(b"{}")},
        "layers": [{"mediaType": "application/octet-stream", "digest": layer.0, "size": layer.1}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject.0, "size": subject.1},
        "annotations": annotations,
    });
    Bytes::from(serde_json::to_vec(&m).unwrap())
}

/// An index of one linux/amd64 manifest, tagged `tag`; returns its digest.
async fn push_index(c: &Client, r: &Reference, tag: &str, md: &str, size: usize) -> String {
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": md, "size": size,
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    });
    c.push_manifest(
        r,
        tag,
        OCI_INDEX,
        Bytes::from(serde_json::to_vec(&index).unwrap()),
    )
    .await
    .unwrap()
}

/// Push referrers to `host/repo` and find them: `fallback` says whether the registry there has
/// no referrers API (the tag schema index is kept) or has one (it is not).
async fn referrers_case(c: &Client, host: &str, repo: &str, fallback: bool) {
    const ART: &str = "application/vnd.lazyblk.test";
    let r = reference(host, repo, "v1");
    let (md, mbytes, ld) = push_image(c, &r, b"the source layer").await;
    let layer = (ld.as_str(), b"the source layer".len());
    c.push_blob(
        &r,
        &sha256_digest(b"{}"),
        2,
        BlobSource::Bytes(Bytes::from_static(b"{}")),
        None,
    )
    .await
    .unwrap();
    let idx = push_index(c, &r, "multi", &md, mbytes.len()).await;
    let subject = (md.as_str(), mbytes.len());
    let a = referrer(ART, subject, layer, "2025-01-01T00:00:00Z", &[]);
    let b = referrer(ART, subject, layer, "2025-02-01T00:00:00Z", &[]);
    let other = referrer(
        "application/x.sbom",
        subject,
        layer,
        "2026-01-01T00:00:00Z",
        &[],
    );
    for m in [&a, &b, &other, &a] {
        let p = c.push_referrer(&r, OCI_MANIFEST, m.clone()).await.unwrap();
        assert_eq!(p.digest, sha256_digest(m));
        assert_eq!(p.subject, md);
        assert_eq!(p.fallback, fallback, "{host}");
    }
    let tag = link::referrers_tag(&md).unwrap();
    let tags = c.list_tags(&r).await.unwrap();
    assert_eq!(tags.contains(&tag), fallback, "{tags:?}");
    // Three referrers, each once (a was pushed twice).
    let all = c.referrers(&r, &md, None).await.unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    // The newest of the artifact type, by tag, by digest and through the index.
    let want = r.pinned(&sha256_digest(&b)).unwrap();
    for (src, index) in [
        (r.clone(), None),
        (r.pinned(&md).unwrap(), None),
        (r.with_tag("multi").unwrap(), Some(idx.clone())),
        (r.pinned(&idx).unwrap(), Some(idx.clone())),
    ] {
        let l = c
            .find_referrer(&src, ART, &Platform::default())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{src}: no referrer found"));
        assert_eq!(l.reference, want, "{src}");
        assert_eq!(
            l.reference.to_string(),
            format!("{host}/{repo}@{}", sha256_digest(&b))
        );
        assert_eq!(
            (l.subject.as_str(), l.manifest.as_str()),
            (md.as_str(), md.as_str())
        );
        assert_eq!(l.index, index);
        assert_eq!(l.created.as_deref(), Some("2025-02-01T00:00:00Z"));
    }
    assert!(c
        .find_referrer(&r, "application/x.none", &Platform::default())
        .await
        .unwrap()
        .is_none());
    let arm: Platform = "linux/arm64".parse().unwrap();
    let e = c
        .find_referrer(&r.with_tag("multi").unwrap(), ART, &arm)
        .await
        .unwrap_err();
    assert_one_line(&e, &[repo, "multi", "linux/arm64"]);

    // Only the index has a referrer: found through the index when it names the manifest.
    let r2 = reference(host, repo, "v2");
    let (md2, m2, _) = push_image(c, &r2, b"another layer").await;
    let idx2 = push_index(c, &r2, "multi2", &md2, m2.len()).await;
    let wrong = referrer(
        ART,
        (&idx2, 1),
        layer,
        "2027-01-01T00:00:00Z",
        &[(link::SOURCE_MANIFEST, &md)],
    );
    let right = referrer(
        ART,
        (&idx2, 1),
        layer,
        "2025-01-01T00:00:00Z",
        &[(link::SOURCE_MANIFEST, &md2)],
    );
    for m in [&wrong, &right] {
        c.push_referrer(&r2, OCI_MANIFEST, m.clone()).await.unwrap();
    }
    let l = c
        .find_referrer(&r2.with_tag("multi2").unwrap(), ART, &Platform::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(l.reference, r2.pinned(&sha256_digest(&right)).unwrap());
    assert_eq!(
        (l.subject, l.manifest, l.index),
        (idx2.clone(), md2.clone(), Some(idx2))
    );
    assert!(c
        .find_referrer(&r2, ART, &Platform::default())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn referrers_through_the_tag_schema_and_the_referrers_api() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(&dir.path().join("reg"), &RegistryAuth::None);
    let c = Client::new(options(dir.path(), CredentialSource::Anonymous)).unwrap();
    // distribution 2.8 has no referrers API (404): the tag schema.
    referrers_case(&c, &reg.host(), "fallback/app", true).await;
    // The same registry behind a front that implements the API: no tag schema index.
    let front = ReferrersFront::start(reg.port);
    referrers_case(&c, &front.host(), "api/app", false).await;
    assert_eq!(
        front.referrers.lock().unwrap().len(),
        2,
        "one subject per image"
    );
}
