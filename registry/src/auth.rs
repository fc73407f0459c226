//! Authentication: `WWW-Authenticate` challenges per endpoint origin, Basic, Bearer tokens
//! cached per (origin, scope) and renewed before they expire or when refused, one fetch shared
//! by concurrent requests; credentials looked up once per host.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{self, HeaderMap};
use reqwest::StatusCode;
use tracing::debug;
use url::Url;

use crate::challenge::parse_challenges;
use crate::client::{lock, Client};
use crate::creds::{Credential, Secret};
use crate::endpoints::Endpoint;
use crate::error::{ErrorKind, RegistryError, Result};
use crate::transport::{exec, net_error, read_limited, sensitive, show_url, status_error, Ctx};

/// Largest token response read.
const SMALL_BODY: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub(crate) enum AuthScheme {
    Basic,
    Bearer { realm: Url, service: Option<String> },
}

/// One cached token behind an async lock, so that one fetch serves every waiting request.
pub(crate) type TokenSlot = Arc<tokio::sync::Mutex<Option<Token>>>;

pub(crate) struct Token {
    header: Secret,
    refresh_at: Instant,
}

/// `repository:<repo>:pull`.
pub(crate) fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

impl Client {
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
    pub(crate) async fn authorization(
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
}
