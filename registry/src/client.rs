//! The client: options, endpoints (mirrors + origin) and their health, authentication (Basic,
//! Bearer tokens with refresh), redirects, manifests and ranged blob reads. Push is in
//! `push.rs`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use sha2::Digest as _;
use tracing::{debug, warn};
use url::Url;

use crate::challenge::parse_challenges;
use crate::creds::{Credential, CredentialSource, Secret};
use crate::error::{ErrorKind, RegistryError, Result};
use crate::hosts::{self, Capabilities, HostConfig};
use crate::manifest::{bare_media_type, ACCEPTED};
use crate::reference::{validate_digest, Reference};

/// Most redirects followed for one request.
pub const MAX_REDIRECTS: usize = 10;
/// Longest a mirror stays marked down.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Largest token or error body read.
const SMALL_BODY: u64 = 1 << 20;

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
    /// Total time for a token request. Other requests have no total limit (blob bodies may be
    /// large); a stalled connection fails after `read_timeout`.
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

/// A resolved manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Its digest (`sha256:<hex>`): the pinned one, or the hash of `bytes`.
    pub digest: String,
    /// Its media type (one of [`crate::manifest::ACCEPTED`]).
    pub media_type: String,
    /// The manifest bytes, exactly as served and verified.
    pub bytes: Bytes,
}

/// Where a reference's requests go, for diagnostics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointStatus {
    /// The API root, `scheme://host[:port]/.../v2/`.
    pub api_base: String,
    /// The registry itself (else a mirror).
    pub origin: bool,
    /// Currently skipped after a failure.
    pub down: bool,
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

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TlsKey {
    skip_verify: bool,
    ca: Vec<PathBuf>,
}

#[derive(Clone, Debug)]
enum AuthScheme {
    Basic,
    Bearer { realm: Url, service: Option<String> },
}

/// One cached token behind an async lock, so that one fetch serves every waiting request.
type TokenSlot = Arc<tokio::sync::Mutex<Option<Token>>>;

struct Token {
    header: Secret,
    refresh_at: Instant,
}

#[derive(Default)]
struct Health {
    down_until: Option<Instant>,
    backoff: Duration,
}

pub(crate) struct Inner {
    pub(crate) opts: ClientOptions,
    proxy: Arc<ProxyEnv>,
    http: Mutex<HashMap<TlsKey, reqwest::Client>>,
    endpoints: Mutex<HashMap<String, Arc<Vec<Endpoint>>>>,
    /// Per endpoint origin (`scheme://host:port`): the challenge it answered with.
    challenges: Mutex<HashMap<String, AuthScheme>>,
    /// Per (endpoint origin, scope): the token, behind an async lock so one fetch is shared.
    tokens: Mutex<HashMap<(String, String), TokenSlot>>,
    /// Per credential host: the credential (looked up once).
    creds: tokio::sync::Mutex<HashMap<String, Option<Credential>>>,
    /// Per (endpoint, repository, digest): where the last redirect for that blob led.
    redirects: Mutex<HashMap<(String, String, String), Url>>,
    /// Per (registry, repository, digest): the endpoint that last served that blob.
    served_by: Mutex<HashMap<(String, String, String), String>>,
    health: Mutex<HashMap<String, Health>>,
    token_fetches: AtomicU64,
}

/// One place requests for a registry can go.
#[derive(Clone)]
pub(crate) struct Endpoint {
    /// `scheme://host[:port]/.../v2/`.
    pub(crate) base: Url,
    /// `host[:port]` (the registry name for the origin), for messages and health.
    pub(crate) label: String,
    pub(crate) origin: bool,
    pub(crate) caps: Capabilities,
    pub(crate) http: reqwest::Client,
    /// The host whose credentials are used.
    cred_host: String,
    /// `scheme://host:port` of `base`.
    origin_key: String,
}

/// What a request is about, for errors.
pub(crate) struct Ctx {
    pub(crate) host: String,
    pub(crate) repo: String,
    /// `manifest`, `blob`, `upload`, `tags`.
    pub(crate) noun: &'static str,
    /// `tag "v1"`, `digest sha256:..`, `sha256:..`.
    pub(crate) what: String,
}

impl Ctx {
    pub(crate) fn new(
        ep: &Endpoint,
        repo: &str,
        noun: &'static str,
        what: impl Into<String>,
    ) -> Ctx {
        Ctx {
            host: ep.label.clone(),
            repo: repo.to_string(),
            noun,
            what: what.into(),
        }
    }
    pub(crate) fn err(&self, kind: ErrorKind, detail: impl Into<String>) -> RegistryError {
        RegistryError::new(kind, &self.host, Some(&self.repo), detail)
    }
    fn subject(&self) -> String {
        if self.what.is_empty() {
            self.noun.to_string()
        } else {
            format!("{} {}", self.noun, self.what)
        }
    }
}

/// `scheme://host:port` of a URL.
fn origin_of(u: &Url) -> String {
    u.origin().ascii_serialization()
}

/// A URL for messages: no query (it may hold a signature), no user info.
pub(crate) fn show_url(u: &Url) -> String {
    format!("{}{}", origin_of(u), u.path())
}

