//! `lazyblk convert` with real tools: a multi-layer image made with Debian's `umoci` (deletions,
//! an opaque directory, a file turned into a directory and back, hardlinks across layers, modes,
//! owners, xattrs and file capabilities, devices, fifos, sparse files), copied with `skopeo` into
//! a real `docker-registry` as OCI (gzip), Docker schema 2 and OCI with zstd layers; converted
//! from each, from the `oci:` layout and from a `docker save`-style archive; pushed, read back
//! through the chunk store by reference, checked with `fsck.erofs`, mounted (erofs over loop),
//! and compared with `umoci unpack` of the source (content, modes, owners, xattrs, link targets,
//! hardlink counts, device numbers). Needs root, umoci, skopeo, erofs-utils, docker-registry
//! (`scripts/setup`); it fails, never skips, when they are missing.

use lazyblk_chunkstore::{ChunkStore, Location, StoreOptions};
use lazyblk_convert::{ConvertOptions, Error, SourceRef};
use lazyblk_registry::{Client, ClientOptions, CredentialSource, Manifest, Reference};
use lazyblk_tests::registry::{Registry, RegistryAuth};
use lazyblk_tests::tree;
use std::path::{Path, PathBuf};
use std::process::Command;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Run `cmd`, failing the test with its output when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (scripts/setup installs it): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The source image: layout `w/L`, tag `img`, four layers; `w/REF/rootfs` is `umoci unpack` of it.
const MAKE_IMAGE: &str = include_str!("../images/layered.sh");

fn make_image(w: &Path) {
    run(Command::new("bash").arg("-c").arg(MAKE_IMAGE).env("W", w));
}

/// `docker save`'s layout of the image: `manifest.json`, the config, `<n>/layer.tar`.
fn docker_archive(w: &Path) -> PathBuf {
    let l = w.join("L");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(l.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "img")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = |d: &str| {
        l.join("blobs/sha256")
            .join(d.strip_prefix("sha256:").unwrap())
    };
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&mdigest)).unwrap()).unwrap();
    let a = w.join("archive");
    std::fs::create_dir(&a).unwrap();
    std::fs::copy(
        blob(m["config"]["digest"].as_str().unwrap()),
        a.join("cfg.json"),
    )
    .unwrap();
    let mut layers = Vec::new();
    for (i, layer) in m["layers"].as_array().unwrap().iter().enumerate() {
        std::fs::create_dir(a.join(i.to_string())).unwrap();
        let out = std::fs::File::create(a.join(format!("{i}/layer.tar"))).unwrap();
        let st = Command::new("gzip")
            .arg("-dc")
            .arg(blob(layer["digest"].as_str().unwrap()))
            .stdout(out)
            .status()
            .unwrap();
        assert!(st.success());
        layers.push(format!("{i}/layer.tar"));
    }
    let manifest =
        serde_json::json!([{"Config": "cfg.json", "RepoTags": ["img:latest"], "Layers": layers}]);
    std::fs::write(a.join("manifest.json"), manifest.to_string()).unwrap();
    let tarball = w.join("saved.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&a)
        .arg("-cf")
        .arg(&tarball)
        .arg("."));
    tarball
}

fn skopeo(from: &str, to: &str, extra: &[&str]) {
    run(Command::new("skopeo")
        .args(["copy", "--insecure-policy", "--dest-tls-verify=false", "-q"])
        .args(extra)
        .arg(from)
        .arg(to));
}

