//! The content-addressed cache. Layout (versioned, so a future format lives beside this one):
//!
//! ```text
//! cache/v1/objects/ab/abcdef…   tensor bytes, or an output shard holding several tensors,
//!                               named by the blake3 digest of their bytes
//! cache/v1/actions/12/12ab…     node key → the digest of the tensor it produced, and where its
//!                               bytes are (JSON)
//! cache/v1/files/9f/9f3c…       path → (device, inode, size, mtime) → file digest, like git's index
//! cache/v1/builds/4e…            per output directory: the node keys of its last build, to explain
//!                                what a new build recomputes and why
//! cache/v1/tmp/                 files being written; renamed into place when complete
//! ```
//!
//! A fused tensor is written once: the engine hands it to the build in a temporary file, the
//! build writes it into an output shard, and once the shard is complete the shard itself
//! becomes an object (a second name for the output's file, [`Store::adopt`]) and the tensor's
//! action names its range inside it ([`Within`]). Where the shard cannot be linked (another
//! file system), the temporary file becomes an object of its own ([`Store::promote`]).
//!
//! Every write goes to `tmp/` and is then renamed, so a killed process leaves at worst a stray
//! temporary file, never a partial object. Objects are checked whenever they are read: against
//! the XXH3 checksum their action recorded when they were written (ten times cheaper than
//! blake3, and as sure to catch damage), or their blake3 name for entries without one. A
//! damaged object is evicted and recomputed. `modelforge cache verify` re-hashes every object
//! against its name. Entries are not fsynced: after a power loss the check catches what the
//! disk lost, at the price of recomputing it.
mod check;
mod gc;
mod stat;

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

pub use check::{check, CheckReport};
pub use gc::{collect, parse_duration, stats, GcReport, Stats};
pub use stat::hash_file;

use crate::digest::{Digest, FileDigest, NodeKey, TensorDigest};

const LAYOUT: &str = "v1";

/// An open cache directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// What an action produced: its byte count, and where its bytes are, by content.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct ActionEntry {
    /// The blake3 of the result's bytes, which name the object holding them alone. A result
    /// that is a range of another object (`within`) need not have it: the object's name
    /// covers its bytes, and `check` checks them on every read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor: Option<TensorDigest>,
    pub len: u64,
    /// The bytes are a range of another object (an output shard) rather than an object of
    /// their own, named by `tensor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<Within>,
    /// For a re-factored delta: the fraction of its energy the truncation kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    /// For an alignment map: how well the two bases' spaces match (mean cosine of principal
    /// angles for an inner map, relative residual of the fit for a residual map).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<f64>,
    /// The object's XXH3-64 checksum, which reads check instead of re-hashing with blake3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Checksum>,
}

/// Where inside another object a result's bytes are.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Within {
    /// The object: an output shard, named by the digest of the whole file.
    pub object: FileDigest,
    /// Where the result's bytes start in it.
    pub offset: u64,
}

impl ActionEntry {
    /// The object's name and where in it the result starts; `None` for an entry that names
    /// no object (a handed result not yet settled, or a malformed entry).
    fn place(&self) -> Option<(String, u64)> {
        match (self.within, self.tensor) {
            (Some(w), _) => Some((w.object.hex(), w.offset)),
            (None, Some(tensor)) => Some((tensor.hex(), 0)),
            (None, None) => None,
        }
    }
}

/// An XXH3-64 checksum, written in hexadecimal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checksum(pub u64);

