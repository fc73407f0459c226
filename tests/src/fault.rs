//! A small HTTP/1.1 range server that injects faults on demand: error statuses, hangs,
//! connection resets, truncated or over-long bodies, ignored ranges, flipped bytes, wrong
//! `Content-Range`, off-host redirects. It counts requests and body bytes.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One injected misbehaviour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and an empty body.
    Status(u16),
    /// Close the connection without answering.
    Reset,
    /// Never answer (until the server stops or 60 s pass).
    Hang,
    /// Announce the full length, send half of it, close.
    Truncate,
    /// Answer 200 with the whole file.
    IgnoreRange,
    /// Flip one byte in the middle of the body.
    FlipByte,
    /// Answer 206 with a `Content-Range` for other bytes.
    WrongRange,
    /// Send more bytes than asked for.
    TooLong,
    /// Redirect to another host.
    RedirectOffHost,
    /// Announce and stream a body far larger than asked for (1 GiB), until the client hangs up.
    Huge,
    /// Answer correctly, but only after this many milliseconds.
    Delay(u64),
    /// Send the first half of the body, pause this many milliseconds, then the rest.
    Stall(u64),
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Fault, String> {
        Ok(match s {
            "reset" => Fault::Reset,
            "hang" => Fault::Hang,
            "truncate" => Fault::Truncate,
            "ignore-range" => Fault::IgnoreRange,
            "flip" => Fault::FlipByte,
            "wrong-range" => Fault::WrongRange,
            "too-long" => Fault::TooLong,
            "redirect-offhost" => Fault::RedirectOffHost,
            "huge" => Fault::Huge,
            s if s.starts_with("stall") => {
                Fault::Stall(s[5..].parse().map_err(|_| format!("bad stall in {s}"))?)
            }
            s if s.starts_with("delay") => {
                Fault::Delay(s[5..].parse().map_err(|_| format!("bad delay in {s}"))?)
            }
            s => match s.strip_prefix("status") {
                Some(code) => {
                    Fault::Status(code.parse().map_err(|_| format!("bad status in {s}"))?)
                }
                None => return Err(format!("unknown fault {s}")),
            },
        })
    }
}

#[derive(Default)]
struct State {
    root: PathBuf,
    target: String,
    queue: Mutex<VecDeque<Fault>>,
    always: Mutex<Option<Fault>>,
    down: AtomicBool,
    stop: AtomicBool,
    requests: AtomicU64,
    connections: AtomicU64,
    target_requests: AtomicU64,
    bytes: AtomicU64,
    etag_override: Mutex<Option<String>>,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    log: Mutex<Vec<Logged>>,
    /// Requests for the target answered so far (probes included).
    target_answered: AtomicU64,
}

/// A request as the server received it ([`FaultServer::log`]).
#[derive(Clone, Debug)]
pub struct Logged {
    /// The path asked for.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// Requests for the target (probes included) answered before it arrived: 0 for a request
    /// sent while the first one for the target was still being answered (or before it).
    pub target_answered: u64,
}

/// Counts a request for the target as answered when its handling ends.
struct Answered<'a>(&'a AtomicU64);

impl Drop for Answered<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A running fault server; stops on drop.
pub struct FaultServer {
    /// Port on 127.0.0.1.
    pub port: u16,
    state: Arc<State>,
}