/// Unmounts on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Convert `src` in `work`, push it to `dst`, read it back by reference through the chunk
/// store, `fsck.erofs` it, mount it and return its tree digest.
fn convert_and_read_back(client: &Client, src: &SourceRef, work: &Path, dst: &str) -> String {
    let mut layers_seen = 0;
    let c = rt()
        .block_on(lazyblk_convert::convert(
            src,
            Some(client),
            work,
            &ConvertOptions::default(),
            &mut |p| {
                if let lazyblk_convert::Progress::Applied { .. } = p {
                    layers_seen += 1;
                }
            },
        ))
        .unwrap_or_else(|e| panic!("converting {src}: {e}"));
    assert_eq!(layers_seen, 4, "{src}");
    assert_eq!(c.layers.len(), 4);
    assert!(c.tree.hardlinks >= 1 && c.tree.nodes >= 3, "{:?}", c.tree);
    let r = Reference::parse(dst).unwrap();
    let pushed = rt()
        .block_on(lazyblk_builder::push(
            client,
            &c.out_dir,
            &r,
            None,
            &|_, _| {},
        ))
        .unwrap();
    // The source config rides along as a layer runtimes can find.
    let got = rt().block_on(client.resolve(&r)).unwrap();
    let Manifest::Image(m) = lazyblk_registry::parse_manifest(&got.media_type, &got.bytes).unwrap()
    else {
        panic!("an image manifest")
    };
    let cfg_layer = m
        .layers()
        .iter()
        .find(|l| {
            l.annotations()
                .as_ref()
                .and_then(|a| a.get("org.opencontainers.image.title"))
                == Some(&"image-config.json".to_string())
        })
        .expect("an image-config.json layer");
    assert_eq!(
        cfg_layer.media_type().to_string(),
        "application/vnd.oci.image.config.v1+json"
    );
    let cfg = rt()
        .block_on(client.get_blob(&r, cfg_layer.digest().as_ref(), 1 << 20))
        .unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&cfg).unwrap();
    assert_eq!(cfg["config"]["Entrypoint"][0], "/usr/bin/tool", "{cfg}");
    assert_eq!(cfg["config"]["WorkingDir"], "/etc");
    assert_eq!(cfg["config"]["User"], "1000:1000");
    assert!(cfg["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "FOO=bar"));

    let cache = work.join("cache");
    let mut o = StoreOptions {
        cache_root: cache.clone(),
        readahead_bytes: 0,
        ..Default::default()
    };
    o.registry.credentials = CredentialSource::Anonymous;
    o.registry.hosts_dir = Some(cache.join("no-hosts.d"));
    let s = ChunkStore::open(&Location::parse(dst), o).unwrap();
    assert_eq!(s.id(), pushed.image);
    let raw = work.join("read-back.erofs");
    s.export(&raw).unwrap();
    drop(s);
    // What was built: the metadata, then each layer's region at its offset.
    let mut built = vec![0u8; c.layout.image_size as usize];
    let meta = std::fs::read(&c.meta).unwrap();
    built[..meta.len()].copy_from_slice(&meta);
    for (i, at) in c.layout.region_offsets.iter().enumerate() {
        let r = std::fs::read(work.join("regions").join(i.to_string())).unwrap();
        built[*at as usize..*at as usize + r.len()].copy_from_slice(&r);
    }
    assert!(
        std::fs::read(&raw).unwrap() == built,
        "read back through the registry, the image is the one built"
    );
    // Every layer with file data is a shared blob of its own.
    let with_data = c.build.shared.len();
    assert!(with_data >= 2, "{:?}", c.build.shared);
    run(Command::new("fsck.erofs").arg(&raw));
    let mnt = work.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-t", "erofs", "-o", "loop,ro"])
        .arg(&raw)
        .arg(&mnt));
    let _m = Mount(mnt.clone());
    tree::digest(&mnt).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn umoci_images_convert_to_the_tree_umoci_unpacks() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("src");
    std::fs::create_dir(&w).unwrap();
    make_image(&w);
    let want = tree::digest(&w.join("REF/rootfs")).unwrap();
    // The source really has what the test claims.
    for needle in [
        "a/h2: file size=8",
        "nlink=1",
        "usr/bin/tool-link: file size=4",
        "nlink=2",
        "security.capability=",
        "user.k2=7632",
        "usr/bin/su: file size=2 sha256=",
        "mode=640",
        "a/rel: link -> ../etc/passwd uid=2000 gid=3000",
        "dev/loop77: special 60644 rdev=74d",
        "opq/new: file",
        "turn: file size=11",
        "tmp: dir mode=1777",
    ] {
        assert!(
            want.contains(needle),
            "{needle:?} not in the source tree:\n{want}"
        );
    }
    for gone in [
        "etc/passwd",
        "gone",
        "opq/old1",
        "opq/keepdir",
        "turn/inner",
        "a/h1",
    ] {
        assert!(
            !want.contains(&format!("\n{gone}:")),
            "{gone} still in:\n{want}"
        );
    }

    let reg = Registry::start(&dir.path().join("reg"), &RegistryAuth::None);
    let host = reg.host();
    let layout = format!("oci:{}:img", w.join("L").display());
    skopeo(&layout, &format!("docker://{host}/src/oci:v1"), &[]);
    skopeo(
        &layout,
        &format!("docker://{host}/src/v2s2:v1"),
        &["--format", "v2s2"],
    );
    // This skopeo (1.9) recompresses only into `dir:` and `oci:`, and only uncompressed
    // layers: decompressed into `dir:`, zstd into a second layout, then copied as is.
    let plain = format!("dir:{}", w.join("plain").display());
    let zstd = format!("oci:{}:img", w.join("Z").display());
    skopeo(&layout, &plain, &["--dest-decompress"]);
    skopeo(
        &plain,
        &zstd,
        &[
            "--format",
            "oci",
            "--dest-compress",
            "--dest-compress-format",
            "zstd",
        ],
    );
    // A registry of its own: skopeo's blob cache would reuse the gzip layers of the same
    // content already pushed to the first one.
    let reg2 = Registry::start(&dir.path().join("reg2"), &RegistryAuth::None);
    let host2 = reg2.host();
    skopeo(
        &zstd,
        &format!("docker://{host2}/src/zstd:v1"),
        &["--dest-compress-format", "zstd"],
    );
    let client = Client::new(ClientOptions::default()).unwrap();
    // Each copy is what its name says.
    for (name, want_mt, want_layer) in [
        (
            format!("{host}/src/oci:v1"),
            "application/vnd.oci.image.manifest.v1+json",
            "tar+gzip",
        ),
        (
            format!("{host}/src/v2s2:v1"),
            "application/vnd.docker.distribution.manifest.v2+json",
            "diff.tar.gzip",
        ),
        (
            format!("{host2}/src/zstd:v1"),
            "application/vnd.oci.image.manifest.v1+json",
            "tar+zstd",
        ),
    ] {
        let r = Reference::parse(&name).unwrap();
        let got = rt().block_on(client.resolve(&r)).unwrap();
        assert_eq!(got.media_type, want_mt, "{name}");
        let text = String::from_utf8_lossy(&got.bytes);
        assert!(text.contains(want_layer), "{name}: {text}");
    }

    let archive = docker_archive(&w);
    let sources = [
        ("layout", SourceRef::parse(&layout).unwrap()),
        (
            "oci",
            SourceRef::parse(&format!("{host}/src/oci:v1")).unwrap(),
        ),
        (
            "v2s2",
            SourceRef::parse(&format!("{host}/src/v2s2:v1")).unwrap(),
        ),
        (
            "zstd",
            SourceRef::parse(&format!("{host2}/src/zstd:v1")).unwrap(),
        ),
        ("archive", SourceRef::DockerArchive(archive)),
    ];
    for (name, src) in sources {
        let work = dir.path().join(format!("work-{name}"));
        let got = convert_and_read_back(&client, &src, &work, &format!("{host}/lazy/{name}:v1"));
        if got != want {
            std::fs::write(w.join("want.txt"), &want).unwrap();
            std::fs::write(work.join("got.txt"), &got).unwrap();
            let diff = run(Command::new("sh").arg("-c").arg(format!(
                "diff {} {} || true",
                w.join("want.txt").display(),
                work.join("got.txt").display()
            )));
            panic!("{name}: the converted tree differs from umoci unpack:\n{diff}");
        }
    }
}

