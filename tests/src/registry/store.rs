//! What goes around a registry: an "object store" serving its blob files, a front redirecting
//! blob reads there, a lying mirror and a broken one.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::http::{forward, parse_range, HttpServer, Reply};
use super::Registry;

/// Serves the registry's blob files (`/blobs/<hex>`) with Range support, like an object store
/// behind a registry's redirect, and records whether it ever saw an `Authorization` header.
pub struct ObjectStore {
    /// The server.
    pub server: HttpServer,
    /// Whether any request carried `Authorization`.
    pub saw_authorization: Arc<AtomicBool>,
    /// Answer `Range` requests with 200 and the whole file.
    pub ignore_range: Arc<AtomicBool>,
    /// Answer this many next requests with 403 (an expired pre-signed URL).
    pub fail_next: Arc<AtomicU32>,
    /// Blob requests served with content.
    pub served: Arc<AtomicU64>,
}

impl ObjectStore {
    /// Serve blobs from `storage` (a registry's filesystem root).
    pub fn start(storage: &Path) -> ObjectStore {
        let saw = Arc::new(AtomicBool::new(false));
        let ignore = Arc::new(AtomicBool::new(false));
        let fail = Arc::new(AtomicU32::new(0));
        let served = Arc::new(AtomicU64::new(0));
        let (s2, i2, f2, sv2) = (saw.clone(), ignore.clone(), fail.clone(), served.clone());
        let storage = storage.to_path_buf();
        let server = HttpServer::start(move |req| {
            if req.header("authorization").is_some() {
                s2.store(true, Ordering::SeqCst);
            }
            if f2.load(Ordering::SeqCst) > 0 {
                f2.fetch_sub(1, Ordering::SeqCst);
                return Reply::new(403, &[], "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>");
            }
            let Some(hex) = req.path().strip_prefix("/blobs/") else {
                return Reply::new(404, &[], "no");
            };
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Reply::new(404, &[], "no");
            }
            let Ok(data) = std::fs::read(Registry::blob_path(&storage, hex)) else {
                return Reply::new(404, &[], "no such blob");
            };
            sv2.fetch_add(1, Ordering::SeqCst);
            let total = data.len() as u64;
            if req.method == "HEAD" {
                return Reply::Response {
                    status: 200,
                    headers: vec![],
                    body: vec![],
                    head_len: Some(total),
                };
            }
            let range = req
                .header("range")
                .filter(|_| !i2.load(Ordering::SeqCst))
                .and_then(parse_range);
            match range {
                Some((a, b)) if a < total => {
                    let b = b.min(total - 1);
                    Reply::new(
                        206,
                        &[
                            ("Content-Type", "application/octet-stream"),
                            ("Content-Range", &format!("bytes {a}-{b}/{total}")),
                        ],
                        data[a as usize..=b as usize].to_vec(),
                    )
                }
                Some(_) => Reply::new(416, &[("Content-Range", &format!("bytes */{total}"))], ""),
                None => Reply::new(200, &[("Content-Type", "application/octet-stream")], data),
            }
        });
        ObjectStore {
            server,
            saw_authorization: saw,
            ignore_range: ignore,
            fail_next: fail,
            served,
        }
    }
}

/// What the [`Front`] does with blob GETs and manifests.
#[derive(Default)]
pub struct FrontKnobs {
    /// Answer blob GET/HEAD with a 307 back to itself, forever.
    pub redirect_loop: AtomicBool,
    /// Serve manifests as Docker schema 1 (`...manifest.v1+prettyjws`).
    pub wrong_media_type: AtomicBool,
    /// Alter one byte of every manifest body (same length), so it no longer hashes to its digest.
    pub tamper_manifest: AtomicBool,
}

/// A front for a registry: proxies `/v2/` to it but answers blob GET/HEAD with a 307 to the
/// [`ObjectStore`], like a registry with S3 storage and redirects.
pub struct Front {
    /// The server.
    pub server: HttpServer,
    /// Blob requests redirected.
    pub redirected: Arc<AtomicU64>,
    /// Behaviour switches.
    pub knobs: Arc<FrontKnobs>,
}

