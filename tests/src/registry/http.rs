//! The tiny HTTP/1.1 server the harness' servers are built on: requests, replies, relaying a
//! request to another port, `Range` parsing.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// `bytes=a-b` (or `bytes=a-`).
pub fn parse_range(h: &str) -> Option<(u64, u64)> {
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
