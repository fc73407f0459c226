//! The host cache limit: one limit for every cache under a cache root, least recently used
//! across images, a chunk several caches hold counted once (and kept or dropped once); caches
//! no store holds are brought under it by the pass itself (`lazyblk gc --host-cache-limit`).

use super::hostindex::{chunks_with, shifted_pair, Two};
use super::*;
use lazyblk_chunkstore::policy::hostlimit::{enforce, host_usage, set_host_limit};
use std::collections::HashMap;

fn open_limited(t: &Two, name: &str) -> ChunkStore {
    let mut o = t.opts(true);
    o.host_limit_period = Duration::from_millis(100);
    o.evict_grace = Duration::from_millis(100);
    let loc = Location::parse(&t.ng.url(&format!("{name}/manifest")));
    ChunkStore::open(&loc, o).unwrap()
}

/// Raw bytes of the stored chunks of `ms`, each digest once, and summed over the images.
fn union_and_sum(ms: &[&Manifest]) -> (u64, u64) {
    let mut uniq = HashMap::new();
    let mut sum = 0;
    for m in ms {
        for i in 0..m.chunk_count() {
            if let ChunkRef::Stored(e) = m.chunk(i) {
                uniq.insert(e.digest, u64::from(m.chunk_len(i)));
                sum += u64::from(m.chunk_len(i));
            }
        }
    }
    (uniq.values().sum(), sum)
}

/// (chunk in a, chunk in b) of every digest each image stores once and both share.
fn shared_pairs(t: &Two) -> Vec<(u64, u64)> {
    (0..t.ma.chunk_count())
        .filter_map(|i| match t.ma.chunk(i) {
            ChunkRef::Stored(e) => Some((i, e.digest)),
            ChunkRef::Zero => None,
        })
        .filter_map(
            |(i, d)| match (&chunks_with(&t.ma, &d)[..], &chunks_with(&t.mb, &d)[..]) {
                ([_], [j]) => Some((i, *j)),
                _ => None,
            },
        )
        .collect()
}

fn check_bytes(t: &Two, sa: &ChunkStore, sb: &ChunkStore) {
    assert!(
        read_all(sa, t.a.len()) == t.a,
        "the first image's bytes differ"
    );
    assert!(
        read_all(sb, t.b.len()) == t.b,
        "the second image's bytes differ"
    );
}

#[test]
fn running_stores_keep_the_root_under_the_host_limit_lru_across_images_counting_shared_once() {
    let t = shifted_pair(31);
    let root = t.root.join("cache");
    let (union, sum) = union_and_sum(&[&t.ma, &t.mb]);
    let pairs = shared_pairs(&t);
    assert!(
        pairs.len() > 50,
        "the pair shares too little: {}",
        pairs.len()
    );
    // Between what the two hold counted once and summed: shared chunks must count once.
    let roomy = union + (sum - union) / 2;
    set_host_limit(&root, Some(roomy)).unwrap();
    let sa = open_limited(&t, "a");
    assert!(read_all(&sa, t.a.len()) == t.a);
    sa.flush().unwrap();
    std::thread::sleep(Duration::from_millis(600)); // a's uses are older than b's
    let sb = open_limited(&t, "b");
    assert!(read_all(&sb, t.b.len()) == t.b);
    sb.flush().unwrap();
    assert!(sb.stats().local_copies >= pairs.len() as u64);
    std::thread::sleep(Duration::from_millis(800)); // several rounds
    let u = host_usage(&root, &[]);
    assert_eq!((u.unique_bytes, u.held_bytes), (union, sum), "{u:?}");
    let evicted = |s: &ChunkStore| s.stats().host_evicted_chunks;
    assert_eq!(
        evicted(&sa) + evicted(&sb),
        0,
        "under the limit counted once"
    );

    // b's three chunks in front are used last.
    std::thread::sleep(Duration::from_millis(600));
    let cs = t.mb.chunk_size as usize;
    let mut front = vec![0u8; 3 * cs];
    sb.read_at(0, &mut front).unwrap();
    assert!(front == t.b[..3 * cs]);
    let small = union / 2;
    set_host_limit(&root, Some(small)).unwrap();
    // Both stores evicted (a store counts its evictions just after clearing their bits).
    wait_for(
        "the root under the host limit, both stores evicting",
        || {
            host_usage(&root, &[]).unique_bytes <= small
                && sa.stats().host_evicted_chunks > 0
                && sb.stats().host_evicted_chunks > 0
        },
    );
    // Least recently used first: a's own chunks (chunks 20..23 of a, no other cache has
    // them) were used before anything of b; b's front was used last.
    for k in 20..23 {
        assert!(!sa.chunk_present(k), "a's own chunk {k} is still present");
    }
    for k in 0..3 {
        assert!(sb.chunk_present(k), "b's most recent chunk {k} was dropped");
    }
    // Counted once, kept or dropped once: a shared chunk is in both caches or in neither.
    for &(i, j) in &pairs {
        assert_eq!(
            sa.chunk_present(i),
            sb.chunk_present(j),
            "shared chunk {i} of a / {j} of b kept in one cache only"
        );
    }
    check_bytes(&t, &sa, &sb);
    assert_eq!(sa.stats().verify_failures + sb.stats().verify_failures, 0);
}

