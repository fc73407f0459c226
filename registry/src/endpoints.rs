//! Where requests go: `--mirror`s, then `hosts.toml` hosts, then the origin; mirror health
//! with backoff, and blaming the mirror that served a blob that did not verify.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use url::Url;

use crate::client::{lock, Client, TlsKey};
use crate::error::{ErrorKind, RegistryError, Result};
use crate::hosts::{self, Capabilities, HostConfig};
use crate::reference::Reference;
use crate::transport::{origin_of, Ctx};

/// Longest a mirror stays marked down.
const MAX_BACKOFF: Duration = Duration::from_secs(600);

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

#[derive(Default)]
pub(crate) struct Health {
    down_until: Option<Instant>,
    backoff: Duration,
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
    pub(crate) cred_host: String,
    /// `scheme://host:port` of `base`.
    pub(crate) origin_key: String,
}

impl Client {
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

    /// Run `op` at each endpoint of `eps` in order until one succeeds: a mirror that fails is
    /// marked down and the next host tried; the origin's error is final (the origin is always
    /// the last endpoint listed).
    pub(crate) async fn first_ok<T, F, Fut>(
        &self,
        eps: Vec<Endpoint>,
        what: &(dyn std::fmt::Display + Sync),
        mut op: F,
    ) -> Result<T>
    where
        F: FnMut(Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut last = None;
        for ep in eps {
            match op(ep.clone()).await {
                Ok(x) => {
                    self.mark_up(&ep);
                    return Ok(x);
                }
                // A mirror that lacks something (a pull-through cache without the referrers
                // tag, say) answered: the next host is asked, the mirror stays healthy.
                Err(e) if !ep.origin && e.kind() == crate::error::ErrorKind::NotFound => {
                    debug!(mirror = %ep.label, error = %e, "not on this mirror; asking the next host");
                    last = Some(e);
                }
                Err(e) if !ep.origin => {
                    self.mark_down(&ep, &e);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::invalid(format!("no endpoint for {what}"))))
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
}

pub(crate) fn join(ep: &Endpoint, path: &str, ctx: &Ctx) -> Result<Url> {
    ep.base
        .join(path)
        .map_err(|e| ctx.err(ErrorKind::Invalid, format!("bad URL for {path:?}: {e}")))
}
