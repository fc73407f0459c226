//! The client: [`ClientOptions`], [`Client`] and the state its clones share (connection pools
//! per TLS setting, token cache, redirect memory, mirror health), construction and the HTTP
//! clients. The rest of `impl Client` is by role: `endpoints.rs` (where requests go),
//! `auth.rs`, `transport.rs` (sending, redirects, errors), `resolve.rs` (manifests),
//! `blobs.rs` (reads), `push.rs`, and `proxy.rs` (proxies from the environment).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use url::Url;

use crate::auth::{AuthScheme, TokenSlot};
use crate::creds::{Credential, CredentialSource};
use crate::endpoints::{Endpoint, Health};
use crate::error::{RegistryError, Result};
use crate::hosts;
use crate::proxy::ProxyEnv;

/// Client configuration.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Force plain HTTP (`Some(true)`) or HTTPS (`Some(false)`) for origins. `None`: plain HTTP
    /// for `localhost`, `127.0.0.0/8` and `::1` (containerd's rule), HTTPS otherwise.
    pub plain_http: Option<bool>,
    /// Mirrors tried in order before the origin for pulls and tag resolution, each a base URL
    /// (`http://127.0.0.1:8080`, optionally with a path prefix; `/v2/` is added).
    pub mirrors: Vec<String>,
    /// containerd's hosts directory (`<dir>/<host>/hosts.toml`). `None`:
    /// [`hosts::DEFAULT_HOSTS_DIR`].
    pub hosts_dir: Option<PathBuf>,
    /// Extra CA certificates (PEM bundle) trusted beside the system roots.
    pub ca_file: Option<PathBuf>,
    /// Skip TLS certificate verification everywhere.
    pub insecure: bool,
    /// Where credentials come from.
    pub credentials: CredentialSource,
    /// Largest manifest accepted by [`Client::resolve`] (bytes).
    pub manifest_limit: u64,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for any read on a connection (headers or body bytes).
    pub read_timeout: Duration,
    /// Total time for each request but a blob read, body included: tokens, manifests, HEADs,
    /// tags, referrers, upload requests (those carrying blob bytes get one more second per
    /// 256 KiB). Blob reads have no total limit (their bodies may be large); a stalled read
    /// fails after `read_timeout`.
    pub request_timeout: Duration,
    /// Blobs up to this size are pushed in one PUT; larger ones in PATCH pieces of this size.
    pub chunk_size: u64,
    /// How long a failing mirror is first skipped (doubling on each new failure, up to 10 min).
    pub mirror_backoff: Duration,
    /// `User-Agent`.
    pub user_agent: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            plain_http: None,
            mirrors: Vec::new(),
            hosts_dir: None,
            ca_file: None,
            insecure: false,
            credentials: CredentialSource::default(),
            manifest_limit: 4 << 20,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            chunk_size: 16 << 20,
            mirror_backoff: Duration::from_secs(30),
            user_agent: concat!("lazyblk-registry/", env!("CARGO_PKG_VERSION")).into(),
        }
    }
}

/// An OCI distribution registry client. Cheap to clone (shared state behind an `Arc`): one
/// connection pool, token cache, redirect memory and mirror health for all clones.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("credentials", &self.inner.opts.credentials.describe())
            .field("mirrors", &self.inner.opts.mirrors)
            .finish_non_exhaustive()
    }
}

/// The TLS settings an HTTP client is built for (one pool each): `hosts.toml` may set them per host.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TlsKey {
    pub(crate) skip_verify: bool,
    pub(crate) ca: Vec<PathBuf>,
}

/// What every clone of a [`Client`] shares.
pub(crate) struct Inner {
    pub(crate) opts: ClientOptions,
    pub(crate) proxy: Arc<ProxyEnv>,
    pub(crate) http: Mutex<HashMap<TlsKey, reqwest::Client>>,
    pub(crate) endpoints: Mutex<HashMap<String, Arc<Vec<Endpoint>>>>,
    /// Per endpoint origin (`scheme://host:port`): the challenge it answered with.
    pub(crate) challenges: Mutex<HashMap<String, AuthScheme>>,
    /// Per (endpoint origin, scope): the token, behind an async lock so one fetch is shared.
    pub(crate) tokens: Mutex<HashMap<(String, String), TokenSlot>>,
    /// Per credential host: the credential (looked up once).
    pub(crate) creds: tokio::sync::Mutex<HashMap<String, Option<Credential>>>,
    /// Per (endpoint, repository, digest): where the last redirect for that blob led.
    pub(crate) redirects: Mutex<HashMap<(String, String, String), Url>>,
    /// Per (registry, repository, digest): the endpoint that last served that blob.
    pub(crate) served_by: Mutex<HashMap<(String, String, String), String>>,
    /// Per mirror label: when it may be tried again.
    pub(crate) health: Mutex<HashMap<String, Health>>,
    pub(crate) token_fetches: AtomicU64,
}

