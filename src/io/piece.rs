//! Bytes on their way into an output: in memory, or a range of a file that the writer reads
//! straight into its own buffers (`pread`), with no mapping of the file in between. Mapping a
//! range to copy it once costs a page fault per 16 pages and an unmapping with its TLB
//! shootdown; reading it costs the same one copy, done by the kernel.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

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

/// A read error, saying what was being read.
fn reading(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("reading {}: {e}", path.display()))
}
