//! Writing a PEFT LoRA adapter (`[output] adapter`): the names and shapes of each module's
//! factors, and the `adapter_config.json` that makes PEFT read every module's B·A as its delta.
use std::collections::BTreeMap;

use safetensors::Dtype;
use serde_json::{json, Map, Value};

use crate::io::writer::OutTensor;

/// One module's factors: B (p × rank) · A (rank × q) is its delta, or the delta's transpose
/// for an embedding or a Conv1D.
#[derive(Clone, Debug)]
pub(crate) struct Factors {
    /// The module's path in the base model (the tensor's name without `.weight`).
    pub module: String,
    /// Written as PEFT's embedding LoRA (`lora_embedding_A`/`_B`).
    pub embedding: bool,
    pub rank: usize,
    pub p: usize,
    pub q: usize,
}

impl Factors {
    /// The names PEFT saves A and B under.
    pub fn names(&self) -> (String, String) {
        let module = &self.module;
        if self.embedding {
            (
                format!("base_model.model.{module}.lora_embedding_A"),
                format!("base_model.model.{module}.lora_embedding_B"),
            )
        } else {
            (
                format!("base_model.model.{module}.lora_A.weight"),
                format!("base_model.model.{module}.lora_B.weight"),
            )
        }
    }

    /// A (rank × q) and B (p × rank), in f32.
    pub fn tensors(&self) -> [OutTensor; 2] {
        let (a, b) = self.names();
        [
            OutTensor {
                name: a,
                dtype: Dtype::F32,
                shape: vec![self.rank, self.q],
            },
            OutTensor {
                name: b,
                dtype: Dtype::F32,
                shape: vec![self.p, self.rank],
            },
        ]
    }
}

/// `adapter_config.json` for these modules of the base at `base`: one rank for most modules,
/// the others in `rank_pattern`, with alpha = rank everywhere so that every module's scaling is
/// 1 and B·A is the delta itself. `fan_in_fan_out`: the linear modules are Conv1D's.
pub(crate) fn config(base: &str, modules: &[Factors], fan_in_fan_out: bool) -> Value {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for m in modules {
        *counts.entry(m.rank).or_default() += 1;
    }
    let r = counts
        .iter()
        .max_by_key(|(rank, n)| (**n, std::cmp::Reverse(**rank)))
        .map(|(rank, _)| *rank)
        .unwrap_or(1);
    let mut rank_pattern = Map::new();
    for m in modules {
        if m.rank != r {
            rank_pattern.insert(regex::escape(&m.module), Value::from(m.rank));
        }
    }
    let mut targets: Vec<String> = modules
        .iter()
        .map(|m| m.module.rsplit('.').next().unwrap_or(&m.module).to_owned())
        .collect();
    targets.sort();
    targets.dedup();
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": rank_pattern.clone(),
        "alpha_pattern": rank_pattern,
        "target_modules": targets,
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": false,
        "use_dora": false,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": true,
    })
}
