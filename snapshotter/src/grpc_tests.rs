//! Through the real unix socket with containerd-snapshots' generated client, as containerd's
//! proxy plugin talks to it.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;

use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::api::snapshots::v1::*;
use containerd_snapshots::tonic::transport::{Channel, Endpoint, Uri};
use containerd_snapshots::tonic::Code;

use crate::testing::FakeImages;
use crate::*;

async fn connect(path: PathBuf) -> SnapshotsClient<Channel> {
    for _ in 0..200 {
        if path.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let ch = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            tokio::net::UnixStream::connect(path.clone())
        }))
        .await
        .unwrap();
    SnapshotsClient::new(ch)
}

fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_commit_stat_list_remove_over_the_socket() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("run/snap.sock");
    let root = d.path().join("root");
    // A stale socket from a killed run is replaced.
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let fake = Arc::new(FakeImages::new());
    let image = LazyImage {
        reference: "reg.test/lazy@sha256:ee".into(),
        name: "ee".into(),
    };
    fake.add("reg.test/app:1", image.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let (sock, root, fake) = (sock.clone(), root.clone(), fake.clone());
        tokio::spawn(async move {
            serve_until(&sock, &root, fake, async {
                let _ = stopped.await;
            })
            .await
        })
    };
    // Wait for the replacement: the stale file is there from the start.
    for _ in 0..200 {
        if root.join("metadata.json").exists() || root.join("lock").exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut c = connect(sock.clone()).await;
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // An ordinary layer: Prepare, Commit.
    let m = c
        .prepare(PrepareSnapshotRequest {
            snapshotter: "lazyblk".into(),
            key: "extract-1 sha256:c0".into(),
            parent: String::new(),
            labels: labels(&[(LABEL_SNAPSHOT_REF, "sha256:c0")]),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "bind");
    c.commit(CommitSnapshotRequest {
        snapshotter: "lazyblk".into(),
        name: "sha256:c0".into(),
        key: "extract-1 sha256:c0".into(),
        labels: labels(&[(LABEL_SNAPSHOT_REF, "sha256:c0")]),
    })
    .await
    .unwrap();

    // A lazy top layer over it: ALREADY_EXISTS, then containerd's List finds it.
    let l = labels(&[
        (LABEL_SNAPSHOT_REF, "sha256:c1"),
        (LABEL_IMAGE_REF, "reg.test/app:1"),
        (LABEL_LAYER_DIGEST, "sha256:l1"),
        (LABEL_IMAGE_LAYERS, "sha256:l1"),
    ]);
    let err = c
        .prepare(PrepareSnapshotRequest {
            snapshotter: "lazyblk".into(),
            key: "extract-2 sha256:c1".into(),
            parent: "sha256:c0".into(),
            labels: l,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    let mut stream = c
        .list(ListSnapshotsRequest {
            snapshotter: "lazyblk".into(),
            filters: vec![
                r#"labels."containerd.io/snapshot.ref"==sha256:c1,parent=="sha256:c0""#.into(),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let mut found = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        found.extend(r.info);
    }
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].name, "sha256:c1");
    assert_eq!(found[0].kind, Kind::Committed as i32);
    assert_eq!(found[0].parent, "sha256:c0");
    let bad = c
        .list(ListSnapshotsRequest {
            snapshotter: "lazyblk".into(),
            filters: vec!["name==".into()],
        })
        .await;
    let code = match bad {
        Err(e) => e.code(),
        Ok(s) => s.into_inner().message().await.unwrap_err().code(),
    };
    assert_eq!(code, Code::InvalidArgument);

    // A container over the lazy top: the image's mountpoint is the lower dir.
    let m = c
        .prepare(PrepareSnapshotRequest {
            snapshotter: "lazyblk".into(),
            key: "ctr".into(),
            parent: "sha256:c1".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let canon = std::fs::canonicalize(&root).unwrap();
    let want = format!("lowerdir={}", canon.join("images/ee/mnt").display());
    assert!(m[0].options.contains(&want), "{:?}", m[0].options);
    let again = c
        .mounts(MountsRequest {
            snapshotter: "lazyblk".into(),
            key: "ctr".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(again, m);

    // Stat, Update, Usage.
    let st = c
        .stat(StatSnapshotRequest {
            snapshotter: "lazyblk".into(),
            key: "sha256:c0".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(st.kind, Kind::Committed as i32);
    let mut info = st.clone();
    info.labels = labels(&[("containerd.io/gc.root", "1")]);
    let up = c
        .update(UpdateSnapshotRequest {
            snapshotter: "lazyblk".into(),
            info: Some(info),
            // No mask: the labels are replaced whole (masks: meta's and service's tests).
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap();
    assert_eq!(up.labels, labels(&[("containerd.io/gc.root", "1")]));
    let nf = c
        .stat(StatSnapshotRequest {
            snapshotter: "lazyblk".into(),
            key: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(nf.code(), Code::NotFound);
    let u = c
        .usage(UsageRequest {
            snapshotter: "lazyblk".into(),
            key: "sha256:c1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((u.size, u.inodes), (0, 0));

    // Remove: refused with a child (FAILED_PRECONDITION), then leaves first; the image goes
    // with its last snapshot.
    let rm = |key: &str| RemoveSnapshotRequest {
        snapshotter: "lazyblk".into(),
        key: key.into(),
    };
    let e = c.remove(rm("sha256:c1")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    c.remove(rm("ctr")).await.unwrap();
    c.remove(rm("sha256:c1")).await.unwrap();
    assert_eq!(fake.count("release ee"), 1);
    c.remove(rm("sha256:c0")).await.unwrap();
    c.cleanup(CleanupRequest {
        snapshotter: "lazyblk".into(),
    })
    .await
    .unwrap();

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(!sock.exists(), "the socket is removed on the way out");
}
