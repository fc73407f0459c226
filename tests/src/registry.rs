//! A real Docker registry (Debian's `docker-registry`, distribution 2.8) on a free loopback port,
//! and the small HTTP servers the registry client's tests put around it: a token issuer, a
//! redirecting front, an "object store" serving the registry's blob files, and a broken mirror.
//!
//! The servers are hand-rolled HTTP/1.1 on std threads, one request per connection
//! (`Connection: close`), so a test can count and shape every request.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;

/// Where `docker-registry` is expected to be.
pub fn registry_binary() -> PathBuf {
    for p in ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("docker-registry is not installed: run scripts/setup (apt-get install docker-registry apache2-utils)");
}

/// How the registry authenticates.
#[derive(Clone, Debug)]
pub enum RegistryAuth {
    /// Anyone may pull and push.
    None,
    /// htpasswd (bcrypt, made with `htpasswd -Bbn`) with one user.
    Htpasswd {
        /// User.
        user: String,
        /// Password.
        password: String,
    },
    /// Bearer tokens from a token service.
    Token {
        /// The token service URL.
        realm: String,
        /// `service` (the tokens' audience).
        service: String,
        /// `issuer` (the tokens' `iss`).
        issuer: String,
        /// PEM file of the certificate(s) that sign tokens.
        rootcertbundle: PathBuf,
    },
}

/// A running registry; killed on drop.
pub struct Registry {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its filesystem storage root.
    pub storage: PathBuf,
    dir: PathBuf,
}

impl Registry {
    /// Start a registry with storage and config in `dir`.
    pub fn start(dir: &Path, auth: &RegistryAuth) -> Registry {
        let bin = registry_binary();
        let port = crate::free_port();
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).expect("mkdir storage");
        let auth_yaml = match auth {
            RegistryAuth::None => String::new(),
            RegistryAuth::Htpasswd { user, password } => {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("run htpasswd (apt-get install apache2-utils)");
                assert!(out.status.success(), "htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
                let file = dir.join("htpasswd");
                std::fs::write(&file, &out.stdout).expect("write htpasswd");
                format!("auth:\n  htpasswd:\n    realm: lazyblk-test\n    path: {}\n", file.display())
            }
            RegistryAuth::Token { realm, service, issuer, rootcertbundle } => format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                rootcertbundle.display()
            ),
        };
        let conf = dir.join("config.yml");
        std::fs::write(
            &conf,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: lazyblk-test-secret\n{auth_yaml}",
                storage.display()
            ),
        )
        .expect("write config.yml");
        let log = std::fs::File::create(dir.join("registry.log")).expect("create registry.log");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut r = Registry {
            child,
            port,
            storage,
            dir: dir.to_path_buf(),
        };
        let t0 = Instant::now();
        loop {
            if let Ok(resp) = raw_get(port, "/v2/") {
                if resp.starts_with(b"HTTP/1.1 200") || resp.starts_with(b"HTTP/1.1 401") {
                    break;
                }
            }
            if let Ok(Some(st)) = r.child.try_wait() {
                panic!("docker-registry exited ({st}): {}", r.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "docker-registry did not answer /v2/: {}",
                r.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    /// The file holding blob `sha256:<hex>` in the registry's storage.
    pub fn blob_path(storage: &Path, hex: &str) -> PathBuf {
        storage.join(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2.min(hex.len())]
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raw_get(port: u16, path: &str) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut v = Vec::new();
    s.read_to_end(&mut v)?;
    Ok(v)
}

/// One HTTP request as the servers here see it.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body (by `Content-Length`).
    pub body: Vec<u8>,
}

impl Request {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// Query parameters (percent-decoded; repeated names kept in order).
    pub fn query(&self) -> Vec<(String, String)> {
        let Some((_, q)) = self.target.split_once('?') else {
            return Vec::new();
        };
        q.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(x) => {
                        out.push(x);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A reply: a response to serialize, or raw bytes (a relayed response).
pub enum Reply {
    /// Status, headers, body. `Content-Length` and `Connection: close` are added; with
    /// `head_len` the body is left out and `Content-Length` is that (a HEAD answer).
    Response {
        /// Status code.
        status: u16,
        /// Extra headers.
        headers: Vec<(String, String)>,
        /// Body.
        body: Vec<u8>,
        /// For HEAD: the length to announce, without a body.
        head_len: Option<u64>,
    },
    /// Sent as is.
    Raw(Vec<u8>),
}

impl Reply {
    /// A response with a body.
    pub fn new(status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Reply {
        Reply::Response {
            status,
            headers: headers
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            body: body.into(),
            head_len: None,
        }
    }
}

type Handler = Arc<dyn Fn(Request) -> Reply + Send + Sync>;

/// A tiny HTTP/1.1 server on 127.0.0.1, one thread per connection, one request per connection.
pub struct HttpServer {
    /// Its port.
    pub port: u16,
    stop: Arc<AtomicBool>,
    /// Requests served.
    pub requests: Arc<AtomicU64>,
}

impl HttpServer {
    /// Serve `handler` on a free port.
    pub fn start(handler: impl Fn(Request) -> Reply + Send + Sync + 'static) -> HttpServer {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let handler: Handler = Arc::new(handler);
        let (st, rq) = (stop.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (h, rq) = (handler.clone(), rq.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(conn, &h, &rq);
                });
            }
        });
        HttpServer {
            port,
            stop,
            requests,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn read_request(s: &mut TcpStream) -> std::io::Result<Request> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(a, b)| (a.trim().to_ascii_lowercase(), b.trim().to_string()))
        .collect();
    let len = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut tmp)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Ok(Request {
        method,
        target,
        headers,
        body,
    })
}

fn serve_one(mut s: TcpStream, h: &Handler, rq: &AtomicU64) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let req = read_request(&mut s)?;
    rq.fetch_add(1, Ordering::SeqCst);
    let out = match h(req) {
        Reply::Raw(b) => b,
        Reply::Response {
            status,
            headers,
            body,
            head_len,
        } => {
            let mut o = format!("HTTP/1.1 {status} {}\r\n", reason(status)).into_bytes();
            for (n, v) in &headers {
                o.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
            }
            let len = head_len.unwrap_or(body.len() as u64);
            o.extend_from_slice(
                format!("Content-Length: {len}\r\nConnection: close\r\n\r\n").as_bytes(),
            );
            if head_len.is_none() {
                o.extend_from_slice(&body);
            }
            o
        }
    };
    s.write_all(&out)?;
    s.flush()?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    Ok(())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        _ => "Status",
    }
}

/// Relay `req` to `127.0.0.1:port` and return the raw response.
pub fn forward(port: u16, req: &Request) -> Vec<u8> {
    let attempt = || -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n",
            req.method, req.target
        );
        for (n, v) in &req.headers {
            if n != "host" && n != "connection" {
                head.push_str(&format!("{n}: {v}\r\n"));
            }
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())?;
        s.write_all(&req.body)?;
        let mut v = Vec::new();
        s.read_to_end(&mut v)?;
        Ok(v)
    };
    attempt().unwrap_or_else(|e| {
        format!(
            "HTTP/1.1 502 Bad Gateway\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{e}",
            e.to_string().len()
        )
        .into_bytes()
    })
}