impl Serialize for Checksum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:016x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(d)?;
        u64::from_str_radix(&hex, 16)
            .map(Checksum)
            .map_err(serde::de::Error::custom)
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating if needed) the cache under `dir`, and removes temporary files that
    /// processes no longer running left behind.
    pub fn open(dir: &Path) -> std::io::Result<Store> {
        let root = dir.join(LAYOUT);
        for sub in ["objects", "actions", "files", "builds", "tmp"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        let store = Store { root };
        store.remove_abandoned_tmp();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn fanout(&self, bucket: &str, hex: &str) -> PathBuf {
        self.root.join(bucket).join(&hex[..2]).join(hex)
    }

    /// The object named `digest`: a tensor's bytes, or a file's (an adopted output shard).
    pub fn object_path<K>(&self, digest: &Digest<K>) -> PathBuf {
        self.fanout("objects", &digest.hex())
    }

    /// The object holding an entry's bytes, and where in it they start.
    pub fn object_of(&self, entry: &ActionEntry) -> Option<(PathBuf, u64)> {
        let (hex, offset) = entry.place()?;
        Some((self.fanout("objects", &hex), offset))
    }

    fn action_path(&self, key: &NodeKey) -> PathBuf {
        self.fanout("actions", &key.hex())
    }

    /// A new temporary file in the store, named after this process so that others can tell
    /// whether its writer is still alive.
    fn tmp_file(&self) -> std::io::Result<(PathBuf, File)> {
        self.tmp_file_of(std::process::id(), "")
    }

    /// A temporary file that lives as long as the process `owner`.
    fn tmp_file_of(&self, owner: u32, tag: &str) -> std::io::Result<(PathBuf, File)> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self
            .root
            .join("tmp")
            .join(format!("{owner}-{}{tag}{n}", std::process::id()));
        let file = File::create(&path)?;
        Ok((path, file))
    }

    /// Starts writing a new object.
    pub fn object_writer(&self) -> std::io::Result<ObjectWriter> {
        let (path, file) = self.tmp_file()?;
        Ok(self.writer(path, Self::buffered(file), false))
    }

    /// Starts writing a result to be handed to the process `owner` (the build), which writes it
    /// into an output shard and then settles it: [`Store::adopt`] and [`Store::put_action`],
    /// or [`Store::promote`]. [`ObjectWriter::finish`] leaves it where
    /// [`ObjectWriter::path`] says; it lives as long as `owner` does.
    pub fn handed_writer(&self, owner: u32) -> std::io::Result<ObjectWriter> {
        let (path, file) = self.tmp_file_of(owner, "h")?;
        Ok(self.writer(path, Self::buffered(file), true))
    }

    /// Starts writing a result to be handed to the build in `slot` (a slot of shared memory,
    /// see `job::Job::slots`), over whatever it held: only [`ActionEntry::len`] bytes from its
    /// start are the result's.
    pub fn slot_writer(&self, mut slot: File) -> std::io::Result<ObjectWriter> {
        use std::io::Seek;
        slot.seek(std::io::SeekFrom::Start(0))?;
        // Written straight through: the blocks are large, and shared memory is no disk.
        Ok(self.writer(PathBuf::new(), BufWriter::with_capacity(0, slot), true))
    }

    /// Plain buffered writes: the kernel writes them back after the build. Pacing them to the
    /// disk (`io::write_behind`) made cold builds about 2 s slower on the 2-core machine; the
    /// output goes around the page cache, so these are the build's only dirty pages.
    fn buffered(file: File) -> BufWriter<File> {
        BufWriter::with_capacity(4 << 20, file)
    }

    fn writer(&self, path: PathBuf, out: BufWriter<File>, handed: bool) -> ObjectWriter {
        ObjectWriter {
            store: self.clone(),
            tmp: path,
            out,
            // A handed result becomes a range of a shard, named by the shard's digest: its own
            // would be a second blake3 of the same bytes.
            hasher: (!handed).then(blake3::Hasher::new),
            checksum: Xxh3::new(),
            len: 0,
        }
    }

    /// Makes the complete file at `path`, whose blake3 is `digest`, an object too, under a
    /// second name (a hard link: no byte is copied). Fails where the file system cannot link
    /// it into the store.
    pub fn adopt(&self, path: &Path, digest: &FileDigest) -> std::io::Result<()> {
        let object = self.object_path(digest);
        if let Some(parent) = object.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::hard_link(path, &object) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            other => other,
        }
    }

    /// Whether a file written in `dir` can be adopted (see [`Store::adopt`]): the same file
    /// system, one that has hard links. Tried with an empty file.
    pub fn can_adopt_from(&self, dir: &Path) -> bool {
        let probe = dir.join(format!(".modelforge-probe-{}", std::process::id()));
        if std::fs::create_dir_all(dir).is_err() || File::create(&probe).is_err() {
            return false;
        }
        let linked = self.tmp_file().and_then(|(tmp, _)| {
            std::fs::remove_file(&tmp)?;
            let result = std::fs::hard_link(&probe, &tmp);
            let _ = std::fs::remove_file(&tmp);
            result
        });
        let _ = std::fs::remove_file(&probe);
        linked.is_ok()
    }

    /// Makes a handed result (see [`Store::handed_writer`]) an object of its own and records
    /// it under `key`.
    pub fn promote(
        &self,
        handed: &Path,
        key: &NodeKey,
        entry: &ActionEntry,
        sync: bool,
    ) -> std::io::Result<()> {
        let file = File::open(handed)?;
        if sync {
            file.sync_all()?;
        }
        // Handed results are not named by their own digest until now.
        let tensor = match entry.tensor {
            Some(tensor) => tensor,
            None => {
                let mut hasher = blake3::Hasher::new();
                for window in crate::mapped::windows(&file, 0, file.metadata()?.len()) {
                    crate::digest::hash_into(&mut hasher, &window?);
                }
                TensorDigest::new(hasher.finalize())
            }
        };
        let path = self.object_path(&tensor);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(handed, &path)?;
        let entry = ActionEntry {
            tensor: Some(tensor),
            within: None,
            ..*entry
        };
        self.put_action(key, &entry)
    }

    /// Makes a result handed over in a slot (see [`Store::slot_writer`]) an object of its own,
    /// copied out of the slot, and records it under `key`.
    pub fn promote_slot(
        &self,
        slot: &File,
        key: &NodeKey,
        entry: &ActionEntry,
        sync: bool,
    ) -> std::io::Result<()> {
        let mut out = self.object_writer()?;
        for window in crate::mapped::windows(slot, 0, entry.len) {
            out.write(&window?)?;
        }
        let copied = out.finish(sync)?;
        if copied.check != entry.check {
            return Err(std::io::Error::other(
                "the slot no longer holds the result handed in it",
            ));
        }
        self.put_action(
            key,
            &ActionEntry {
                within: None,
                energy: entry.energy,
                overlap: entry.overlap,
                ..copied
            },
        )
    }

    /// Hashes an object in full; `false` if it is missing or its bytes do not match its name.
    pub fn verify_object<K>(&self, digest: &Digest<K>) -> bool {
        let Ok(file) = File::open(self.object_path(digest)) else {
            return false;
        };
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(file).is_ok() && Digest::<K>::new(hasher.finalize()) == *digest
    }

    /// Removes the object holding a damaged entry's bytes, and with it, lazily, every action
    /// that points at it (an action whose object is missing is treated as absent). An output
    /// the object was linked from keeps its file.
    pub fn evict(&self, entry: &ActionEntry) {
        if let Some((object, _)) = self.object_of(entry) {
            let _ = std::fs::remove_file(object);
        }
    }

    /// Whether the object an entry names is present and long enough to hold its bytes.
    pub fn holds(&self, entry: &ActionEntry) -> bool {
        // A range must be checkable, by its checksum or its own digest: its object's name
        // does not cover it alone.
        let Some((object, offset)) = self.object_of(entry) else {
            return false;
        };
        if entry.within.is_some() && entry.check.is_none() && entry.tensor.is_none() {
            return false;
        }
        std::fs::metadata(&object).is_ok_and(|meta| match entry.within {
            Some(_) => meta.len() >= offset.saturating_add(entry.len),
            None => meta.len() == entry.len,
        })
    }

    /// The recorded result of a node, if its object is still present.
    pub fn action(&self, key: &NodeKey) -> Option<ActionEntry> {
        let bytes = std::fs::read(self.action_path(key)).ok()?;
        let entry: ActionEntry = serde_json::from_slice(&bytes).ok()?;
        self.holds(&entry).then_some(entry)
    }

    pub fn put_action(&self, key: &NodeKey, entry: &ActionEntry) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        self.write_atomic(&self.action_path(key), &bytes, false)
    }

    /// The record of the last build of the output directory `output`.
    pub fn build_record(&self, output: &Path) -> Option<Vec<u8>> {
        std::fs::read(self.build_record_path(output)).ok()
    }

    pub fn put_build_record(&self, output: &Path, bytes: &[u8]) -> std::io::Result<()> {
        self.write_atomic(&self.build_record_path(output), bytes, false)
    }

    fn build_record_path(&self, output: &Path) -> PathBuf {
        let abs = std::path::absolute(output).unwrap_or_else(|_| output.to_owned());
        let key = blake3::hash(abs.as_os_str().as_encoded_bytes()).to_hex();
        self.root.join("builds").join(format!("{key}.json"))
    }

    /// Marks the object holding an entry's bytes as used now, for `gc --older-than`.
    pub fn touch(&self, entry: &ActionEntry) {
        let Some((object, _)) = self.object_of(entry) else {
            return;
        };
        if let Ok(file) = File::options().append(true).open(object) {
            let _ = file.set_modified(std::time::SystemTime::now());
        }
    }

    /// Writes a small file atomically: temporary file, then rename (and fsync before the
    /// rename when `durable`; cache entries need not be, as every read checks them).
    pub(crate) fn write_atomic(
        &self,
        path: &Path,
        bytes: &[u8],
        durable: bool,
    ) -> std::io::Result<()> {
        let (tmp, mut file) = self.tmp_file()?;
        let result = (|| {
            file.write_all(bytes)?;
            if durable {
                file.sync_all()?;
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn remove_abandoned_tmp(&self) {
        let Ok(entries) = std::fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let pid = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<i32>().ok());
            if pid.is_some_and(|pid| !process_alive(pid)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// Streams a new object into the store; nothing is visible until [`ObjectWriter::finish`].
pub struct ObjectWriter {
    store: Store,
    tmp: PathBuf,
    out: BufWriter<File>,
    /// None for a result handed to the build (see [`Store::handed_writer`]), which is not
    /// named by its own digest.
    hasher: Option<blake3::Hasher>,
    checksum: Xxh3,
    len: u64,
}

impl ObjectWriter {
    /// Where the bytes are being written.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if let Some(hasher) = &mut self.hasher {
            crate::digest::hash_into(hasher, bytes);
        }
        self.checksum.update(bytes);
        self.len += bytes.len() as u64;
        self.out.write_all(bytes)
    }

    /// Moves the object to its content address; with `sync`, after flushing it to disk.
    /// Without, an object torn by a power loss fails its digest check when read, and is
    /// evicted and recomputed. A handed result stays where [`ObjectWriter::path`] says, not
    /// synced: the build syncs what it keeps.
    pub fn finish(mut self, sync: bool) -> std::io::Result<ActionEntry> {
        let digest = self
            .hasher
            .as_ref()
            .map(|h| TensorDigest::new(h.finalize()));
        self.out.flush()?;
        match digest {
            None => self.tmp = PathBuf::new(),
            Some(digest) => {
                if sync {
                    self.out.get_ref().sync_all()?;
                }
                let path = self.store.object_path(&digest);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::rename(&self.tmp, &path)?;
            }
        }
        Ok(ActionEntry {
            tensor: digest,
            len: self.len,
            within: None,
            energy: None,
            overlap: None,
            check: Some(Checksum(self.checksum.digest())),
        })
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        // After finish the temporary file has been renamed (or handed over) and this does
        // nothing.
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Reads an entry's bytes while checking them; [`VerifyingReader::check`] says whether what
/// was read is what its action entry recorded.
pub struct VerifyingReader {
    file: File,
    check: Check,
    /// Where the entry's bytes end in the file.
    end: u64,
    /// Whether the file holds the entry's bytes alone, so that nothing may follow them.
    alone: bool,
}

enum Check {
    /// An object this build's engine has just written, and hashed as it wrote.
    Fresh,
    Checksum(Box<Xxh3>, Checksum),
    /// Entries written before checksums were recorded: the blake3 name.
    Digest(Box<blake3::Hasher>, TensorDigest),
}

impl Check {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            Check::Fresh => {}
            Check::Checksum(hasher, _) => hasher.update(bytes),
            Check::Digest(hasher, _) => crate::digest::hash_into(hasher, bytes),
        }
    }
}

impl VerifyingReader {
    pub fn open(store: &Store, entry: &ActionEntry) -> Option<Self> {
        let check = match (entry.check, entry.tensor) {
            (Some(checksum), _) => Check::Checksum(Box::new(Xxh3::new()), checksum),
            (None, Some(tensor)) => Check::Digest(Box::new(blake3::Hasher::new()), tensor),
            (None, None) => return None,
        };
        let (path, offset) = store.object_of(entry)?;
        Self::at(&path, offset, entry, check)
    }

    /// Opens an object written moments ago by this build, whose digest was computed from the
    /// very bytes written: only its length is checked.
    pub fn open_fresh(store: &Store, entry: &ActionEntry) -> Option<Self> {
        let (path, offset) = store.object_of(entry)?;
        Self::at(&path, offset, entry, Check::Fresh)
    }

    /// Opens a result the engine handed over in `path` (see [`Store::handed_writer`]),
    /// hashed as it was written: only its length is checked.
    pub fn open_handed(path: &Path, entry: &ActionEntry) -> Option<Self> {
        Self::at(
            path,
            0,
            &ActionEntry {
                within: None,
                ..*entry
            },
            Check::Fresh,
        )
    }

    /// Opens a result the engine handed over in `slot` (see [`Store::slot_writer`]), from
    /// its start (what follows is an earlier result's), hashed as it was written: only its
    /// length is checked.
    pub fn open_slot(slot: File, entry: &ActionEntry) -> Option<Self> {
        let mut reader = Self::within(slot, 0, entry, Check::Fresh)?;
        reader.alone = false;
        Some(reader)
    }

    fn at(path: &Path, offset: u64, entry: &ActionEntry, check: Check) -> Option<Self> {
        Self::within(File::open(path).ok()?, offset, entry, check)
    }

    fn within(mut file: File, offset: u64, entry: &ActionEntry, check: Check) -> Option<Self> {
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(offset)).ok()?;
        Some(VerifyingReader {
            file,
            check,
            end: offset + entry.len,
            alone: entry.within.is_none(),
        })
    }

    /// The rest of the entry's bytes (`len` of them), as windows mapped one at a time, each
    /// hashed as it is handed out.
    pub fn windows(
        &mut self,
        len: u64,
    ) -> impl Iterator<Item = std::io::Result<crate::mapped::Window>> + '_ {
        use std::io::Seek;
        let start = self.file.stream_position().unwrap_or(0);
        // Past them afterwards, so that `check` sees whether all were read.
        let _ = self.file.seek(std::io::SeekFrom::Current(len as i64));
        let check = &mut self.check;
        crate::mapped::windows(&self.file, start, len).inspect(move |window| {
            if let Ok(window) = window {
                check.update(window);
            }
        })
    }

    /// Where the rest of the entry's bytes (`len` of them) are, when they need no check as
    /// they are read (a result this build's engine has just written): its file and the offset
    /// they start at, skipped past so that [`VerifyingReader::check`] counts them read.
    /// `None` for bytes that must be checked: read those through
    /// [`VerifyingReader::windows`].
    pub fn unchecked(&mut self, len: u64) -> Option<(&File, u64)> {
        use std::io::Seek;
        if !matches!(self.check, Check::Fresh) {
            return None;
        }
        let start = self.file.stream_position().ok()?;
        self.file
            .seek(std::io::SeekFrom::Current(len as i64))
            .ok()?;
        Some((&self.file, start))
    }

    pub fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact(buf)?;
        self.check.update(buf);
        Ok(())
    }

    /// True when every byte has been read and they hash to what the entry recorded.
    pub fn check(mut self) -> bool {
        use std::io::Seek;
        let complete = if self.alone {
            let mut rest = [0u8; 1];
            matches!(self.file.read(&mut rest), Ok(0))
        } else {
            self.file.stream_position().is_ok_and(|at| at == self.end)
        };
        complete
            && match self.check {
                Check::Fresh => true,
                Check::Checksum(hasher, expected) => Checksum(hasher.digest()) == expected,
                Check::Digest(hasher, expected) => TensorDigest::new(hasher.finalize()) == expected,
            }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_named_by_content_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.object_writer().unwrap();
        w.write(b"hello ").unwrap();
        w.write(b"world").unwrap();
        let entry = w.finish(true).unwrap();
        let digest = entry.tensor.unwrap();
        assert_eq!(digest, TensorDigest::of(b"hello world"));
        assert!(store.verify_object(&digest));

        let key = NodeKey::of(b"node");
        assert_eq!(store.action(&key), None);
        store.put_action(&key, &entry).unwrap();
        assert_eq!(store.action(&key), Some(entry));

        let read = |entry: &ActionEntry| {
            let mut reader = VerifyingReader::open(&store, entry).unwrap();
            let mut buf = [0u8; 11];
            reader.read_exact(&mut buf).unwrap();
            reader.check()
        };
        let unchecked = ActionEntry {
            check: None,
            ..entry
        };
        assert!(entry.check.is_some() && read(&entry) && read(&unchecked));
        std::fs::write(store.object_path(&digest), b"hello w0rld").unwrap();
        assert!(!store.verify_object(&digest));
        // Damage is caught by the checksum the entry recorded, and by the name without one.
        assert!(!read(&entry) && !read(&unchecked));
        store.evict(&entry);
        assert_eq!(
            store.action(&key),
            None,
            "an action without its object is absent"
        );
        assert_eq!(
            std::fs::read_dir(store.root().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_result_inside_an_adopted_shard_is_read_and_checked_as_a_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cache")).unwrap();
        // The engine hands the result over: no object yet, only its file.
        let mut w = store.handed_writer(std::process::id()).unwrap();
        let handed = w.path().to_owned();
        w.write(b"tensor").unwrap();
        let entry = w.finish(false).unwrap();
        // Not named by its own digest: the shard's will cover it.
        assert!(handed.exists() && entry.tensor.is_none() && entry.check.is_some());
        let mut reader = VerifyingReader::open_handed(&handed, &entry).unwrap();
        let mut buf = [0u8; 6];
        reader.read_exact(&mut buf).unwrap();
        assert!(reader.check() && &buf == b"tensor");

        // The build writes it into a shard, which the store adopts.
        let shard = dir.path().join("model.safetensors");
        std::fs::write(&shard, b"head:tensor:tail").unwrap();
        let digest = FileDigest::of(b"head:tensor:tail");
        store.adopt(&shard, &digest).unwrap();
        store.adopt(&shard, &digest).unwrap();
        let key = NodeKey::of(b"node");
        let within = Some(Within {
            object: digest,
            offset: 5,
        });
        store
            .put_action(&key, &ActionEntry { within, ..entry })
            .unwrap();
        let read = |entry: &ActionEntry| {
            let mut reader = VerifyingReader::open(&store, entry).unwrap();
            let mut buf = [0u8; 6];
            reader.read_exact(&mut buf).unwrap();
            (buf, reader.check())
        };
        let found = store.action(&key).unwrap();
        assert_eq!(read(&found), (*b"tensor", true));
        let by_name = ActionEntry {
            check: None,
            tensor: Some(TensorDigest::of(b"tensor")),
            ..found
        };
        assert_eq!(read(&by_name), (*b"tensor", true));
        assert!(store.verify_object(&digest));

        // The output's file changed in place: the range no longer checks, by either means.
        std::fs::write(&shard, b"head:tensoR:tail").unwrap();
        assert!(!read(&found).1 && !read(&by_name).1);
        // Evicting removes the cache's name only; a file cut short makes the entry absent.
        store.evict(&found);
        assert!(shard.exists() && store.action(&key).is_none());
        store.adopt(&shard, &digest).unwrap();
        std::fs::write(&shard, b"head:ten").unwrap();
        assert!(store.action(&key).is_none());

        // Promoted instead, a handed result is an object of its own.
        let mut w = store.handed_writer(std::process::id()).unwrap();
        let path = w.path().to_owned();
        w.write(b"other").unwrap();
        let entry = w.finish(false).unwrap();
        store.promote(&path, &key, &entry, true).unwrap();
        let promoted = ActionEntry {
            tensor: Some(TensorDigest::of(b"other")),
            ..entry
        };
        assert!(!path.exists() && store.action(&key) == Some(promoted));
        // A range that nothing can check is no entry.
        let unchecked = ActionEntry {
            check: None,
            ..found
        };
        store.adopt(&shard, &FileDigest::of(b"head:ten")).unwrap();
        assert!(!store.holds(&ActionEntry {
            within: Some(Within {
                object: FileDigest::of(b"head:ten"),
                offset: 0
            }),
            len: 3,
            ..unchecked
        }));
    }

    /// A slot is written over result after result: each reads back as its own bytes alone,
    /// however long the one before, and promotes to an object of those bytes; a slot written
    /// over since refuses to promote.
    #[test]
    fn results_handed_in_a_slot_read_back_and_promote() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let slot = tempfile::tempfile().unwrap();
        let hand = |bytes: &[u8]| {
            let mut w = store.slot_writer(slot.try_clone().unwrap()).unwrap();
            w.write(bytes).unwrap();
            w.finish(false).unwrap()
        };
        let read = |entry: &ActionEntry| {
            let mut reader = VerifyingReader::open_slot(slot.try_clone().unwrap(), entry).unwrap();
            let mut bytes = vec![0u8; entry.len as usize];
            reader.read_exact(&mut bytes).unwrap();
            assert!(reader.check());
            bytes
        };
        let long = hand(b"a longer first result");
        assert_eq!(read(&long), b"a longer first result");
        let short = hand(b"second");
        assert!(short.tensor.is_none() && short.len == 6);
        assert_eq!(read(&short), b"second");

        let key = NodeKey::of(b"node");
        store.promote_slot(&slot, &key, &short, true).unwrap();
        let promoted = store.action(&key).unwrap();
        assert_eq!(promoted.tensor, Some(TensorDigest::of(b"second")));
        assert!(store.verify_object(&promoted.tensor.unwrap()));
        hand(b"third!");
        assert!(store
            .promote_slot(&slot, &NodeKey::of(b"other"), &short, true)
            .is_err());
    }
}
