//! The record of an output's last build, kept in the cache: the key of each computed tensor, to
//! explain what a new build recomputes and why, and the key and digest of each shard, so that a
//! shard whose tensors all come from the same sources as last time is hard-linked from the
//! previous output instead of being written again.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Resolution;
use crate::digest::{FileDigest, NodeKey};
use crate::io::writer::Shard;
use crate::store::Store;
use modelforge_core::node::Node;

/// Bumped whenever the writer would make other bytes of the same tensors.
const SHARD_VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct BuildRecord {
    /// The nodes of computed tensors, by the tensors' names.
    #[serde(default)]
    pub tensors: BTreeMap<String, Node>,
    /// The fused model's shards by file name.
    #[serde(default)]
    pub shards: BTreeMap<String, ShardRecord>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ShardRecord {
    /// What the shard's bytes depend on (see [`shard_keys`]).
    pub key: NodeKey,
    /// The digest of the file that was written.
    pub digest: FileDigest,
}

impl BuildRecord {
    /// What this build made: the keys of its computed tensors, and the key and digest of each
    /// shard of its fused model (`files`: the output files written, by final path).
    pub fn new(
        res: &Resolution,
        shards: &[Shard],
        keys: &[NodeKey],
        files: &[(PathBuf, FileDigest)],
    ) -> BuildRecord {
        let tensors = res
            .plan
            .tensors
            .iter()
            .filter_map(|t| res.graph.fused(&t.out.name))
            .map(|keyed| (keyed.name.clone(), keyed.node.clone()))
            .collect();
        let digests: HashMap<&Path, FileDigest> =
            files.iter().map(|(path, d)| (path.as_path(), *d)).collect();
        let shards = match &res.recipe.output.path {
            Some(model) => shards
                .iter()
                .zip(keys)
                .filter_map(|(shard, &key)| {
                    let digest = *digests.get(model.path.join(&shard.file_name).as_path())?;
                    Some((shard.file_name.clone(), ShardRecord { key, digest }))
                })
                .collect(),
            None => BTreeMap::new(),
        };
        BuildRecord { tensors, shards }
    }

    /// The record of the last build of `output`; empty when there is none, or when it is
    /// unreadable (a record is only ever a shortcut).
    pub fn read(store: &Store, output: &Path) -> BuildRecord {
        store
            .build_record(output)
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    pub fn write(&self, store: &Store, output: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        store.put_build_record(output, &bytes)
    }
}

/// Each shard's key: the writer's format and, for each tensor in order, its name, dtype, shape
/// and what its bytes depend on. Two shards with the same key have the same bytes.
pub(crate) fn shard_keys(res: &Resolution, shards: &[Shard]) -> Vec<NodeKey> {
    shards
        .iter()
        .map(|shard| {
            let tensors: Vec<_> = shard
                .tensors
                .iter()
                .map(|t| {
                    let bytes = res.graph.tensor(&t.name).key;
                    json!([t.name, t.dtype.to_string(), t.shape, bytes])
                })
                .collect();
            NodeKey::of_value(&json!({
                "op": "shard",
                "version": SHARD_VERSION,
                "tensors": tensors,
            }))
        })
        .collect()
}

/// The shards of the previous fused model that the new one can take as they are, with their
/// digests: those whose key is unchanged and whose file still has the digest it was written
/// with (trusted from the stat cache while the file's inode, size and modification time are
/// unchanged, rehashed otherwise or with `rehash`).
pub(crate) fn kept_shards(
    res: &Resolution,
    shards: &[Shard],
    keys: &[NodeKey],
    rehash: bool,
) -> HashMap<String, FileDigest> {
    let Some(model) = &res.recipe.output.path else {
        return HashMap::new();
    };
    let last = BuildRecord::read(&res.store, &res.recipe.primary_output().path);
    shards
        .iter()
        .zip(keys)
        .filter_map(|(shard, key)| {
            let old = last
                .shards
                .get(&shard.file_name)
                .filter(|r| r.key == *key)?;
            let on_disk = res
                .store
                .file_digest(&model.path.join(&shard.file_name), rehash)
                .ok()?;
            (on_disk == old.digest).then(|| (shard.file_name.clone(), old.digest))
        })
        .collect()
}