/// A token issuer for distribution's `auth: token`: checks Basic credentials and grants every
/// requested action on `repository` scopes as an ES256 JWT with an `x5c` header. The signature
/// is made by the caller's `sign` (so the crypto crates stay in the tests' dev-dependencies).
pub struct TokenIssuer {
    /// The server.
    pub server: HttpServer,
    /// Token requests answered with a token.
    pub issued: Arc<AtomicU64>,
    /// Token requests refused (bad or missing credentials).
    pub refused: Arc<AtomicU64>,
}

/// Signs a JWT's signing input (ES256: 64 bytes r||s).
pub type Signer = Box<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

/// What the issuer signs with and grants.
pub struct IssuerConfig {
    /// `iss`.
    pub issuer: String,
    /// `aud` (the registry's `service`).
    pub service: String,
    /// The one user and password accepted.
    pub user: String,
    /// Password.
    pub password: String,
    /// The JWT's lifetime (`exp - iat`), seconds; negative for tokens that expired already
    /// (distribution accepts 60 s of clock skew past `exp`).
    pub lifetime: i64,
    /// The `expires_in` announced to the client (may differ from `lifetime` to test a registry
    /// that refuses a token the client still believes valid).
    pub expires_in: u64,
    /// DER of the signing certificate (for `x5c`).
    pub cert_der: Vec<u8>,
    /// ES256 signature (64 bytes r||s) of the signing input.
    pub sign: Signer,
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl TokenIssuer {
    /// Start the issuer on a free port; its realm is `<url>/token`.
    pub fn start(cfg: IssuerConfig) -> TokenIssuer {
        let issued = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let (iss, rf) = (issued.clone(), refused.clone());
        let jti = AtomicU64::new(0);
        let server = HttpServer::start(move |req| {
            let expect = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", cfg.user, cfg.password))
            );
            if req.path() != "/token" {
                return Reply::new(404, &[], "not found");
            }
            if req.header("authorization") != Some(expect.as_str()) {
                rf.fetch_add(1, Ordering::SeqCst);
                return Reply::new(
                    401,
                    &[("Content-Type", "application/json")],
                    r#"{"details":"bad credentials"}"#,
                );
            }
            let q = req.query();
            let mut access = Vec::new();
            for (k, v) in &q {
                if k != "scope" {
                    continue;
                }
                for s in v.split(' ') {
                    let mut it = s.splitn(2, ':');
                    let (Some(ty), Some(rest)) = (it.next(), it.next()) else {
                        continue;
                    };
                    let Some((name, actions)) = rest.rsplit_once(':') else {
                        continue;
                    };
                    access.push(serde_json::json!({
                        "type": ty, "name": name, "actions": actions.split(',').collect::<Vec<_>>()
                    }));
                }
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_secs();
            let header = serde_json::json!({
                "typ": "JWT", "alg": "ES256",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(&cfg.cert_der)],
            });
            let claims = serde_json::json!({
                "iss": cfg.issuer, "sub": cfg.user, "aud": cfg.service,
                "exp": now.saturating_add_signed(cfg.lifetime), "nbf": now.saturating_sub(1), "iat": now,
                "jti": format!("t{}", jti.fetch_add(1, Ordering::SeqCst)),
                "access": access,
            });
            let input = format!(
                "{}.{}",
                b64url(header.to_string().as_bytes()),
                b64url(claims.to_string().as_bytes())
            );
            let sig = (cfg.sign)(input.as_bytes());
            let token = format!("{input}.{}", b64url(&sig));
            iss.fetch_add(1, Ordering::SeqCst);
            let body = serde_json::json!({"token": token, "expires_in": cfg.expires_in});
            Reply::new(
                200,
                &[("Content-Type", "application/json")],
                body.to_string(),
            )
        });
        TokenIssuer {
            server,
            issued,
            refused,
        }
    }