/// A transport error as one line, without the URL.
pub(crate) fn net_error(e: reqwest::Error, ctx: &Ctx) -> RegistryError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_body() || e.is_decode() {
        ErrorKind::Truncated
    } else {
        ErrorKind::Connect
    };
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    let word = match kind {
        ErrorKind::Timeout => "timed out",
        ErrorKind::Truncated => "body read failed",
        _ => "connection failed",
    };
    ctx.err(kind, format!("{}: {word} ({msg})", ctx.subject()))
}

/// The error for a non-success status, with the registry's own message when it sent one.
pub(crate) async fn status_error(resp: reqwest::Response, ctx: &Ctx) -> RegistryError {
    let status = resp.status();
    let via = if origin_of(resp.url()) != ctx.host && !resp.url().as_str().contains(&ctx.host) {
        format!(" from {}", show_url(resp.url()))
    } else {
        String::new()
    };
    let body = read_limited(resp, 64 << 10, ctx).await.unwrap_or_default();
    let msg = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let e = v.get("errors")?.get(0)?;
            e.get("message")
                .and_then(|m| m.as_str())
                .filter(|m| !m.is_empty())
                .or_else(|| e.get("code").and_then(|c| c.as_str()))
                .map(str::to_string)
        });
    let kind = match status.as_u16() {
        404 | 410 => ErrorKind::NotFound,
        401 | 403 => ErrorKind::Auth,
        408 | 429 | 500..=599 => ErrorKind::Unavailable,
        416 => ErrorKind::Invalid,
        _ => ErrorKind::Protocol,
    };
    match (kind, msg) {
        (ErrorKind::NotFound, Some(m)) => ctx.err(kind, format!("{m} ({}){via}", ctx.subject())),
        (ErrorKind::NotFound, None) => ctx.err(kind, format!("{} not found{via}", ctx.subject())),
        (_, Some(m)) => ctx.err(kind, format!("{}: {status}{via}: {m}", ctx.subject())),
        (_, None) => ctx.err(kind, format!("{}: {status}{via}", ctx.subject())),
    }
}

/// Read a whole body, failing with `TooLarge` past `limit` bytes (checked against
/// `Content-Length` first, then while reading).
pub(crate) async fn read_limited(
    mut resp: reqwest::Response,
    limit: u64,
    ctx: &Ctx,
) -> Result<Bytes> {
    let too_large = || {
        ctx.err(
            ErrorKind::TooLarge,
            format!("{} is larger than the {limit}-byte limit", ctx.subject()),
        )
    };
    let announced = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(announced.unwrap_or(0) as usize);
    while let Some(c) = resp.chunk().await.map_err(|e| net_error(e, ctx))? {
        if buf.len() as u64 + c.len() as u64 > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&c);
    }
    if let Some(n) = announced {
        if n != buf.len() as u64 {
            return Err(ctx.err(
                ErrorKind::Truncated,
                format!(
                    "{}: body has {} of {n} announced bytes",
                    ctx.subject(),
                    buf.len()
                ),
            ));
        }
    }
    Ok(Bytes::from(buf))
}

/// Hash `bytes` with the digest's algorithm and compare.
pub(crate) fn digest_matches(digest: &str, bytes: &[u8]) -> Option<String> {
    let actual = match digest.split_once(':') {
        Some(("sha512", _)) => format!("sha512:{}", hex::encode(sha2::Sha512::digest(bytes))),
        _ => format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes))),
    };
    (actual != digest).then_some(actual)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// The proxy settings from the environment (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`, or their
/// lowercase forms). Loopback hosts never go through a proxy (as in Go's net/http).
#[derive(Debug, Default, Clone)]
pub(crate) struct ProxyEnv {
    http: Option<Url>,
    https: Option<Url>,
    no_proxy: Vec<String>,
}

impl ProxyEnv {
    fn from_env() -> ProxyEnv {
        let get = |a: &str, b: &str| {
            std::env::var(a)
                .ok()
                .or_else(|| std::env::var(b).ok())
                .filter(|v| !v.is_empty())
        };
        Self::from_values(
            get("HTTP_PROXY", "http_proxy"),
            get("HTTPS_PROXY", "https_proxy"),
            get("NO_PROXY", "no_proxy"),
        )
    }

    pub(crate) fn from_values(
        http: Option<String>,
        https: Option<String>,
        no_proxy: Option<String>,
    ) -> ProxyEnv {
        let url = |s: String| {
            let s = if s.contains("://") {
                s
            } else {
                format!("http://{s}")
            };
            Url::parse(&s).ok()
        };
        ProxyEnv {
            http: http.and_then(url),
            https: https.and_then(url),
            no_proxy: no_proxy
                .unwrap_or_default()
                .split(',')
                .map(|e| {
                    e.trim()
                        .trim_start_matches("*.")
                        .trim_start_matches('.')
                        .to_ascii_lowercase()
                })
                .filter(|e| !e.is_empty())
                .collect(),
        }
    }

