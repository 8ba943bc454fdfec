//! Writing the output directory: each tensor's bytes come from its input (copied tensors) or
//! from the cache (computed ones, checked against their digest on the way), and a shard whose
//! bytes would not change is linked from the previous output, into a staging directory that
//! replaces the previous output in one step.
use std::collections::HashMap;
use std::path::PathBuf;

use super::engine::Engine;
use super::{output_error, write_error, ExecError, Resolution};
use crate::digest::FileDigest;
use crate::digest::NodeKey;
use crate::io::atomic::{StagedFile, StagingDir};
use crate::io::piece::Piece;
use crate::io::safetensors::SafetensorsFile;
use crate::io::writer::{self, Shard, ShardWriter};
use crate::plan::{Origin, TensorPlan};
use crate::store::VerifyingReader;
use modelforge_core::node::Node;

pub(crate) enum Outcome {
    /// The output, complete but not yet in place.
    Written(Staged),
    /// These tensors' cache objects were damaged and have been evicted; nothing was written.
    Corrupt(Vec<String>),
    /// The engine stopped before computing a tensor the output needs; nothing was written.
    EngineStopped,
}

/// Complete output directories, each still hidden beside its final place.
pub(crate) struct Staged {
    /// The output's files (final paths) and their digests.
    pub files: Vec<(PathBuf, FileDigest)>,
    /// How many shards were linked from the previous output rather than written.
    pub kept: usize,
    dirs: Vec<(PathBuf, StagingDir)>,
    /// Single files (the GGUF and its Modelfile), each renamed over its place.
    singles: Vec<StagedFile>,
}

impl Staged {
    fn extend(&mut self, other: Staged) {
        self.files.extend(other.files);
        self.kept += other.kept;
        self.dirs.extend(other.dirs);
        self.singles.extend(other.singles);
    }

    /// Swaps every output into place, then renames the lock file over the old one: the window
    /// in which a killed build leaves a new output beside an old lock is a few system calls.
    /// The previous outputs are removed when the returned value is dropped.
    pub fn commit(self, lock: Option<StagedFile>) -> Result<Vec<StagingDir>, ExecError> {
        let mut old = Vec::new();
        for (target, mut dir) in self.dirs {
            dir.commit().map_err(output_error(&target))?;
            old.push(dir);
        }
        for file in self.singles {
            let path = file.target().to_owned();
            file.commit().map_err(output_error(&path))?;
        }
        if let Some(lock) = lock {
            let path = lock.target().to_owned();
            lock.commit().map_err(output_error(&path))?;
        }
        for dir in &old {
            dir.sync_parent();
        }
        Ok(old)
    }
}

/// The input file and offset an uncomputed output tensor is copied from.
fn input_of<'a>(res: &'a Resolution, plan: &'a TensorPlan) -> (&'a SafetensorsFile, u64) {
    match &plan.origin {
        Origin::Base { tensor, meta } => {
            let (file, _) = res.plan.inputs.base.weights.get(tensor).expect("planned");
            (file, meta.start)
        }
        Origin::Replacement { adapter, meta, .. } => {
            let file = res.plan.inputs.adapters[*adapter]
                .tensor_file(&plan.out.name)
                .expect("planned");
            (file, meta.start)
        }
    }
}

/// Waits, if the engine is computing `key`, until its result is in the cache.
fn ready(engine: Option<&Engine>, res: &Resolution, key: &NodeKey) -> bool {
    match engine {
        Some(engine) if res.store.action(key).is_none() => engine.wait_for(key),
        _ => true,
    }
}

/// Waits until the engine has put in the cache every node the transfer report reads its
/// figures from (the maps, energies and overlaps of width adaptation and comparison): no
/// tensor waits for an overlap, so without this the report could be written without it.
fn figures_ready(engine: Option<&Engine>, res: &Resolution) {
    for keyed in res.graph.in_order() {
        if !matches!(
            keyed.node,
            Node::Copy { .. } | Node::Fuse(_) | Node::Refactor { .. }
        ) {
            // An engine that stopped without it fails the build when it is finished.
            ready(engine, res, &keyed.key);
        }
    }
}

