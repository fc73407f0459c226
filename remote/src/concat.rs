//! Two blobs read as one.

use crate::{BlobInfo, BoxFuture, Remote, RemoteError};
use bytes::Bytes;

/// Two blobs read as one: offsets below `split` from the first (the image's blob), the rest
/// from the second at `offset - split` (a prefetch pack's blob, whose frames the store places
/// after the image's). A range across the seam is read from both, in order.
pub struct Concat {
    first: Box<dyn Remote>,
    split: u64,
    second: Box<dyn Remote>,
    second_size: u64,
}

impl Concat {
    /// `first` (of `split` bytes) followed by `second` (of `second_size` bytes).
    pub fn new(
        first: Box<dyn Remote>,
        split: u64,
        second: Box<dyn Remote>,
        second_size: u64,
    ) -> Self {
        Concat {
            first,
            split,
            second,
            second_size,
        }
    }
}

impl Remote for Concat {
    fn location(&self) -> String {
        format!("{} + {}", self.first.location(), self.second.location())
    }

    fn probe(&self) -> BoxFuture<'_, Result<BlobInfo, RemoteError>> {
        Box::pin(async move {
            let (a, b) = tokio::join!(self.first.probe(), self.second.probe());
            let (a, b) = (a?, b?);
            if b.size != self.second_size {
                return Err(RemoteError::permanent(
                    self.second.location(),
                    format!("size is {} bytes, expected {}", b.size, self.second_size),
                ));
            }
            Ok(BlobInfo {
                size: a.size + b.size,
                etag: a.etag,
            })
        })
    }

    fn report_corrupt(&self) {
        self.first.report_corrupt();
        self.second.report_corrupt();
    }

    fn served(&self) -> Vec<crate::ServedBytes> {
        let mut v = self.first.served();
        crate::merge_served(&mut v, self.second.served());
        v
    }

    fn read_range_with<'a>(
        &'a self,
        offset: u64,
        len: u64,
        sink: &'a mut (dyn FnMut(Bytes) + Send),
    ) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async move {
            let end = offset + len;
            if offset < self.split {
                let head = end.min(self.split) - offset;
                self.first.read_range_with(offset, head, sink).await?;
            }
            if end > self.split {
                let from = offset.max(self.split);
                self.second
                    .read_range_with(from - self.split, end - from, sink)
                    .await?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalRemote;

    #[test]
    fn concat_reads_across_the_seam_in_order() {
        let dir = std::env::temp_dir().join(format!("lazyblk-concat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a"), b"0123456789").unwrap();
        std::fs::write(dir.join("b"), b"abcdef").unwrap();
        let c = Concat::new(
            Box::new(LocalRemote::new(dir.join("a"))),
            10,
            Box::new(LocalRemote::new(dir.join("b"))),
            6,
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert_eq!(&c.read_range(2, 3).await.unwrap()[..], b"234");
            assert_eq!(&c.read_range(8, 5).await.unwrap()[..], b"89abc");
            assert_eq!(&c.read_range(11, 5).await.unwrap()[..], b"bcdef");
            assert_eq!(c.probe().await.unwrap().size, 16);
            assert!(c.read_range(14, 3).await.is_err(), "past the second blob");
            let short = Concat::new(
                Box::new(LocalRemote::new(dir.join("a"))),
                10,
                Box::new(LocalRemote::new(dir.join("b"))),
                7,
            );
            let e = short.probe().await.unwrap_err();
            assert!(e.to_string().contains("expected 7"), "{e}");
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
