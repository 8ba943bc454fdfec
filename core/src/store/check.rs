//! `modelforge cache verify`: re-hash every object and check every action, so that a damaged
//! cache is found before a build trips over it (a build would evict and recompute a bad
//! object it reads; this finds the ones no build has read yet).
use std::path::PathBuf;

use rayon::prelude::*;
use serde::Serialize;

use super::gc::walk;
use super::{ActionEntry, Store};
use crate::digest::TensorDigest;

/// What `cache verify` found.
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    pub objects: u64,
    pub object_bytes: u64,
    /// Objects whose bytes do not hash to their name, or whose name is not a digest.
    pub bad_objects: Vec<PathBuf>,
    pub actions: u64,
    /// Actions that cannot be read, or whose object is missing or of another length: builds
    /// treat them as absent and recompute the node.
    pub dangling_actions: Vec<PathBuf>,
    /// Temporary files of builds still running (those of dead processes are removed on open).
    pub tmp_files: u64,
    /// Whether the bad objects and dangling actions were removed.
    pub repaired: bool,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.bad_objects.is_empty()
    }
}

/// Hashes every object (in parallel) and reads every action; with `repair`, removes what is
/// bad, which the next build recomputes.
pub fn check(store: &Store, repair: bool) -> CheckReport {
    let objects = walk(&store.root().join("objects"));
    let bad_objects: Vec<PathBuf> = objects
        .par_iter()
        .filter(|(path, _)| !object_is_sound(store, path))
        .map(|(path, _)| path.clone())
        .collect();
    let actions = walk(&store.root().join("actions"));
    let dangling_actions: Vec<PathBuf> = actions
        .iter()
        .filter(|(path, _)| {
            let entry = std::fs::read(path)
                .ok()
                .and_then(|b| serde_json::from_slice::<ActionEntry>(&b).ok());
            entry.is_none_or(|entry| {
                !store.holds(&entry)
                    || store
                        .object_of(&entry)
                        .is_some_and(|(object, _)| bad_objects.contains(&object))
            })
        })
        .map(|(path, _)| path.clone())
        .collect();
    if repair {
        for path in bad_objects.iter().chain(&dangling_actions) {
            let _ = std::fs::remove_file(path);
        }
    }
    let tmp_files = std::fs::read_dir(store.root().join("tmp"))
        .map(|entries| entries.count() as u64)
        .unwrap_or(0);
    CheckReport {
        objects: objects.len() as u64,
        object_bytes: objects.iter().map(|(_, m)| m.len()).sum(),
        bad_objects,
        actions: actions.len() as u64,
        dangling_actions,
        tmp_files,
        repaired: repair,
    }
}

fn object_is_sound(store: &Store, path: &std::path::Path) -> bool {
    let digest = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<TensorDigest>().ok());
    match digest {
        Some(digest) => store.object_path(&digest) == path && store.verify_object(&digest),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::NodeKey;

    #[test]
    fn finds_and_repairs_a_damaged_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut entries = Vec::new();
        for text in [&b"one"[..], b"two", b"three"] {
            let mut w = store.object_writer().unwrap();
            w.write(text).unwrap();
            let entry = w.finish(false).unwrap();
            store.put_action(&NodeKey::of(text), &entry).unwrap();
            entries.push(entry);
        }
        let clean = check(&store, false);
        assert_eq!((clean.objects, clean.actions), (3, 3));
        assert!(clean.is_clean() && clean.dangling_actions.is_empty());

        // Same length, other bytes: only a full hash can tell.
        std::fs::write(store.object_path(&entries[1].tensor.unwrap()), b"twO").unwrap();
        let damaged = check(&store, false);
        assert_eq!(
            damaged.bad_objects,
            vec![store.object_path(&entries[1].tensor.unwrap())]
        );
        assert_eq!(damaged.dangling_actions.len(), 1);
        assert!(store.object_path(&entries[1].tensor.unwrap()).exists());

        let repaired = check(&store, true);
        assert!(repaired.repaired && !repaired.is_clean());
        assert!(!store.object_path(&entries[1].tensor.unwrap()).exists());
        let after = check(&store, false);
        assert!(after.is_clean() && after.dangling_actions.is_empty());
        assert_eq!((after.objects, after.actions), (2, 2));
    }
}
