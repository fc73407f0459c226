//! Reading a source image: from a registry (`[host/]repo[:tag|@digest]`), an OCI layout
//! directory (`oci:DIR[:TAG]`, skopeo's syntax) or a `docker save` archive
//! (`docker-archive:FILE`). An index picks the [`Platform`]; every manifest, config and layer is
//! checked against its SHA-256 before it is used (layers as they are downloaded or read), and
//! the config's `diff_ids` against the decompressed layers as they are applied.

use crate::error::{Error, Result};
use lazyblk_registry::{parse_manifest, select_platform, Client, Manifest, Reference};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Most bytes of a manifest, an index or a config read whole.
pub const MAX_SMALL_BLOB: u64 = 16 << 20;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Where a source image is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceRef {
    /// An image in a registry.
    Registry(Reference),
    /// An OCI image layout directory, and the `org.opencontainers.image.ref.name` to pick.
    OciLayout {
        /// The layout directory (has `index.json`, `oci-layout`, `blobs/`).
        dir: PathBuf,
        /// The tag; none: the layout's only image.
        tag: Option<String>,
    },
    /// A `docker save` archive (`manifest.json` and layer tars).
    DockerArchive(PathBuf),
}

impl SourceRef {
    /// `oci:DIR[:TAG]`, `docker-archive:FILE`, or a registry reference.
    pub fn parse(s: &str) -> Result<SourceRef> {
        if let Some(rest) = s.strip_prefix("oci:") {
            // The tag is after the last ':' when what follows has no '/'.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            return Ok(SourceRef::OciLayout {
                dir: PathBuf::from(dir),
                tag: tag.filter(|t| !t.is_empty()),
            });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            return Ok(SourceRef::DockerArchive(PathBuf::from(rest)));
        }
        Reference::parse(s)
            .map(SourceRef::Registry)
            .map_err(|e| Error::Source(format!("{s:?} is not an image reference: {e}")))
    }
}

impl std::fmt::Display for SourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceRef::Registry(r) => write!(f, "{r}"),
            SourceRef::OciLayout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            SourceRef::OciLayout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            SourceRef::DockerArchive(p) => write!(f, "docker-archive:{}", p.display()),
        }
    }
}

/// The platform to pick from an index (the registry client's, shared with the finder of lazy
/// versions).
pub use lazyblk_registry::Platform;

/// One layer of the source image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerDesc {
    /// `sha256:<hex>` of its bytes as stored.
    pub digest: String,
    /// Its size as stored.
    pub size: u64,
    /// Its media type (empty in a `docker save` archive: decided by the bytes).
    pub media_type: String,
}

/// The image manifest the conversion used (the OCI 1.1 `subject` of the pushed image's link).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestDesc {
    /// `sha256:<hex>` (empty for a `docker save` archive, which has no manifest blob).
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its size.
    pub size: u64,
}

enum Origin {
    Registry {
        client: Client,
        reference: Reference,
    },
    Layout {
        dir: PathBuf,
    },
    /// Layers already extracted into the work directory, verified.
    Extracted(Vec<PathBuf>),
}

/// An opened source image: its config, its layers, and where to read them.
pub struct Image {
    /// The manifest used.
    pub manifest: ManifestDesc,
    /// The index it was picked from (a registry source that named an index).
    pub index: Option<ManifestDesc>,
    /// The config blob, as stored.
    pub config: Vec<u8>,
    /// The layers, base first.
    pub layers: Vec<LayerDesc>,
    /// The config's `rootfs.diff_ids` (empty when it has none).
    pub diff_ids: Vec<String>,
    origin: Origin,
}

