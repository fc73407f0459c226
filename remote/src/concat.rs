//! Blobs read as one.

use crate::{BlobInfo, BoxFuture, Remote, RemoteError};
use bytes::Bytes;

/// Blobs read as one, in order: an image's shared blobs and its own blob (a converted image's
/// per-layer data), and a prefetch pack's blob after them (whose frames the store places
/// after the image's). A range across a seam is read from each blob in turn.
pub struct Concat {
    /// Each blob and where it starts.
    parts: Vec<(Box<dyn Remote>, u64)>,
    /// The expected size of each blob but the first (the first is checked by its caller
    /// against the whole: `probe` returns the sum).
    sizes: Vec<u64>,
}

impl Concat {
    /// `first` (of `split` bytes) followed by `second` (of `second_size` bytes).
    pub fn new(
        first: Box<dyn Remote>,
        split: u64,
        second: Box<dyn Remote>,
        second_size: u64,
    ) -> Self {
        Concat::of(vec![(first, split), (second, second_size)])
    }

    /// The blobs `parts` (each with its size) one after the other. At least one.
    pub fn of(parts: Vec<(Box<dyn Remote>, u64)>) -> Self {
        assert!(!parts.is_empty(), "Concat of no blob");
        let mut at = 0;
        let mut v = Vec::with_capacity(parts.len());
        let mut sizes = Vec::with_capacity(parts.len());
        for (r, size) in parts {
            v.push((r, at));
            sizes.push(size);
            at += size;
        }
        Concat { parts: v, sizes }
    }
}

impl Remote for Concat {
    fn location(&self) -> String {
        let v: Vec<String> = self.parts.iter().map(|(r, _)| r.location()).collect();
        v.join(" + ")
    }

    fn probe(&self) -> BoxFuture<'_, Result<BlobInfo, RemoteError>> {
        Box::pin(async move {
            let all =
                futures_util::future::join_all(self.parts.iter().map(|(r, _)| r.probe())).await;
            let mut size = 0;
            let mut etag = None;
            for (i, got) in all.into_iter().enumerate() {
                let b = got?;
                if i == 0 {
                    etag = b.etag;
                } else if b.size != self.sizes[i] {
                    return Err(RemoteError::permanent(
                        self.parts[i].0.location(),
                        format!("size is {} bytes, expected {}", b.size, self.sizes[i]),
                    ));
                }
                size += b.size;
            }
            Ok(BlobInfo { size, etag })
        })
    }

    fn report_corrupt(&self) {
        for (r, _) in &self.parts {
            r.report_corrupt();
        }
    }

    fn served(&self) -> Vec<crate::ServedBytes> {
        let mut v = Vec::new();
        for (r, _) in &self.parts {
            crate::merge_served(&mut v, r.served());
        }
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
            let last = self.parts.len() - 1;
            for (i, (r, start)) in self.parts.iter().enumerate() {
                // The last blob takes whatever lies past the others (and fails past its end).
                let stop = match i == last {
                    true => end,
                    false => self.parts[i + 1].1,
                };
                let (from, to) = (offset.max(*start), end.min(stop));
                if from < to {
                    r.read_range_with(from - start, to - from, sink).await?;
                }
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
            // Three blobs: a range over all of them, in order.
            let three = Concat::of(vec![
                (Box::new(LocalRemote::new(dir.join("b"))), 6),
                (Box::new(LocalRemote::new(dir.join("a"))), 10),
                (Box::new(LocalRemote::new(dir.join("b"))), 6),
            ]);
            assert_eq!(
                &three.read_range(4, 14).await.unwrap()[..],
                b"ef0123456789ab"
            );
            assert_eq!(three.probe().await.unwrap().size, 22);
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
