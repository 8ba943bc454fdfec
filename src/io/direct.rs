//! Writing a large file around the page cache (`O_DIRECT`), and hashing it: the bytes go from
//! a few reused, aligned buffers straight to the disk, while the caller fills the next buffers.
//! A buffered write copies every byte into page-cache pages the kernel must first find and then
//! write back; on the 2-core virtual machine measured, those copies cost 0.8 s of CPU per GB
//! (the pages are new to the host each time), against 0.2 s per GB here. Output shards are
//! written this way: the build never reads them back.
//!
//! Two writes are in flight at once, each [`CHUNK`] bytes at an aligned offset. The file's last,
//! partial chunk is written padded to the alignment and the file then cut to its length. The
//! file is hashed as it is copied in: each [`LEAF`] of it is a leaf of its blake3 (`leaves`),
//! hashed a part at a time right after the part is copied, while it is still in the core's
//! cache. The whole leaves a write covers are copied and hashed on all cores, one leaf a task,
//! so neither the copy nor the hash is bound to the caller's thread; only the leaves a write
//! begins or ends inside are the caller's.
//! Where the file system refuses `O_DIRECT` (tmpfs, some network file systems),
//! [`DirectWriter::create`] gives the file back, to be written buffered.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::piece::Piece;
use modelforge_core::leaves::{Layout, Leaf, Leaves};
use rayon::prelude::*;

/// Bytes per write.
const CHUNK: usize = 8 << 20;
/// Bytes per leaf of the file's hash, and per task copying and hashing: a chunk holds eight.
const LEAF: usize = 1 << 20;
/// Offsets, lengths and buffer addresses are multiples of this (the largest logical block
/// size of common disks).
const ALIGN: usize = 4096;
/// Writes in flight at once, each on its own thread.
const IN_FLIGHT: usize = 2;
/// Bytes copied, then hashed, at a time: well inside a core's cache.
const PART: usize = 128 << 10;

/// A heap buffer of [`CHUNK`] bytes aligned to [`ALIGN`].
struct Aligned(std::ptr::NonNull<u8>);

// SAFETY: the buffer is plain memory owned by one value at a time.
unsafe impl Send for Aligned {}

impl Aligned {
    fn layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(CHUNK, ALIGN).expect("a valid layout")
    }

    fn new() -> Aligned {
        // SAFETY: a non-zero size; zeroed, so every byte is initialised.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::layout()) };
        Aligned(
            std::ptr::NonNull::new(ptr)
                .unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout())),
        )
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: CHUNK initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_ptr(), CHUNK) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { std::alloc::dealloc(self.0.as_ptr(), Self::layout()) }
    }
}

/// Sets or clears `O_DIRECT` on `file`; whether that succeeded.
fn set_direct(file: &File, on: bool) -> bool {
    // SAFETY: F_GETFL/F_SETFL on a valid descriptor only change its status flags.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        let flags = match on {
            true => flags | libc::O_DIRECT,
            false => flags & !libc::O_DIRECT,
        };
        flags >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags) == 0
    }
}

/// A message to a writer: a buffer, the file offset it goes to, and how many of its bytes to
/// write (a multiple of ALIGN).
type WriteJob = (Aligned, u64, usize);

/// A file of a known length written front to back with `O_DIRECT`, and hashed.
pub struct DirectWriter {
    file: Arc<File>,
    /// The hashes of the file's leaves written so far (and how the file is cut into them).
    leaves: Leaves,
    /// The buffer being filled, and how much of it is.
    current: Aligned,
    filled: usize,
    /// The hasher of the open leaf: the one the next byte goes to, fed what it holds so far.
    hasher: blake3::Hasher,
    /// The file offset `current` will be written at.
    offset: u64,
    /// Whether a write failed (a piece could not be read, a writer stopped): the buffer and
    /// the open leaf may hold part of it, so the file takes nothing more.
    broken: bool,
    writes: Option<SyncSender<WriteJob>>,
    free: Receiver<Aligned>,
    writers: Vec<JoinHandle<()>>,
    /// The first error a write met.
    error: Arc<Mutex<Option<std::io::Error>>>,
}

