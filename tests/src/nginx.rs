//! Start a real nginx (Debian package) serving a directory on 127.0.0.1.

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
        let port = crate::free_port();
        std::fs::create_dir_all(prefix.join("logs")).expect("mkdir logs");
        let conf = prefix.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {p}/logs/error.log warn;\npid {p}/nginx.pid;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  access_log {p}/logs/access.log;\n  client_body_temp_path {p}/tmp;\n  proxy_temp_path {p}/tmp;\n  fastcgi_temp_path {p}/tmp;\n  uwsgi_temp_path {p}/tmp;\n  scgi_temp_path {p}/tmp;\n  keepalive_requests 100000;\n\
                 server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
                p = prefix.display(),
                root = root.display(),
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
        let log = std::fs::read_to_string(self.prefix.join("logs/access.log")).unwrap_or_default();
        let mut reqs = 0;
        let mut bytes = 0;
        for line in log.lines() {
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

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
