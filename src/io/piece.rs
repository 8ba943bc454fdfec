//! Bytes on their way into an output: in memory, or a range of a file that the writer reads
//! straight into its own buffers (`pread`), with no mapping of the file in between. Mapping a
//! range to copy it once costs a page fault per 16 pages and an unmapping with its TLB
//! shootdown; reading it costs the same one copy, done by the kernel.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy)]
pub(crate) enum Piece<'a> {
    Bytes(&'a [u8]),
    /// `len` bytes of `file` (at `path`, for messages) from `offset`.
    File {
        file: &'a File,
        path: &'a Path,
        offset: u64,
        len: u64,
    },
}

impl<'a> Piece<'a> {
    pub fn len(&self) -> u64 {
        match self {
            Piece::Bytes(bytes) => bytes.len() as u64,
            Piece::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `at` bytes, and the rest.
    pub fn split_at(self, at: u64) -> (Piece<'a>, Piece<'a>) {
        match self {
            Piece::Bytes(bytes) => {
                let (head, tail) = bytes.split_at(at as usize);
                (Piece::Bytes(head), Piece::Bytes(tail))
            }
            Piece::File {
                file,
                path,
                offset,
                len,
            } => {
                let part = |offset, len| Piece::File {
                    file,
                    path,
                    offset,
                    len,
                };
                (part(offset, at), part(offset + at, len - at))
            }
        }
    }

    /// Copies the bytes into `dst`, which has as many.
    pub fn copy_to(&self, dst: &mut [u8]) -> std::io::Result<()> {
        match self {
            Piece::Bytes(bytes) => {
                dst.copy_from_slice(bytes);
                Ok(())
            }
            Piece::File {
                file, path, offset, ..
            } => file
                .read_exact_at(dst, *offset)
                .map_err(|e| reading(path, e)),
        }
    }

    /// Hands the bytes to `each` in order, a mapped window at a time for a file's; a file
    /// that cannot be read is an error made by `unread`.
    pub fn each<E>(
        &self,
        unread: impl Fn(std::io::Error) -> E,
        mut each: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        match self {
            Piece::Bytes(bytes) => each(bytes),
            Piece::File {
                file,
                path,
                offset,
                len,
            } => {
                for window in super::mapped::windows(file, *offset, *len) {
                    each(&window.map_err(|e| unread(reading(path, e)))?)?;
                }
                Ok(())
            }
        }
    }
}

/// A piece's file that could not be read, carried inside the `io::Error` a writer returns so
/// that the build reports the file it read, not the one it was writing.
#[derive(Debug, thiserror::Error)]
#[error("reading {}: {source}", path.display())]
pub(crate) struct ReadError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl ReadError {
    /// The read error inside `e`, or `e` itself when it is none.
    pub fn within(e: std::io::Error) -> Result<ReadError, std::io::Error> {
        if !e.get_ref().is_some_and(|inner| inner.is::<ReadError>()) {
            return Err(e);
        }
        let inner = e.into_inner().expect("checked above");
        Ok(*inner.downcast::<ReadError>().expect("checked above"))
    }
}

/// A read error, saying what was being read.
fn reading(path: &Path, source: std::io::Error) -> std::io::Error {
    let kind = source.kind();
    let path = path.to_owned();
    std::io::Error::new(kind, ReadError { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_that_cannot_be_read_says_which_file_through_the_writers_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("short"), [1; 4]).unwrap();
        let file = File::open(dir.path().join("short")).unwrap();
        let piece = Piece::File {
            file: &file,
            path: Path::new("short"),
            offset: 2,
            len: 4,
        };
        let error = piece.copy_to(&mut [0; 4]).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
        let read = ReadError::within(error).unwrap();
        assert_eq!(read.path, Path::new("short"));
        // Any other error is given back as it was.
        let other = ReadError::within(std::io::Error::other("disk full")).unwrap_err();
        assert_eq!(other.to_string(), "disk full");
        // The parts of a piece are its bytes, in order, however it is split.
        let two = Piece::File {
            file: &file,
            path: Path::new("short"),
            offset: 2,
            len: 2,
        };
        let (head, tail) = two.split_at(1);
        let (mut a, mut b) = ([0; 1], [0; 1]);
        head.copy_to(&mut a).unwrap();
        tail.copy_to(&mut b).unwrap();
        assert_eq!((a, b, tail.len()), ([1], [1], 1));
    }
}
