//! `parse_manifest` and `select_platform` on arbitrary bytes, and `merge_referrer` (the
//! referrers tag schema index, read-modify-write) on the same bytes as an existing index. The first byte picks the served
//! media type (OCI manifest, OCI index, Docker manifest, Docker list, or another), the rest is
//! the document. Never panics; an accepted document re-serializes to one that decodes to the
//! same value; a selected platform is the one asked for.

use lazyblk_registry::link::merge_referrer;
use lazyblk_registry::manifest::{parse_manifest, select_platform, Manifest, ACCEPTED, OCI_INDEX};

/// The check, on one input.
pub fn run(data: &[u8]) {
    let Some((&sel, doc)) = data.split_first() else {
        return;
    };
    // Merging a referrer into whatever is there: never panics; what it writes is an index
    // that lists the entry once, and merging again changes nothing.
    let entry = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
        "size": 7, "artifactType": "application/vnd.lazyblk.image.v1",
    });
    if let Ok(Some(merged)) = merge_referrer(Some(doc), &entry) {
        let Ok(Manifest::Index(i)) = parse_manifest(OCI_INDEX, &merged) else {
            panic!("merge_referrer wrote something that is not an index")
        };
        let n = i
            .manifests()
            .iter()
            .filter(|d| d.digest().to_string() == entry["digest"])
            .count();
        assert_eq!(n, 1, "the entry is listed once");
        assert!(
            merge_referrer(Some(&merged), &entry).unwrap().is_none(),
            "merging twice"
        );
    }
    let mt = ACCEPTED
        .get(usize::from(sel % 5))
        .copied()
        .unwrap_or("application/json");
    let Ok(m) = parse_manifest(mt, doc) else {
        // Whatever parse_manifest refuses, select_platform refuses too.
        assert!(select_platform(mt, doc, "linux", "amd64", None).is_err());
        return;
    };
    let re = match &m {
        Manifest::Image(i) => serde_json::to_vec(i).unwrap(),
        Manifest::Index(i) => serde_json::to_vec(i).unwrap(),
    };
    let back = parse_manifest(mt, &re).expect("a re-serialized manifest must decode");
    assert_eq!(back, m);
    let (os, arch, variant) = match sel / 5 % 4 {
        0 => ("linux", "amd64", None),
        1 => ("linux", "arm64", Some("v8")),
        2 => ("linux", "arm", Some("v7")),
        _ => ("windows", "x86_64", None),
    };
    match (&m, select_platform(mt, doc, os, arch, variant)) {
        (Manifest::Index(_), Ok(Some(d))) => {
            let p = d
                .platform()
                .as_ref()
                .expect("a selected descriptor has a platform");
            assert_eq!(p.os().to_string(), os);
        }
        (Manifest::Index(_), Ok(None)) => {}
        (Manifest::Index(_), Err(e)) => {
            panic!("index accepted by parse_manifest refused by select_platform: {e}")
        }
        (Manifest::Image(_), r) => {
            assert!(r.is_err(), "select_platform accepted an image manifest")
        }
    }
}
