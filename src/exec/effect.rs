//! The effect an adapter keeps on its `examples`: once the built model's shards are written,
//! four forward passes by the engine score the texts on the source base without and with the
//! adapter, and on the base and the built model (see [`crate::plan::Effect`]).
use std::path::Path;

use modelforge_core::job::{ScoreJob, TensorPlace};

use super::{ExecError, Resolution};
use crate::io::safetensors::SafetensorsFile;
use crate::plan::Effect;

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
        // Checked when planning, on the base; the built model has the base's config.
        let decoder = crate::arch::decoder(&base.config, has).map_err(|_| ExecError::Engine {
            message: "the built model's forward pass cannot be described".into(),
            help: "this is a bug: the base's was checked when planning".into(),
        })?;
        let run = |decoder: &modelforge_core::job::Decoder,
                   tensors: Vec<TensorPlace>,
                   adapted: bool,
                   texts: &[Vec<i64>]| {
            let (deltas, replacements) = match adapted {
                true => (examples.deltas.clone(), examples.replacements.clone()),
                false => (Vec::new(), Vec::new()),
            };
            super::score(&ScoreJob {
                device: res.device,
                decoder: decoder.clone(),
                tensors,
                deltas,
                replacements,
                texts: texts.to_vec(),
            })
            .map(|s| {
                s.logprobs
                    .iter()
                    .map(|lp| lp.iter().sum())
                    .collect::<Vec<f64>>()
            })
        };
        let source = examples.source.weights.places();
        let (s, t) = (&examples.source_ids, &examples.target_ids);
        let source_without = run(&examples.source_decoder, source.clone(), false, s)?;
        let source_with = run(&examples.source_decoder, source, true, s)?;
        let target_without = run(&decoder, base.weights.places(), false, t)?;
        let target_with = run(&decoder, built.clone(), false, t)?;
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
