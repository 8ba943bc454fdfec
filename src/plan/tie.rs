//! Tied embeddings: models whose output head shares the input embedding's tensor (Llama-3.2,
//! Qwen2.5, Gemma, GPT-2). A LoRA on either side changes the one shared tensor, as PEFT's merge
//! does; a full replacement of one side (`modules_to_save`) makes them two tensors, written
//! apart with `tie_word_embeddings = false`. A checkpoint may hold a stale copy of the tied
//! head: it is fused like its twin or left out, never copied beside a changed embedding.
use std::collections::BTreeMap;

use serde_json::Value;

use super::{Delta, DeltaKind, Origin, TensorPlan};
use crate::io::hf::HfModel;
use crate::io::writer::OutTensor;

/// (input embedding, output head) tensor names, by family: LLaMA and the families sharing its
/// names (Mistral, Qwen2/3, Gemma, Mixtral, Phi-3), GPT-2, GPT-NeoX, ChatGLM-6B, ChatGLM2/3.
const PAIRS: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "lm_head.weight"),
    ("transformer.wte.weight", "lm_head.weight"),
    ("gpt_neox.embed_in.weight", "embed_out.weight"),
    ("transformer.word_embeddings.weight", "lm_head.weight"),
    (
        "transformer.embedding.word_embeddings.weight",
        "transformer.output_layer.weight",
    ),
];

/// The base's input embedding and output head names, tied or not (the head may be absent).
pub(crate) fn vocabulary_tensors(base: &HfModel) -> Option<(&'static str, &'static str)> {
    PAIRS
        .iter()
        .find(|(embedding, _)| base.weights.tensors.contains_key(*embedding))
        .copied()
}

/// A base whose head is tied to its input embedding.
#[derive(Clone, Debug)]
pub(crate) struct Tie {
    pub embedding: String,
    pub head: String,
    /// The checkpoint holds the head too (a stale duplicate of the embedding).
    pub head_in_checkpoint: bool,
}

impl Tie {
    /// The base's tie, decided from config.json's `tie_word_embeddings` and, where it is
    /// absent, from what the checkpoint holds: an embedding without its head is tied.
    pub fn of(base: &HfModel) -> Option<Tie> {
        let (embedding, head) = vocabulary_tensors(base)?;
        let head_in_checkpoint = base.weights.tensors.contains_key(head);
        let tied = match base.config.get("tie_word_embeddings") {
            Some(Value::Bool(tied)) => *tied,
            _ => !head_in_checkpoint,
        };
        tied.then(|| Tie {
            embedding: embedding.to_owned(),
            head: head.to_owned(),
            head_in_checkpoint,
        })
    }

    /// Makes the head a tensor of the plan, so that adapters can name it: the checkpoint's
    /// copy, or the embedding's bytes under the head's name.
    pub fn add_head(&self, tensors: &mut BTreeMap<String, TensorPlan>) {
        if tensors.contains_key(&self.head) {
            return;
        }
        let Some(embedding) = tensors.get(&self.embedding) else {
            return;
        };
        let plan = TensorPlan {
            origin: Origin::Base {
                tensor: self.embedding.clone(),
                meta: super::origin_meta(&embedding.origin).clone(),
            },
            deltas: Vec::new(),
            out: OutTensor {
                name: self.head.clone(),
                ..embedding.out.clone()
            },
        };
        tensors.insert(self.head.clone(), plan);
    }
}

/// What became of the tie once every adapter is planned.
pub(crate) enum Settled {
    /// Nothing touched either side: the base's tensors as they are.
    Untouched,
    /// One shared tensor, written once under the embedding's name.
    Kept,
    /// Two tensors from now on; the reason, for the summary and the model card.
    Untied(String),
}

/// Settles the tie after planning: while tied (before the first adapter that replaces either
/// side), a delta on either side changes both, as the one shared tensor in PEFT; replacements
/// and later deltas stay on their side. Kept tied, the head is left out of the output.
pub(crate) fn settle(
    tie: &Tie,
    tensors: &mut BTreeMap<String, TensorPlan>,
    adapter_names: &[String],
    copies: &[(usize, String)],
) -> Settled {
    // PEFT's copy of a targeted embedding's own weight is loaded into the one shared tensor:
    // both sides start from it, and the tie holds.
    let mut copies = copies.to_vec();
    for (adapter, name) in copies.clone() {
        let twin = if name == tie.embedding {
            &tie.head
        } else if name == tie.head {
            &tie.embedding
        } else {
            continue;
        };
        let origin = match tensors.get(&name) {
            Some(plan) => plan.origin.clone(),
            None => continue,
        };
        if let Some(plan) = tensors.get_mut(twin) {
            if !matches!(plan.origin, Origin::Replacement { .. }) {
                plan.origin = origin;
                copies.push((adapter, twin.clone()));
            }
        }
    }
    let (Some(embedding), Some(head)) = (tensors.get(&tie.embedding), tensors.get(&tie.head))
    else {
        return Settled::Untouched;
    };
    let is_copy =
        |adapter: usize, name: &str| copies.iter().any(|(a, n)| *a == adapter && n == name);
    let replaced = |plan: &TensorPlan| match plan.origin {
        Origin::Replacement { adapter, .. } if !is_copy(adapter, &plan.out.name) => Some(adapter),
        _ => None,
    };
    let breaks = match (replaced(embedding), replaced(head)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let shared = |delta: &Delta| {
        breaks.is_none_or(|at| delta.adapter < at)
            && !matches!(delta.kind, DeltaKind::Difference(_))
    };
    let from_embedding: Vec<Delta> = embedding
        .deltas
        .iter()
        .filter(|d| shared(d))
        .cloned()
        .collect();
    let from_head: Vec<Delta> = head.deltas.iter().filter(|d| shared(d)).cloned().collect();
    let copied = copies
        .iter()
        .any(|(_, n)| *n == tie.embedding || *n == tie.head);
    if breaks.is_none() && from_embedding.is_empty() && from_head.is_empty() && !copied {
        if !tie.head_in_checkpoint {
            tensors.remove(&tie.head);
        }
        return Settled::Untouched;
    }
    // Each side gets the other's shared deltas, in the stack's order.
    let mirror = |plan: &mut TensorPlan, other: Vec<Delta>| {
        plan.deltas.extend(other);
        plan.deltas.sort_by_key(|d| d.adapter);
    };
    mirror(tensors.get_mut(&tie.embedding).expect("present"), from_head);
    match breaks {
        None => {
            tensors.remove(&tie.head);
            Settled::Kept
        }
        Some(at) => {
            mirror(tensors.get_mut(&tie.head).expect("present"), from_embedding);
            let sides = [&tie.embedding, &tie.head]
                .into_iter()
                .filter(|name| replaced(&tensors[*name]) == Some(at))
                .map(|name| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(" and ");
            Settled::Untied(format!(
                "the base ties `{}` and `{}`, but `{}` replaces {sides} (modules_to_save), so the two are written apart and config.json says `tie_word_embeddings = false`",
                tie.embedding, tie.head, adapter_names[at]
            ))
        }
    }
}