impl FaultServer {
    /// Serve files of `root`; faults apply to requests for `/target`.
    pub fn start(root: &Path, target: &str) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(State {
            root: root.to_path_buf(),
            target: format!("/{target}"),
            ..Default::default()
        });
        let st = state.clone();
        listener.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        st.connections.fetch_add(1, Ordering::SeqCst);
                        let st = st.clone();
                        s.set_nonblocking(false).ok();
                        std::thread::spawn(move || serve(s, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultServer { port, state }
    }

    /// URL of `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// Inject `f` into the next data range request for the target (probes excluded).
    pub fn push(&self, f: Fault) {
        self.state.queue.lock().unwrap().push_back(f);
    }

    /// Inject `f` into every request for the target (probes included), or stop doing so.
    pub fn set_always(&self, f: Option<Fault>) {
        *self.state.always.lock().unwrap() = f;
    }

    /// Reset every connection (the server is "down"), or come back.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Pretend the file changed: serve this ETag from now on.
    pub fn set_etag(&self, etag: &str) {
        *self.state.etag_override.lock().unwrap() = Some(etag.to_string());
    }

    /// Requests received (all paths).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Requests for the target.
    pub fn target_requests(&self) -> u64 {
        self.state.target_requests.load(Ordering::SeqCst)
    }

    /// Most target range requests being answered at the same time so far.
    pub fn max_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Body bytes sent.
    pub fn bytes(&self) -> u64 {
        self.state.bytes.load(Ordering::SeqCst)
    }

    /// Every request so far (any path but the control endpoints), in the order they arrived.
    pub fn log(&self) -> Vec<Logged> {
        self.state.log.lock().unwrap().clone()
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(stream: TcpStream, st: &State) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut out = stream;
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            head.push(line.trim_end().to_string());
            if head.len() > 100 {
                return;
            }
        }
        st.requests.fetch_add(1, Ordering::SeqCst);
        if st.down.load(Ordering::SeqCst) {
            let _ = out.shutdown(Shutdown::Both);
            return;
        }
        let path = head
            .first()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("/")
            .to_string();
        let header = |name: &str| {
            head.iter().skip(1).find_map(|h| {
                let (k, v) = h.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        // Control endpoint for out-of-process use: /__fault/<fault|none>/<count> (count 0:
        // every request for the target, probes included).
        if path == "/__stats" {
            let body = format!(
                "requests={} target_requests={} bytes={} max_in_flight={}\n",
                st.requests.load(Ordering::SeqCst),
                st.target_requests.load(Ordering::SeqCst),
                st.bytes.load(Ordering::SeqCst),
                st.max_in_flight.load(Ordering::SeqCst)
            );
            if respond(&mut out, st, "200 OK", &[], body.as_bytes()).is_err() {
                return;
            }
            continue;
        }
        if let Some(spec) = path.strip_prefix("/__fault/") {
            let (f, n) = spec.split_once('/').unwrap_or((spec, "0"));
            let n: u32 = n.parse().unwrap_or(0);
            st.queue.lock().unwrap().clear();
            *st.always.lock().unwrap() = None;
            let r = if f == "none" {
                Ok(())
            } else {
                f.parse::<Fault>().map(|fault| {
                    if n == 0 {
                        *st.always.lock().unwrap() = Some(fault);
                    } else {
                        st.queue
                            .lock()
                            .unwrap()
                            .extend((0..n).map(|_| fault.clone()));
                    }
                })
            };
            let (status, body) = match r {
                Ok(()) => ("200 OK", "ok\n".to_string()),
                Err(e) => ("400 Bad Request", format!("{e}\n")),
            };
            if respond(&mut out, st, status, &[], body.as_bytes()).is_err() {
                return;
            }
            continue;
        }
        let range = header("range");
        st.log.lock().unwrap().push(Logged {
            path: path.clone(),
            range: range.clone(),
            target_answered: st.target_answered.load(Ordering::SeqCst),
        });
        let if_match = header("if-match");
        let is_target = path == st.target;
        let _answered = is_target.then(|| Answered(&st.target_answered));
        let fault = if is_target {
            st.target_requests.fetch_add(1, Ordering::SeqCst);
            let always = st.always.lock().unwrap().clone();
            always.or_else(|| {
                if range.as_deref() != Some("bytes=0-0") {
                    st.queue.lock().unwrap().pop_front()
                } else {
                    None
                }
            })
        } else {
            None
        };
        let file = st.root.join(path.trim_start_matches('/'));
        let data = match std::fs::read(&file) {
            Ok(d) if !path.contains("..") => d,
            _ => {
                if respond(&mut out, st, "404 Not Found", &[], b"").is_err() {
                    return;
                }
                continue;
            }
        };
        let etag = st
            .etag_override
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| format!("\"{:x}-{}\"", data.len(), data.len() % 97));
        // Track concurrency of data requests for the target.
        let _guard = (is_target && range.as_deref() != Some("bytes=0-0")).then(|| {
            let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            st.max_in_flight.fetch_max(now, Ordering::SeqCst);
            InFlight(&st.in_flight)
        });
        if let Some(Fault::Delay(ms)) = fault {
            std::thread::sleep(Duration::from_millis(ms));
        }
        match fault {
            Some(Fault::Status(code)) => {
                let _ = respond(&mut out, st, &format!("{code} Injected"), &[], b"");
                continue;
            }
            Some(Fault::Reset) => {
                let _ = out.shutdown(Shutdown::Both);
                return;
            }
            Some(Fault::Hang) => {
                let t0 = Instant::now();
                while !st.stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
            Some(Fault::RedirectOffHost) => {
                let loc = format!("Location: http://127.0.0.2:1{}", path);
                let _ = respond(&mut out, st, "302 Found", &[loc], b"");
                continue;
            }
            Some(Fault::IgnoreRange) => {
                if respond(&mut out, st, "200 OK", &[format!("ETag: {etag}")], &data).is_err() {
                    return;
                }
                continue;
            }
            _ => {}
        }
        if let (Some(m), true) = (&if_match, is_target) {
            if *m != etag {
                let _ = respond(&mut out, st, "412 Precondition Failed", &[], b"");
                continue;
            }
        }
        let Some((a, b)) = range
            .as_deref()
            .and_then(|r| parse_range(r, data.len() as u64))
        else {
            if respond(&mut out, st, "200 OK", &[format!("ETag: {etag}")], &data).is_err() {
                return;
            }
            continue;
        };
        let mut body = data[a as usize..=b as usize].to_vec();
        let mut cr = format!("Content-Range: bytes {a}-{b}/{}", data.len());
        match fault {
            Some(Fault::FlipByte) => {
                let mid = body.len() / 2;
                body[mid] ^= 0x5a;
            }
            Some(Fault::WrongRange) => {
                cr = format!("Content-Range: bytes {}-{}/{}", a + 1, b + 1, data.len())
            }
            Some(Fault::TooLong) => body.extend(std::iter::repeat_n(0x42, 4096)),
            Some(Fault::Huge) => {
                let hdr = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n{cr}\r\n\r\n",
                    1u64 << 30
                );
                if out.write_all(hdr.as_bytes()).is_err() {
                    return;
                }
                let junk = vec![0x33u8; 1 << 16];
                for _ in 0..(1 << 14) {
                    if out.write_all(&junk).is_err() {
                        break;
                    }
                    st.bytes.fetch_add(junk.len() as u64, Ordering::SeqCst);
                }
                let _ = out.shutdown(Shutdown::Both);
                return;
            }
            Some(Fault::Stall(ms)) => {
                let hdr = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n{cr}\r\nETag: {etag}\r\n\r\n",
                    body.len()
                );
                let half = body.len() / 2;
                if out.write_all(hdr.as_bytes()).is_err() || out.write_all(&body[..half]).is_err() {
                    return;
                }
                let _ = out.flush();
                std::thread::sleep(Duration::from_millis(ms));
                if out.write_all(&body[half..]).is_err() {
                    return;
                }
                st.bytes.fetch_add(body.len() as u64, Ordering::SeqCst);
                continue;
            }
            Some(Fault::Truncate) => {
                let hdr = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n{cr}\r\nETag: {etag}\r\n\r\n",
                    body.len()
                );
                let half = body.len() / 2;
                let _ = out.write_all(hdr.as_bytes());
                let _ = out.write_all(&body[..half]);
                st.bytes.fetch_add(half as u64, Ordering::SeqCst);
                let _ = out.shutdown(Shutdown::Both);
                return;
            }
            _ => {}
        }
        if respond(
            &mut out,
            st,
            "206 Partial Content",
            &[cr, format!("ETag: {etag}")],
            &body,
        )
        .is_err()
        {
            return;
        }
    }
}

struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn parse_range(r: &str, len: u64) -> Option<(u64, u64)> {
    let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
    let a: u64 = a.parse().ok()?;
    let b: u64 = if b.is_empty() {
        len.checked_sub(1)?
    } else {
        b.parse().ok()?
    };
    (a <= b && b < len).then_some((a, b))
}

fn respond(
    out: &mut TcpStream,
    st: &State,
    status: &str,
    extra: &[String],
    body: &[u8],
) -> std::io::Result<()> {
    let mut h = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n",
        body.len()
    );
    for e in extra {
        h.push_str(e);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    out.write_all(h.as_bytes())?;
    out.write_all(body)?;
    st.bytes.fetch_add(body.len() as u64, Ordering::SeqCst);
    out.flush()
}
