//! Where metrics are served: `unix:PATH` (a socket bound 0600, or 0660 with a group) or
//! `tcp:ADDR:PORT` (reachable by whoever can reach the address: bind it to a loopback or
//! management address), and the listeners that answer `GET /metrics` on them.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, Result};

/// How long one scrape may take to send its request and read the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A listen address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket at this path.
    Unix(PathBuf),
    /// A TCP address (`127.0.0.1:9101`, `[::1]:9101`).
    Tcp(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = Error;

    fn from_str(s: &str) -> Result<Listen> {
        let bad = |why: &str| Error::Listen {
            addr: s.to_string(),
            why: why.to_string(),
        };
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() || p.contains('\0') {
                return Err(bad("empty path or a NUL in it"));
            }
            if p.ends_with('/') {
                return Err(bad("the path names a directory"));
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            return a
                .parse::<SocketAddr>()
                .map(Listen::Tcp)
                .map_err(|_| bad("not ADDR:PORT with an IP address (IPv6 in brackets)"));
        }
        Err(bad("unknown scheme"))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A bound metrics listener.
#[derive(Debug)]
pub enum Listener {
    /// On a unix socket (its path).
    Unix(UnixListener, PathBuf),
    /// On TCP.
    Tcp(TcpListener),
}

/// The stream sockets a [`Listener`] accepts: blocking, with a read and write timeout.
pub trait Conn: std::io::Read + std::io::Write {
    /// Make the accepted socket blocking, with the timeouts of a scrape.
    fn prepare(&self) -> std::io::Result<()>;
}

macro_rules! conn {
    ($t:ty) => {
        impl Conn for $t {
            fn prepare(&self) -> std::io::Result<()> {
                self.set_nonblocking(false)?;
                self.set_read_timeout(Some(IO_TIMEOUT))?;
                self.set_write_timeout(Some(IO_TIMEOUT))
            }
        }
    };
}
conn!(std::os::unix::net::UnixStream);
conn!(std::net::TcpStream);

/// Answer one accepted connection with `render()` (also for callers that accept themselves,
/// like the daemon's runtime).
pub fn answer<C: Conn>(accepted: std::io::Result<C>, render: &dyn Fn() -> String) -> Result<()> {
    let c = accepted.map_err(|e| Error::io("accept", e))?;
    c.prepare()
        .map_err(|e| Error::io("metrics connection", e))?;
    crate::http::serve_connection(c, render)
}

impl Listener {
    /// Bind `at`: a unix socket 0600 (0660 and owned by `group` with one), replacing what is
    /// at its path, through a temporary name so it is never reachable with looser
    /// permissions; or a TCP port.
    pub fn bind(at: &Listen, group: Option<u32>) -> Result<Listener> {
        match at {
            Listen::Unix(p) => lazyblk_blocksource::fsutil::bind_private_socket(p, group)
                .map(|l| Listener::Unix(l, p.clone()))
                .map_err(|e| Error::io(format!("binding the metrics socket {at}"), e)),
            Listen::Tcp(a) => TcpListener::bind(a)
                .map(Listener::Tcp)
                .map_err(|e| Error::io(format!("binding the metrics address {at}"), e)),
        }
    }

    /// Accept one connection and answer it with `render()` (see [`crate::http`]); a client
    /// that sends nothing is dropped after [`IO_TIMEOUT`].
    pub fn serve_one(&self, render: &dyn Fn() -> String) -> Result<()> {
        match self {
            Listener::Unix(l, _) => answer(l.accept().map(|(c, _)| c), render),
            Listener::Tcp(l) => answer(l.accept().map(|(c, _)| c), render),
        }
    }

    /// Answer scrapes one after another, forever (a failed one is logged and dropped).
    pub fn serve_forever(&self, render: &dyn Fn() -> String) -> ! {
        loop {
            if let Err(e) = self.serve_one(render) {
                tracing::debug!("metrics scrape: {e}");
            }
        }
    }

    /// The file descriptor to poll for a connection.
    pub fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// Make `accept` return at once when nobody waits (for a caller that polls first).
    pub fn set_nonblocking(&self) -> Result<()> {
        match self {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
        .map_err(|e| Error::io("metrics listener", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn addresses_parse_and_print_back() {
        for ok in [
            "unix:/run/lazyblk/metrics.sock",
            "tcp:127.0.0.1:9101",
            "tcp:[::1]:9101",
        ] {
            let l: Listen = ok.parse().unwrap();
            assert_eq!(l.to_string(), ok);
        }
        for bad in [
            "",
            "unix:",
            "unix:/tmp/",
            "tcp:localhost:80",
            "tcp:1.2.3.4",
            "http://x",
        ] {
            let e = bad.parse::<Listen>().unwrap_err().to_string();
            assert!(e.contains("bad listen address") && e.contains(bad), "{e}");
        }
    }

    fn scrape_unix(p: &std::path::Path) -> String {
        let mut c = std::os::unix::net::UnixStream::connect(p).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: lazyblk\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    /// A running exporter on a unix socket, scraped twice: the socket is 0600 and each scrape
    /// sees the counter as it is then.
    #[test]
    fn an_exporter_on_a_unix_socket_answers_scrapes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.sock");
        let l = Listener::bind(&Listen::Unix(p.clone()), None).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let n = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
        let n2 = n.clone();
        let t = std::thread::spawn(move || {
            for _ in 0..2 {
                let render = || {
                    let s = lazyblk_chunkstore::StatsSnapshot {
                        misses: n2.load(std::sync::atomic::Ordering::SeqCst),
                        ..Default::default()
                    };
                    crate::encode(
                        &[crate::Device {
                            id: 5,
                            image: "sha256:x".into(),
                            stats: Some(s),
                        }],
                        false,
                    )
                };
                l.serve_one(&render).unwrap();
            }
        });
        let misses = |out: &str| {
            let body = out.split_once("\r\n\r\n").unwrap().1;
            let s = crate::parse_text(body).unwrap();
            crate::expose::value(&s, "lazyblk_misses_total", &[("device", "5")]).unwrap()
        };
        let first = scrape_unix(&p);
        assert!(first.starts_with("HTTP/1.1 200 OK"), "{first}");
        assert_eq!(misses(&first), 1.0);
        n.store(4, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(misses(&scrape_unix(&p)), 4.0);
        t.join().unwrap();
    }
}
