//! What a job's nodes read: input tensors, found through the job's table of places and read
//! from files opened once each, and the results of other nodes, read back from the cache and
//! checked against their digests.
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use modelforge_core::digest::NodeKey;
use modelforge_core::job::Place;
use modelforge_core::node::{Content, Input};
use modelforge_core::store::{Store, VerifyingReader};

use crate::error::{shape, EngineError};

/// Where a tensor's bytes are.
#[derive(Clone, Debug)]
pub(crate) struct Slice {
    pub path: PathBuf,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub start: u64,
    pub len: u64,
}

/// The job's inputs: where each is, and the files, opened once each.
pub struct Inputs {
    places: HashMap<(Content, String), Place>,
    files: HashMap<PathBuf, std::sync::Arc<File>>,
}

impl Inputs {
    pub fn new(places: &[Place]) -> Inputs {
        Inputs {
            places: places
                .iter()
                .map(|p| ((p.content.clone(), p.tensor.clone()), p.clone()))
                .collect(),
            files: HashMap::new(),
        }
    }

    /// Where `input`'s bytes are.
    pub(crate) fn slice(&self, input: &Input) -> Result<Slice, EngineError> {
        let place = self
            .places
            .get(&(input.content.clone(), input.tensor.clone()))
            .ok_or_else(|| shape!("the job does not say where `{}` is", input.tensor))?;
        Ok(Slice {
            path: place.path.clone(),
            dtype: input.dtype,
            shape: input.shape.clone(),
            start: place.start,
            len: place.len,
        })
    }

    /// The open file at `path`, shared with the threads that read a tensor's blocks from it.
    pub(crate) fn file(&mut self, path: &PathBuf) -> std::io::Result<std::sync::Arc<File>> {
        if !self.files.contains_key(path) {
            let file = File::open(path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            self.files.insert(path.clone(), std::sync::Arc::new(file));
        }
        Ok(self.files[path].clone())
    }

    pub(crate) fn read(&mut self, input: &Input) -> Result<Vec<u8>, EngineError> {
        let slice = self.slice(input)?;
        let mut bytes = vec![0u8; slice.len as usize];
        self.file(&slice.path)?
            .read_exact_at(&mut bytes, slice.start)?;
        Ok(bytes)
    }
}

/// The bytes of the object node `key` wrote, checked against its digest; a damaged one is
/// evicted.
pub fn node_bytes(store: &Store, key: &NodeKey) -> Result<Vec<u8>, EngineError> {
    let missing = || EngineError::Missing {
        node: *key,
        damaged: false,
    };
    let entry = store.action(key).ok_or_else(missing)?;
    let mut reader = VerifyingReader::open(store, &entry).ok_or_else(missing)?;
    let mut bytes = vec![0u8; entry.len as usize];
    reader.read_exact(&mut bytes)?;
    if !reader.check() {
        store.evict(&entry);
        return Err(EngineError::Missing {
            node: *key,
            damaged: true,
        });
    }
    Ok(bytes)
}