impl DirectWriter {
    /// Takes a new, empty file that will have `len` bytes and switches it to `O_DIRECT`; gives
    /// it back, unchanged, where the file system does not support that.
    pub fn create(file: File, len: u64) -> Result<DirectWriter, File> {
        if !set_direct(&file, true) {
            return Err(file);
        }
        let file = Arc::new(file);
        let layout = Layout::new(LEAF as u64, len);
        let (writes, queue) = sync_channel::<WriteJob>(IN_FLIGHT);
        let (give_back, free) = sync_channel::<Aligned>(IN_FLIGHT + 1);
        let queue = Arc::new(Mutex::new(queue));
        let error = Arc::new(Mutex::new(None));
        let writers = (0..IN_FLIGHT)
            .map(|_| {
                let (file, queue, give_back, error) = (
                    file.clone(),
                    queue.clone(),
                    give_back.clone(),
                    error.clone(),
                );
                std::thread::spawn(move || loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((mut buffer, offset, len)) = next else {
                        break;
                    };
                    let bytes = &buffer.bytes()[..len];
                    let written = match file.write_all_at(bytes, offset) {
                        // A write the file system would not take directly (one cut short by
                        // a file-size limit, a device with larger blocks): from here on the
                        // file is written buffered, which reports the real cause if any.
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                            set_direct(&file, false);
                            file.write_all_at(bytes, offset)
                        }
                        written => written,
                    };
                    if let Err(e) = written {
                        error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                    }
                    let _ = give_back.send(buffer);
                })
            })
            .collect();
        for _ in 0..IN_FLIGHT {
            let _ = give_back.send(Aligned::new());
        }
        Ok(DirectWriter {
            file,
            leaves: Leaves::new(layout),
            current: Aligned::new(),
            filled: 0,
            hasher: layout.start(0),
            offset: 0,
            broken: false,
            writes: Some(writes),
            free,
            writers,
            error,
        })
    }

    /// Appends `piece` to the file.
    pub fn write(&mut self, piece: Piece<'_>) -> std::io::Result<()> {
        if self.broken {
            return Err(std::io::Error::other("an earlier write to the file failed"));
        }
        let (written, declared) = (
            self.offset + self.filled as u64,
            self.leaves.layout().bytes(),
        );
        if written + piece.len() > declared {
            return Err(std::io::Error::other(format!(
                "more bytes than the {declared} the file was declared to have"
            )));
        }
        self.append(piece).inspect_err(|_| self.broken = true)
    }

    fn append(&mut self, mut piece: Piece<'_>) -> std::io::Result<()> {
        while !piece.is_empty() {
            let n = piece.len().min((CHUNK - self.filled) as u64);
            let (head, rest) = piece.split_at(n);
            self.fill(head)?;
            piece = rest;
            if self.filled == CHUNK {
                self.submit(CHUNK)?;
            }
        }
        Ok(())
    }

    /// Copies `piece`, which fits, into the current buffer after what it holds, and hashes it:
    /// into the open leaf up to its end, the whole leaves that follow on all cores, and what
    /// is left into the next leaf, left open.
    fn fill(&mut self, piece: Piece<'_>) -> std::io::Result<()> {
        let at = self.offset + self.filled as u64;
        let to_boundary = (LEAF as u64 - at % LEAF as u64) % LEAF as u64;
        let (open, rest) = piece.split_at(to_boundary.min(piece.len()));
        self.fill_open(open)?;
        let whole = (rest.len() / LEAF as u64) as usize;
        let (leaves, tail) = rest.split_at((whole * LEAF) as u64);
        if whole > 0 {
            let first = ((at + open.len()) / LEAF as u64) as usize;
            let layout = self.leaves.layout();
            let start = self.filled;
            let dst = &mut self.current.bytes()[start..start + whole * LEAF];
            let hash = |(i, dst): (usize, &mut [u8])| {
                let part = leaves.split_at((i * LEAF) as u64).1.split_at(LEAF as u64).0;
                let mut hasher = layout.start(first + i);
                copy_and_hash(dst, part, &mut hasher)?;
                Ok(layout.end(first + i, &hasher))
            };
            let hashed: Vec<Leaf> = match whole {
                1 => vec![hash((0, dst))?],
                _ => dst
                    .par_chunks_mut(LEAF)
                    .enumerate()
                    .map(hash)
                    .collect::<std::io::Result<_>>()?,
            };
            for leaf in hashed {
                self.leaves.set(leaf);
            }
            self.filled += whole * LEAF;
            self.hasher = layout.start(first + whole);
        }
        self.fill_open(tail)
    }

    /// Copies `piece` into the current buffer and hashes it into the open leaf, which it
    /// does not run past; a leaf it completes is set, and the next one opened.
    fn fill_open(&mut self, piece: Piece<'_>) -> std::io::Result<()> {
        if piece.is_empty() {
            return Ok(());
        }
        let filled = self.filled;
        let dst = &mut self.current.bytes()[filled..filled + piece.len() as usize];
        copy_and_hash(dst, piece, &mut self.hasher)?;
        self.filled += dst.len();
        let at = self.offset + self.filled as u64;
        if at.is_multiple_of(LEAF as u64) {
            let index = (at / LEAF as u64) as usize - 1;
            let layout = self.leaves.layout();
            self.leaves.set(layout.end(index, &self.hasher));
            self.hasher = layout.start(index + 1);
        }
        Ok(())
    }

    fn failed(&self) -> std::io::Result<()> {
        match self.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// A buffer no write is using, once one is.
    fn free(&self) -> std::io::Result<Aligned> {
        self.free
            .recv()
            .map_err(|_| std::io::Error::other("the direct writers stopped"))
    }

    /// Hands `len` bytes (a multiple of ALIGN) of `buffer` to a writer, to go at the offset
    /// that follows the last.
    fn send(&mut self, buffer: Aligned, len: usize) -> std::io::Result<()> {
        self.failed()?;
        let writes = self.writes.as_ref().expect("open until finished");
        writes
            .send((buffer, self.offset, len))
            .map_err(|_| std::io::Error::other("the direct writers stopped"))?;
        self.offset += len as u64;
        Ok(())
    }

    /// Hands the current buffer to a writer: its first `len` bytes (a multiple of ALIGN), of
    /// which the first `self.filled` are the file's.
    fn submit(&mut self, len: usize) -> std::io::Result<()> {
        let next = self.free()?;
        let full = std::mem::replace(&mut self.current, next);
        self.send(full, len)?;
        self.filled = 0;
        Ok(())
    }

    /// Closes the queue and waits for the writes under way.
    fn stop(&mut self) {
        self.writes = None;
        for writer in self.writers.drain(..) {
            let _ = writer.join();
        }
    }

    /// Writes what remains, waits for every write, and cuts the file to its length; with
    /// `sync`, the data is on disk when this returns. Returns the file's blake3 digest.
    pub fn finish(mut self, sync: bool) -> std::io::Result<blake3::Hash> {
        if self.broken {
            return Err(std::io::Error::other("an earlier write to the file failed"));
        }
        let len = self.offset + self.filled as u64;
        let layout = self.leaves.layout();
        if len != layout.bytes() {
            return Err(std::io::Error::other(format!(
                "{len} bytes written to a file declared to have {}",
                layout.bytes()
            )));
        }
        if !len.is_multiple_of(LEAF as u64) || len == 0 {
            // The last leaf, shorter than the others (or the empty file's only one).
            let index = (len / LEAF as u64) as usize;
            self.leaves.set(layout.end(index, &self.hasher));
        }
        if self.filled > 0 || len == 0 {
            let padded = self.filled.next_multiple_of(ALIGN);
            let filled = self.filled;
            self.current.bytes()[filled..padded].fill(0);
            self.submit(padded)?;
        }
        self.stop();
        self.failed()?;
        self.file.set_len(len)?;
        if sync {
            self.file.sync_all()?;
        }
        self.leaves
            .finish()
            .ok_or_else(|| std::io::Error::other("a leaf of the file was not hashed"))
    }
}