#[test]
fn a_layer_that_does_not_match_its_digest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("src");
    std::fs::create_dir(&w).unwrap();
    run(Command::new("bash")
        .arg("-c")
        .arg(
            "set -eu; cd \"$W\"; umoci init --layout L; umoci new --image L:img; \
         umoci unpack --image L:img B; echo hello > B/rootfs/f; umoci repack --image L:img B",
        )
        .env("W", &w));
    let reg = Registry::start(&dir.path().join("reg"), &RegistryAuth::None);
    let layout = format!("oci:{}:img", w.join("L").display());
    skopeo(&layout, &format!("docker://{}/src/bad:v1", reg.host()), &[]);
    // Corrupt the (only, gzip) layer in the layout and in the registry's storage.
    let gz = std::fs::read_dir(w.join("L/blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read(p).unwrap().starts_with(&[0x1f, 0x8b]))
        .unwrap();
    let hex = gz.file_name().unwrap().to_str().unwrap().to_string();
    let flip = |p: &Path| {
        let mut b = std::fs::read(p).unwrap();
        let n = b.len();
        b[n - 9] ^= 0x55;
        std::fs::write(p, b).unwrap();
    };
    flip(&gz);
    flip(&Registry::blob_path(&reg.storage, &hex));
    let client = Client::new(ClientOptions::default()).unwrap();
    for src in [layout, format!("{}/src/bad:v1", reg.host())] {
        let src = SourceRef::parse(&src).unwrap();
        let work = dir.path().join("work");
        let _ = std::fs::remove_dir_all(&work);
        let e = rt()
            .block_on(lazyblk_convert::convert(
                &src,
                Some(&client),
                &work,
                &ConvertOptions::default(),
                &mut |_| {},
            ))
            .unwrap_err();
        assert!(matches!(e, Error::Digest { .. }), "{src}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("digest mismatch") && !msg.contains('\n'),
            "{msg}"
        );
        assert!(
            !work.join("rootfs/f").exists(),
            "nothing applied from a bad layer"
        );
    }
}

#[test]
fn converted_images_link_to_their_source_and_are_found_from_it() {
    use lazyblk_registry::link::{referrers_tag, SOURCE_INDEX, SOURCE_MANIFEST, SOURCE_REPOSITORY};
    use lazyblk_registry::Platform;
    use lazyblk_remote::registry::{find_lazy, lazy_version, Serve};
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("src");
    std::fs::create_dir(&w).unwrap();
    run(Command::new("bash")
        .arg("-c")
        .arg(
            "set -eu; cd \"$W\"; umoci init --layout L; umoci new --image L:img; \
         umoci unpack --image L:img B; echo hello > B/rootfs/f; umoci repack --image L:img B; \
         umoci new --image L:other; umoci unpack --image L:other C; echo x > C/rootfs/g; \
         umoci repack --image L:other C",
        )
        .env("W", &w));
    let reg = Registry::start(&dir.path().join("reg"), &RegistryAuth::None);
    let reg2 = Registry::start(&dir.path().join("reg2"), &RegistryAuth::None);
    let (host, host2) = (reg.host(), reg2.host());
    let layout = |t: &str| format!("oci:{}:{t}", w.join("L").display());
    skopeo(&layout("img"), &format!("docker://{host}/src/app:v1"), &[]);
    skopeo(
        &layout("other"),
        &format!("docker://{host}/src/app:plain"),
        &[],
    );
    let client = Client::new(ClientOptions::default()).unwrap();
    let v1 = Reference::parse(&format!("{host}/src/app:v1")).unwrap();
    let got = rt().block_on(client.resolve(&v1)).unwrap();
    // An index over it (what multi-platform images are).
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": got.media_type, "digest": got.digest, "size": got.bytes.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    });
    let idx = rt()
        .block_on(client.push_manifest(
            &v1,
            "multi",
            "application/vnd.oci.image.index.v1+json",
            serde_json::to_vec(&index).unwrap().into(),
        ))
        .unwrap();

    // Converted from the tag into the same repository, from the index into another one and
    // (the same build) into another registry: each a newer link.
    let convert = |src: &str, work: &Path| {
        let src = SourceRef::parse(src).unwrap();
        let c = rt()
            .block_on(lazyblk_convert::convert(
                &src,
                Some(&client),
                work,
                &ConvertOptions::default(),
                &mut |_| {},
            ))
            .unwrap();
        (src, c)
    };
    let push = |c: &lazyblk_convert::Converted, src: &SourceRef, dst: &str, created: &str| {
        let link = c
            .source_link(src, created.into())
            .expect("a registry source");
        rt().block_on(lazyblk_builder::push_linked(
            &client,
            &c.out_dir,
            &Reference::parse(dst).unwrap(),
            &link,
            &|_, _| {},
        ))
        .unwrap()
    };
    let (src1, c1) = convert(&format!("{host}/src/app:v1"), &dir.path().join("w1"));
    assert!(c1.index.is_none());
    let same = push(
        &c1,
        &src1,
        &format!("{host}/src/app:lazy"),
        "2025-01-01T00:00:00Z",
    );
    assert_eq!(same.links.len(), 1);
    assert!(
        same.links[0].fallback,
        "distribution 2.8 has no referrers API"
    );
    assert_eq!(same.links[0].digest, same.pushed.digest);
    assert_eq!(same.links[0].subject, got.digest);

    // The lazy manifest: subject, artifact type, the source named without its host.
    let lazy = rt()
        .block_on(client.resolve(&Reference::parse(&format!("{host}/src/app:lazy")).unwrap()))
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&lazy.bytes).unwrap();
    assert_eq!(m["artifactType"], "application/vnd.lazyblk.image.v1");
    assert_eq!(m["subject"]["digest"], got.digest);
    assert_eq!(m["subject"]["size"], got.bytes.len());
    assert_eq!(m["subject"]["mediaType"], got.media_type);
    assert_eq!(m["annotations"][SOURCE_REPOSITORY], "src/app");
    assert_eq!(m["annotations"][SOURCE_MANIFEST], got.digest);
    assert!(
        !String::from_utf8_lossy(&lazy.bytes).contains(&host),
        "no host in a link"
    );
    let tags = rt().block_on(client.list_tags(&v1)).unwrap();
    assert!(
        tags.contains(&referrers_tag(&got.digest).unwrap()),
        "{tags:?}"
    );

    let find = |src: &str| {
        rt().block_on(find_lazy(
            &client,
            &Reference::parse(src).unwrap(),
            &Platform::default(),
        ))
        .unwrap()
    };
    let found = find(&format!("{host}/src/app:v1")).unwrap();
    assert_eq!(
        found.reference.to_string(),
        format!("{host}/src/app@{}", same.pushed.digest)
    );

    let (src2, c2) = convert(&format!("{host}/src/app:multi"), &dir.path().join("w2"));
    assert_eq!(c2.index.as_ref().unwrap().digest, idx);
    let other = push(
        &c2,
        &src2,
        &format!("{host}/lazy/app:v1"),
        "2025-02-01T00:00:00Z",
    );
    assert_eq!(other.links.len(), 2, "the manifest and the index");
    assert_eq!(other.links[0].subject, got.digest);
    assert_eq!(other.links[1].subject, idx);
    assert_eq!(other.links[0].digest, other.pushed.digest);
    let far = push(
        &c2,
        &src2,
        &format!("{host2}/elsewhere/app:v1"),
        "2025-03-01T00:00:00Z",
    );

    // Found by tag, by digest, through the index (tag or digest): the newest, in the source
    // repository, and it opens there through the chunk store.
    for src in [
        format!("{host}/src/app:v1"),
        format!("{host}/src/app@{}", got.digest),
        format!("{host}/src/app:multi"),
        format!("{host}/src/app@{idx}"),
    ] {
        let l = find(&src).unwrap_or_else(|| panic!("{src}: no lazy version"));
        assert_eq!(
            l.reference.to_string(),
            format!("{host}/src/app@{}", far.pushed.digest),
            "{src}"
        );
        assert_eq!(l.created.as_deref(), Some("2025-03-01T00:00:00Z"));
    }
    let via_index = rt()
        .block_on(client.resolve(&v1.pinned(&far.links[1].digest).unwrap()))
        .unwrap();
    let vi: serde_json::Value = serde_json::from_slice(&via_index.bytes).unwrap();
    assert_eq!(vi["subject"]["digest"], idx);
    assert_eq!(vi["annotations"][SOURCE_INDEX], idx);
    let l = find(&format!("{host}/src/app:v1")).unwrap();
    let cache = dir.path().join("cache");
    let mut o = StoreOptions {
        cache_root: cache.clone(),
        readahead_bytes: 0,
        ..Default::default()
    };
    o.registry.credentials = CredentialSource::Anonymous;
    o.registry.hosts_dir = Some(cache.join("no-hosts.d"));
    let s = ChunkStore::open(&Location::parse(&l.reference.to_string()), o.clone()).unwrap();
    assert_eq!(s.id(), far.pushed.image);
    drop(s);

    // A prefetch pack pushed over a converted image (`trace --pack --push`) keeps its link to
    // the source, made now: the newest, so the source (tag, digest, index) finds the version
    // with the pack, and the store opens it with the pack.
    let lazy_ref = Reference::parse(&format!("{host}/lazy/app:v1")).unwrap();
    let m2 = lazyblk_format::Manifest::decode(&std::fs::read(c2.out_dir.join("manifest")).unwrap())
        .unwrap();
    let pack_path = dir.path().join("trace").join("prefetch.pack");
    std::fs::create_dir_all(pack_path.parent().unwrap()).unwrap();
    {
        use lazyblk_blocksource::BlockSource;
        let s2 = ChunkStore::open(&Location::parse(&lazy_ref.to_string()), o.clone()).unwrap();
        let mut read = |at: u64, buf: &mut [u8]| {
            s2.read_at(at, buf)
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        // Three blocks outside the image's metadata pack (the pack extends it).
        let data: Vec<u64> = (0..m2.block_count())
            .filter(|&b| m2.pack.as_ref().is_none_or(|p| p.covers(b, b).is_none()))
            .take(3)
            .collect();
        assert_eq!(data.len(), 3);
        lazyblk_builder::build_prefetch_pack(
            other.pushed.image,
            &m2,
            &data,
            &mut read,
            &pack_path,
            3,
        )
        .unwrap();
    }
    let packed = rt()
        .block_on(lazyblk_builder::push_pack(
            &client,
            &pack_path,
            &lazy_ref,
            &|_, _| {},
        ))
        .unwrap();
    assert_eq!(packed.image, other.pushed.image, "the same image");
    for src in [
        format!("{host}/src/app:v1"),
        format!("{host}/src/app:multi"),
    ] {
        let l = find(&src).unwrap_or_else(|| panic!("{src}: no lazy version"));
        assert_eq!(
            l.reference.to_string(),
            format!("{host}/src/app@{}", packed.digest),
            "{src}: the version with the pack is the newest"
        );
    }
    let pm = rt().block_on(client.resolve(&lazy_ref)).unwrap();
    let pv: serde_json::Value = serde_json::from_slice(&pm.bytes).unwrap();
    assert_eq!(
        pv["subject"]["digest"], got.digest,
        "the pack push keeps the subject"
    );
    assert_eq!(pv["annotations"][SOURCE_INDEX], idx);
    let l = find(&format!("{host}/src/app:v1")).unwrap();
    let s = ChunkStore::open(&Location::parse(&l.reference.to_string()), o).unwrap();
    assert!(
        s.open_report().prefetch_pack.is_some(),
        "the source's lazy version opens with its prefetch pack"
    );
    drop(s);

    // `add`'s choice: a lazy image as is, an ordinary one through its link, none: one line.
    let choose = |src: &str| {
        rt().block_on(lazy_version(
            &client,
            &Reference::parse(src).unwrap(),
            &Platform::default(),
        ))
    };
    assert_eq!(
        choose(&format!("{host}/src/app:lazy")).unwrap(),
        Serve::Itself
    );
    assert_eq!(
        choose(&format!("{host}/src/app:multi")).unwrap(),
        Serve::Lazy(find(&format!("{host}/src/app:multi")).unwrap())
    );
    let e = choose(&format!("{host}/src/app:plain"))
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(
        e.contains("src/app:plain") && e.contains("lazyblk convert"),
        "{e}"
    );
    assert!(find(&format!("{host}/src/app:plain")).is_none());
}

/// A base image and an application image on it, made with umoci from Debian's python3.11 (its
/// standard library, the interpreter, busybox) plus one application layer (new files, a
/// changed and a deleted file of the base).
const MAKE_PAIR: &str = r#"
set -eux
cd "$W"
umoci init --layout L
umoci new --image L:base
umoci unpack --image L:base B
R=B/rootfs
mkdir -p $R/usr/lib $R/usr/bin $R/etc
cp -a /usr/lib/python3.11 $R/usr/lib/
cp "$(command -v busybox)" $R/usr/bin/busybox
umoci repack --refresh-bundle --image L:base B
cp -L /usr/bin/python3.11 $R/usr/bin/
echo 'PRETTY_NAME="base"' > $R/etc/os-release
umoci repack --image L:base B
umoci unpack --image L:base A
R=A/rootfs
mkdir -p $R/app/vendor
cp -a /usr/lib/python3.11/json /usr/lib/python3.11/email $R/app/vendor/
head -c 1500000 /dev/urandom > $R/app/model.bin
for i in $(seq 200); do echo "print($i)" > $R/app/mod$i.py; done
echo 'PRETTY_NAME="app"' > $R/etc/os-release
rm $R/usr/lib/python3.11/this.py
umoci repack --image L:app A
"#;

/// The registry blobs (digest, size) of the lazyblk image at `r`.
fn blobs_of(client: &Client, r: &str) -> Vec<(String, u64)> {
    let got = rt()
        .block_on(client.resolve(&Reference::parse(r).unwrap()))
        .unwrap();
    let Manifest::Image(m) = lazyblk_registry::parse_manifest(&got.media_type, &got.bytes).unwrap()
    else {
        panic!("an image manifest")
    };
    let mut v: Vec<(String, u64)> = m
        .layers()
        .iter()
        .map(|l| (l.digest().to_string(), l.size()))
        .collect();
    v.push((m.config().digest().to_string(), m.config().size()));
    v
}

#[test]
fn a_shared_base_layer_is_stored_and_fetched_once() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("src");
    std::fs::create_dir(&w).unwrap();
    run(Command::new("bash").arg("-c").arg(MAKE_PAIR).env("W", &w));
    let reg = Registry::start(&dir.path().join("reg"), &RegistryAuth::None);
    let host = reg.host();
    let client = Client::new(ClientOptions::default()).unwrap();
    let mut built = Vec::new();
    for name in ["base", "app"] {
        let layout = format!("oci:{}:{name}", w.join("L").display());
        skopeo(&layout, &format!("docker://{host}/src/{name}:v1"), &[]);
        let src = SourceRef::parse(&format!("{host}/src/{name}:v1")).unwrap();
        let work = dir.path().join(format!("work-{name}"));
        let c = rt()
            .block_on(lazyblk_convert::convert(
                &src,
                Some(&client),
                &work,
                &ConvertOptions::default(),
                &mut |_| {},
            ))
            .unwrap_or_else(|e| panic!("converting {src}: {e}"));
        let dst = format!("{host}/lazy/{name}:v1");
        rt().block_on(lazyblk_builder::push(
            &client,
            &c.out_dir,
            &Reference::parse(&dst).unwrap(),
            None,
            &|_, _| {},
        ))
        .unwrap();
        built.push((c, dst));
    }
    let (base, app) = (&built[0], &built[1]);
    assert_eq!(base.0.build.shared.len(), 2, "one blob per layer with data");
    assert_eq!(app.0.build.shared.len(), 3);
    assert_eq!(
        app.0.build.shared[..2],
        base.0.build.shared[..],
        "the base's layers are the same blobs in the application image"
    );
    // In the registry: what the application image adds beyond the base.
    let base_blobs = blobs_of(&client, &base.1);
    let app_blobs = blobs_of(&client, &app.1);
    let added: u64 = app_blobs
        .iter()
        .filter(|b| !base_blobs.contains(b))
        .map(|b| b.1)
        .sum();
    let own_layer = app.0.layers.last().unwrap().0.size;
    let base_total: u64 = base_blobs.iter().map(|b| b.1).sum();
    eprintln!(
        "sharing: base {base_total} bytes in the registry; the application adds {added} \
         bytes for its own layer of {own_layer} compressed bytes ({:.2}x)",
        added as f64 / own_layer as f64
    );
    assert!(
        added <= 2 * own_layer,
        "the application image adds {added} registry bytes, more than 2x its layer's {own_layer}"
    );
    // On a host: the base read whole, then the application fetches only what it adds.
    let cache = dir.path().join("cache");
    let opts = || {
        let mut o = StoreOptions {
            cache_root: cache.clone(),
            readahead_bytes: 0,
            ..Default::default()
        };
        o.registry.credentials = CredentialSource::Anonymous;
        o.registry.hosts_dir = Some(cache.join("no-hosts.d"));
        o
    };
    let sb = ChunkStore::open(&Location::parse(&base.1), opts()).unwrap();
    let raw_base = dir.path().join("base.erofs");
    sb.export(&raw_base).unwrap();
    sb.flush().unwrap();
    let sa = ChunkStore::open(&Location::parse(&app.1), opts()).unwrap();
    // Read at once, as `lazyblk cat` and a mount do: misses wait for the host index's first
    // build, so no chunk of the base goes to the network.
    let raw_app = dir.path().join("app.erofs");
    sa.export(&raw_app).unwrap();
    let s = sa.stats();
    let new_blobs: u64 = app.0.build.own_blob_size + app.0.build.shared[2].size;
    eprintln!(
        "sharing: the application fetched {} bytes ({} chunks), copied {} chunks from the base's cache; its new blobs hold {new_blobs}",
        s.bytes_fetched, s.chunks_fetched, s.local_copies
    );
    assert!(s.local_copies > 0, "{s:?}");
    assert!(
        s.bytes_fetched <= new_blobs,
        "the application fetched {} bytes, more than its new blobs' {new_blobs}",
        s.bytes_fetched
    );
    drop((sa, sb));
    for raw in [&raw_base, &raw_app] {
        run(Command::new("fsck.erofs").arg(raw));
    }
    // And the application's tree is the one umoci unpacks.
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:app", w.join("L").display()))
        .arg(w.join("REF")));
    let want = tree::digest(&w.join("REF/rootfs")).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-t", "erofs", "-o", "loop,ro"])
        .arg(&raw_app)
        .arg(&mnt));
    let _m = Mount(mnt.clone());
    assert!(
        tree::digest(&mnt).unwrap() == want,
        "the application's tree differs"
    );
}