    /// The realm URL.
    pub fn realm(&self) -> String {
        format!("{}/token", self.server.url())
    }
}

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

/// `bytes=a-b` (or `bytes=a-`).
fn parse_range(h: &str) -> Option<(u64, u64)> {
    let r = h.strip_prefix("bytes=")?;
    let (a, b) = r.split_once('-')?;
    let a = a.trim().parse().ok()?;
    let b = if b.trim().is_empty() {
        u64::MAX
    } else {
        b.trim().parse().ok()?
    };
    (a <= b).then_some((a, b))
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

/// A registry with `auth: token` and its own token issuer (a fresh self-signed ES256 key in
/// the registry's `rootcertbundle`), accepting `user`/`password`; tokens live `lifetime` s
/// while the issuer announces `expires_in` s.
pub struct TokenRegistry {
    /// The issuer (counts tokens issued and refused).
    pub issuer: TokenIssuer,
    /// The registry.
    pub registry: Registry,
}

impl TokenRegistry {
    /// Start both, the registry's files in `dir`.
    pub fn start(
        dir: &Path,
        user: &str,
        password: &str,
        lifetime: i64,
        expires_in: u64,
    ) -> TokenRegistry {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["lazyblk-test-issuer".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("self-signed certificate");
        std::fs::create_dir_all(dir).expect("mkdir");
        let bundle = dir.join("root.pem");
        std::fs::write(&bundle, cert.pem()).expect("write root.pem");
        let rng = ring::rand::SystemRandom::new();
        let kp = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .expect("signing key");
        let issuer = TokenIssuer::start(IssuerConfig {
            issuer: "lazyblk-test-issuer".into(),
            service: "lazyblk-test-registry".into(),
            user: user.into(),
            password: password.into(),
            lifetime,
            expires_in,
            cert_der: cert.der().to_vec(),
            sign: Box::new(move |m| kp.sign(&rng, m).expect("sign").as_ref().to_vec()),
        });
        let registry = Registry::start(
            dir,
            &RegistryAuth::Token {
                realm: issuer.realm(),
                service: "lazyblk-test-registry".into(),
                issuer: "lazyblk-test-issuer".into(),
                rootcertbundle: bundle,
            },
        );
        TokenRegistry { issuer, registry }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_and_ranges() {
        assert_eq!(
            percent_decode("repository%3Afoo%2Fbar%3Apull%2Cpush+x"),
            "repository:foo/bar:pull,push x"
        );
        assert_eq!(percent_decode("a%zz%"), "a%zz%");
        assert_eq!(parse_range("bytes=1-2"), Some((1, 2)));
        assert_eq!(parse_range("bytes=5-"), Some((5, u64::MAX)));
        assert_eq!(parse_range("bytes=5-1"), None);
    }
}
