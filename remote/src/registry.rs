//! Images in OCI registries: a lazyblk image published as an OCI artifact (`docs/FORMAT.md`,
//! "In an OCI registry"), its files found by the `org.opencontainers.image.title` annotation of
//! their layer descriptors and read through `lazyblk-registry` (auth, redirects, mirrors).
//!
//! A [`RegistryLocation`] is plain data (a reference and a file name); the [`crate::Connector`]
//! holds the registry client and resolves each image once, so the manifest, the companions
//! and every range of the blob of one store share one client, one token cache and one
//! resolution.

use crate::{BlobInfo, BoxFuture, Remote, RemoteError};
use bytes::Bytes;
use lazyblk_registry::{Client, Link, Manifest as OciManifest, Platform, Reference, RegistryError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// `artifactType` of a lazyblk image manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.lazyblk.image.v1";
/// Media type of the config blob (JSON: the image id, sizes).
pub const MEDIA_CONFIG: &str = "application/vnd.lazyblk.config.v1+json";
/// Media type of the lazyblk manifest layer (its digest is the lazyblk image id).
pub const MEDIA_MANIFEST: &str = "application/vnd.lazyblk.manifest.v1";
/// Media type of the blob of zstd chunks.
pub const MEDIA_BLOB: &str = "application/vnd.lazyblk.blob.v1";
/// Media type of a published prefetch list.
pub const MEDIA_PREFETCH: &str = "application/vnd.lazyblk.prefetch.v1";
/// Media type of a published prefetch pack.
pub const MEDIA_PACK: &str = "application/vnd.lazyblk.prefetch-pack.v1";
/// Media type of a prefetch pack's blob.
pub const MEDIA_PACK_BLOB: &str = "application/vnd.lazyblk.prefetch-pack-blob.v1";
/// Annotation naming a layer's file (ORAS' convention).
pub const TITLE: &str = "org.opencontainers.image.title";
/// Annotation giving the lazyblk image id on every layer and on the manifest.
pub const IMAGE_ID: &str = "io.lazyblk.image.id";
/// The file name a reference stands for when it names an image.
pub const MANIFEST_FILE: &str = "manifest";

/// A file of a lazyblk image in a registry: `name` (`manifest`, `blob`, `prefetch`, ...) of the
/// image `reference`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryLocation {
    /// The image.
    pub reference: Reference,
    /// The file, as named by its layer's title.
    pub name: String,
}

impl std::fmt::Display for RegistryLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.name == MANIFEST_FILE {
            write!(f, "{}", self.reference)
        } else {
            write!(f, "{} ({})", self.reference, self.name)
        }
    }
}

/// One layer: where a file's bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// Its digest (`sha256:...`).
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
}

/// A resolved lazyblk image: the OCI manifest's digest and its files by title.
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    /// Digest of the OCI manifest.
    pub digest: String,
    /// The layers by file name.
    pub files: HashMap<String, Layer>,
}

/// The files of a lazyblk image manifest `bytes` (as served, of `media_type`) of `r`: a
/// manifest whose `artifactType` (or config media type) is not lazyblk's is a clear error
/// (an ordinary container image has no lazy version under this reference).
pub fn lazyblk_files(r: &Reference, media_type: &str, bytes: &[u8]) -> Result<Resolved, String> {
    let m = match lazyblk_registry::parse_manifest(media_type, bytes).map_err(|e| e.to_string())? {
        OciManifest::Image(m) => m,
        OciManifest::Index(_) => {
            return Err(format!(
                "{r} is an image index, not a lazyblk image (its media type is {media_type})"
            ))
        }
    };
    let is_ours = m.artifact_type().as_ref().map(|t| t.to_string()).as_deref()
        == Some(ARTIFACT_TYPE)
        || m.config().media_type().to_string() == MEDIA_CONFIG;
    if !is_ours {
        return Err(format!(
            "{r} is not a lazyblk image (artifact type {}, config {}); convert it with `lazyblk convert`",
            m.artifact_type()
                .as_ref()
                .map_or("none".to_string(), |t| t.to_string()),
            m.config().media_type()
        ));
    }
    let mut files = HashMap::new();
    for l in m.layers() {
        let Some(title) = l.annotations().as_ref().and_then(|a| a.get(TITLE)) else {
            continue;
        };
        files.insert(
            title.clone(),
            Layer {
                digest: l.digest().to_string(),
                size: l.size(),
                media_type: l.media_type().to_string(),
            },
        );
    }
    if !files.contains_key(MANIFEST_FILE) {
        return Err(format!("{r}: the lazyblk image has no manifest layer"));
    }
    Ok(Resolved {
        digest: String::new(),
        files,
    })
}

