//! `GET /metrics` over HTTP/1.x, answered minimally: one request per connection, the head read
//! (at most [`MAX_HEAD`] bytes, within the socket's timeouts) and parsed by hand, one response
//! with `Content-Length` and `Connection: close`. That is all Prometheus and
//! `curl --unix-socket` need; a server framework would bring a runtime per daemon for it.

use std::io::{Read, Write};

use crate::{Error, Result};

/// Longest request head read (request line and headers).
pub const MAX_HEAD: usize = 8192;

/// The part of a request this server looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The path without the query (`/metrics`).
    pub path: String,
}

/// Parse a request head (the bytes up to the blank line; what follows it is ignored): the
/// request line must be `METHOD SP TARGET SP HTTP/1.x`, the headers `Name: value` lines.
pub fn parse_request(head: &[u8]) -> Result<Request> {
    let bad = |why: &str| Error::Request(why.to_string());
    let text = std::str::from_utf8(head).map_err(|_| bad("not UTF-8"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().ok_or_else(|| bad("empty"))?;
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("the request line is not `METHOD TARGET HTTP/1.x`"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad("bad method"));
    }
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return Err(bad("not HTTP/1.0 or HTTP/1.1"));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad("bad request target"));
    }
    for h in lines {
        if h.is_empty() {
            break;
        }
        match h.split_once(':') {
            Some((name, _))
                if !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) => {}
            _ => return Err(bad("bad header line")),
        }
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
    })
}

/// Read a request head from `r`: up to the first blank line, at most [`MAX_HEAD`] bytes.
fn read_head(r: &mut impl Read) -> Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = find_end(&head) {
            head.truncate(end);
            return Ok(head);
        }
        if head.len() >= MAX_HEAD {
            return Err(Error::Request(format!("head longer than {MAX_HEAD} bytes")));
        }
        let n = r
            .read(&mut buf)
            .map_err(|e| Error::io("reading the request", e))?;
        if n == 0 {
            return Err(Error::Request(
                "connection closed before the end of the head".into(),
            ));
        }
        head.extend_from_slice(&buf[..n]);
    }
}

fn find_end(b: &[u8]) -> Option<usize> {
    (0..b.len()).find_map(|i| {
        if b[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if b[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

fn respond(
    w: &mut impl Write,
    status: &str,
    extra: &str,
    ctype: &str,
    body: &str,
    head_only: bool,
) -> Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    w.write_all(out.as_bytes())
        .and_then(|()| w.flush())
        .map_err(|e| Error::io("writing the response", e))
}

/// Answer one request on `conn`: `GET /metrics` (or `HEAD`) with `render()` in the text
/// format, anything else with 400, 404 or 405. The caller sets the socket's timeouts.
pub fn serve_connection<S: Read + Write>(mut conn: S, render: &dyn Fn() -> String) -> Result<()> {
    let plain = "text/plain; charset=utf-8";
    let req = match read_head(&mut conn).and_then(|h| parse_request(&h)) {
        Ok(r) => r,
        Err(e @ Error::Request(_)) => {
            let _ = respond(
                &mut conn,
                "400 Bad Request",
                "",
                plain,
                &format!("{e}\n"),
                false,
            );
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let head_only = req.method == "HEAD";
    if req.method != "GET" && !head_only {
        return respond(
            &mut conn,
            "405 Method Not Allowed",
            "Allow: GET, HEAD\r\n",
            plain,
            "only GET /metrics\n",
            false,
        );
    }
    if req.path != "/metrics" {
        return respond(
            &mut conn,
            "404 Not Found",
            "",
            plain,
            "only GET /metrics\n",
            head_only,
        );
    }
    respond(
        &mut conn,
        "200 OK",
        "",
        crate::expose::CONTENT_TYPE,
        &render(),
        head_only,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection: what the client sent, what the server wrote.
    struct Conn {
        input: std::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Conn {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(b)
        }
    }

    impl Write for Conn {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.output.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn exchange(req: &[u8]) -> (Result<()>, String) {
        let mut c = Conn {
            input: std::io::Cursor::new(req.to_vec()),
            output: Vec::new(),
        };
        let r = serve_connection(&mut c, &|| "m 1\n".to_string());
        (r, String::from_utf8(c.output).unwrap())
    }

    #[test]
    fn get_metrics_is_answered_with_the_text_format() {
        let (r, out) = exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n");
        r.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(
            out.contains("Content-Type: text/plain; version=0.0.4"),
            "{out}"
        );
        assert!(out.contains("Content-Length: 4\r\n"), "{out}");
        assert!(out.contains("Connection: close\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nm 1\n"), "{out}");
        // A query is ignored; bare LFs are accepted.
        let (_, out) = exchange(b"GET /metrics?x=1 HTTP/1.0\n\n");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        let (_, out) = exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("\r\n\r\n"),
            "{out}"
        );
    }

    #[test]
    fn other_requests_get_clear_errors() {
        let (_, out) = exchange(b"GET / HTTP/1.1\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 404 "), "{out}");
        let (_, out) = exchange(b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(
            out.starts_with("HTTP/1.1 405 ") && out.contains("Allow: GET, HEAD"),
            "{out}"
        );
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n",
        ] {
            let (r, out) = exchange(bad);
            assert!(r.is_err(), "{:?}", String::from_utf8_lossy(bad));
            assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        }
        let mut long = b"GET /metrics HTTP/1.1\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        let (r, _) = exchange(&long);
        assert!(r.unwrap_err().to_string().contains("longer than"));
    }
}
