//! Sending: the request context for errors, transport and status errors (one line, the
//! registry's own message), bounded body reads, and following redirects without the registry's
//! `Authorization` to another origin, with a per-blob memory of where they led.

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use tracing::debug;
use url::Url;

use crate::client::{lock, Client};
use crate::creds::Secret;
use crate::endpoints::Endpoint;
use crate::error::{ErrorKind, RegistryError, Result};

/// Most redirects followed for one request.
pub const MAX_REDIRECTS: usize = 10;

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
    pub(crate) fn subject(&self) -> String {
        if self.what.is_empty() {
            self.noun.to_string()
        } else {
            format!("{} {}", self.noun, self.what)
        }
    }
}

/// `scheme://host:port` of a URL.
pub(crate) fn origin_of(u: &Url) -> String {
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
    let server = e
        .url()
        .map(|u| match (u.host_str(), u.port_or_known_default()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (h, _) => h.unwrap_or("").to_string(),
        });
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut cert = None;
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        let t = s.to_string();
        // rustls: "invalid peer certificate: UnknownIssuer", "...: Expired", "...: not valid
        // for name ...": a configuration problem, not worth retrying.
        if let Some(i) = t.find("invalid peer certificate") {
            cert.get_or_insert_with(|| t[i..].to_string());
        }
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    if let Some(why) = cert {
        let server = server.unwrap_or_else(|| ctx.host.clone());
        let hint = if why.contains("UnknownIssuer") {
            " (its issuer is not a trusted CA)"
        } else {
            ""
        };
        return ctx.err(
            ErrorKind::Certificate,
            format!(
                "{}: TLS certificate of {server} not accepted: {why}{hint}; trust its CA with \
                 --ca-file (or hosts.toml's ca) or skip verification with --insecure",
                ctx.subject()
            ),
        );
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

fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

pub(crate) fn sensitive(s: &Secret) -> Result<HeaderValue> {
    let mut v = HeaderValue::from_str(s.expose())
        .map_err(|_| RegistryError::invalid("credential or token is not a valid header value"))?;
    v.set_sensitive(true);
    Ok(v)
}

/// `rb` with a total time limit, when there is one.
pub(crate) fn bounded(
    rb: reqwest::RequestBuilder,
    limit: Option<std::time::Duration>,
) -> reqwest::RequestBuilder {
    match limit {
        Some(t) => rb.timeout(t),
        None => rb,
    }
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

impl Client {
    /// `send_authed`, then follow redirects (at most [`MAX_REDIRECTS`]), sending
    /// `Authorization` only to the endpoint's own origin. With `remember` (a blob read), a
    /// redirect's final URL is kept for that blob and tried first next time (dropped on any
    /// failure). Every request but a blob read is bounded by `request_timeout` in total, body
    /// included; blob reads only by `read_timeout` (their bodies may be large).
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
        let limit = key.is_none().then_some(self.inner.opts.request_timeout);
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
                bounded(c.request(m.clone(), u.clone()).headers(h.clone()), limit)
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
            let mut rb = bounded(
                ep.http
                    .request(method.clone(), next.clone())
                    .headers(headers.clone()),
                limit,
            );
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
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    use bytes::Bytes;

    use crate::{BlobSource, Client, ClientOptions, ErrorKind, Reference};

    /// A server that keeps every connection alive with a byte every 50 ms, so `read_timeout`
    /// never fires: headers that never end, except blob GETs (a 206 whose 20 body bytes trickle
    /// in over a second) and HEADs under `/v2/fast/` (404 at once, so a push goes on to POST).
    fn trickler() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { continue };
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut b).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let (method, path) = {
                        let mut w = head.split(' ');
                        (
                            w.next().unwrap_or("").to_string(),
                            w.next().unwrap_or("").to_string(),
                        )
                    };
                    let tick = || std::thread::sleep(Duration::from_millis(50));
                    if method == "HEAD" && path.starts_with("/v2/fast/") {
                        let _ = s.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\
                              Connection: close\r\n\r\n",
                        );
                        return;
                    }
                    if method == "GET" && path.contains("/blobs/") {
                        let _ = s.write_all(
                            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-19/20\r\n\
                              Content-Length: 20\r\n\r\n",
                        );
                        for i in 0..20u8 {
                            tick();
                            if s.write_all(&[b'a' + i]).is_err() {
                                return;
                            }
                        }
                        return;
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\n").is_err() {
                        return;
                    }
                    for _ in 0..400 {
                        tick();
                        if s.write_all(b"X-Slow: 1\r\n").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    /// `request_timeout` bounds manifests, HEADs and uploads in total even while bytes keep
    /// coming; a blob read that takes longer than it still completes.
    #[tokio::test]
    async fn request_timeout_bounds_all_but_blob_reads() {
        let port = trickler();
        let dir = tempfile::tempdir().unwrap();
        let c = Client::new(ClientOptions {
            hosts_dir: Some(dir.path().into()),
            read_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_millis(600),
            ..Default::default()
        })
        .unwrap();
        let slow = Reference::parse(&format!("127.0.0.1:{port}/slow/img:v1")).unwrap();
        let fast = Reference::parse(&format!("127.0.0.1:{port}/fast/img:v1")).unwrap();
        let d = crate::manifest::sha256_digest(b"x");
        let timed = |e: crate::RegistryError, t0: Instant, what: &str| {
            assert_eq!(e.kind(), ErrorKind::Timeout, "{what}: {e}");
            assert!(
                t0.elapsed() < Duration::from_millis(1800),
                "{what}: {:?}",
                t0.elapsed()
            );
            assert!(e.to_string().contains("timed out"), "{what}: {e}");
        };
        let t0 = Instant::now();
        timed(c.resolve(&slow).await.unwrap_err(), t0, "manifest");
        let t0 = Instant::now();
        timed(c.blob_size(&slow, &d).await.unwrap_err(), t0, "HEAD");
        let t0 = Instant::now();
        let e = c
            .push_blob(
                &fast,
                &d,
                1,
                BlobSource::Bytes(Bytes::from_static(b"x")),
                None,
            )
            .await
            .unwrap_err();
        timed(e, t0, "upload");
        let t0 = Instant::now();
        let e = c
            .push_manifest(
                &slow,
                "v1",
                crate::manifest::OCI_MANIFEST,
                Bytes::from_static(b"{}"),
            )
            .await
            .unwrap_err();
        timed(e, t0, "manifest PUT");
        // A blob read: a second of trickle, longer than request_timeout, and it completes.
        let t0 = Instant::now();
        let mut got = Vec::new();
        c.read_blob_range(&slow, &d, 0, 20, &mut |b| got.extend_from_slice(&b))
            .await
            .unwrap();
        assert_eq!(got, b"abcdefghijklmnopqrst");
        assert!(
            t0.elapsed() > Duration::from_millis(800),
            "{:?}",
            t0.elapsed()
        );
    }
}
