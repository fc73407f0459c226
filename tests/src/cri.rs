//! A minimal CRI image client: `runtime.v1.ImageService/PullImage` over containerd's unix socket.
//!
//! crictl is not in Debian, and the guest suites need a CRI pull (containerd's `ctr images pull`
//! passes no labels to a snapshotter, so it can never start a lazy image). The two messages are
//! declared here by hand with `prost` (field numbers from the CRI's `api.proto`, `runtime.v1`):
//! `PullImageRequest { ImageSpec image = 1; AuthConfig auth = 2; PodSandboxConfig sandbox_config = 3; }`,
//! `ImageSpec { string image = 1; map<string,string> annotations = 2; }`,
//! `PullImageResponse { string image_ref = 1; }`. Nothing else of the CRI is needed.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `runtime.v1.ImageSpec`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    /// The image reference.
    #[prost(string, tag = "1")]
    pub image: String,
    /// Unstructured annotations (unused).
    #[prost(map = "string, string", tag = "2")]
    pub annotations: std::collections::HashMap<String, String>,
}

/// `runtime.v1.PullImageRequest` (no auth, no sandbox config).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageRequest {
    /// The image to pull.
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
}

/// `runtime.v1.PullImageResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageResponse {
    /// The image's id (`sha256:` of its config).
    #[prost(string, tag = "1")]
    pub image_ref: String,
}

/// Pull `image` through the CRI plugin of the containerd listening on `socket`; the image id.
/// `timeout` bounds the whole call (a pull through a lazy snapshotter must never hang).
pub fn pull_image(socket: &Path, image: &str, timeout: Duration) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket = socket.to_path_buf();
    rt.block_on(async move {
        tokio::time::timeout(timeout, pull(socket, image))
            .await
            .with_context(|| format!("CRI PullImage of {image}: no answer within {timeout:?}"))?
    })
}

async fn pull(socket: PathBuf, image: &str) -> Result<String> {
    // The URI is required by tonic but unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            tokio::net::UnixStream::connect(socket.clone())
        }))
        .await
        .context("connecting to containerd's socket")?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.context("containerd's socket")?;
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/runtime.v1.ImageService/PullImage");
    let req = PullImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            annotations: Default::default(),
        }),
    };
    let codec: tonic::codec::ProstCodec<PullImageRequest, PullImageResponse> =
        tonic::codec::ProstCodec::default();
    let resp = grpc
        .unary(tonic::Request::new(req), path, codec)
        .await
        .map_err(|s| anyhow::anyhow!("CRI PullImage of {image}: {}: {}", s.code(), s.message()))?;
    Ok(resp.into_inner().image_ref)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn request_encodes_as_the_cri_expects() {
        let req = PullImageRequest {
            image: Some(ImageSpec {
                image: "a/b:c".into(),
                annotations: Default::default(),
            }),
        };
        // field 1 (message, len 7) { field 1 (string, len 5) "a/b:c" }
        assert_eq!(req.encode_to_vec(), b"\x0a\x07\x0a\x05a/b:c");
        let resp = PullImageResponse::decode(&b"\x0a\x03sha"[..]).unwrap();
        assert_eq!(resp.image_ref, "sha");
    }

    #[test]
    fn a_missing_socket_is_one_clear_error() {
        let e = pull_image(
            Path::new("/nonexistent/containerd.sock"),
            "x",
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("containerd's socket"), "{e:#}");
    }
}
