//! File digests without rehashing: a file whose device, inode, size and modification time (in
//! nanoseconds) are those recorded when it was last hashed keeps its digest, as git's index
//! does. `--rehash` bypasses it.
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Store;
use crate::digest::{FileDigest, TensorDigest};
use crate::leaves::{Layout, Leaves};

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct StatEntry {
    path: String,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    digest: FileDigest,
}

impl StatEntry {
    fn of(path: &Path, meta: &std::fs::Metadata, digest: FileDigest) -> Self {
        StatEntry {
            path: path.display().to_string(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            digest,
        }
    }
}

impl Store {
    fn stat_path(&self, path: &Path) -> std::path::PathBuf {
        let key = blake3::hash(path.as_os_str().as_encoded_bytes()).to_hex();
        self.fanout("files", &key)
    }

    /// The digest of the file at `path`, from the stat cache when the file is unchanged.
    pub fn file_digest(&self, path: &Path, rehash: bool) -> std::io::Result<FileDigest> {
        let path = std::fs::canonicalize(path)?;
        let meta = std::fs::metadata(&path)?;
        if !rehash {
            if let Some(digest) = self.recorded_digest(&path, &meta) {
                return Ok(digest);
            }
        }
        let entry_path = self.stat_path(&path);
        let digest = hash_file(&path)?;
        // The file may have changed while it was hashed; record only what was stable.
        let after = std::fs::metadata(&path)?;
        let entry = StatEntry::of(&path, &meta, digest);
        if entry == StatEntry::of(&path, &after, digest) {
            let bytes = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
            self.write_atomic(&entry_path, &bytes, false)?;
        }
        Ok(digest)
    }

    /// Whether [`Store::file_digest`] would give the digest of the file at `path` without
    /// reading it (the stat cache knows the file as it is now).
    pub fn knows_file(&self, path: &Path) -> bool {
        std::fs::canonicalize(path)
            .and_then(|path| Ok((std::fs::metadata(&path)?, path)))
            .is_ok_and(|(meta, path)| self.recorded_digest(&path, &meta).is_some())
    }

    /// The digest the stat cache holds for the file at the canonical `path`, if the file is
    /// unchanged since.
    fn recorded_digest(&self, path: &Path, meta: &std::fs::Metadata) -> Option<FileDigest> {
        let entry = std::fs::read(self.stat_path(path))
            .ok()
            .and_then(|b| serde_json::from_slice::<StatEntry>(&b).ok())?;
        (entry == StatEntry::of(path, meta, entry.digest)).then_some(entry.digest)
    }

    /// Records a digest the caller computed while writing the file (so that the next build
    /// need not hash its own output again).
    pub fn record_file_digest(&self, path: &Path, digest: FileDigest) -> std::io::Result<()> {
        let path = std::fs::canonicalize(path)?;
        let meta = std::fs::metadata(&path)?;
        let bytes = serde_json::to_vec(&StatEntry::of(&path, &meta, digest))
            .map_err(std::io::Error::other)?;
        self.write_atomic(&self.stat_path(&path), &bytes, false)
    }
}

impl Store {
    /// The digest of each tensor of the file at `path` whose contents have `digest`, given
    /// their (name, offset, length): recorded once per content, so never stale, and hashed from
    /// mapped windows when missing. Node keys name an adapter's tensors by these, so that a
    /// change to one tensor (a DoRA magnitude, a trainable token's row) rebuilds only what
    /// reads it.
    pub fn tensor_digests(
        &self,
        path: &Path,
        digest: FileDigest,
        tensors: &[(String, u64, u64)],
    ) -> std::io::Result<std::collections::BTreeMap<String, TensorDigest>> {
        type Digests = std::collections::BTreeMap<String, TensorDigest>;
        let key = blake3::hash(format!("tensors:{}", digest.hex()).as_bytes()).to_hex();
        let record = self.fanout("files", &key);
        if let Some(known) = std::fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice::<Digests>(&b).ok())
            .filter(|known| tensors.iter().all(|(name, _, _)| known.contains_key(name)))
        {
            return Ok(known);
        }
        let file = File::open(path)?;
        let mut digests = Digests::new();
        for (name, start, len) in tensors {
            let mut hasher = blake3::Hasher::new();
            for window in crate::mapped::windows(&file, *start, *len) {
                hasher.update(&window?);
            }
            digests.insert(name.clone(), TensorDigest::new(hasher.finalize()));
        }
        // Recorded only if the file still has the contents its digest says.
        if hash_file(path)? == digest {
            let bytes = serde_json::to_vec(&digests).map_err(std::io::Error::other)?;
            self.write_atomic(&record, &bytes, false)?;
        }
        Ok(digests)
    }
}

/// Hashes a file on all cores from mapped windows (`mapped`): each worker maps, hashes and
/// unmaps whole leaves of [`LEAF`] bytes (`leaves`), so the bytes are hashed where the page
/// cache holds them, never copied, and the process's memory does not grow with the file's size.
/// (As with `b3sum`, a file truncated by another process while it is being hashed ends this one
/// with SIGBUS; the stat cache records nothing for it.)
pub fn hash_file(path: &Path) -> std::io::Result<FileDigest> {
    use rayon::prelude::*;
    let file = File::open(path)?;
    let layout = Layout::new(LEAF, file.metadata()?.len());
    let hashed = (0..layout.count())
        .into_par_iter()
        .map(|index| {
            let (start, len) = layout.range(index);
            let mut hasher = layout.start(index);
            for window in crate::mapped::windows(&file, start, len) {
                hasher.update(&window?);
            }
            Ok(layout.end(index, &hasher))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut leaves = Leaves::new(layout);
    for leaf in hashed {
        leaves.set(leaf);
    }
    Ok(FileDigest::new(
        leaves.finish().expect("every leaf is hashed"),
    ))
}

/// Bytes a worker hashes at a time: one mapped window.
const LEAF: u64 = crate::mapped::WINDOW;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_hashed_in_leaves_on_all_cores_has_its_blake3() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for len in [0, 5, LEAF, 2 * LEAF + 12_345] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(
                hash_file(&path).unwrap(),
                FileDigest::of(&bytes),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn unchanged_files_keep_their_digest_and_changed_ones_are_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cache")).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "one").unwrap();
        assert_eq!(
            store.file_digest(&file, false).unwrap(),
            FileDigest::of(b"one")
        );
        std::fs::write(&file, "two").unwrap();
        assert_eq!(
            store.file_digest(&file, false).unwrap(),
            FileDigest::of(b"two")
        );
        assert_eq!(
            store.file_digest(&file, true).unwrap(),
            FileDigest::of(b"two")
        );
    }
}
