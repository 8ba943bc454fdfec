//! Reading large byte ranges of files without copying them: each window of the range is
//! mapped, handed to the caller where the page cache holds it, and unmapped, so the process's
//! memory does not grow with the range. A plain `read` would copy every byte once more, which
//! measured as a tenth of a build's CPU time.
//!
//! As with any mapping, a file truncated by another process while it is mapped ends this one
//! with SIGBUS. The files read here are the inputs a build has just hashed and cache objects,
//! which are never rewritten in place.
use std::fs::File;

/// Bytes mapped at a time.
pub const WINDOW: u64 = 16 << 20;

/// Consecutive mapped slices covering a byte range of a file, in order.
pub struct Windows<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

/// One mapped slice of a file.
pub struct Window {
    map: memmap2::Mmap,
    /// Where the wanted bytes start in the map (mappings start on a page boundary).
    skip: usize,
}

impl std::ops::Deref for Window {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map[self.skip..]
    }
}

/// The `len` bytes of `file` at `start`, as windows mapped one at a time.
pub fn windows(file: &File, start: u64, len: u64) -> Windows<'_> {
    Windows {
        file,
        at: start,
        end: start + len,
    }
}

impl Iterator for Windows<'_> {
    type Item = std::io::Result<Window>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.end {
            return None;
        }
        let from = self.at - self.at % page_size();
        let to = self.end.min(from + WINDOW);
        // SAFETY: a read-only private mapping; see the module's note on truncation.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(from)
                .len((to - from) as usize)
                .map(self.file)
        };
        let skip = (self.at - from) as usize;
        self.at = to;
        Some(map.map(|map| {
            let _ = map.advise(memmap2::Advice::Sequential);
            Window { map, skip }
        }))
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn windows_cover_the_range_in_order_from_any_offset() {
        let mut file = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..(WINDOW as usize * 2 + 12_345))
            .map(|i| (i % 253) as u8)
            .collect();
        file.write_all(&bytes).unwrap();
        for (start, len) in [(0, bytes.len() as u64), (4097, WINDOW + 5), (17, 0), (3, 1)] {
            let mut seen = Vec::new();
            for window in windows(&file, start, len) {
                seen.extend_from_slice(&window.unwrap());
            }
            assert_eq!(seen, bytes[start as usize..(start + len) as usize]);
        }
    }
}