impl Front {
    /// Front `registry_port`, redirecting blobs to `store_url` (`http://127.0.0.1:<port>`).
    pub fn start(registry_port: u16, store_url: &str) -> Front {
        let redirected = Arc::new(AtomicU64::new(0));
        let knobs = Arc::new(FrontKnobs::default());
        let (rd, kn) = (redirected.clone(), knobs.clone());
        let store = store_url.to_string();
        let server = HttpServer::start(move |req| {
            let path = req.path().to_string();
            if let Some(n) = path.strip_prefix("/loop/") {
                let n: u64 = n.parse().unwrap_or(0);
                return Reply::new(307, &[("Location", &format!("/loop/{}", n + 1))], "");
            }
            let blob = path
                .strip_prefix("/v2/")
                .and_then(|p| p.rsplit_once("/blobs/sha256:"))
                .filter(|(_, hex)| hex.len() == 64 && !hex.contains('/'))
                .map(|(_, hex)| hex.to_string());
            if let (Some(hex), true) = (blob, req.method == "GET" || req.method == "HEAD") {
                // Like a registry: check auth first by asking the registry itself.
                let mut probe = req.clone();
                probe.method = "HEAD".into();
                probe.headers.retain(|(n, _)| n != "range");
                let answer = forward(registry_port, &probe);
                if !answer.starts_with(b"HTTP/1.1 200") {
                    if req.method == "GET" {
                        // The probe's answer has no body: ask again for the real one.
                        return Reply::Raw(forward(registry_port, &req));
                    }
                    return Reply::Raw(answer);
                }
                rd.fetch_add(1, Ordering::SeqCst);
                if kn.redirect_loop.load(Ordering::SeqCst) {
                    return Reply::new(307, &[("Location", "/loop/0")], "");
                }
                return Reply::new(
                    307,
                    &[(
                        "Location",
                        &format!("{store}/blobs/{hex}?X-Signature=s3cr3t-sig"),
                    )],
                    "",
                );
            }
            let raw = forward(registry_port, &req);
            if path.contains("/manifests/")
                && req.method == "GET"
                && raw.starts_with(b"HTTP/1.1 200")
            {
                let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                    return Reply::Raw(raw);
                };
                let mut head = String::from_utf8_lossy(&raw[..split]).into_owned();
                let mut body = raw[split + 4..].to_vec();
                if kn.wrong_media_type.load(Ordering::SeqCst) {
                    head = head
                        .split("\r\n")
                        .map(|l| {
                            if l.to_ascii_lowercase().starts_with("content-type:") {
                                "Content-Type: application/vnd.docker.distribution.manifest.v1+prettyjws".to_string()
                            } else {
                                l.to_string()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("\r\n");
                }
                if kn.tamper_manifest.load(Ordering::SeqCst) {
                    if let Some(i) = body.windows(13).position(|w| w == b"schemaVersion") {
                        body[i] = b'S';
                    }
                }
                let mut out = head.into_bytes();
                out.extend_from_slice(b"\r\n\r\n");
                out.extend_from_slice(&body);
                return Reply::Raw(out);
            }
            Reply::Raw(raw)
        });
        Front {
            server,
            redirected,
            knobs,
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.server.port)
    }
}

/// A mirror that proxies to the registry at `registry_port` but answers blob reads with zeros of
/// the asked length (a mirror with corrupt content the client cannot see, only the caller's
/// verification can).
pub fn lying_mirror(registry_port: u16) -> HttpServer {
    HttpServer::start(move |req| {
        if req.method == "GET" && req.path().contains("/blobs/sha256:") {
            if let Some((a, b)) = req.header("range").and_then(parse_range) {
                if b != u64::MAX {
                    let total = format!("bytes {a}-{b}/{}", b + 1);
                    return Reply::new(
                        206,
                        &[("Content-Range", &total)],
                        vec![0u8; (b - a + 1) as usize],
                    );
                }
            }
        }
        Reply::Raw(forward(registry_port, &req))
    })
}

/// A mirror that answers everything with 500.
pub fn broken_mirror() -> HttpServer {
    HttpServer::start(|_| Reply::new(500, &[("Content-Type", "text/plain")], "mirror is broken"))
}