#[test]
fn a_pass_over_idle_caches_drops_the_coldest_and_leaves_kept_ones_alone() {
    let t = shifted_pair(32);
    let root = t.root.join("cache");
    let (union, _) = union_and_sum(&[&t.ma, &t.mb]);
    // A limit that is never reached, so the stores publish when they used each chunk.
    set_host_limit(&root, Some(u64::MAX / 2)).unwrap();
    let sa = open_limited(&t, "a");
    assert!(read_all(&sa, t.a.len()) == t.a);
    let a_dir = sa.cache_dir().to_path_buf();
    drop(sa);
    std::thread::sleep(Duration::from_millis(600));
    let sb = open_limited(&t, "b");
    assert!(read_all(&sb, t.b.len()) == t.b);
    drop(sb);
    // A cache written while no limit was set has no atime file: its chunks date from its
    // bitmap's last write (a's close, before b was used).
    std::fs::remove_file(a_dir.join("atime")).unwrap();
    let small = union / 2;
    let pass = enforce(&root, small, &[]).unwrap();
    eprintln!("{pass:?}");
    assert!(pass.cutoff.is_some() && pass.idle_chunks > 0, "{pass:?}");
    assert_eq!(pass.usage.unique_bytes, union);
    let u = host_usage(&root, &[]);
    assert!(u.unique_bytes <= small - small / 10, "{u:?}");
    // The bitmaps were clean and still are: the caches open without re-verifying, and what
    // they claim is the images' bytes.
    let sa = open_limited(&t, "a");
    let sb = open_limited(&t, "b");
    assert_eq!(sa.open_report().reverified + sb.open_report().reverified, 0);
    for k in 20..23 {
        assert!(
            !sa.chunk_present(k),
            "a's own chunk {k}, the coldest, was kept"
        );
    }
    for (s, m, img) in [(&sa, &t.ma, &t.a), (&sb, &t.mb, &t.b)] {
        let data = std::fs::read(s.data_path()).unwrap();
        let cs = m.chunk_size as usize;
        for i in 0..m.chunk_count() {
            if s.chunk_present(i) {
                let (x, y) = (i as usize * cs, ((i as usize + 1) * cs).min(img.len()));
                assert!(data[x..y] == img[x..y], "present chunk {i} differs");
            }
        }
    }
    let b_before = sb.stats().present_chunks;
    let a_shared_before: Vec<u64> = (0..t.ma.chunk_count())
        .filter(|&i| sa.chunk_present(i))
        .filter(|&i| matches!(t.ma.chunk(i), ChunkRef::Stored(e) if !chunks_with(&t.mb, &e.digest).is_empty()))
        .collect();
    let b_id = sb.id();
    drop((sa, sb));
    // A kept image (a hand-over's) loses nothing, whatever the limit.
    let pass = enforce(&root, 1, &[b_id]).unwrap();
    assert!(pass.usage.pinned_bytes > 0, "{pass:?}");
    let (sa, sb) = (open_limited(&t, "a"), open_limited(&t, "b"));
    assert_eq!(sb.stats().present_chunks, b_before);
    let stored = |i: u64| t.ma.chunk(i) != ChunkRef::Zero;
    let in_b = |i: u64| match t.ma.chunk(i) {
        ChunkRef::Stored(e) => !chunks_with(&t.mb, &e.digest).is_empty(),
        ChunkRef::Zero => false,
    };
    // What a still holds is only what b (kept) holds too: the pinned digests are never picked.
    let kept: Vec<u64> = (0..t.ma.chunk_count())
        .filter(|&i| stored(i) && sa.chunk_present(i))
        .collect();
    assert!(
        kept.iter().all(|&i| in_b(i)),
        "a kept chunks b does not have: {kept:?}"
    );
    // ... and all of it: b holds those digests, and b is kept.
    assert!(!a_shared_before.is_empty());
    assert_eq!(kept, a_shared_before, "a lost chunks b holds");
    set_host_limit(&root, None).unwrap();
    check_bytes(&t, &sa, &sb);
}
