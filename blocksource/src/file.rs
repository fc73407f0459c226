//! A fully local raw file as a [`BlockSource`]: the reference implementation and a baseline.

use crate::{check_range, BlockError, BlockSource, Completion, Geometry, Located};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A local raw image file. Everything is always present.
pub struct FileSource {
    file: File,
    geometry: Geometry,
}

impl FileSource {
    /// Open `path`; the device size is the file size rounded up to `block_size`.
    pub fn open(path: &Path, block_size: u32, writable: bool) -> Result<Self, BlockError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        let len = file.metadata()?.len();
        let bs = u64::from(block_size);
        Ok(FileSource {
            file,
            geometry: Geometry {
                size: len.div_ceil(bs) * bs,
                block_size,
                read_only: !writable,
            },
        })
    }
}

impl BlockSource for FileSource {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn locate(&self, offset: u64, len: u64) -> Option<Located> {
        check_range(self.geometry.size, offset, len).ok()?;
        // A raw file may have holes: never vouched for.
        Some(Located {
            fd: self.file.as_raw_fd(),
            offset,
            written: false,
        })
    }

    fn files(&self) -> Vec<std::os::fd::RawFd> {
        vec![self.file.as_raw_fd()]
    }

    fn fetch(&self, offset: u64, len: u64, done: Completion) {
        done(check_range(self.geometry.size, offset, len));
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        if self.geometry.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(self.geometry.size, offset, data.len() as u64)?;
        self.file.write_all_at(data, offset)?;
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.file.sync_data()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_match_file_and_tail_is_zero() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let src = FileSource::open(f.path(), 4096, false).unwrap();
        assert_eq!(src.geometry().size, 12288);
        let mut buf = vec![0xAAu8; 4096];
        src.read_at(8192, &mut buf).unwrap();
        assert_eq!(&buf[..10_000 - 8192], &data[8192..]);
        assert!(buf[10_000 - 8192..].iter().all(|&b| b == 0));
        assert!(matches!(
            src.read_at(12288, &mut buf),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(src.write_at(0, &buf), Err(BlockError::ReadOnly)));
    }
}
