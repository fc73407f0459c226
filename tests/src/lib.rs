//! Test harness shared by lazyblk's integration tests: a real nginx on a free loopback port, a
//! fault-injecting HTTP/1.1 range server, a real Docker registry with the servers its client's tests
//! need, and deterministic test data.

pub mod cri;
pub mod fault;
pub mod nginx;
pub mod registry;
pub mod tree;

use rand::{Rng, SeedableRng};

/// Deterministic "image" bytes: a mix of compressible text, random data, zero runs and repeated
/// blocks (so zero chunks and dedup are exercised).
pub fn sample_image(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; size];
    let mut at = 0;
    while at < size {
        let n = rng.gen_range(1..=40_000).min(size - at);
        match rng.gen_range(0..4) {
            0 => {} // zeros
            1 => rng.fill(&mut v[at..at + n]),
            2 => {
                for (i, b) in v[at..at + n].iter_mut().enumerate() {
                    *b = b"lazyblk reads what it needs "[i % 28];
                }
            }
            _ => {
                if at > n {
                    let src = rng.gen_range(0..at - n);
                    v.copy_within(src..src + n, at);
                }
            }
        }
        at += n;
    }
    v
}

/// A free TCP port on 127.0.0.1, never one this process handed out before: the port is only
/// bound later by a child (nginx, docker-registry), and the kernel may give the same free port
/// to a test running beside this one meanwhile (two registries on one port: one test then
/// talks to the other's registry).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}
