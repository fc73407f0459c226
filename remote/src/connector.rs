//! One connection pool for every remote of a store.

use crate::http::{self, HttpOptions};
use crate::registry::{Registries, RegistryRemote};
use crate::{HttpRemote, LocalRemote, Location, Remote, RemoteError};
use std::sync::Arc;

/// Opens remotes and reads small files with one HTTP client (and, for images in registries,
/// one registry client that resolves each image once), so the requests of one store (the
/// manifest, the prefetch list, the blob's ranges) share a connection pool instead of opening
/// a connection each.
#[derive(Clone)]
pub struct Connector {
    client: reqwest::Client,
    registries: Arc<Registries>,
}

impl Connector {
    /// A connector with the HTTP settings `http` and the registry settings `registry`.
    pub fn new(
        http: &HttpOptions,
        registry: &lazyblk_registry::ClientOptions,
    ) -> Result<Self, RemoteError> {
        Ok(Connector {
            client: http::client(http)?,
            registries: Arc::new(Registries::new(registry.clone())),
        })
    }

    /// Open a [`Remote`] for a location.
    pub fn open_remote(&self, loc: &Location) -> Box<dyn Remote> {
        match loc {
            Location::Path(p) => Box::new(LocalRemote::new(p.clone())),
            Location::Url(u) => Box::new(HttpRemote::with_client(u, self.client.clone())),
            Location::Registry(r) => {
                Box::new(RegistryRemote::new(self.registries.clone(), r.clone()))
            }
        }
    }

    /// The digest of the OCI manifest a registry location resolved to (`None` for other
    /// locations, or one not resolved yet).
    pub async fn resolved_digest(&self, loc: &Location) -> Option<String> {
        match loc {
            Location::Registry(r) => self
                .registries
                .resolve(&r.reference)
                .await
                .ok()
                .map(|f| f.digest.clone()),
            _ => None,
        }
    }

    /// Read a whole (small) file: a manifest. Bounded to `max` bytes.
    pub async fn read_whole(&self, loc: &Location, max: u64) -> Result<Vec<u8>, RemoteError> {
        match loc {
            Location::Path(p) => {
                let name = p.display().to_string();
                let meta = std::fs::metadata(p)
                    .map_err(|e| RemoteError::permanent(&name, e.to_string()))?;
                if meta.len() > max {
                    return Err(RemoteError::permanent(
                        name,
                        format!("larger than {max} bytes"),
                    ));
                }
                std::fs::read(p).map_err(|e| RemoteError::permanent(name, e.to_string()))
            }
            Location::Url(u) => http::get_whole(&self.client, u, max).await,
            Location::Registry(r) => self.registries.read_whole(r, max).await,
        }
    }
}