    pub(crate) fn proxy_for(&self, u: &Url) -> Option<Url> {
        let loopback = match u.host()? {
            url::Host::Domain(d) => {
                d.eq_ignore_ascii_case("localhost")
                    || d.to_ascii_lowercase().ends_with(".localhost")
            }
            url::Host::Ipv4(a) => a.is_loopback(),
            url::Host::Ipv6(a) => a.is_loopback(),
        };
        if loopback {
            return None;
        }
        let host = u
            .host_str()?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = u.port_or_known_default();
        for e in &self.no_proxy {
            if e == "*" {
                return None;
            }
            let (eh, ep) = match e.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => {
                    (h, p.parse::<u16>().ok())
                }
                _ => (e.as_str(), None),
            };
            let eh = eh.trim_start_matches('[').trim_end_matches(']');
            if (host == eh || host.ends_with(&format!(".{eh}"))) && (ep.is_none() || ep == port) {
                return None;
            }
        }
        match u.scheme() {
            "https" => self.https.clone(),
            "http" => self.http.clone(),
            _ => None,
        }
    }
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

    fn http_client(&self, key: &TlsKey) -> Result<reqwest::Client> {
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

    fn endpoint(&self, hc: &HostConfig, origin: bool, registry: &str) -> Result<Endpoint> {
        let http = self.http_client(&TlsKey {
            skip_verify: hc.skip_verify,
            ca: hc.ca.clone(),
        })?;
        let host = match hc.api_base.port() {
            Some(p) => format!("{}:{p}", hc.api_base.host_str().unwrap_or("")),
            None => hc.api_base.host_str().unwrap_or("").to_string(),
        };
        let path = hc
            .api_base
            .path()
            .trim_end_matches('/')
            .trim_end_matches("/v2");
        Ok(Endpoint {
            label: if origin {
                registry.to_string()
            } else {
                format!("{host}{path}")
            },
            cred_host: if origin { registry.to_string() } else { host },
            origin_key: origin_of(&hc.api_base),
            base: hc.api_base.clone(),
            origin,
            caps: hc.capabilities,
            http,
        })
    }

    /// All endpoints of a registry: `--mirror`s, then `hosts.toml` hosts, then the origin.
    pub(crate) fn all_endpoints(&self, r: &Reference) -> Result<Arc<Vec<Endpoint>>> {
        if let Some(e) = lock(&self.inner.endpoints).get(r.registry()) {
            return Ok(e.clone());
        }
        let o = &self.inner.opts;
        let mut eps = Vec::new();
        for m in &o.mirrors {
            let hc = HostConfig {
                api_base: hosts::api_base(m, false)?,
                capabilities: Capabilities::MIRROR,
                skip_verify: false,
                ca: Vec::new(),
            };
            eps.push(self.endpoint(&hc, false, r.registry())?);
        }
        let dir = o
            .hosts_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(hosts::DEFAULT_HOSTS_DIR));
        let file = hosts::load_hosts(&dir, r.registry())?.unwrap_or_default();
        for h in &file.hosts {
            eps.push(self.endpoint(h, false, r.registry())?);
        }
        let origin = match file.server {
            Some(s) => s,
            None => {
                let plain = o
                    .plain_http
                    .unwrap_or_else(|| hosts::is_loopback_host(r.registry()));
                let scheme = if plain { "http" } else { "https" };
                HostConfig {
                    api_base: hosts::api_base(&format!("{scheme}://{}", r.api_host()), false)?,
                    capabilities: Capabilities::ALL,
                    skip_verify: false,
                    ca: Vec::new(),
                }
            }
        };
        eps.push(self.endpoint(&origin, true, r.registry())?);
        let eps = Arc::new(eps);
        lock(&self.inner.endpoints).insert(r.registry().to_string(), eps.clone());
        Ok(eps)
    }

    /// The endpoints requests for `r` may go to, in order, with their health.
    pub fn endpoints(&self, r: &Reference) -> Result<Vec<EndpointStatus>> {
        Ok(self
            .all_endpoints(r)?
            .iter()
            .map(|e| EndpointStatus {
                api_base: e.base.to_string(),
                origin: e.origin,
                down: !self.is_up(e),
            })
            .collect())
    }

    /// Endpoints to try for a capability: the mirrors that have it and are up, then the origin.
    pub(crate) fn ordered(
        &self,
        r: &Reference,
        cap: fn(&Capabilities) -> bool,
    ) -> Result<Vec<Endpoint>> {
        let all = self.all_endpoints(r)?;
        let mut v: Vec<Endpoint> = all
            .iter()
            .filter(|e| !e.origin && cap(&e.caps) && self.is_up(e))
            .cloned()
            .collect();
        v.extend(all.iter().filter(|e| e.origin).cloned());
        Ok(v)
    }

    fn is_up(&self, ep: &Endpoint) -> bool {
        ep.origin
            || lock(&self.inner.health)
                .get(&ep.label)
                .and_then(|h| h.down_until)
                .is_none_or(|t| Instant::now() >= t)
    }

    pub(crate) fn mark_down(&self, ep: &Endpoint, why: &RegistryError) {
        if ep.origin {
            return;
        }
        let mut h = lock(&self.inner.health);
        let e = h.entry(ep.label.clone()).or_default();
        e.backoff = if e.backoff.is_zero() {
            self.inner.opts.mirror_backoff
        } else {
            (e.backoff * 2).min(MAX_BACKOFF)
        };
        e.down_until = Some(Instant::now() + e.backoff);
        warn!(mirror = %ep.label, error = %why, skip_for = ?e.backoff, "mirror failed; using the next host");
    }

    pub(crate) fn mark_up(&self, ep: &Endpoint) {
        if !ep.origin {
            lock(&self.inner.health).remove(&ep.label);
        }
    }

    /// The caller found that blob `digest` of `r`, as last read, does not verify: the mirror that
    /// served it is marked down and its remembered redirect dropped, so the next read goes
    /// elsewhere. Returns whether a mirror was blamed (false when the origin served it).
    pub fn report_bad_blob(&self, r: &Reference, digest: &str) -> bool {
        let key = (
            r.registry().to_string(),
            r.repository().to_string(),
            digest.to_string(),
        );
        let Some(label) = lock(&self.inner.served_by).remove(&key) else {
            return false;
        };
        lock(&self.inner.redirects)
            .retain(|(ep, repo, d), _| !(ep == &label && repo == r.repository() && d == digest));
        let Ok(all) = self.all_endpoints(r) else {
            return false;
        };
        match all.iter().find(|e| e.label == label && !e.origin) {
            Some(ep) => {
                let why = RegistryError::new(
                    ErrorKind::DigestMismatch,
                    &ep.label,
                    Some(r.repository()),
                    format!("blob {digest}: the caller reported bad content"),
                );
                self.mark_down(ep, &why);
                true
            }
            None => false,
        }
    }

    async fn credential(&self, ep: &Endpoint) -> Result<Option<Credential>> {
        let mut m = self.inner.creds.lock().await;
        if let Some(c) = m.get(&ep.cred_host) {
            return Ok(c.clone());
        }
        let src = self.inner.opts.credentials.clone();
        let host = ep.cred_host.clone();
        let c = tokio::task::spawn_blocking(move || src.lookup(&host))
            .await
            .map_err(|e| RegistryError::invalid(format!("credential lookup panicked: {e}")))??;
        debug!(host = %ep.cred_host, found = c.is_some(), source = %self.inner.opts.credentials.describe(), "credentials");
        m.insert(ep.cred_host.clone(), c.clone());
        Ok(c)
    }

    async fn creds_note(&self, ep: &Endpoint) -> String {
        let src = self.inner.opts.credentials.describe();
        match self.credential(ep).await {
            Ok(Some(_)) => format!("credentials from {src}"),
            Ok(None) => format!("anonymous: no credentials for {} in {src}", ep.cred_host),
            Err(_) => format!("credentials from {src} unusable"),
        }
    }

    fn token_slot(&self, ep: &Endpoint, scope: &str) -> TokenSlot {
        lock(&self.inner.tokens)
            .entry((ep.origin_key.clone(), scope.to_string()))
            .or_default()
            .clone()
    }

    /// The `Authorization` value for a request to `ep` with `scope`, or `None` while the
    /// endpoint has not asked for auth. `stale`: the value that was just refused; a cached token
    /// equal to it is replaced.
    async fn authorization(
        &self,
        ep: &Endpoint,
        scope: &str,
        stale: Option<&Secret>,
        ctx: &Ctx,
    ) -> Result<Option<Secret>> {
        let scheme = lock(&self.inner.challenges).get(&ep.origin_key).cloned();
        match scheme {
            None => Ok(None),
            Some(AuthScheme::Basic) => {
                Ok(self.credential(ep).await?.and_then(|c| c.basic_header()))
            }
            Some(AuthScheme::Bearer { realm, service }) => {
                let slot = self.token_slot(ep, scope);
                // Concurrent requests wait here for the one fetch in flight.
                let mut g = slot.lock().await;
                if let Some(t) = &*g {
                    if Instant::now() < t.refresh_at && stale != Some(&t.header) {
                        return Ok(Some(t.header.clone()));
                    }
                }
                let t = self
                    .fetch_token(ep, &realm, service.as_deref(), scope, ctx)
                    .await?;
                let h = t.header.clone();
                *g = Some(t);
                Ok(Some(h))
            }
        }
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &Url,
        service: Option<&str>,
        scope: &str,
        ctx: &Ctx,
    ) -> Result<Token> {
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let realm_s = show_url(realm);
        let tctx = Ctx {
            host: ctx.host.clone(),
            repo: ctx.repo.clone(),
            noun: "token service",
            what: realm_s.clone(),
        };
        let cred = self.credential(ep).await?;
        let rb = match &cred {
            Some(Credential::IdentityToken(t)) => {
                let mut form = vec![
                    ("grant_type", "refresh_token".to_string()),
                    ("refresh_token", t.expose().to_string()),
                    ("client_id", "lazyblk".to_string()),
                    ("scope", scope.to_string()),
                ];
                if let Some(s) = service {
                    form.push(("service", s.to_string()));
                }
                ep.http.post(realm.clone()).form(&form)
            }
            other => {
                let mut u = realm.clone();
                {
                    let mut q = u.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    for s in scope.split(' ') {
                        q.append_pair("scope", s);
                    }
                }
                let rb = ep.http.get(u);
                match other.as_ref().and_then(Credential::basic_header) {
                    Some(h) => rb.header(header::AUTHORIZATION, sensitive(&h)?),
                    None => rb,
                }
            }
        };
        self.inner.token_fetches.fetch_add(1, Ordering::Relaxed);
        debug!(realm = %realm_s, scope, "fetching token");
        let resp = rb
            .timeout(self.inner.opts.request_timeout)
            .send()
            .await
            .map_err(|e| net_error(e, &tctx))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(ctx.err(
                ErrorKind::Auth,
                format!(
                    "authentication failed at token service {realm_s}: {status} ({})",
                    self.creds_note(ep).await
                ),
            ));
        }
        if !status.is_success() {
            return Err(status_error(resp, &tctx).await);
        }
        let body = read_limited(resp, SMALL_BODY, &tctx).await?;
        let tr: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            tctx.err(
                ErrorKind::Protocol,
                format!("token service {realm_s}: invalid token response: {e}"),
            )
        })?;
        let Some(tok) = tr
            .token
            .filter(|t| !t.is_empty())
            .or(tr.access_token.filter(|t| !t.is_empty()))
        else {
            return Err(tctx.err(
                ErrorKind::Protocol,
                format!("token service {realm_s}: response has no token"),
            ));
        };
        // The spec's default lifetime is 60 s. Refresh when 10% of it (at most 5 s) is left.
        let life = Duration::from_secs(tr.expires_in.filter(|&n| n > 0).unwrap_or(60));
        let margin = (life / 10).min(Duration::from_secs(5));
        Ok(Token {
            header: Secret::new(format!("Bearer {tok}")),
            refresh_at: Instant::now() + life - margin,
        })
    }

    /// Learn the challenge from a 401; false when there is none we can answer.
    fn learn_challenge(&self, ep: &Endpoint, headers: &HeaderMap) -> bool {
        let mut found = None;
        for v in headers.get_all(header::WWW_AUTHENTICATE) {
            let Ok(v) = v.to_str() else { continue };
            for c in parse_challenges(v) {
                if c.is("bearer") {
                    if let Some(realm) = c.param("realm").and_then(|r| Url::parse(r).ok()) {
                        if matches!(realm.scheme(), "http" | "https") {
                            found = Some(AuthScheme::Bearer {
                                realm,
                                service: c.param("service").map(str::to_string),
                            });
                            break;
                        }
                    }
                } else if c.is("basic") && found.is_none() {
                    found = Some(AuthScheme::Basic);
                }
            }
            if matches!(found, Some(AuthScheme::Bearer { .. })) {
                break;
            }
        }
        match found {
            Some(s) => {
                debug!(endpoint = %ep.label, scheme = ?s, "auth challenge");
                lock(&self.inner.challenges).insert(ep.origin_key.clone(), s);
                true
            }
            None => false,
        }
    }

    /// Send a request to the endpoint with authorization; on 401 (or 403 with a token) learn the
    /// challenge, get fresh credentials and retry once. Returns the response and the
    /// `Authorization` value used.
    pub(crate) async fn send_authed(
        &self,
        ep: &Endpoint,
        scope: &str,
        ctx: &Ctx,
        mk: &(dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync),
    ) -> Result<(reqwest::Response, Option<Secret>)> {
        let auth = self.authorization(ep, scope, None, ctx).await?;
        let resp = exec(mk(&ep.http), auth.as_ref(), ctx).await?;
        let st = resp.status();
        let bearer_sent = auth
            .as_ref()
            .is_some_and(|a| a.expose().starts_with("Bearer "));
        if st != StatusCode::UNAUTHORIZED && !(st == StatusCode::FORBIDDEN && bearer_sent) {
            return Ok((resp, auth));
        }
        if st == StatusCode::UNAUTHORIZED && !self.learn_challenge(ep, resp.headers()) {
            return Err(ctx.err(
                ErrorKind::Auth,
                format!(
                    "{}: 401 Unauthorized without a usable WWW-Authenticate challenge",
                    ctx.subject()
                ),
            ));
        }
        debug!(endpoint = %ep.label, status = %st, "re-authenticating");
        let fresh = self.authorization(ep, scope, auth.as_ref(), ctx).await?;
        if fresh.is_none() {
            return Err(ctx.err(
                ErrorKind::Auth,
                format!(
                    "authentication required: {st} ({})",
                    self.creds_note(ep).await
                ),
            ));
        }
        let resp = exec(mk(&ep.http), fresh.as_ref(), ctx).await?;
        let st = resp.status();
        if st == StatusCode::UNAUTHORIZED || st == StatusCode::FORBIDDEN {
            let what = if st == StatusCode::FORBIDDEN {
                "access denied"
            } else {
                "authentication failed"
            };
            return Err(ctx.err(
                ErrorKind::Auth,
                format!("{what}: {st} ({})", self.creds_note(ep).await),
            ));
        }
        Ok((resp, fresh))
    }

    /// `send_authed`, then follow redirects (at most [`MAX_REDIRECTS`]), sending
    /// `Authorization` only to the endpoint's own origin. With `remember`, a redirect's final
    /// URL is kept for that blob and tried first next time (dropped on any failure).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send_following(
        &self,
        ep: &Endpoint,
        scope: &str,
        ctx: &Ctx,
        method: Method,
        url: Url,
        headers: HeaderMap,
        remember: Option<(String, String)>,
    ) -> Result<reqwest::Response> {
        let key = remember.map(|(repo, digest)| (ep.label.clone(), repo, digest));
        if let Some(k) = &key {
            let known = lock(&self.inner.redirects).get(k).cloned();
            if let Some(u) = known {
                let mut rb = ep
                    .http
                    .request(method.clone(), u.clone())
                    .headers(headers.clone());
                if origin_of(&u) == ep.origin_key {
                    if let Some(a) = self.authorization(ep, scope, None, ctx).await? {
                        rb = rb.header(header::AUTHORIZATION, sensitive(&a)?);
                    }
                }
                match rb.send().await {
                    Ok(r) if r.status().is_success() => return Ok(r),
                    Ok(r) => {
                        debug!(url = %show_url(&u), status = %r.status(), "remembered redirect failed; asking the registry again")
                    }
                    Err(e) => {
                        debug!(url = %show_url(&u), error = %net_error(e, ctx), "remembered redirect failed; asking the registry again")
                    }
                }
                lock(&self.inner.redirects).remove(k);
            }
        }
        let (mut resp, auth) = {
            let (m, u, h) = (method.clone(), url.clone(), headers.clone());
            self.send_authed(ep, scope, ctx, &move |c| {
                c.request(m.clone(), u.clone()).headers(h.clone())
            })
            .await?
        };
        let mut cur = url;
        let mut hops = 0;
        let mut method = method;
        while is_redirect(resp.status()) {
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(ctx.err(
                    ErrorKind::RedirectLoop,
                    format!(
                        "{}: redirect loop (more than {MAX_REDIRECTS} redirects, last to {})",
                        ctx.subject(),
                        show_url(&cur)
                    ),
                ));
            }
            let loc = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let Some(next) = loc.and_then(|l| cur.join(&l).ok()) else {
                return Err(ctx.err(
                    ErrorKind::Protocol,
                    format!(
                        "{}: {} without a valid Location",
                        ctx.subject(),
                        resp.status()
                    ),
                ));
            };
            if resp.status() == StatusCode::SEE_OTHER && method != Method::HEAD {
                method = Method::GET;
            }
            debug!(from = %show_url(&cur), to = %show_url(&next), "redirect");
            let mut rb = ep
                .http
                .request(method.clone(), next.clone())
                .headers(headers.clone());
            // Never send the registry's credentials to another origin.
            if origin_of(&next) == ep.origin_key {
                if let Some(a) = &auth {
                    rb = rb.header(header::AUTHORIZATION, sensitive(a)?);
                }
            }
            resp = rb.send().await.map_err(|e| net_error(e, ctx))?;
            cur = next;
        }
        if hops > 0 && resp.status().is_success() {
            if let Some(k) = key {
                lock(&self.inner.redirects).insert(k, cur);
            }
        }
        Ok(resp)
    }

    /// Fetch the manifest `r` names (by digest when pinned, else by tag) and verify it: media
    /// type one of [`ACCEPTED`], at most `manifest_limit` bytes, SHA-256 equal to the pinned
    /// digest and to `Docker-Content-Digest` when sent. Mirrors with `resolve` (tags) or `pull`
    /// (digests) are tried first.
    pub async fn resolve(&self, r: &Reference) -> Result<Resolved> {
        let by_tag = r.digest().is_none();
        let mut last = None;
        for ep in self.ordered(r, if by_tag { |c| c.resolve } else { |c| c.pull })? {
            match self.resolve_at(&ep, r).await {
                Ok(x) => {
                    self.mark_up(&ep);
                    return Ok(x);
                }
                Err(e) if !ep.origin => {
                    self.mark_down(&ep, &e);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::invalid(format!("no endpoint for {r}"))))
    }

    async fn resolve_at(&self, ep: &Endpoint, r: &Reference) -> Result<Resolved> {
        let ctx = Ctx::new(ep, r.repository(), "manifest", r.what());
        let url = join(
            ep,
            &format!("{}/manifests/{}", r.repository(), r.manifest_ref()),
            &ctx,
        )?;
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            HeaderValue::from_str(&ACCEPTED.join(", ")).expect("static header"),
        );
        let resp = self
            .send_following(
                ep,
                &pull_scope(r.repository()),
                &ctx,
                Method::GET,
                url,
                h,
                None,
            )
            .await?;
        if !resp.status().is_success() {
            return Err(status_error(resp, &ctx).await);
        }
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(bare_media_type)
            .unwrap_or_default();
        if !ACCEPTED.contains(&ct.as_str()) {
            return Err(ctx.err(
                ErrorKind::MediaType,
                format!("manifest {}: unsupported media type {ct:?} (want an OCI or Docker schema-2 manifest or index)", r.what()),
            ));
        }
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| validate_digest(d).is_ok())
            .map(str::to_string);
        let bytes = read_limited(resp, self.inner.opts.manifest_limit, &ctx).await?;
        // The document's own mediaType, when present, must agree with the served type.
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            if let Some(f) = v.get("mediaType").and_then(|m| m.as_str()) {
                if f != ct {
                    return Err(ctx.err(
                        ErrorKind::MediaType,
                        format!(
                            "manifest {}: served as {ct:?} but its mediaType is {f:?}",
                            r.what()
                        ),
                    ));
                }
            }
        } else {
            return Err(ctx.err(
                ErrorKind::Protocol,
                format!("manifest {}: not JSON", r.what()),
            ));
        }
        let expect = r.digest().map(str::to_string).or(header_digest.clone());
        let digest = match &expect {
            Some(d) => {
                if let Some(actual) = digest_matches(d, &bytes) {
                    let which = if r.digest().is_some() {
                        "pinned digest"
                    } else {
                        "Docker-Content-Digest"
                    };
                    return Err(ctx.err(
                        ErrorKind::DigestMismatch,
                        format!(
                            "manifest {}: content hashes to {actual}, not the {which} {d}",
                            r.what()
                        ),
                    ));
                }
                if let (Some(pinned), Some(hd)) = (r.digest(), &header_digest) {
                    if pinned.split(':').next() == hd.split(':').next() && pinned != hd {
                        return Err(ctx.err(
                            ErrorKind::DigestMismatch,
                            format!("manifest {}: Docker-Content-Digest is {hd}", r.what()),
                        ));
                    }
                }
                if d.starts_with("sha256:") {
                    d.clone()
                } else {
                    crate::manifest::sha256_digest(&bytes)
                }
            }
            None => crate::manifest::sha256_digest(&bytes),
        };
        debug!(reference = %r, digest, media_type = ct, bytes = bytes.len(), endpoint = %ep.label, "resolved");
        Ok(Resolved {
            digest,
            media_type: ct,
            bytes,
        })
    }

    /// The size of blob `digest` in `r`'s repository (HEAD).
    pub async fn blob_size(&self, r: &Reference, digest: &str) -> Result<u64> {
        validate_digest(digest)?;
        let mut last = None;
        for ep in self.ordered(r, |c| c.pull)? {
            let ctx = Ctx::new(&ep, r.repository(), "blob", digest);
            let res = async {
                let url = join(&ep, &format!("{}/blobs/{digest}", r.repository()), &ctx)?;
                let resp = self
                    .send_following(
                        &ep,
                        &pull_scope(r.repository()),
                        &ctx,
                        Method::HEAD,
                        url,
                        HeaderMap::new(),
                        None,
                    )
                    .await?;
                if !resp.status().is_success() {
                    return Err(status_error(resp, &ctx).await);
                }
                resp.headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| {
                        ctx.err(
                            ErrorKind::Protocol,
                            format!("blob {digest}: HEAD without Content-Length"),
                        )
                    })
            }
            .await;
            match res {
                Ok(n) => {
                    self.mark_up(&ep);
                    return Ok(n);
                }
                Err(e) if !ep.origin => {
                    self.mark_down(&ep, &e);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::invalid("no endpoint")))
    }

    /// Stream bytes `offset .. offset + len` of blob `digest` into `sink` as they arrive. A
    /// server that ignores `Range` (200 with the whole blob) is handled by skipping to `offset`.
    /// Mirrors are tried first; a mirror that fails is marked down and the read goes on at the
    /// next one (from where it stopped), then at the origin. The content is not verified: the
    /// caller does that, and calls [`Client::report_bad_blob`] when it does not verify. On error
    /// the sink has received a prefix of the range.
    pub async fn read_blob_range(
        &self,
        r: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        validate_digest(digest)?;
        if len == 0 {
            return Ok(());
        }
        if offset.checked_add(len).is_none() {
            return Err(RegistryError::invalid(format!(
                "blob {digest}: range {offset}+{len} overflows"
            )));
        }
        let mut done = 0u64;
        let mut last = None;
        for ep in self.ordered(r, |c| c.pull)? {
            let mut tries = 0;
            loop {
                let before = done;
                match self
                    .range_at(&ep, r, digest, offset, len, &mut done, sink)
                    .await
                {
                    Ok(()) => {
                        self.mark_up(&ep);
                        lock(&self.inner.served_by).insert(
                            (
                                r.registry().to_string(),
                                r.repository().to_string(),
                                digest.to_string(),
                            ),
                            ep.label.clone(),
                        );
                        return Ok(());
                    }
                    Err(e) => {
                        lock(&self.inner.redirects).remove(&(
                            ep.label.clone(),
                            r.repository().to_string(),
                            digest.to_string(),
                        ));
                        tries += 1;
                        // Progress then a transient failure: go on from where it stopped.
                        if e.is_transient() && done > before && tries < 4 {
                            debug!(endpoint = %ep.label, error = %e, done, "resuming range read");
                            continue;
                        }
                        if ep.origin {
                            return Err(e);
                        }
                        self.mark_down(&ep, &e);
                        last = Some(e);
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::invalid("no endpoint")))
    }

    #[allow(clippy::too_many_arguments)]
    async fn range_at(
        &self,
        ep: &Endpoint,
        r: &Reference,
        digest: &str,
        offset: u64,
        len: u64,
        done: &mut u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<()> {
        let start = offset + *done;
        let end = offset + len - 1;
        let ctx = Ctx::new(ep, r.repository(), "blob", digest);
        let url = join(ep, &format!("{}/blobs/{digest}", r.repository()), &ctx)?;
        let mut h = HeaderMap::new();
        h.insert(
            header::RANGE,
            HeaderValue::from_str(&format!("bytes={start}-{end}")).expect("ascii"),
        );
        let remember = Some((r.repository().to_string(), digest.to_string()));
        let mut resp = self
            .send_following(
                ep,
                &pull_scope(r.repository()),
                &ctx,
                Method::GET,
                url,
                h,
                remember,
            )
            .await?;
        let mut skip = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let cr = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let got = cr
                    .strip_prefix("bytes ")
                    .and_then(|s| s.split(['-', '/']).next())
                    .and_then(|s| s.trim().parse::<u64>().ok());
                if got != Some(start) {
                    return Err(ctx.err(
                        ErrorKind::Protocol,
                        format!("blob {digest}: asked for bytes {start}-{end}, got Content-Range {cr:?}"),
                    ));
                }
                0
            }
            StatusCode::OK => {
                debug!(endpoint = %ep.label, digest, "server ignored Range; skipping to the offset");
                start
            }
            _ => return Err(status_error(resp, &ctx).await),
        };
        let mut want = end + 1 - start;
        while want > 0 {
            match resp.chunk().await {
                Ok(Some(mut c)) => {
                    if skip > 0 {
                        let n = skip.min(c.len() as u64) as usize;
                        c = c.slice(n..);
                        skip -= n as u64;
                    }
                    if c.is_empty() {
                        continue;
                    }
                    let n = want.min(c.len() as u64) as usize;
                    sink(c.slice(..n));
                    *done += n as u64;
                    want -= n as u64;
                }
                Ok(None) => {
                    return Err(ctx.err(
                        ErrorKind::Truncated,
                        format!(
                            "blob {digest}: body ended {want} bytes short of bytes {start}-{end}"
                        ),
                    ))
                }
                Err(e) => return Err(net_error(e, &ctx)),
            }
        }
        Ok(())
    }

    /// A whole blob of at most `max` bytes, verified against its digest (a mirror serving wrong
    /// content is marked down and the next host tried).
    pub async fn get_blob(&self, r: &Reference, digest: &str, max: u64) -> Result<Bytes> {
        validate_digest(digest)?;
        let mut last = None;
        for ep in self.ordered(r, |c| c.pull)? {
            let ctx = Ctx::new(&ep, r.repository(), "blob", digest);
            let res = async {
                let url = join(&ep, &format!("{}/blobs/{digest}", r.repository()), &ctx)?;
                let remember = Some((r.repository().to_string(), digest.to_string()));
                let resp = self
                    .send_following(
                        &ep,
                        &pull_scope(r.repository()),
                        &ctx,
                        Method::GET,
                        url,
                        HeaderMap::new(),
                        remember,
                    )
                    .await?;
                if !resp.status().is_success() {
                    return Err(status_error(resp, &ctx).await);
                }
                let b = read_limited(resp, max, &ctx).await?;
                if let Some(actual) = digest_matches(digest, &b) {
                    return Err(ctx.err(
                        ErrorKind::DigestMismatch,
                        format!("blob {digest}: content hashes to {actual}"),
                    ));
                }
                Ok(b)
            }
            .await;
            match res {
                Ok(b) => {
                    self.mark_up(&ep);
                    return Ok(b);
                }
                Err(e) if !ep.origin => {
                    self.mark_down(&ep, &e);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::invalid("no endpoint")))
    }
}

/// `repository:<repo>:pull`.
pub(crate) fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

pub(crate) fn join(ep: &Endpoint, path: &str, ctx: &Ctx) -> Result<Url> {
    ep.base
        .join(path)
        .map_err(|e| ctx.err(ErrorKind::Invalid, format!("bad URL for {path:?}: {e}")))
}

fn sensitive(s: &Secret) -> Result<HeaderValue> {
    let mut v = HeaderValue::from_str(s.expose())
        .map_err(|_| RegistryError::invalid("credential or token is not a valid header value"))?;
    v.set_sensitive(true);
    Ok(v)
}

pub(crate) async fn exec(
    rb: reqwest::RequestBuilder,
    auth: Option<&Secret>,
    ctx: &Ctx,
) -> Result<reqwest::Response> {
    let rb = match auth {
        Some(a) => rb.header(header::AUTHORIZATION, sensitive(a)?),
        None => rb,
    };
    rb.send().await.map_err(|e| net_error(e, ctx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_skip_loopback_and_no_proxy() {
        let env = ProxyEnv::from_values(
            Some("http://proxy:3128".into()),
            Some("proxy:3129".into()),
            Some(" .internal.example, direct.example:443,*.wild.example".into()),
        );
        let p = |u: &str| {
            env.proxy_for(&Url::parse(u).unwrap())
                .map(|u| u.to_string())
        };
        assert_eq!(p("https://ghcr.io/v2/"), Some("http://proxy:3129/".into()));
        assert_eq!(p("http://ghcr.io/v2/"), Some("http://proxy:3128/".into()));
        for u in [
            "http://127.0.0.1:5000/v2/",
            "http://127.9.9.9/",
            "http://localhost:5000/",
            "http://[::1]:5000/",
            "https://a.internal.example/",
            "https://internal.example/",
            "https://direct.example/",
            "https://x.wild.example/",
        ] {
            assert_eq!(p(u), None, "{u}");
        }
        assert!(p("http://direct.example:8080/").is_some());
        let star = ProxyEnv::from_values(Some("http://p:1".into()), None, Some("*".into()));
        assert_eq!(star.proxy_for(&Url::parse("http://x/").unwrap()), None);
    }

    #[test]
    fn digest_check() {
        let d = crate::manifest::sha256_digest(b"abc");
        assert_eq!(digest_matches(&d, b"abc"), None);
        assert!(digest_matches(&d, b"abd").is_some());
    }
}

#[cfg(test)]
mod secret_tests {
    use super::*;

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
