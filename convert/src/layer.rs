//! A layer's bytes as a tar stream: decompression chosen by media type and checked against the
//! magic bytes (gzip, zstd, plain), a byte limit on the decompressed stream (tar bombs), and the
//! SHA-256 of the decompressed stream (the config's `diff_id`).

use sha2::{Digest, Sha256};
use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Read};
use std::rc::Rc;

/// How a layer is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames).
    Zstd,
}

/// The compression a layer media type says, `None` (inner) when it does not say (an empty media
/// type, as in `docker save` archives); an error for what is not a tar layer at all.
pub fn from_media_type(mt: &str) -> Result<Option<Compression>, String> {
    let mt = mt.split(';').next().unwrap_or("").trim();
    if mt.is_empty() {
        return Ok(None);
    }
    let known_prefix = [
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
    ];
    let Some(rest) = known_prefix.iter().find_map(|p| mt.strip_prefix(p)) else {
        return Err(format!("media type {mt:?} is not a tar layer"));
    };
    match rest {
        "" => Ok(Some(Compression::None)),
        "+gzip" | ".gzip" => Ok(Some(Compression::Gzip)),
        "+zstd" | ".zstd" => Ok(Some(Compression::Zstd)),
        r => Err(format!("media type {mt:?}: unknown compression {r:?}")),
    }
}

/// What the first bytes say.
pub fn sniff(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// The state shared between a [`Counted`] reader and whoever reads the tar through it.
#[derive(Debug, Default)]
pub struct Meter {
    /// Bytes read so far.
    pub bytes: Cell<u64>,
    /// Set when the limit was hit (the read failed because of it).
    pub over: Cell<bool>,
    /// Set when the stream ended.
    pub eof: Cell<bool>,
}

/// A reader that counts what passes, fails once more than `limit` bytes passed, and hashes it.
pub struct Counted<R> {
    inner: R,
    limit: u64,
    meter: Rc<Meter>,
    hash: Sha256,
}

impl<R: Read> Counted<R> {
    /// Count and hash what `inner` gives, failing past `limit` bytes.
    pub fn new(inner: R, limit: u64, meter: Rc<Meter>) -> Counted<R> {
        Counted {
            inner,
            limit,
            meter,
            hash: Sha256::new(),
        }
    }

    /// Read to the end (what a tar reader leaves after its end marker), then the stream's
    /// `sha256:<hex>`.
    pub fn finish(mut self) -> io::Result<String> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(format!("sha256:{}", hex::encode(self.hash.finalize())))
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.meter.eof.set(true);
        }
        let total = self.meter.bytes.get() + n as u64;
        self.meter.bytes.set(total);
        if total > self.limit {
            self.meter.over.set(true);
            return Err(io::Error::other("layer exceeds its size limit"));
        }
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// The decompressed stream of a layer's bytes `r`, whose media type says `declared` (`None`:
/// decided by the magic bytes). A declared compression the bytes do not have is an error.
pub fn decompress<'a, R: Read + 'a>(
    r: R,
    declared: Option<Compression>,
) -> Result<Box<dyn Read + 'a>, String> {
    let mut br = BufReader::with_capacity(1 << 16, r);
    let head = br.fill_buf().map_err(|e| format!("reading: {e}"))?;
    let actual = sniff(head);
    if let Some(d) = declared {
        if d != actual && !(d == Compression::None && head.is_empty()) {
            return Err(format!(
                "its media type says {d:?} but its bytes are {actual:?}"
            ));
        }
    }
    Ok(match actual {
        Compression::None => Box::new(br),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(br)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(br).map_err(|e| format!("zstd: {e}"))?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn media_types() {
        assert_eq!(
            from_media_type("application/vnd.oci.image.layer.v1.tar+gzip"),
            Ok(Some(Compression::Gzip))
        );
        assert_eq!(
            from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            Ok(Some(Compression::Zstd))
        );
        assert_eq!(
            from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Ok(Some(Compression::Gzip))
        );
        assert_eq!(
            from_media_type("application/vnd.oci.image.layer.v1.tar"),
            Ok(Some(Compression::None))
        );
        assert_eq!(from_media_type(""), Ok(None));
        assert!(from_media_type("application/vnd.lazyblk.blob.v1").is_err());
        assert!(from_media_type("application/vnd.oci.image.layer.v1.tar+lz4").is_err());
    }

    #[test]
    fn decompresses_by_magic_and_checks_the_media_type() {
        let plain = b"hello tar".to_vec();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&plain[..], 3).unwrap();
        for (bytes, c) in [
            (&plain, Compression::None),
            (&gz, Compression::Gzip),
            (&zs, Compression::Zstd),
        ] {
            let mut out = Vec::new();
            decompress(&bytes[..], Some(c))
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, plain);
            let mut out = Vec::new();
            decompress(&bytes[..], None)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, plain);
        }
        assert!(decompress(&plain[..], Some(Compression::Gzip)).is_err());
        assert!(decompress(&gz[..], Some(Compression::Zstd)).is_err());
    }

    #[test]
    fn counted_fails_past_the_limit_and_hashes() {
        let m = Rc::new(Meter::default());
        let mut c = Counted::new(&[7u8; 100][..], 50, m.clone());
        assert!(io::copy(&mut c, &mut io::sink()).is_err());
        assert!(m.over.get());
        let m = Rc::new(Meter::default());
        let c = Counted::new(&b"abc"[..], 50, m.clone());
        assert_eq!(
            c.finish().unwrap(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(m.bytes.get(), 3);
    }
}
