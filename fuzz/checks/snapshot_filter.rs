//! `Filter::parse` (containerd's filter syntax for the snapshotter's List) on arbitrary text:
//! never panics; what it accepts prints (Display, everything quoted) to a filter that parses
//! back to the same selectors and matches the same snapshots; and a label selector built with
//! `quote` from the input's two halves matches a snapshot carrying exactly that label.

use std::collections::BTreeMap;
use std::time::SystemTime;

use lazyblk_snapshotter::filter::{quote, Filter};
use lazyblk_snapshotter::meta::{Kind, Snapshot};

fn snap(labels: BTreeMap<String, String>) -> Snapshot {
    Snapshot {
        id: 1,
        kind: Kind::Committed,
        parent: "k8s.io/1/sha256:p".into(),
        labels,
        created: SystemTime::UNIX_EPOCH,
        updated: SystemTime::UNIX_EPOCH,
        remote: None,
    }
}

/// The check, on one input.
pub fn run(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(f) = Filter::parse(&[s]) {
        let shown = f.to_string();
        let back = Filter::parse(&[shown.as_str()])
            .unwrap_or_else(|e| panic!("{s:?} printed as {shown:?}, which does not parse: {e}"));
        assert_eq!(back, f, "{s:?} -> {shown:?}");
        let sample = snap(BTreeMap::from([("a".to_string(), "x".to_string())]));
        for name in ["", "a", "sha256:p"] {
            assert_eq!(f.matches(name, &sample), back.matches(name, &sample));
        }
    }
    let mid = s
        .char_indices()
        .nth(s.chars().count() / 2)
        .map_or(s.len(), |(i, _)| i);
    let (k, v) = s.split_at(mid);
    let sel = format!(
        "labels.{}=={},parent=={}",
        quote(k),
        quote(v),
        quote("k8s.io/1/sha256:p")
    );
    let f = Filter::parse(&[sel.as_str()]).unwrap_or_else(|e| panic!("{sel:?}: {e}"));
    let with = snap(BTreeMap::from([(k.to_string(), v.to_string())]));
    assert!(f.matches("n", &with), "{sel:?}");
    let other = format!("{v}-");
    assert!(
        !f.matches("n", &snap(BTreeMap::from([(k.to_string(), other)]))),
        "{sel:?}"
    );
}
