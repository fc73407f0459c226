//! The metrics server's HTTP request parser (`lazyblk_metrics::parse_request`) and the whole
//! exchange (`serve_connection`) on arbitrary bytes: never panics; what it accepts has an
//! upper-case method and a path starting with `/` without spaces or a query; every exchange
//! writes exactly one response with a status line, and 200 only for `GET`/`HEAD /metrics`.

use std::io::{Cursor, Read, Write};

struct Conn {
    input: Cursor<Vec<u8>>,
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

/// The check, on one input.
pub fn run(data: &[u8]) {
    if let Ok(r) = lazyblk_metrics::parse_request(data) {
        assert!(!r.method.is_empty() && r.method.bytes().all(|b| b.is_ascii_uppercase()));
        assert!(
            r.path.starts_with('/') && !r.path.contains([' ', '?']),
            "{r:?}"
        );
    }
    let mut c = Conn {
        input: Cursor::new(data.to_vec()),
        output: Vec::new(),
    };
    let _ = lazyblk_metrics::serve_connection(&mut c, &|| "# TYPE x gauge\nx 1\n".into());
    let out = String::from_utf8(c.output).expect("responses are text");
    // Even a head that never ends (the peer closed) is answered, with 400.
    assert!(
        !out.is_empty(),
        "no response to {:?}",
        String::from_utf8_lossy(data)
    );
    assert!(out.starts_with("HTTP/1.1 "), "{out:?}");
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out:?}");
    if out.starts_with("HTTP/1.1 200 ") {
        // Only the head (up to the blank line) is parsed; what follows may be anything.
        let ok = [&b"GET /metrics"[..], b"HEAD /metrics"]
            .iter()
            .any(|p| data.starts_with(p) && matches!(data.get(p.len()), Some(b' ' | b'?')));
        assert!(ok, "200 for {:?}", String::from_utf8_lossy(data));
    }
}