/// Lock a std mutex, ignoring poisoning (the maps stay consistent: every update is one insert
/// or remove).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    /// A client. Fails only on unreadable `ca_file` or an invalid mirror URL.
    pub fn new(opts: ClientOptions) -> Result<Client> {
        for m in &opts.mirrors {
            hosts::api_base(m, false)?;
        }
        let inner = Inner {
            proxy: Arc::new(ProxyEnv::from_env()),
            opts,
            http: Mutex::default(),
            endpoints: Mutex::default(),
            challenges: Mutex::default(),
            tokens: Mutex::default(),
            creds: tokio::sync::Mutex::default(),
            redirects: Mutex::default(),
            served_by: Mutex::default(),
            health: Mutex::default(),
            token_fetches: AtomicU64::new(0),
        };
        let c = Client {
            inner: Arc::new(inner),
        };
        c.http_client(&TlsKey {
            skip_verify: false,
            ca: Vec::new(),
        })?;
        Ok(c)
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    /// How many tokens this client has fetched (diagnostics).
    pub fn token_fetches(&self) -> u64 {
        self.inner.token_fetches.load(Ordering::Relaxed)
    }

    pub(crate) fn http_client(&self, key: &TlsKey) -> Result<reqwest::Client> {
        if let Some(c) = lock(&self.inner.http).get(key) {
            return Ok(c.clone());
        }
        let o = &self.inner.opts;
        let proxy = self.inner.proxy.clone();
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(o.connect_timeout)
            .read_timeout(o.read_timeout)
            .user_agent(o.user_agent.clone())
            .proxy(reqwest::Proxy::custom(move |u| proxy.proxy_for(u)));
        for ca in o.ca_file.iter().chain(&key.ca) {
            let pem = std::fs::read(ca).map_err(|e| {
                RegistryError::invalid(format!("cannot read CA file {}: {e}", ca.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| RegistryError::invalid(format!("CA file {}: {e}", ca.display())))?;
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        if o.insecure || key.skip_verify {
            b = b.danger_accept_invalid_certs(true);
        }
        let c = b
            .build()
            .map_err(|e| RegistryError::invalid(format!("cannot build the HTTP client: {e}")))?;
        lock(&self.inner.http).insert(key.clone(), c.clone());
        Ok(c)
    }
}

#[cfg(test)]
mod secret_tests {
    use bytes::Bytes;

    use super::*;
    use crate::creds::Secret;
    use crate::reference::Reference;

    /// Every error and Debug output the client can produce with a secret configured, checked for
    /// the secret.
    #[tokio::test]
    async fn secrets_never_printed() {
        const PW: &str = "hunter2-very-secret";
        let dir = tempfile::tempdir().unwrap();
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let mut texts = Vec::new();
        for creds in [
            CredentialSource::Basic {
                username: "bob".into(),
                password: Secret::new(PW),
            },
            CredentialSource::CredsFile({
                let p = dir.path().join("creds");
                std::fs::write(&p, format!("bob:{PW}\n")).unwrap();
                p
            }),
        ] {
            let opts = ClientOptions {
                credentials: creds,
                hosts_dir: Some(dir.path().into()),
                mirrors: vec![format!("http://127.0.0.1:{port}/mirror")],
                ..Default::default()
            };
            texts.push(format!("{opts:?}"));
            let c = Client::new(opts).unwrap();
            texts.push(format!("{c:?}"));
            let r = Reference::parse(&format!("127.0.0.1:{port}/foo/bar:v1")).unwrap();
            let d = crate::manifest::sha256_digest(b"x");
            let errs = [
                c.resolve(&r).await.unwrap_err(),
                c.blob_size(&r, &d).await.unwrap_err(),
                c.get_blob(&r, &d, 10).await.unwrap_err(),
                c.read_blob_range(&r, &d, 0, 1, &mut |_| {})
                    .await
                    .unwrap_err(),
                c.push_blob(
                    &r,
                    &d,
                    1,
                    crate::BlobSource::Bytes(Bytes::from_static(b"x")),
                    Some("a/b"),
                )
                .await
                .unwrap_err(),
                c.push_manifest(
                    &r,
                    "v1",
                    crate::manifest::OCI_MANIFEST,
                    Bytes::from_static(b"{}"),
                )
                .await
                .unwrap_err(),
                c.list_tags(&r).await.unwrap_err(),
                c.referrers(&r, &d, None).await.unwrap_err(),
            ];
            for e in errs {
                assert!(e.is_transient(), "{e}");
                texts.push(format!("{e} {e:?}"));
            }
            texts.push(format!("{:?}", c.endpoints(&r).unwrap()));
        }
        for t in &texts {
            assert!(!t.contains(PW), "secret printed: {t}");
            assert!(!t.contains('\n'), "not one line: {t}");
        }
    }
}
