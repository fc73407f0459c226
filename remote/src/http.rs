//! HTTP(S) range reads with `reqwest`: connection reuse, timeouts, same-origin redirects only,
//! strict checks of status, `Content-Range` and body length, and `If-Match` pinning to the ETag
//! seen at open so a blob replaced on the server is detected instead of mixed.

use crate::{BlobInfo, BoxFuture, Remote, RemoteError};
use bytes::Bytes;
use reqwest::header::{HeaderMap, CONTENT_RANGE, ETAG, IF_MATCH, RANGE};
use reqwest::StatusCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Tunables of the HTTP remote.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Whole-request timeout (headers and body).
    pub request_timeout: Duration,
    /// Idle connections kept per host.
    pub max_idle_per_host: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_idle_per_host: 16,
        }
    }
}

/// A client (one connection pool) with lazyblk's timeouts and redirect policy.
pub(crate) fn client(opts: &HttpOptions) -> Result<reqwest::Client, RemoteError> {
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        let same_origin = attempt.previous().first().is_some_and(|first| {
            first.scheme() == attempt.url().scheme()
                && first.host_str() == attempt.url().host_str()
                && first.port_or_known_default() == attempt.url().port_or_known_default()
        });
        if attempt.previous().len() > 5 {
            attempt.error("too many redirects")
        } else if !same_origin {
            let msg = format!("refusing a redirect to another host: {}", attempt.url());
            attempt.error(msg)
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .connect_timeout(opts.connect_timeout)
        .timeout(opts.request_timeout)
        .pool_max_idle_per_host(opts.max_idle_per_host)
        .redirect(policy)
        .no_proxy()
        .build()
        .map_err(|e| RemoteError::permanent("http client", e.to_string()))
}

fn classify(url: &str, e: reqwest::Error) -> RemoteError {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    if e.is_redirect() || e.is_builder() {
        RemoteError::permanent(url, msg)
    } else {
        RemoteError::transient(url, msg)
    }
}

fn status_error(url: &str, status: StatusCode) -> RemoteError {
    let msg = format!("HTTP status {status}");
    match status.as_u16() {
        408 | 425 | 429 | 500..=599 => RemoteError::transient(url, msg),
        412 => RemoteError::permanent(
            url,
            "the blob changed on the server (ETag no longer matches)",
        ),
        _ => RemoteError::permanent(url, msg),
    }
}

/// Parse `bytes a-b/total` (total may be `*`).
fn parse_content_range(h: &HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    let v = h.get(CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((a.parse().ok()?, b.parse().ok()?, total))
}

/// Reads ranges of a blob at an HTTP(S) URL.
pub struct HttpRemote {
    url: String,
    client: reqwest::Client,
    seen: Mutex<Option<BlobInfo>>,
    /// `scheme://host[:port]` of `url`, for [`Remote::served`].
    origin: String,
    served: AtomicU64,
}

impl HttpRemote {
    /// A remote for `url`.
    pub fn new(url: &str, opts: &HttpOptions) -> Result<Self, RemoteError> {
        Ok(Self::with_client(url, client(opts)?))
    }

    /// A remote for `url` that uses `client` (and its connection pool).
    pub(crate) fn with_client(url: &str, client: reqwest::Client) -> Self {
        HttpRemote {
            url: url.to_string(),
            client,
            seen: Mutex::new(None),
            origin: crate::origin_label(url),
            served: AtomicU64::new(0),
        }
    }

    fn pinned(&self) -> Option<BlobInfo> {
        self.seen.lock().expect("lock").clone()
    }
}

impl Remote for HttpRemote {
    fn location(&self) -> String {
        self.url.clone()
    }

    fn served(&self) -> Vec<crate::ServedBytes> {
        vec![crate::ServedBytes {
            origin: self.origin.clone(),
            mirror: false,
            bytes: self.served.load(Ordering::Relaxed),
        }]
    }

    fn probe(&self) -> BoxFuture<'_, Result<BlobInfo, RemoteError>> {
        Box::pin(async move {
            let url = &self.url;
            let resp = self
                .client
                .get(url)
                .header(RANGE, "bytes=0-0")
                .send()
                .await
                .map_err(|e| classify(url, e))?;
            let status = resp.status();
            if status == StatusCode::OK {
                return Err(RemoteError::permanent(
                    url,
                    "the server does not support range requests (answered 200 to a Range request)",
                ));
            }
            if status != StatusCode::PARTIAL_CONTENT {
                return Err(status_error(url, status));
            }
            let size = match parse_content_range(resp.headers()) {
                Some((0, 0, Some(total))) => total,
                _ => {
                    return Err(RemoteError::permanent(
                        url,
                        "missing or invalid Content-Range in a 206 response",
                    ))
                }
            };
            let etag = resp
                .headers()
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let info = BlobInfo { size, etag };
            *self.seen.lock().expect("lock") = Some(info.clone());
            Ok(info)
        })
    }

    fn read_range_with<'a>(
        &'a self,
        offset: u64,
        len: u64,
        sink: &'a mut (dyn FnMut(Bytes) + Send),
    ) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async move {
            let url = &self.url;
            if len == 0 {
                return Ok(());
            }
            let last = offset + len - 1;
            let mut req = self
                .client
                .get(url)
                .header(RANGE, format!("bytes={offset}-{last}"));
            let pinned = self.pinned();
            if let Some(etag) = pinned.as_ref().and_then(|p| p.etag.as_deref()) {
                if !etag.starts_with("W/") {
                    req = req.header(IF_MATCH, etag);
                }
            }
            let mut resp = req.send().await.map_err(|e| classify(url, e))?;
            let status = resp.status();
            if status == StatusCode::OK {
                return Err(RemoteError::permanent(
                    url,
                    "the server ignored the Range header (200 instead of 206)",
                ));
            }
            if status != StatusCode::PARTIAL_CONTENT {
                return Err(status_error(url, status));
            }
            match parse_content_range(resp.headers()) {
                Some((a, b, total)) if a == offset && b == last => {
                    if let (Some(t), Some(p)) = (total, &pinned) {
                        if t != p.size {
                            return Err(RemoteError::permanent(
                                url,
                                format!("blob size changed on the server: {} -> {t}", p.size),
                            ));
                        }
                    }
                }
                other => {
                    return Err(RemoteError::transient(
                        url,
                        format!("asked for bytes {offset}-{last}, Content-Range says {other:?}"),
                    ))
                }
            }
            let mut got = 0u64;
            loop {
                match resp.chunk().await {
                    Ok(Some(c)) => {
                        if got + c.len() as u64 > len {
                            return Err(RemoteError::transient(
                                url,
                                format!("body of range {offset}+{len} is longer than asked"),
                            ));
                        }
                        got += c.len() as u64;
                        self.served.fetch_add(c.len() as u64, Ordering::Relaxed);
                        sink(c);
                    }
                    Ok(None) => break,
                    Err(e) => return Err(classify(url, e)),
                }
            }
            if got < len {
                return Err(RemoteError::transient(
                    url,
                    format!("truncated body: {got} of {len} bytes at offset {offset}"),
                ));
            }
            Ok(())
        })
    }
}

/// GET a whole small resource (a manifest), at most `max` bytes.
pub(crate) async fn get_whole(
    client: &reqwest::Client,
    url: &str,
    max: u64,
) -> Result<Vec<u8>, RemoteError> {
    let mut resp = client.get(url).send().await.map_err(|e| classify(url, e))?;
    if resp.status() != StatusCode::OK {
        return Err(status_error(url, resp.status()));
    }
    let announced = resp.content_length();
    let mut body = Vec::new();
    while let Some(c) = resp.chunk().await.map_err(|e| classify(url, e))? {
        if (body.len() + c.len()) as u64 > max {
            return Err(RemoteError::permanent(
                url,
                format!("larger than {max} bytes"),
            ));
        }
        body.extend_from_slice(&c);
    }
    if let Some(n) = announced {
        if n != body.len() as u64 {
            return Err(RemoteError::transient(url, "truncated body"));
        }
    }
    Ok(body)
}
