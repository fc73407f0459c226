//! A real Docker registry (Debian's `docker-registry`, distribution 2.8) on a free loopback port
//! (plain HTTP or HTTPS with a certificate made here), and the small HTTP servers the registry
//! client's tests put around it: [`http`] (the server they are built on), [`token`] (a token
//! issuer and a registry using it), [`referrers`] (the OCI 1.1 referrers API in front of a
//! registry without it), [`store`] (an "object store" serving the registry's blob
//! files, a redirecting front, lying and broken mirrors).
//!
//! The servers are hand-rolled HTTP/1.1 on std threads, one request per connection
//! (`Connection: close`), so a test can count and shape every request.

pub mod http;
pub mod referrers;
pub mod store;
pub mod token;

pub use http::{forward, HttpServer, Reply, Request};
pub use referrers::ReferrersFront;
pub use store::{broken_mirror, lying_mirror, Front, FrontKnobs, ObjectStore};
pub use token::{IssuerConfig, Signer, TokenIssuer, TokenRegistry};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    /// With [`Registry::start_tls`]: the PEM file of its (self-signed) certificate, for
    /// `127.0.0.1` and `localhost`, to give the client as `ca_file`.
    pub cert: Option<PathBuf>,
    dir: PathBuf,
}

impl Registry {
    /// Start a registry serving plain HTTP, with storage and config in `dir`.
    pub fn start(dir: &Path, auth: &RegistryAuth) -> Registry {
        Self::start_with(dir, auth, false)
    }

    /// Start a registry serving HTTPS only (distribution's `http.tls`) with a fresh self-signed
    /// certificate for `127.0.0.1` and `localhost` ([`Registry::cert`]).
    pub fn start_tls(dir: &Path, auth: &RegistryAuth) -> Registry {
        Self::start_with(dir, auth, true)
    }

    fn start_with(dir: &Path, auth: &RegistryAuth, tls: bool) -> Registry {
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
        let (cert, tls_yaml) = if tls {
            let key = rcgen::KeyPair::generate().expect("TLS key");
            let cert = rcgen::CertificateParams::new(vec![
                "127.0.0.1".to_string(),
                "localhost".to_string(),
            ])
            .expect("certificate params")
            .self_signed(&key)
            .expect("self-signed certificate");
            let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
            std::fs::write(&c, cert.pem()).expect("write tls.crt");
            std::fs::write(&k, key.serialize_pem()).expect("write tls.key");
            let yaml = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                c.display(),
                k.display()
            );
            (Some(c), yaml)
        } else {
            (None, String::new())
        };
        let conf = dir.join("config.yml");
        std::fs::write(
            &conf,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
                 maintenance:\n    uploadpurging:\n      enabled: false\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: lazyblk-test-secret\n{tls_yaml}{auth_yaml}",
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
            cert,
            dir: dir.to_path_buf(),
        };
        let t0 = Instant::now();
        loop {
            if let Ok(resp) = raw_get(port, "/v2/") {
                // Go's server answers plain HTTP on a TLS port with a 400 saying so.
                let ready = if tls {
                    resp.starts_with(b"HTTP/1.0 400")
                } else {
                    resp.starts_with(b"HTTP/1.1 200") || resp.starts_with(b"HTTP/1.1 401")
                };
                if ready {
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