/// Writes the outputs into staging directories, reading computed tensors from the cache as the
/// engine (when it runs) puts them there. The fused model is written as `shards` (from
/// [`Resolution::shards`]); those named in `kept` are linked from the previous output instead
/// (see [`super::record::kept_shards`]).
pub(crate) fn assemble(
    res: &Resolution,
    engine: Option<&Engine>,
    shards: &[Shard],
    kept: &HashMap<String, FileDigest>,
    progress: bool,
    sync: bool,
) -> Result<Outcome, ExecError> {
    let mut staged = Staged {
        files: Vec::new(),
        kept: 0,
        dirs: Vec::new(),
        singles: Vec::new(),
    };
    if let Some(model) = &res.recipe.output.path {
        match write_model(res, engine, &model.path, shards, kept, progress, sync)? {
            Outcome::Written(model) => staged.extend(model),
            stopped => return Ok(stopped),
        }
    }
    if let (Some(gguf), Some(layout)) = (&res.recipe.output.gguf, res.gguf.as_ref()) {
        match write_gguf(res, engine, layout, &gguf.path.path, sync)? {
            Outcome::Written(gguf) => staged.extend(gguf),
            stopped => return Ok(stopped),
        }
    }
    if let Some(adapter) = &res.recipe.output.adapter {
        // Without a fused model, the adapter carries the transfer report.
        let report = res.recipe.output.path.is_none();
        match write_adapter(res, engine, &adapter.path.path, report)? {
            Outcome::Written(adapter) => staged.extend(adapter),
            stopped => return Ok(stopped),
        }
    }
    staged.files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Outcome::Written(staged))
}

/// The fused model: weights from the inputs and the cache (or the previous output's unchanged
/// shards), config, card and manifest.
fn write_model(
    res: &Resolution,
    engine: Option<&Engine>,
    target: &std::path::Path,
    shards: &[Shard],
    kept: &HashMap<String, FileDigest>,
    progress: bool,
    sync: bool,
) -> Result<Outcome, ExecError> {
    let target = &target.to_path_buf();
    let staging = StagingDir::new(target).map_err(output_error(target))?;
    let plans = plans_by_name(res);
    let bar = super::progress_bar(res.plan.tensors.len(), "writing", progress);

    let mut written = Vec::new();
    let mut linked = 0;
    let mut corrupt = Vec::new();
    // How many more times each computed tensor is written: a result the engine handed over
    // is dropped after its last.
    let mut uses: HashMap<&NodeKey, usize> = HashMap::new();
    for shard in shards.iter().filter(|s| !kept.contains_key(&s.file_name)) {
        for tensor in &shard.tensors {
            if let (_, Some(key)) = plans[tensor.name.as_str()] {
                *uses.entry(key).or_default() += 1;
            }
        }
    }
    for shard in shards {
        let path = staging.path().join(&shard.file_name);
        // Where the shard goes, and where the previous output has it.
        let placed = target.join(&shard.file_name);
        if let Some(digest) = kept.get(&shard.file_name) {
            // A second name for the same inode: nothing is copied, and the previous output's
            // removal frees nothing of it. (Where the file system has no hard links, the shard
            // is written as any other.)
            if std::fs::hard_link(&placed, &path).is_ok() {
                if sync {
                    std::fs::File::open(&path)
                        .and_then(|file| file.sync_all())
                        .map_err(output_error(&path))?;
                }
                written.push((placed, *digest));
                linked += 1;
                bar.inc(shard.tensors.len() as u64);
                continue;
            }
        }
        let mut out = ShardWriter::create(&path, shard).map_err(output_error(&path))?;
        // The tensors the engine handed over, and where their bytes are in the shard.
        let mut handed = Vec::new();
        for tensor in &shard.tensors {
            let offset = out.begin(&tensor.name).map_err(output_error(&path))?;
            let (plan, key) = plans[tensor.name.as_str()];
            let handed_over = match (engine, key) {
                (Some(engine), Some(key)) => ready(Some(engine), res, key) && engine.handed(key),
                _ => false,
            };
            let streamed = stream(res, engine, plan, key, &mut |piece| {
                out.write(piece).map_err(write_error(&path))
            })?;
            match streamed {
                Streamed::Done => {
                    if let (Some(engine), Some(key), true) = (engine, key, handed_over) {
                        handed.push((*key, offset));
                        let left = uses.get_mut(key).map_or(0, |n| {
                            *n -= 1;
                            *n
                        });
                        if left == 0 {
                            engine.consume(key);
                        }
                    }
                }
                Streamed::EngineStopped => return Ok(Outcome::EngineStopped),
                Streamed::Corrupt => {
                    corrupt.push(tensor.name.clone());
                    break;
                }
            }
            bar.inc(1);
        }
        if !corrupt.is_empty() {
            // The staging directory is dropped, and with it everything written so far.
            return Ok(Outcome::Corrupt(corrupt));
        }
        let digest = FileDigest::new(out.finish(sync).map_err(output_error(&path))?);
        if let (Some(engine), false) = (engine, handed.is_empty()) {
            // The shard is the cache object of the tensors handed over. Where it cannot be
            // linked into the cache, the engine makes them objects of their own when it ends.
            if res.store.adopt(&path, &digest).is_ok() {
                engine
                    .settle(digest, &handed)
                    .map_err(|source| ExecError::Cache {
                        path: res.store.root().to_owned(),
                        source,
                    })?;
            }
        }
        written.push((placed, digest));
    }
    bar.finish_and_clear();

    if shards.len() > 1 {
        let path = staging.path().join(crate::io::hf::INDEX);
        let index =
            serde_json::to_vec_pretty(&writer::index_json(shards)).expect("an index serialises");
        std::fs::write(&path, &index).map_err(output_error(&path))?;
        written.push((target.join(crate::io::hf::INDEX), FileDigest::of(&index)));
    }
    figures_ready(engine, res);
    let shard_files: Vec<PathBuf> = shards
        .iter()
        .map(|shard| staging.path().join(&shard.file_name))
        .collect();
    super::effect::measure(
        res,
        &shard_files.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    )?;
    for (name, bytes) in crate::output::files(&res.surroundings()).map_err(output_error(target))? {
        let path = staging.path().join(&name);
        std::fs::write(&path, &bytes).map_err(output_error(&path))?;
        written.push((target.join(&name), FileDigest::of(&bytes)));
    }
    Ok(Outcome::Written(Staged {
        files: written,
        kept: linked,
        dirs: vec![(target.clone(), staging)],
        singles: Vec::new(),
    }))
}