/// What a manifest is, for `add <ref>`: a lazyblk image, or an ordinary container image or an
/// index, whose lazy version is found through its referrers ([`find_lazy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A lazyblk image: served as is.
    Lazy,
    /// Another image manifest (an ordinary container image, another artifact).
    Image,
    /// An image index (or Docker manifest list).
    Index,
}

/// What the manifest `bytes` (served as `media_type`) is. Bytes that do not decode count as
/// [`Kind::Image`] (the store then reports what is wrong with them).
pub fn classify(media_type: &str, bytes: &[u8]) -> Kind {
    match lazyblk_registry::parse_manifest(media_type, bytes) {
        Ok(OciManifest::Index(_)) => Kind::Index,
        Ok(OciManifest::Image(m)) => {
            let ours = m.artifact_type().as_ref().map(|t| t.to_string()).as_deref()
                == Some(ARTIFACT_TYPE)
                || m.config().media_type().to_string() == MEDIA_CONFIG;
            if ours {
                Kind::Lazy
            } else {
                Kind::Image
            }
        }
        Err(_) => Kind::Image,
    }
}

/// The newest lazy version of the image `source` names (a tag or a digest; an index resolved
/// to its manifest for `platform`): a lazyblk image whose `subject` is that manifest (or the
/// index), found through the referrers in the source's repository (the referrers API or the
/// referrers tag schema), as `repo@sha256:...` in that repository. `lazyblk convert` makes
/// them (`docs/FORMAT.md`, "Links to the source"). `None`: there is none.
pub async fn find_lazy(
    client: &Client,
    source: &Reference,
    platform: &Platform,
) -> Result<Option<Link>, RegistryError> {
    client.find_referrer(source, ARTIFACT_TYPE, platform).await
}

/// What to serve for a reference ([`lazy_version`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Serve {
    /// The reference itself: a lazyblk image (or one that did not resolve: the store says why).
    Itself,
    /// The lazy version of the ordinary image it names.
    Lazy(Link),
}

/// The error for an ordinary image `r` without a lazy version: one line naming it and
/// `lazyblk convert`.
pub fn no_lazy_version(r: &Reference) -> RemoteError {
    RemoteError::permanent(
        r.to_string(),
        format!(
            "not a lazyblk image, and no lazy version refers to it (no referrer of type {ARTIFACT_TYPE}); make one with `lazyblk convert {r} <dst-ref>`"
        ),
    )
}

/// For `add <ref>`: serve `r` itself when it is a lazyblk image, else its lazy version
/// ([`find_lazy`]); an ordinary image without one is [`no_lazy_version`]. A reference that
/// does not resolve now is [`Serve::Itself`], so a pinned image in the cache still opens
/// without the registry (and the store reports any other failure as it always does).
pub async fn lazy_version(
    client: &Client,
    r: &Reference,
    platform: &Platform,
) -> Result<Serve, RemoteError> {
    let got = match client.resolve(r).await {
        Ok(g) => g,
        Err(e) => {
            tracing::debug!("{r}: not resolved ({e}); the store will try");
            return Ok(Serve::Itself);
        }
    };
    if classify(&got.media_type, &got.bytes) == Kind::Lazy {
        return Ok(Serve::Itself);
    }
    match find_lazy(client, r, platform).await {
        Ok(Some(l)) => Ok(Serve::Lazy(l)),
        Ok(None) => Err(no_lazy_version(r)),
        Err(e) => Err(remote_error(&format!("{r}: looking for a lazy version"), e)),
    }
}

/// The connector's registry side: one client, each image resolved once.
pub(crate) struct Registries {
    opts: lazyblk_registry::ClientOptions,
    client: Mutex<Option<Client>>,
    images: Mutex<HashMap<Reference, Arc<tokio::sync::OnceCell<Arc<Resolved>>>>>,
}

