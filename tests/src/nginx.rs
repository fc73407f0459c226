//! Start a real nginx (Debian package) on 127.0.0.1: serving a directory, as a reverse proxy, or
//! as a caching registry mirror (the slice module).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nginx; killed on drop.
pub struct Nginx {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    prefix: PathBuf,
}

/// Where nginx is expected to be.
pub fn nginx_binary() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("nginx is not installed: run scripts/setup (apt-get install nginx-light)");
}

impl Nginx {
    /// Serve `root` (read-only) on a free port. `prefix` is a scratch directory.
    pub fn start(root: &Path, prefix: &Path) -> Nginx {
        Nginx::launch(prefix, &format!("root {};", root.display()))
    }

    /// A reverse proxy to `127.0.0.1:upstream` (an "origin" whose access log counts what the
    /// upstream served through it).
    pub fn proxy(upstream: u16, prefix: &Path) -> Nginx {
        Nginx::launch(
            prefix,
            &format!(
                "client_max_body_size 0;\n  location / {{ proxy_pass http://127.0.0.1:{upstream}; proxy_buffering off; }}"
            ),
        )
    }

    /// A caching registry mirror in front of `127.0.0.1:upstream`, as a fleet would run one:
    /// blob ranges cached in 1 MiB slices (`slice`, `proxy_cache_lock`: one upstream request
    /// per slice however many clients ask at once); manifests and everything else passed
    /// through uncached.
    pub fn caching_mirror(upstream: u16, prefix: &Path) -> Nginx {
        let cache = prefix.join("cache");
        Nginx::launch_with(
            prefix,
            &format!(
                "proxy_cache_path {} levels=1:2 keys_zone=mirror:16m max_size=2g inactive=1h use_temp_path=off;",
                cache.display()
            ),
            &format!(
                "location ~ /blobs/ {{\n    slice 1m;\n    proxy_cache mirror;\n    proxy_cache_key $uri$slice_range;\n    \
                 proxy_set_header Range $slice_range;\n    proxy_cache_valid 200 206 1h;\n    proxy_cache_lock on;\n    \
                 proxy_cache_lock_timeout 60s;\n    proxy_http_version 1.1;\n    proxy_pass http://127.0.0.1:{upstream};\n  }}\n  \
                 location / {{ proxy_pass http://127.0.0.1:{upstream}; }}"
            ),
        )
    }

    fn launch(prefix: &Path, server: &str) -> Nginx {
        Nginx::launch_with(prefix, "", server)
    }

    /// Start nginx with `http` directives and a `server` body on a free port.
    fn launch_with(prefix: &Path, http: &str, server: &str) -> Nginx {
        let port = crate::free_port();
        std::fs::create_dir_all(prefix.join("logs")).expect("mkdir logs");
        let conf = prefix.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {p}/logs/error.log warn;\npid {p}/nginx.pid;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  access_log {p}/logs/access.log;\n  client_body_temp_path {p}/tmp;\n  proxy_temp_path {p}/tmp;\n  fastcgi_temp_path {p}/tmp;\n  uwsgi_temp_path {p}/tmp;\n  scgi_temp_path {p}/tmp;\n  keepalive_requests 100000;\n  {http}\n\
                 server {{ listen 127.0.0.1:{port};\n  {server}\n}}\n}}\n",
                p = prefix.display(),
            ),
        )
        .expect("write nginx.conf");
        let child = Command::new(nginx_binary())
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(prefix)
            .stdin(Stdio::null())
            .spawn()
            .expect("start nginx");
        let n = Nginx {
            child,
            port,
            prefix: prefix.to_path_buf(),
        };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "nginx did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    /// URL of `name` under the served root.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// (requests, body bytes sent) from the access log (combined format).
    pub fn served(&self) -> (u64, u64) {
        self.served_matching("")
    }

    /// (requests, body bytes sent) of the requests whose line contains `pat`.
    pub fn served_matching(&self, pat: &str) -> (u64, u64) {
        let log = std::fs::read_to_string(self.prefix.join("logs/access.log")).unwrap_or_default();
        let mut reqs = 0;
        let mut bytes = 0;
        for line in log.lines().filter(|l| l.contains(pat)) {
            reqs += 1;
            // ... "GET /x HTTP/1.1" 206 1234 "-" "-"
            if let Some(after) = line.split('"').nth(2) {
                let mut it = after.split_whitespace();
                let _status = it.next();
                bytes += it.next().and_then(|b| b.parse::<u64>().ok()).unwrap_or(0);
            }
        }
        (reqs, bytes)
    }
}

impl Nginx {
    /// Kill it now (a mirror dying under load).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
