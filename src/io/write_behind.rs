//! Writing large files at the disk's pace, for output shards where the file system refuses
//! `O_DIRECT` (see `io::direct`). A plain buffered write only copies into the page cache; the
//! kernel writes the dirty pages back later, and a process that dirties more than the kernel's
//! limits is then stalled while they drain, in bursts. Measured on the 2-core machine, 2 GiB
//! written in 16 MiB pieces took 3.2-5.6 s buffered and 1.1-1.5 s when each piece's write-back
//! was started at once and the writer waited for the pieces a few behind it (the same disk
//! takes 0.7 s a GiB with O_DIRECT). [`WriteBehind`] does the latter: it starts write-back of
//! every [`CHUNK`] as soon as it is written, keeps at most [`IN_FLIGHT`] chunks under
//! write-back, and drops the pages once on disk, so the page cache a file holds stays bounded.
//! The data's meaning is unchanged: `sync_file_range` is only a hint about when, never
//! whether, pages are written.
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;

/// The write-back unit.
const CHUNK: u64 = 8 << 20;

/// Chunks under write-back at once, before the writer waits for the oldest.
const IN_FLIGHT: u64 = 4;

/// A file written front to back, whose write-back follows the writing.
pub struct WriteBehind {
    file: File,
    /// Bytes written so far (the file's length, as it is written from the start).
    written: u64,
    /// Write-back has been started for `..submitted`.
    submitted: u64,
    /// Write-back has finished for `..settled`.
    settled: u64,
}

impl WriteBehind {
    /// Takes a file opened for writing at its start, which this process will not read back.
    pub fn new(file: File) -> Self {
        WriteBehind {
            file,
            written: 0,
            submitted: 0,
            settled: 0,
        }
    }

    pub fn get_ref(&self) -> &File {
        &self.file
    }

    /// Starts write-back of the whole chunks written since the last call, and waits for the
    /// oldest ones while more than [`IN_FLIGHT`] are under way.
    fn follow(&mut self) -> std::io::Result<()> {
        while self.written - self.submitted >= CHUNK {
            self.range(self.submitted, libc::SYNC_FILE_RANGE_WRITE)?;
            self.submitted += CHUNK;
        }
        while self.submitted - self.settled > IN_FLIGHT * CHUNK {
            self.range(
                self.settled,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )?;
            // SAFETY: a valid open descriptor; the pages are clean now, and dropping them is
            // only advice.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    self.settled as libc::off64_t,
                    CHUNK as libc::off64_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
            self.settled += CHUNK;
        }
        Ok(())
    }

    /// `sync_file_range` on the chunk at `start`. Where the file system does not support it,
    /// nothing changes; an I/O error writing the pages back is the caller's.
    fn range(&self, start: u64, flags: libc::c_uint) -> std::io::Result<()> {
        // SAFETY: a valid open descriptor; the call only schedules or waits for write-back.
        let done = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                start as libc::off64_t,
                CHUNK as libc::off64_t,
                flags,
            )
        };
        if done == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EIO | libc::ENOSPC) => Err(error),
            // ENOSYS, EINVAL (file systems without it), ESPIPE: only a hint was lost.
            _ => Ok(()),
        }
    }
}

impl Write for WriteBehind {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        self.follow()?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_written_is_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = WriteBehind::new(File::create(&path).unwrap());
        let piece: Vec<u8> = (0..3_000_001u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..20 {
            w.write_all(&piece).unwrap();
        }
        w.flush().unwrap();
        assert!(w.settled > 0 && w.submitted - w.settled <= IN_FLIGHT * CHUNK);
        drop(w);
        let read = std::fs::read(&path).unwrap();
        assert_eq!(read.len(), 20 * piece.len());
        assert!(read.chunks(piece.len()).all(|c| c == piece));
    }
}