/// A registry error as the store sees it: transient or permanent, naming what was read.
pub(crate) fn remote_error(what: &str, e: RegistryError) -> RemoteError {
    if e.is_transient() {
        RemoteError::transient(what, e.to_string())
    } else {
        RemoteError::permanent(what, e.to_string())
    }
}

impl Registries {
    pub(crate) fn new(opts: lazyblk_registry::ClientOptions) -> Registries {
        Registries {
            opts,
            client: Mutex::new(None),
            images: Mutex::default(),
        }
    }

    /// The client, made on first use (an HTTP-only store never makes one).
    pub(crate) fn client(&self) -> Result<Client, RemoteError> {
        let mut c = self.client.lock().expect("lock");
        if let Some(c) = &*c {
            return Ok(c.clone());
        }
        let made = Client::new(self.opts.clone()).map_err(|e| remote_error("registry", e))?;
        *c = Some(made.clone());
        Ok(made)
    }

    /// The files of image `r`, resolved once (a failed resolution is tried again next time).
    pub(crate) async fn resolve(&self, r: &Reference) -> Result<Arc<Resolved>, RemoteError> {
        let cell = self
            .images
            .lock()
            .expect("lock")
            .entry(r.clone())
            .or_default()
            .clone();
        let client = self.client()?;
        cell.get_or_try_init(|| async {
            let what = r.to_string();
            let got = client
                .resolve(r)
                .await
                .map_err(|e| remote_error(&what, e))?;
            let mut files = lazyblk_files(r, &got.media_type, &got.bytes)
                .map_err(|e| RemoteError::permanent(&what, e))?;
            files.digest = got.digest;
            tracing::debug!("{r}: resolved to {}", files.digest);
            Ok(Arc::new(files))
        })
        .await
        .cloned()
    }

    /// The layer of `loc`'s file; a file the image does not publish is a permanent error (as a
    /// 404 would be).
    pub(crate) async fn layer(&self, loc: &RegistryLocation) -> Result<Layer, RemoteError> {
        let files = self.resolve(&loc.reference).await?;
        files
            .files
            .get(&loc.name)
            .cloned()
            .ok_or_else(|| RemoteError::permanent(loc.to_string(), "not published with this image"))
    }

    /// A whole small file of at most `max` bytes, verified against its layer's digest.
    pub(crate) async fn read_whole(
        &self,
        loc: &RegistryLocation,
        max: u64,
    ) -> Result<Vec<u8>, RemoteError> {
        let layer = self.layer(loc).await?;
        if layer.size > max {
            return Err(RemoteError::permanent(
                loc.to_string(),
                format!("{} bytes, larger than {max}", layer.size),
            ));
        }
        let b = self
            .client()?
            .get_blob(&loc.reference, &layer.digest, max)
            .await
            .map_err(|e| remote_error(&loc.to_string(), e))?;
        Ok(b.to_vec())
    }
}

/// A blob of a lazyblk image in a registry, read by range.
pub struct RegistryRemote {
    registries: Arc<Registries>,
    loc: RegistryLocation,
    /// Bytes of range reads per endpoint (origin, mirror), for [`Remote::served`].
    served: std::sync::Mutex<Vec<crate::ServedBytes>>,
}

impl RegistryRemote {
    pub(crate) fn new(registries: Arc<Registries>, loc: RegistryLocation) -> Self {
        RegistryRemote {
            registries,
            loc,
            served: Default::default(),
        }
    }
}

impl Remote for RegistryRemote {
    fn location(&self) -> String {
        self.loc.to_string()
    }