/// Copies `piece` into `dst` (of the same length) and hashes what was copied, a part at a
/// time, so that the hash reads from the cache what the copy just wrote.
fn copy_and_hash(
    dst: &mut [u8],
    piece: Piece<'_>,
    hasher: &mut blake3::Hasher,
) -> std::io::Result<()> {
    let mut rest = piece;
    for dst in dst.chunks_mut(PART) {
        let (part, after) = rest.split_at(dst.len() as u64);
        part.copy_to(dst)?;
        hasher.update(dst);
        rest = after;
    }
    Ok(())
}

impl Drop for DirectWriter {
    fn drop(&mut self) {
        // Unfinished (an error elsewhere): the caller removes the file.
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn what_is_written_is_the_file_whatever_its_length_and_its_digest_is_blake3() {
        const CARGO: &str = env!("CARGO_MANIFEST_DIR");
        let dir = tempfile::tempdir_in(CARGO).unwrap();
        for len in [
            0,
            1,
            ALIGN + 3,
            LEAF,
            2 * LEAF - 1,
            CHUNK,
            CHUNK + 1,
            3 * CHUNK + 12_345,
        ] {
            let path = dir.path().join(format!("f{len}"));
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            std::fs::write(dir.path().join("source"), &bytes).unwrap();
            let source = File::open(dir.path().join("source")).unwrap();
            // In pieces smaller than a leaf; all at once (whole leaves hashed on all cores); a
            // few bytes, then the rest (the leaf begun is filled first); pieces of a few
            // leaves, each beginning and ending inside one.
            let cuts: [&[usize]; 4] = [
                &[1_000_003],
                &[len.max(1)],
                &[7.min(len), len.max(1)],
                &[3 * LEAF + 4097],
            ];
            for cut in cuts {
                let create = DirectWriter::create(File::create(&path).unwrap(), len as u64);
                let Ok(mut w) = create else {
                    eprintln!("SKIPPED: the file system under {CARGO} refuses O_DIRECT");
                    return;
                };
                let mut rest = &bytes[..];
                for (i, &n) in cut.iter().cycle().enumerate() {
                    if rest.is_empty() {
                        break;
                    }
                    let (piece, after) = rest.split_at(n.min(rest.len()));
                    // Every other piece read from a file holding the same bytes.
                    let at = (bytes.len() - rest.len()) as u64;
                    w.write(match i % 2 {
                        0 => Piece::Bytes(piece),
                        _ => Piece::File {
                            file: &source,
                            path: Path::new("source"),
                            offset: at,
                            len: piece.len() as u64,
                        },
                    })
                    .unwrap();
                    rest = after;
                }
                let digest = w.finish(false).unwrap();
                assert_eq!(digest, blake3::hash(&bytes), "length {len}, cut {cut:?}");
                assert_eq!(
                    std::fs::read(&path).unwrap(),
                    bytes,
                    "length {len}, cut {cut:?}"
                );
            }
        }
    }

    #[test]
    fn a_file_written_longer_or_shorter_than_declared_is_refused() {
        const CARGO: &str = env!("CARGO_MANIFEST_DIR");
        let dir = tempfile::tempdir_in(CARGO).unwrap();
        let create = || DirectWriter::create(File::create(dir.path().join("f")).unwrap(), 10);
        let Ok(mut w) = create() else {
            eprintln!("SKIPPED: the file system under {CARGO} refuses O_DIRECT");
            return;
        };
        assert!(w.write(Piece::Bytes(&[0; 11])).is_err());
        let mut w = create().ok().unwrap();
        w.write(Piece::Bytes(&[0; 9])).unwrap();
        assert!(w.finish(false).is_err());
        // A piece of a file shorter than it says: an error naming the file, and the writer
        // takes nothing more.
        std::fs::write(dir.path().join("short"), [1; 4]).unwrap();
        let short = File::open(dir.path().join("short")).unwrap();
        let mut w = create().ok().unwrap();
        let piece = Piece::File {
            file: &short,
            path: Path::new("short"),
            offset: 0,
            len: 10,
        };
        let error = w.write(piece).unwrap_err().to_string();
        assert!(error.starts_with("reading short: "), "{error}");
        assert!(w.write(Piece::Bytes(&[0; 1])).is_err());
        assert!(w.finish(false).is_err());
    }
}
