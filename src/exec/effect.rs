//! The effect an adapter keeps on its `examples`: once the built model's shards are written,
//! four forward passes by the engine score the texts on the source base without and with the
//! adapter, and on the base and the built model (see [`crate::plan::Effect`]). The first three
//! read only inputs, and are cached under the key of what they read: a build that changes
//! another adapter runs only the built model's.
use std::path::Path;

use modelforge_core::job::{ScoreJob, TensorPlace};

use super::{ExecError, Resolution};
use crate::io::safetensors::SafetensorsFile;
use crate::plan::Effect;

/// The forward pass's version, in the cache keys of its results: changed with any change of
/// what the engine's `score` computes, so that no earlier result is reused.
const SCORE_PASS: &str = "modelforge score pass 2";

/// The effects the primary output's `transfer.json` records, for a build that finds it up to
/// date (its files are the lock's, so the report is this recipe's).
pub(crate) fn recorded(res: &Resolution) {
    if res.plan.examples.is_empty() {
        return;
    }
    let Some(output) = &res.recipe.output.path else {
        return;
    };
    let Ok(bytes) = std::fs::read(output.path.join("transfer.json")) else {
        return;
    };
    #[derive(serde::Deserialize)]
    struct Adapter {
        adapter: String,
        effect: Option<Effect>,
    }
    #[derive(serde::Deserialize)]
    struct Report {
        adapters: Vec<Adapter>,
    }
    if let Ok(report) = serde_json::from_slice::<Report>(&bytes) {
        let mut effects = res.effects.lock().unwrap_or_else(|e| e.into_inner());
        for adapter in report.adapters {
            if let Some(effect) = adapter.effect {
                effects.insert(adapter.adapter, effect);
            }
        }
    }
}

/// Scores every adapter's examples against the built model, whose shards are the files
/// `shards` (complete, in the staging directory), and records the effects in `res`.
pub(crate) fn measure(res: &Resolution, shards: &[&Path]) -> Result<(), ExecError> {
    if res.plan.examples.is_empty() {
        return Ok(());
    }
    let mut built: Vec<TensorPlace> = Vec::new();
    for path in shards {
        let file = SafetensorsFile::open(path).map_err(|e| ExecError::Engine {
            message: e.to_string(),
            help: "the shard was just written; check the disk".into(),
        })?;
        built.extend(file.tensors.iter().map(|(name, meta)| TensorPlace {
            name: name.clone(),
            path: file.path.clone(),
            dtype: meta.dtype,
            shape: meta.shape.clone(),
            start: meta.start,
            len: meta.len,
        }));
    }
    let names: std::collections::HashSet<&str> = built.iter().map(|t| t.name.as_str()).collect();
    let base = &res.plan.inputs.base;
    for examples in &res.plan.examples {
        let has = |name: &str| names.contains(name);
        // Checked on the base when planning; the built model has the base's config.json.
        let Ok(decoder) = crate::arch::decoder(&base.config, has) else {
            eprintln!(
                "warning: the built model's forward pass cannot be described; the examples of `{}` are not scored",
                examples.adapter
            );
            continue;
        };
        let job = |decoder: &modelforge_core::job::Decoder,
                   tensors: Vec<TensorPlace>,
                   adapted: bool,
                   texts: &[Vec<i64>]| {
            let (deltas, replacements) = match adapted {
                true => (examples.deltas.clone(), examples.replacements.clone()),
                false => (Vec::new(), Vec::new()),
            };
            ScoreJob {
                device: res.device,
                decoder: decoder.clone(),
                tensors,
                deltas,
                replacements,
                texts: texts.to_vec(),
            }
        };
        let source = examples.source.weights.places();
        let (s, t) = (&examples.source_ids, &examples.target_ids);
        let scored = (|| -> Result<_, ExecError> {
            Ok((
                cached(
                    res,
                    &job(&examples.source_decoder, source.clone(), false, s),
                )?,
                cached(res, &job(&examples.source_decoder, source, true, s))?,
                cached(res, &job(&decoder, base.weights.places(), false, t))?,
                texts_logprob(&super::score(&job(&decoder, built.clone(), false, t))?),
            ))
        })();
        // The model is built whatever becomes of its examples: a pass the engine cannot run
        // costs the figure, not the build.
        let (source_without, source_with, target_without, target_with) = match scored {
            Ok(scores) => scores,
            Err(e) => {
                eprintln!(
                    "warning: the examples of `{}` could not be scored ({e}); the report's verdict comes from the weights alone",
                    examples.adapter
                );
                continue;
            }
        };
        if let Some(effect) = Effect::of(
            (&source_without, &source_with),
            (&target_without, &target_with),
        ) {
            res.effects
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(examples.adapter.clone(), effect);
        }
    }
    Ok(())
}

/// Each text's log-likelihood.
fn texts_logprob(scores: &modelforge_core::job::Scores) -> Vec<f64> {
    scores
        .logprobs
        .iter()
        .map(|lp| lp.iter().fold(0.0, |sum, x| sum + x))
        .collect()
}

/// `job`'s texts' log-likelihoods, from the cache when a build scored the same texts on the
/// same bytes before. Its key is the job itself with each file named by its digest instead of
/// its path; caching is all this is, and a result that cannot be stored or read is computed.
fn cached(res: &Resolution, job: &ScoreJob) -> Result<Vec<f64>, ExecError> {
    let key = key(res, job);
    if let Some(entry) = key.and_then(|key| res.store.action(&key)) {
        if let Some(mut reader) = modelforge_core::store::VerifyingReader::open(&res.store, &entry)
        {
            let mut bytes = vec![0u8; entry.len as usize];
            if reader.read_exact(&mut bytes).is_ok() && reader.check() {
                if let Ok(found) = serde_json::from_slice::<Vec<f64>>(&bytes) {
                    if found.len() == job.texts.len() {
                        return Ok(found);
                    }
                }
            }
            res.store.evict(&entry);
        }
    }
    let computed = texts_logprob(&super::score(job)?);
    if let Some(key) = key {
        let bytes = serde_json::to_vec(&computed).expect("numbers serialise");
        let _ = res
            .store
            .object_writer()
            .and_then(|mut out| out.write(&bytes).map(|()| out))
            .and_then(|out| out.finish(false))
            .and_then(|entry| res.store.put_action(&key, &entry));
    }
    Ok(computed)
}

/// What `job` computes, named by content: the job with each file's path replaced by the
/// file's digest; `None` if a file cannot be digested.
fn key(res: &Resolution, job: &ScoreJob) -> Option<modelforge_core::digest::NodeKey> {
    let mut named = serde_json::to_value(job).ok()?;
    let mut digests = std::collections::HashMap::new();
    let mut rename = |place: &mut serde_json::Value| -> Option<()> {
        let path = place.get("path")?.as_str()?.to_owned();
        let digest = match digests.get(&path) {
            Some(d) => *d,
            None => {
                let d = res.store.file_digest(Path::new(&path), false).ok()?;
                digests.insert(path, d);
                d
            }
        };
        place["path"] = serde_json::Value::String(digest.hex());
        Some(())
    };
    for list in ["tensors", "replacements"] {
        for place in named[list].as_array_mut()? {
            rename(place)?;
        }
    }
    for delta in named["deltas"].as_array_mut()? {
        rename(&mut delta["a"])?;
        rename(&mut delta["b"])?;
    }
    // Results differ in their last bits between CPU and GPU, not between GPUs.
    named["device"] = serde_json::to_value(job.device.class()).ok()?;
    Some(modelforge_core::digest::NodeKey::of_value(&(
        SCORE_PASS, named,
    )))
}