    fn probe(&self) -> BoxFuture<'_, Result<BlobInfo, RemoteError>> {
        Box::pin(async move {
            let layer = self.registries.layer(&self.loc).await?;
            let size = self
                .registries
                .client()?
                .blob_size(&self.loc.reference, &layer.digest)
                .await
                .map_err(|e| remote_error(&self.location(), e))?;
            if size != layer.size {
                return Err(RemoteError::permanent(
                    self.location(),
                    format!(
                        "blob {} is {size} bytes, its descriptor says {}",
                        layer.digest, layer.size
                    ),
                ));
            }
            Ok(BlobInfo {
                size,
                etag: Some(layer.digest),
            })
        })
    }

    fn read_range_with<'a>(
        &'a self,
        offset: u64,
        len: u64,
        sink: &'a mut (dyn FnMut(Bytes) + Send),
    ) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async move {
            let layer = self.registries.layer(&self.loc).await?;
            let client = self.registries.client()?;
            let mut got = 0u64;
            let mut count = |b: Bytes| {
                got += b.len() as u64;
                sink(b)
            };
            // Counted once per endpoint tried, not per piece: the lock is taken once or twice
            // per range request.
            let mut tally = |origin: &str, mirror: bool, bytes: u64| {
                let one = crate::ServedBytes {
                    origin: origin.to_string(),
                    mirror,
                    bytes,
                };
                crate::merge_served(&mut self.served.lock().expect("lock"), vec![one]);
            };
            client
                .read_blob_range_served(
                    &self.loc.reference,
                    &layer.digest,
                    offset,
                    len,
                    &mut count,
                    &mut tally,
                )
                .await
                .map_err(|e| remote_error(&self.location(), e))?;
            if got != len {
                return Err(RemoteError::transient(
                    self.location(),
                    format!("range {offset}+{len}: {got} bytes received"),
                ));
            }
            Ok(())
        })
    }

    fn served(&self) -> Vec<crate::ServedBytes> {
        self.served.lock().expect("lock").clone()
    }

    fn report_corrupt(&self) {
        let registries = self.registries.clone();
        let loc = self.loc.clone();
        if let Ok(client) = registries.client() {
            // The layer is resolved by now (the bytes came from it).
            let digest = registries
                .images
                .lock()
                .expect("lock")
                .get(&loc.reference)
                .and_then(|c| c.get().cloned())
                .and_then(|r| r.files.get(&loc.name).map(|l| l.digest.clone()));
            if let Some(d) = digest {
                if client.report_bad_blob(&loc.reference, &d) {
                    tracing::warn!("{loc}: a mirror served bytes that did not verify; skipping it");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
    const OCI: &str = "application/vnd.oci.image.manifest.v1+json";

    fn manifest(artifact: Option<&str>, config: &str) -> Vec<u8> {
        let mut v = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI,
            "config": {"mediaType": config, "size": 2, "digest": CFG},
            "layers": [],
        });
        if let Some(a) = artifact {
            v["artifactType"] = a.into();
        }
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn what_add_serves_as_is() {
        // A lazyblk image by its artifact type, or (older pushes) its config.
        assert_eq!(
            classify(OCI, &manifest(Some(ARTIFACT_TYPE), MEDIA_CONFIG)),
            Kind::Lazy
        );
        assert_eq!(classify(OCI, &manifest(None, MEDIA_CONFIG)), Kind::Lazy);
        // An ordinary image, OCI or Docker; another artifact.
        let image = manifest(None, "application/vnd.oci.image.config.v1+json");
        assert_eq!(classify(OCI, &image), Kind::Image);
        let docker = String::from_utf8(manifest(
            None,
            "application/vnd.docker.container.image.v1+json",
        ))
        .unwrap()
        .replace(OCI, "application/vnd.docker.distribution.manifest.v2+json");
        assert_eq!(
            classify(
                "application/vnd.docker.distribution.manifest.v2+json",
                docker.as_bytes()
            ),
            Kind::Image
        );
        assert_eq!(
            classify(
                OCI,
                &manifest(Some("application/x.sbom"), "application/x.cfg")
            ),
            Kind::Image
        );
        // An index; bytes that do not decode.
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert_eq!(
            classify("application/vnd.oci.image.index.v1+json", index),
            Kind::Index
        );
        assert_eq!(classify(OCI, b"{"), Kind::Image);
    }

    #[test]
    fn no_lazy_version_is_one_line_naming_convert() {
        let r = Reference::parse("127.0.0.1:5000/src/app:v1").unwrap();
        let e = no_lazy_version(&r).to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.starts_with("127.0.0.1:5000/src/app:v1: not a lazyblk image"),
            "{e}"
        );
        assert!(
            e.contains("`lazyblk convert 127.0.0.1:5000/src/app:v1 <dst-ref>`"),
            "{e}"
        );
    }
}
