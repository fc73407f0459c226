//! One connection pool for every remote of a store.

use crate::http::{self, HttpOptions};
use crate::{HttpRemote, LocalRemote, Location, Remote, RemoteError};

/// Opens remotes and reads small files with one HTTP client, so the requests of one store
/// (the manifest, the prefetch list, the blob's ranges) share its connection pool instead of
/// opening a connection each.
#[derive(Clone)]
pub struct Connector {
    client: reqwest::Client,
}

impl Connector {
    /// A connector with the HTTP settings `http`.
    pub fn new(http: &HttpOptions) -> Result<Self, RemoteError> {
        Ok(Connector {
            client: http::client(http)?,
        })
    }

    /// Open a [`Remote`] for a location.
    pub fn open_remote(&self, loc: &Location) -> Box<dyn Remote> {
        match loc {
            Location::Path(p) => Box::new(LocalRemote::new(p.clone())),
            Location::Url(u) => Box::new(HttpRemote::with_client(u, self.client.clone())),
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
        }
    }
}
