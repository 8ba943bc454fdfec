//! Writing the output directory: each tensor's bytes come from its input (copied tensors) or
//! from the cache (computed ones, checked against their digest on the way), into a staging
//! directory that replaces the previous output in one step.
use std::collections::HashMap;
use std::path::PathBuf;

use super::{output_error, ExecError, Resolution};
use crate::digest::FileDigest;
use crate::io::atomic::StagingDir;
use crate::io::writer::{self, ShardWriter};
use crate::plan::{Origin, TensorPlan};
use crate::store::VerifyingReader;

/// Bytes moved per read.
const CHUNK: usize = 8 << 20;

pub(crate) enum Outcome {
    /// The output's files (final paths) and their digests.
    Written(Vec<(PathBuf, FileDigest)>),
    /// These tensors' cache objects were damaged and have been evicted; nothing was written.
    Corrupt(Vec<String>),
}

pub(crate) fn assemble(res: &Resolution, progress: bool, sync: bool) -> Result<Outcome, ExecError> {
    let target = &res.recipe.output.path.path;
    let staging = StagingDir::new(target).map_err(output_error(target))?;
    let shards = res.shards();
    let plans: HashMap<&str, (&TensorPlan, Option<&crate::digest::NodeKey>)> = res
        .plan
        .tensors
        .iter()
        .zip(&res.keys.tensors)
        .map(|(t, k)| (t.out.name.as_str(), (t, k.as_ref().map(|(node, _)| node))))
        .collect();
    let bar = super::progress_bar(res.plan.tensors.len(), "writing", progress);

    let mut written = Vec::new();
    let mut corrupt = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    for shard in &shards {
        let path = staging.path().join(&shard.file_name);
        let mut out = ShardWriter::create(&path, shard).map_err(output_error(&path))?;
        for tensor in &shard.tensors {
            let (plan, key) = plans[tensor.name.as_str()];
            out.begin(&tensor.name).map_err(output_error(&path))?;
            let len = tensor.len();
            match key {
                None => {
                    let (file, meta) = match &plan.origin {
                        Origin::Base(meta) => (
                            res.plan
                                .inputs
                                .base
                                .weights
                                .get(&tensor.name)
                                .map(|(f, _)| f)
                                .expect("planned"),
                            meta,
                        ),
                        Origin::Replacement { adapter, meta } => {
                            (&res.plan.inputs.adapters[*adapter].file, meta)
                        }
                    };
                    let mut offset = 0;
                    while offset < len {
                        let n = CHUNK.min((len - offset) as usize);
                        file.read_into(meta.start + offset, &mut buf[..n])?;
                        out.write(&buf[..n]).map_err(output_error(&path))?;
                        offset += n as u64;
                    }
                }
                Some(key) => {
                    let entry = res.store.action(key);
                    let reader = entry
                        .and_then(|e| VerifyingReader::open(&res.store, &e.tensor).map(|r| (e, r)));
                    let Some((entry, mut reader)) = reader.filter(|(e, _)| e.len == len) else {
                        corrupt.push(tensor.name.clone());
                        break;
                    };
                    let mut offset = 0;
                    let mut ok = true;
                    while offset < len {
                        let n = CHUNK.min((len - offset) as usize);
                        if reader.read_exact(&mut buf[..n]).is_err() {
                            ok = false;
                            break;
                        }
                        out.write(&buf[..n]).map_err(output_error(&path))?;
                        offset += n as u64;
                    }
                    if !(ok && reader.check()) {
                        res.store.evict(&entry.tensor);
                        corrupt.push(tensor.name.clone());
                        break;
                    }
                    res.store.touch(&entry.tensor);
                }
            }
            bar.inc(1);
        }
        if !corrupt.is_empty() {
            // The staging directory is dropped, and with it everything written so far.
            return Ok(Outcome::Corrupt(corrupt));
        }
        let file = out.finish(sync).map_err(output_error(&path))?;
        written.push((target.join(&shard.file_name), FileDigest::new(file)));
    }
    bar.finish_and_clear();

    if shards.len() > 1 {
        let path = staging.path().join(crate::io::hf::INDEX);
        let index =
            serde_json::to_vec_pretty(&writer::index_json(&shards)).expect("an index serialises");
        std::fs::write(&path, &index).map_err(output_error(&path))?;
        written.push((target.join(crate::io::hf::INDEX), FileDigest::of(&index)));
    }
    for (name, bytes) in crate::output::files(res).map_err(output_error(target))? {
        let path = staging.path().join(&name);
        std::fs::write(&path, &bytes).map_err(output_error(&path))?;
        written.push((target.join(&name), FileDigest::of(&bytes)));
    }
    staging.commit().map_err(output_error(target))?;
    written.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Outcome::Written(written))
}