/// Each output tensor's plan and, when it is computed, its node, by name.
fn plans_by_name(res: &Resolution) -> HashMap<&str, (&TensorPlan, Option<&NodeKey>)> {
    res.plan
        .tensors
        .iter()
        .map(|t| {
            let key = res.graph.fused(&t.out.name).map(|keyed| &keyed.key);
            (t.out.name.as_str(), (t, key))
        })
        .collect()
}

/// How streaming a tensor ended.
enum Streamed {
    Done,
    /// Its cache object was damaged (and has been evicted).
    Corrupt,
    EngineStopped,
}

/// Streams the bytes of the output tensor `plan` into `sink`: from its input, or from its
/// cache object (`key`) once the engine has put it there, checked as it is read. What needs no
/// check as it is read (an input, what this build's engine wrote) goes to `sink` as a range of
/// its file, for the writer to read straight into its buffers.
fn stream(
    res: &Resolution,
    engine: Option<&Engine>,
    plan: &TensorPlan,
    key: Option<&NodeKey>,
    sink: &mut dyn FnMut(Piece<'_>) -> Result<(), ExecError>,
) -> Result<Streamed, ExecError> {
    let len = plan.out.len();
    let key = match key {
        None => {
            let (file, start) = input_of(res, plan);
            sink(file.piece(start, len))?;
            return Ok(Streamed::Done);
        }
        Some(key) => key,
    };
    if !ready(engine, res, key) {
        return Ok(Streamed::EngineStopped);
    }
    if let Some((entry, path, reader)) = engine.and_then(|e| e.open_handed(key)) {
        // Handed over by the engine, hashed as it was written: only its length is checked.
        let reader = reader.filter(|_| entry.len == len);
        let Some(mut reader) = reader else {
            return Ok(Streamed::Corrupt);
        };
        let Some((file, offset)) = reader.unchecked(len) else {
            return Ok(Streamed::Corrupt);
        };
        sink(Piece::File {
            file,
            path: &path,
            offset,
            len,
        })?;
        return Ok(if reader.check() {
            Streamed::Done
        } else {
            Streamed::Corrupt
        });
    }
    let entry = res.store.action(key);
    // What the engine computed in this build was hashed as it was written; what earlier builds
    // left is checked as it is read.
    let fresh = engine.is_some_and(|e| e.computed(key));
    let open = match fresh {
        true => VerifyingReader::open_fresh,
        false => VerifyingReader::open,
    };
    let reader = entry.and_then(|e| open(&res.store, &e).map(|r| (e, r)));
    let Some((entry, mut reader)) = reader.filter(|(e, _)| e.len == len) else {
        return Ok(Streamed::Corrupt);
    };
    if let Some((file, offset)) = reader.unchecked(len) {
        let path = res.store.object_of(&entry).map(|(path, _)| path);
        sink(Piece::File {
            file,
            path: path.as_deref().unwrap_or(res.store.root()),
            offset,
            len,
        })?;
    } else {
        for window in reader.windows(len) {
            let Ok(window) = window else {
                res.store.evict(&entry);
                return Ok(Streamed::Corrupt);
            };
            sink(Piece::Bytes(&window))?;
        }
    }
    if !reader.check() {
        res.store.evict(&entry);
        return Ok(Streamed::Corrupt);
    }
    res.store.touch(&entry);
    Ok(Streamed::Done)
}

/// `[output] gguf`: the fused model as one GGUF file, converted tensor by tensor as
/// `layout` says, and Ollama's Modelfile beside it; both staged beside their places.
fn write_gguf(
    res: &Resolution,
    engine: Option<&Engine>,
    layout: &crate::output::gguf::Layout,
    target: &std::path::Path,
    sync: bool,
) -> Result<Outcome, ExecError> {
    use std::io::Write;
    let plans = plans_by_name(res);
    let (staged, file) = StagedFile::create(target).map_err(output_error(target))?;
    let mut hasher = blake3::Hasher::new();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut put = |bytes: &[u8]| -> Result<(), ExecError> {
        hasher.update(bytes);
        out.write_all(bytes).map_err(output_error(target))
    };
    put(&layout.header)?;
    let mut corrupt = Vec::new();
    for tensor in &layout.tensors {
        let (plan, key) = plans[tensor.source.as_str()];
        let block = tensor.block_rows() * tensor.row_bytes();
        let mut pending = Vec::with_capacity(block);
        let mut converted = Vec::new();
        let streamed = stream(res, engine, plan, key, &mut |piece| {
            piece.each(write_error(target), |mut window| {
                while !window.is_empty() {
                    let take = (block - pending.len()).min(window.len());
                    pending.extend_from_slice(&window[..take]);
                    window = &window[take..];
                    if pending.len() == block {
                        converted.clear();
                        tensor.convert(&pending, &mut converted);
                        put(&converted)?;
                        pending.clear();
                    }
                }
                Ok(())
            })
        })?;
        match streamed {
            Streamed::Done => {}
            Streamed::EngineStopped => return Ok(Outcome::EngineStopped),
            Streamed::Corrupt => {
                corrupt.push(tensor.source.clone());
                break;
            }
        }
        converted.clear();
        tensor.convert(&pending, &mut converted);
        put(&converted)?;
        put(&vec![0u8; layout.padding(tensor)])?;
    }
    if !corrupt.is_empty() {
        return Ok(Outcome::Corrupt(corrupt));
    }
    let file = out
        .into_inner()
        .map_err(|e| output_error(target)(e.into_error()))?;
    if sync {
        file.sync_all().map_err(output_error(target))?;
    }
    drop(file);
    let digest = FileDigest::new(hasher.finalize());
    let modelfile = modelfile_path(target);
    let staged_modelfile = StagedFile::new(&modelfile, layout.modelfile.as_bytes(), sync)
        .map_err(output_error(&modelfile))?;
    Ok(Outcome::Written(Staged {
        files: vec![
            (target.to_owned(), digest),
            (modelfile, FileDigest::of(layout.modelfile.as_bytes())),
        ],
        kept: 0,
        dirs: Vec::new(),
        singles: vec![staged, staged_modelfile],
    }))
}

/// Ollama's Modelfile for the GGUF `target`: `NAME.Modelfile` beside `NAME.gguf`.
pub(crate) fn modelfile_path(target: &std::path::Path) -> PathBuf {
    let stem = target
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    target.with_file_name(format!("{stem}.Modelfile"))
}

/// `[output] adapter`: the re-factored deltas as one PEFT adapter, with `refactor.json`
/// reporting each module's rank and the fraction of its delta's energy kept.
fn write_adapter(
    res: &Resolution,
    engine: Option<&Engine>,
    target: &std::path::Path,
    with_transfer_report: bool,
) -> Result<Outcome, ExecError> {
    use crate::io::peft::write::{self as peft, Factors};
    use serde_json::{json, Map};

    let staging = StagingDir::new(target).map_err(output_error(target))?;
    let mut modules = Vec::new();
    let mut objects = Vec::new();
    let mut report = Map::new();
    let mut fan_in_fan_out = false;
    let mut left_out = Vec::new();
    for tensor in &res.plan.tensors {
        let Some((crate::plan::Keyed { key, .. }, refactor)) = res.graph.refactor(&tensor.out.name)
        else {
            if !tensor.deltas.is_empty() {
                left_out.push(tensor.out.name.clone());
            }
            continue;
        };
        if !ready(engine, res, key) {
            return Ok(Outcome::EngineStopped);
        }
        let Some(entry) = res.store.action(key) else {
            return Ok(Outcome::Corrupt(vec![tensor.out.name.clone()]));
        };
        // The factored matrix is the delta, or its transpose: (p × q) = B (p × k) · A (k × q).
        let (rows, cols) = (tensor.out.shape[0], tensor.out.shape[1]);
        let (p, q) = if refactor.transpose {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let name = &tensor.out.name;
        let factors = Factors {
            module: name.strip_suffix(".weight").unwrap_or(name).to_owned(),
            // As the refactor node transposed it: an input embedding is an embedding LoRA.
            embedding: crate::plan::difference_kind(name) == crate::io::peft::LoraKind::Embedding
                || tensor.deltas.iter().any(|d| {
                    matches!(
                        &d.kind,
                        crate::plan::DeltaKind::LowRank {
                            kind: crate::io::peft::LoraKind::Embedding,
                            ..
                        }
                    )
                }),
            rank: (entry.len as usize / 4) / (p + q),
            p,
            q,
        };
        fan_in_fan_out |= refactor.transpose && !factors.embedding;
        report.insert(
            factors.module.clone(),
            json!({ "rank": factors.rank, "energy": entry.energy }),
        );
        objects.push((factors.clone(), entry, name.clone()));
        modules.push(factors);
    }
    let mut tensors: Vec<writer::OutTensor> = modules.iter().flat_map(Factors::tensors).collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let shard = writer::Shard {
        file_name: "adapter_model.safetensors".into(),
        tensors,
    };
    // Both factors of a module come from one object: A's bytes, then B's.
    let mut bytes_of: HashMap<String, Vec<u8>> = HashMap::new();
    for (factors, entry, tensor) in &objects {
        let Some(mut reader) = VerifyingReader::open(&res.store, entry) else {
            return Ok(Outcome::Corrupt(vec![tensor.clone()]));
        };
        let mut all = vec![0u8; entry.len as usize];
        if reader.read_exact(&mut all).is_err() || !reader.check() {
            res.store.evict(entry);
            return Ok(Outcome::Corrupt(vec![tensor.clone()]));
        }
        let [a, _] = factors.tensors();
        let b = all.split_off(a.len() as usize);
        let (a_name, b_name) = factors.names();
        bytes_of.insert(a_name, all);
        bytes_of.insert(b_name, b);
    }
    let weights_path = staging.path().join(&shard.file_name);
    let mut out =
        ShardWriter::create(&weights_path, &shard).map_err(output_error(&weights_path))?;
    for tensor in &shard.tensors {
        out.begin(&tensor.name)
            .map_err(output_error(&weights_path))?;
        out.write(Piece::Bytes(&bytes_of[&tensor.name]))
            .map_err(output_error(&weights_path))?;
    }
    let mut written = vec![(
        target.join(&shard.file_name),
        FileDigest::new(out.finish(false).map_err(output_error(&weights_path))?),
    )];

    let config = peft::config(&res.recipe.base.written, &modules, fan_in_fan_out);
    // What changed in the fused model but has no LoRA form (bias vectors, norms, replaced
    // tensors) is named, not silently dropped.
    let report = json!({ "modules": report, "not_in_adapter": left_out });
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, value) in [("adapter_config.json", config), ("refactor.json", report)] {
        let mut bytes = serde_json::to_vec_pretty(&value).expect("JSON serialises");
        bytes.push(b'\n');
        files.push((name.into(), bytes));
    }
    if with_transfer_report {
        figures_ready(engine, res);
        files.extend(
            crate::output::transfer_files(&res.fates(), &res.effects())
                .map_err(output_error(target))?,
        );
    }
    for (name, bytes) in files {
        let path = staging.path().join(&name);
        std::fs::write(&path, &bytes).map_err(output_error(&path))?;
        written.push((target.join(&name), FileDigest::of(&bytes)));
    }
    Ok(Outcome::Written(Staged {
        files: written,
        kept: 0,
        dirs: vec![(target.to_owned(), staging)],
        singles: Vec::new(),
    }))
}