fn sha256_hex(d: &str) -> Result<&str> {
    let hex = d
        .strip_prefix("sha256:")
        .ok_or_else(|| Error::Source(format!("unsupported digest {d:?} (only sha256)")))?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(Error::Source(format!("malformed digest {d:?}")));
    }
    Ok(hex)
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn check(what: &str, expected: &str, bytes: &[u8]) -> Result<()> {
    let actual = digest_of(bytes);
    if actual != expected {
        return Err(Error::Digest {
            what: what.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// The config's `rootfs.diff_ids`.
fn diff_ids(config: &[u8]) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(config)
        .map_err(|e| Error::Source(format!("the image config is not JSON: {e}")))?;
    Ok(v.pointer("/rootfs/diff_ids")
        .and_then(|d| d.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// The image manifest `bytes` (of `media_type`) as config descriptor and layers; refuses an
/// index here and lazyblk's own artifacts.
fn image_parts(what: &str, media_type: &str, bytes: &[u8]) -> Result<(LayerDesc, Vec<LayerDesc>)> {
    let m = match parse_manifest(media_type, bytes)
        .map_err(|e| Error::Source(format!("{what}: {e}")))?
    {
        Manifest::Image(m) => m,
        Manifest::Index(_) => {
            return Err(Error::Source(format!("{what}: an index inside an index")))
        }
    };
    let cfg = m.config();
    if cfg
        .media_type()
        .to_string()
        .starts_with("application/vnd.lazyblk.")
    {
        return Err(Error::Source(format!(
            "{what} is already a lazyblk image (nothing to convert)"
        )));
    }
    let d = |x: &lazyblk_registry::Descriptor| LayerDesc {
        digest: x.digest().to_string(),
        size: x.size(),
        media_type: x.media_type().to_string(),
    };
    Ok((d(cfg), m.layers().iter().map(d).collect()))
}

impl Image {
    /// Open `src` (`client` for registries), picking `platform` from an index. A `docker save`
    /// archive's layers are extracted into `work` now.
    pub async fn open(
        src: &SourceRef,
        client: Option<&Client>,
        platform: &crate::Platform,
        work: &Path,
    ) -> Result<Image> {
        match src {
            SourceRef::Registry(r) => {
                let client = client
                    .ok_or_else(|| Error::Source("a registry source needs a client".into()))?;
                Self::open_registry(client.clone(), r, platform).await
            }
            SourceRef::OciLayout { dir, tag } => Self::open_layout(dir, tag.as_deref(), platform),
            SourceRef::DockerArchive(p) => Self::open_archive(p, work),
        }
    }

    async fn open_registry(client: Client, r: &Reference, p: &crate::Platform) -> Result<Image> {
        let mut got = client.resolve(r).await?;
        let mut reference = r.clone();
        let mut index = None;
        if got.media_type == OCI_INDEX || got.media_type == DOCKER_LIST {
            index = Some(ManifestDesc {
                digest: got.digest.clone(),
                media_type: got.media_type.clone(),
                size: got.bytes.len() as u64,
            });
            let d = select_platform(
                &got.media_type,
                &got.bytes,
                &p.os,
                &p.arch,
                p.variant.as_deref(),
            )
            .map_err(|e| Error::Source(format!("{r}: {e}")))?
            .ok_or_else(|| Error::Source(format!("{r}: the index has no image for {p}")))?;
            reference = r
                .with_digest(d.digest().as_ref())
                .map_err(|e| Error::Source(format!("{r}: {e}")))?;
            got = client.resolve(&reference).await?;
        }
        let (cfg, layers) = image_parts(&r.to_string(), &got.media_type, &got.bytes)?;
        sha256_hex(&cfg.digest)?;
        let config = client
            .get_blob(&reference, &cfg.digest, MAX_SMALL_BLOB)
            .await?
            .to_vec();
        check(&format!("{r}: config"), &cfg.digest, &config)?;
        for l in &layers {
            sha256_hex(&l.digest)?;
        }
        Ok(Image {
            manifest: ManifestDesc {
                digest: got.digest.clone(),
                media_type: got.media_type.clone(),
                size: got.bytes.len() as u64,
            },
            index,
            diff_ids: diff_ids(&config)?,
            config,
            layers,
            origin: Origin::Registry { client, reference },
        })
    }

    fn layout_blob(dir: &Path, digest: &str, max: u64) -> Result<Vec<u8>> {
        let path = dir.join("blobs/sha256").join(sha256_hex(digest)?);
        let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut v = Vec::new();
        f.take(max + 1)
            .read_to_end(&mut v)
            .map_err(|e| Error::io(&path, e))?;
        if v.len() as u64 > max {
            return Err(Error::Source(format!(
                "{}: larger than {max} bytes",
                path.display()
            )));
        }
        check(&path.display().to_string(), digest, &v)?;
        Ok(v)
    }

    fn open_layout(dir: &Path, tag: Option<&str>, p: &crate::Platform) -> Result<Image> {
        let ipath = dir.join("index.json");
        let index = std::fs::read(&ipath).map_err(|e| Error::io(&ipath, e))?;
        let what = format!("oci:{}", dir.display());
        let v: serde_json::Value = serde_json::from_slice(&index)
            .map_err(|e| Error::Source(format!("{}: {e}", ipath.display())))?;
        let empty = Vec::new();
        let ms = v
            .get("manifests")
            .and_then(|m| m.as_array())
            .unwrap_or(&empty);
        let picked: Vec<&serde_json::Value> = ms
            .iter()
            .filter(|m| match tag {
                Some(t) => {
                    m.pointer(&format!("/annotations/{}", REF_NAME.replace('/', "~1")))
                        .and_then(|x| x.as_str())
                        == Some(t)
                }
                None => true,
            })
            .collect();
        let m = match picked[..] {
            [m] => m,
            [] => {
                return Err(Error::Source(format!(
                    "{what}: no image{}",
                    tag.map(|t| format!(" tagged {t:?}")).unwrap_or_default()
                )))
            }
            _ => {
                return Err(Error::Source(format!(
                    "{what}: {} images; name one with oci:DIR:TAG",
                    picked.len()
                )))
            }
        };
        let field = |k: &str| m.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        let mut digest = field("digest");
        let mut media_type = field("mediaType");
        let mut bytes = Self::layout_blob(dir, &digest, MAX_SMALL_BLOB)?;
        if media_type == OCI_INDEX || media_type == DOCKER_LIST {
            let d = select_platform(&media_type, &bytes, &p.os, &p.arch, p.variant.as_deref())
                .map_err(|e| Error::Source(format!("{what}: {e}")))?
                .ok_or_else(|| Error::Source(format!("{what}: the index has no image for {p}")))?;
            digest = d.digest().to_string();
            media_type = d.media_type().to_string();
            bytes = Self::layout_blob(dir, &digest, MAX_SMALL_BLOB)?;
        }
        if media_type.is_empty() {
            media_type = OCI_MANIFEST.into();
        }
        let (cfg, layers) = image_parts(&what, &media_type, &bytes)?;
        let config = Self::layout_blob(dir, &cfg.digest, MAX_SMALL_BLOB)?;
        for l in &layers {
            sha256_hex(&l.digest)?;
        }
        Ok(Image {
            manifest: ManifestDesc {
                digest,
                media_type,
                size: bytes.len() as u64,
            },
            index: None,
            diff_ids: diff_ids(&config)?,
            config,
            layers,
            origin: Origin::Layout {
                dir: dir.to_path_buf(),
            },
        })
    }

    /// A `docker save` archive: `manifest.json` (one image), its config and layer members
    /// (symlinked members, as older Docker writes for repeated layers, followed inside the
    /// archive by name). Layers are extracted to `work/layers/<n>.tar`, their SHA-256 computed
    /// (and checked when the member is named `blobs/sha256/<hex>`).
    fn open_archive(path: &Path, work: &Path) -> Result<Image> {
        let what = format!("docker-archive:{}", path.display());
        let norm = |p: &[u8]| {
            let s = String::from_utf8_lossy(p).into_owned();
            s.trim_start_matches("./").to_string()
        };
        // Pass 1: manifest.json and the symlinks.
        let mut manifest = None;
        let mut links: HashMap<String, String> = HashMap::new();
        let open = || File::open(path).map_err(|e| Error::io(path, e));
        let bad = |e: io::Error| Error::Source(format!("{what}: {e}"));
        let mut a = tar::Archive::new(open()?);
        for e in a.entries().map_err(bad)? {
            let mut e = e.map_err(bad)?;
            let name = norm(&e.path_bytes());
            if e.header().entry_type().is_symlink() {
                if let Some(t) = e.link_name_bytes() {
                    let base = Path::new(&name).parent().unwrap_or(Path::new(""));
                    links.insert(name.clone(), lexical_join(base, &norm(&t)));
                }
            } else if name == "manifest.json" {
                let mut v = Vec::new();
                (&mut e)
                    .take(MAX_SMALL_BLOB)
                    .read_to_end(&mut v)
                    .map_err(bad)?;
                manifest = Some(v);
            }
        }
        let manifest =
            manifest.ok_or_else(|| Error::Source(format!("{what}: no manifest.json")))?;
        let mv: serde_json::Value = serde_json::from_slice(&manifest)
            .map_err(|e| Error::Source(format!("{what}: manifest.json: {e}")))?;
        let images = mv.as_array().cloned().unwrap_or_default();
        let [img] = &images[..] else {
            return Err(Error::Source(format!(
                "{what}: manifest.json lists {} images, need exactly one",
                images.len()
            )));
        };
        let resolve = |n: &str| {
            let mut n = n.trim_start_matches("./").to_string();
            for _ in 0..16 {
                match links.get(&n) {
                    Some(t) => n = t.clone(),
                    None => break,
                }
            }
            n
        };
        let cfg_name = resolve(img.get("Config").and_then(|c| c.as_str()).unwrap_or(""));
        let layer_names: Vec<String> = img
            .get("Layers")
            .and_then(|l| l.as_array())
            .map(|l| l.iter().filter_map(|x| x.as_str()).map(resolve).collect())
            .unwrap_or_default();
        // Pass 2: extract.
        let dir = work.join("layers");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut config = None;
        let mut files: Vec<Option<(PathBuf, String, u64)>> = vec![None; layer_names.len()];
        let mut a = tar::Archive::new(open()?);
        for e in a.entries().map_err(bad)? {
            let mut e = e.map_err(bad)?;
            if !e.header().entry_type().is_file() {
                continue;
            }
            let name = norm(&e.path_bytes());
            if name == cfg_name {
                let mut v = Vec::new();
                (&mut e)
                    .take(MAX_SMALL_BLOB)
                    .read_to_end(&mut v)
                    .map_err(bad)?;
                config = Some(v);
            }
            for (i, l) in layer_names.iter().enumerate() {
                if *l == name && files[i].is_none() {
                    let out = dir.join(format!("{i}.tar"));
                    let (digest, size) = copy_hashing(&mut e, &out)?;
                    if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                        if format!("sha256:{hex}") != digest {
                            return Err(Error::Digest {
                                what: format!("{what}: {name}"),
                                expected: format!("sha256:{hex}"),
                                actual: digest,
                            });
                        }
                    }
                    files[i] = Some((out, digest, size));
                    break;
                }
            }
        }
        let config = config.ok_or_else(|| {
            Error::Source(format!("{what}: config {cfg_name:?} not in the archive"))
        })?;
        let mut layers = Vec::new();
        let mut paths = Vec::new();
        for (i, f) in files.into_iter().enumerate() {
            let (p, digest, size) = f.ok_or_else(|| {
                Error::Source(format!(
                    "{what}: layer {:?} not in the archive",
                    layer_names[i]
                ))
            })?;
            layers.push(LayerDesc {
                digest,
                size,
                media_type: String::new(),
            });
            paths.push(p);
        }
        Ok(Image {
            manifest: ManifestDesc {
                digest: String::new(),
                media_type: String::new(),
                size: 0,
            },
            index: None,
            diff_ids: diff_ids(&config)?,
            config,
            layers,
            origin: Origin::Extracted(paths),
        })
    }

    /// Layer `i` as a local file whose bytes match its digest: downloaded into `work/layers/`
    /// (registry), or checked in place (layout, archive). `progress` gets bytes done.
    pub async fn fetch_layer(
        &self,
        i: usize,
        work: &Path,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<PathBuf> {
        let l = &self.layers[i];
        let what = format!("layer {} ({})", i + 1, l.digest);
        let hex = sha256_hex(&l.digest)?;
        match &self.origin {
            Origin::Extracted(paths) => Ok(paths[i].clone()),
            Origin::Layout { dir } => {
                let path = dir.join("blobs/sha256").join(hex);
                let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0u64;
                loop {
                    let k = f.read(&mut buf).map_err(|e| Error::io(&path, e))?;
                    if k == 0 {
                        break;
                    }
                    h.update(&buf[..k]);
                    n += k as u64;
                    progress(n);
                }
                let actual = format!("sha256:{}", hex::encode(h.finalize()));
                if actual != l.digest || n != l.size {
                    return Err(Error::Digest {
                        what,
                        expected: format!("{} ({} bytes)", l.digest, l.size),
                        actual: format!("{actual} ({n} bytes)"),
                    });
                }
                Ok(path)
            }
            Origin::Registry { client, reference } => {
                let dir = work.join("layers");
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                let path = dir.join(hex);
                let mut f = File::create(&path).map_err(|e| Error::io(&path, e))?;
                let mut h = Sha256::new();
                let mut n = 0u64;
                let mut werr: Option<io::Error> = None;
                client
                    .read_blob_range(reference, &l.digest, 0, l.size, &mut |b| {
                        if werr.is_none() {
                            if let Err(e) = f.write_all(&b) {
                                werr = Some(e);
                            }
                        }
                        h.update(&b);
                        n += b.len() as u64;
                        progress(n);
                    })
                    .await?;
                if let Some(e) = werr {
                    return Err(Error::io(&path, e));
                }
                let actual = format!("sha256:{}", hex::encode(h.finalize()));
                if actual != l.digest {
                    client.report_bad_blob(reference, &l.digest);
                    let _ = std::fs::remove_file(&path);
                    return Err(Error::Digest {
                        what: format!("{reference}: {what}"),
                        expected: l.digest.clone(),
                        actual,
                    });
                }
                Ok(path)
            }
        }
    }
}

/// `base/rel` resolved lexically (`..` pops), for symlinks inside an archive.
fn lexical_join(base: &Path, rel: &str) -> String {
    let mut parts: Vec<String> = base
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for c in rel.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c.to_string()),
        }
    }
    parts.join("/")
}

/// Copy `r` into a new file `out`; its `sha256:<hex>` and size.
fn copy_hashing(r: &mut impl Read, out: &Path) -> Result<(String, u64)> {
    let mut f = File::create(out).map_err(|e| Error::io(out, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).map_err(|e| Error::io(out, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        f.write_all(&buf[..k]).map_err(|e| Error::io(out, e))?;
        n += k as u64;
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources_and_platforms() {
        assert_eq!(
            SourceRef::parse("oci:/tmp/lay:v1").unwrap(),
            SourceRef::OciLayout {
                dir: "/tmp/lay".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            SourceRef::parse("oci:/tmp/lay").unwrap(),
            SourceRef::OciLayout {
                dir: "/tmp/lay".into(),
                tag: None
            }
        );
        assert_eq!(
            SourceRef::parse("docker-archive:/x.tar").unwrap(),
            SourceRef::DockerArchive("/x.tar".into())
        );
        assert!(matches!(
            SourceRef::parse("127.0.0.1:5000/a/b:c").unwrap(),
            SourceRef::Registry(_)
        ));
        assert_eq!(
            "linux/arm64/v8"
                .parse::<Platform>()
                .unwrap()
                .variant
                .as_deref(),
            Some("v8")
        );
        assert!("linux".parse::<Platform>().is_err());
        assert_eq!(Platform::default().to_string(), "linux/amd64");
    }

    #[test]
    fn digests_are_strict() {
        assert!(sha256_hex(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(sha256_hex(&format!("sha256:../../{}", "a".repeat(58))).is_err());
        assert!(sha256_hex("sha512:abc").is_err());
        assert_eq!(
            lexical_join(Path::new("a/b"), "../c/layer.tar"),
            "a/c/layer.tar"
        );
    }
}
