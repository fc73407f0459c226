//! From a snapshot's kind, its own dirs and its lower dirs to containerd mount descriptions,
//! as containerd's overlayfs snapshotter computes them (see the crate docs, "Mounts").

use std::path::{Path, PathBuf};

use containerd_snapshots::api::types::Mount;

use crate::meta::Kind;

/// A snapshot's own directories and the lower dirs its ancestors give, nearest first.
#[derive(Debug)]
pub(crate) struct Shape<'a> {
    pub kind: Kind,
    /// `snapshots/<id>/fs`.
    pub fs: &'a Path,
    /// `snapshots/<id>/work`.
    pub work: &'a Path,
    /// Nearest first; a lazy image's mountpoint is the last when there is one.
    pub lowers: &'a [PathBuf],
    /// Add `index=off` to overlay mounts.
    pub index_off: bool,
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn bind(source: &Path, rw: bool) -> Mount {
    Mount {
        r#type: "bind".into(),
        source: s(source),
        target: String::new(),
        options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
    }
}

pub(crate) fn mounts(shape: &Shape<'_>) -> Vec<Mount> {
    let Shape {
        kind,
        fs,
        work,
        lowers,
        index_off,
    } = *shape;
    if lowers.is_empty() {
        return vec![bind(fs, kind == Kind::Active)];
    }
    let mut options = Vec::new();
    if kind == Kind::Active {
        options.push(format!("workdir={}", s(work)));
        options.push(format!("upperdir={}", s(fs)));
    } else if lowers.len() == 1 {
        return vec![bind(&lowers[0], false)];
    }
    let lower: Vec<String> = lowers.iter().map(|p| s(p)).collect();
    options.push(format!("lowerdir={}", lower.join(":")));
    if index_off {
        options.push("index=off".into());
    }
    vec![Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape<'a>(kind: Kind, lowers: &'a [PathBuf]) -> Shape<'a> {
        Shape {
            kind,
            fs: Path::new("/r/snapshots/9/fs"),
            work: Path::new("/r/snapshots/9/work"),
            lowers,
            index_off: true,
        }
    }

    #[test]
    fn each_shape() {
        let none: Vec<PathBuf> = vec![];
        let one = vec![PathBuf::from("/r/snapshots/1/fs")];
        let two = vec![
            PathBuf::from("/r/snapshots/2/fs"),
            PathBuf::from("/r/images/abc/mnt"),
        ];
        let m = mounts(&shape(Kind::Active, &none));
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].r#type.as_str(), m[0].source.as_str()),
            ("bind", "/r/snapshots/9/fs")
        );
        assert_eq!(m[0].options, ["rw", "rbind"]);

        let m = mounts(&shape(Kind::View, &none));
        assert_eq!(m[0].options, ["ro", "rbind"]);

        let m = mounts(&shape(Kind::Active, &one));
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(m[0].source, "overlay");
        assert_eq!(
            m[0].options,
            [
                "workdir=/r/snapshots/9/work",
                "upperdir=/r/snapshots/9/fs",
                "lowerdir=/r/snapshots/1/fs",
                "index=off"
            ]
        );

        let m = mounts(&shape(Kind::View, &one));
        assert_eq!(
            (m[0].r#type.as_str(), m[0].source.as_str()),
            ("bind", "/r/snapshots/1/fs")
        );
        assert_eq!(m[0].options, ["ro", "rbind"]);

        let m = mounts(&shape(Kind::View, &two));
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(
            m[0].options,
            ["lowerdir=/r/snapshots/2/fs:/r/images/abc/mnt", "index=off"]
        );

        let m = mounts(&shape(Kind::Active, &two));
        assert_eq!(
            m[0].options[2],
            "lowerdir=/r/snapshots/2/fs:/r/images/abc/mnt"
        );
    }
}
