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
use lazyblk_registry::{Client, Manifest as OciManifest, Reference, RegistryError};
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
}

impl RegistryRemote {
    pub(crate) fn new(registries: Arc<Registries>, loc: RegistryLocation) -> Self {
        RegistryRemote { registries, loc }
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
            client
                .read_blob_range(&self.loc.reference, &layer.digest, offset, len, &mut count)
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
