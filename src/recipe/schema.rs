//! The recipe as written: serde types that mirror the TOML and keep each value's span, so that
//! later checks can point at the line that caused them. Unknown keys are errors.
use super::MajoritySign;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRecipe {
    pub base: Spanned<RawBase>,
    #[serde(default, rename = "adapter")]
    pub adapters: Vec<Spanned<RawAdapter>>,
    pub output: Spanned<RawOutput>,
    #[serde(default)]
    pub build: Option<Spanned<RawBuild>>,
    #[serde(default)]
    pub merge: Option<Spanned<RawMerge>>,
}

/// How the adapters' deltas combine.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMerge {
    #[serde(default)]
    pub method: Option<Spanned<MergeMethod>>,
    /// A number, or rules like `weight`'s.
    #[serde(default)]
    pub density: Option<Spanned<RawWeight>>,
    #[serde(default)]
    pub majority_sign: Option<Spanned<MajoritySign>>,
    #[serde(default)]
    pub seed: Option<Spanned<u64>>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MergeMethod {
    /// The weighted sum of the deltas.
    #[default]
    Linear,
    /// For a fused model, the same as `linear`: the deltas' factors concatenated.
    Cat,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBase {
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    /// A Hugging Face repository, `org/name`, found in the local Hugging Face cache.
    #[serde(default)]
    pub hf: Option<Spanned<String>>,
    /// With `hf`: a branch, tag or commit (default `main`).
    #[serde(default)]
    pub revision: Option<Spanned<String>>,
    /// The base's architecture schema by name, instead of the one its config.json suggests.
    #[serde(default)]
    pub arch: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdapter {
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    /// A Hugging Face repository, `org/name`, found in the local Hugging Face cache.
    #[serde(default)]
    pub hf: Option<Spanned<String>>,
    /// With `hf`: a branch, tag or commit (default `main`).
    #[serde(default)]
    pub revision: Option<Spanned<String>>,
    #[serde(default)]
    pub weight: Option<Spanned<RawWeight>>,
    /// The base the adapter was trained on (its layer count drives layer mapping).
    #[serde(default)]
    pub source: Option<Spanned<String>>,
    /// Texts of what the adapter does, one per line: the report measures how much of the
    /// adapter's effect on them the carried adapter keeps.
    #[serde(default)]
    pub examples: Option<Spanned<String>>,
    /// The architecture schema the adapter's module names follow, by name.
    #[serde(default)]
    pub arch: Option<Spanned<String>>,
    /// How the adapter's layers and modules map onto the base.
    #[serde(default)]
    pub map: Option<Spanned<RawMap>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMap {
    #[serde(default)]
    pub layers: Option<Spanned<RawLayers>>,
    #[serde(default)]
    pub dims: Option<Spanned<String>>,
    /// The rank `dims = "align"` re-factors each delta to (default: the adapter's).
    #[serde(default)]
    pub rank: Option<Spanned<u64>>,
    /// Module name → "skip".
    #[serde(default)]
    pub modules: Option<std::collections::BTreeMap<String, Spanned<String>>>,
    /// `"skip"` (default) or `"error"`: what becomes of a module whose role the base's
    /// architecture has no place for.
    #[serde(default)]
    pub unmatched: Option<Spanned<String>>,
}

/// `"same"`, `"interpolate"`, `"truncate"`, or `{ 0 = 0, 1 = 0, ... }` (source → target).
#[derive(Debug)]
pub(crate) enum RawLayers {
    Named(String),
    Table(std::collections::BTreeMap<String, Spanned<u64>>),
}

impl<'de> Deserialize<'de> for RawLayers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LayersVisitor;

        impl<'de> Visitor<'de> for LayersVisitor {
            type Value = RawLayers;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"same\", \"interpolate\", \"truncate\" or a table of source layer = target layer")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawLayers, E> {
                Ok(RawLayers::Named(v.to_owned()))
            }

            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<RawLayers, A::Error> {
                let mut table = std::collections::BTreeMap::new();
                while let Some((key, value)) = map.next_entry::<String, Spanned<u64>>()? {
                    table.insert(key, value);
                }
                Ok(RawLayers::Table(table))
            }
        }

        deserializer.deserialize_any(LayersVisitor)
    }
}

/// `weight = 0.8` or `weight = [ { value = 1.0 }, { layers = "16..", value = 0.5 } ]`.
#[derive(Debug)]
pub(crate) enum RawWeight {
    Scalar(f64),
    Rules(Vec<Spanned<RawWeightRule>>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWeightRule {
    pub value: Spanned<f64>,
    #[serde(default)]
    pub layers: Option<Spanned<String>>,
    #[serde(default)]
    pub modules: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutput {
    /// The fused model; may be left out when `adapter` is given.
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    #[serde(default)]
    pub dtype: Option<Spanned<OutputDtype>>,
    /// Largest shard, e.g. `"2GB"`; above it the weights are split and indexed.
    #[serde(default)]
    pub max_shard_size: Option<Spanned<String>>,
    /// How tensors are grouped into shards.
    #[serde(default)]
    pub shard_by: Option<ShardBy>,
    /// Also write the combined delta as one PEFT adapter for the base, here.
    #[serde(default)]
    pub adapter: Option<Spanned<String>>,
    /// The adapter's rank for every module (truncated SVD).
    #[serde(default)]
    pub adapter_rank: Option<Spanned<u64>>,
    /// Or the smallest rank per module that keeps this fraction of the delta's energy.
    #[serde(default)]
    pub adapter_energy: Option<Spanned<f64>>,
    /// Also write the fused model as one GGUF file (llama.cpp, Ollama), here.
    #[serde(default)]
    pub gguf: Option<Spanned<String>>,
    /// The GGUF's weight type.
    #[serde(default)]
    pub gguf_type: Option<Spanned<GgufType>>,
}

/// The type of a GGUF's weights (1-D tensors are always f32, as llama.cpp's converter writes
/// them).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum GgufType {
    F32,
    /// The converter's default.
    #[default]
    F16,
    Bf16,
    Q8_0,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBuild {
    #[serde(default)]
    pub device: Option<Spanned<String>>,
}

/// How the output's tensors are grouped into shards (each group split at `max_shard_size`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ShardBy {
    /// One group: tensors in name order fill each shard up to the size limit, as
    /// `transformers` shards.
    #[default]
    Size,
    /// One group per set of adapters a tensor depends on (the base's untouched tensors are a
    /// group of their own): a change to one adapter rewrites only the shards it reaches.
    Inputs,
}

/// The dtype of the written tensors.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OutputDtype {
    /// Each tensor keeps the dtype it has in the base.
    #[default]
    Base,
    F32,
    F16,
    Bf16,
}

impl<'de> Deserialize<'de> for RawWeight {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WeightVisitor;

        impl<'de> Visitor<'de> for WeightVisitor {
            type Value = RawWeight;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number or a list of rules like `{ layers = \"0..4\", value = 0.5 }`")
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawWeight, E> {
                Ok(RawWeight::Scalar(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawWeight, E> {
                Ok(RawWeight::Scalar(v as f64))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawWeight, E> {
                Ok(RawWeight::Scalar(v as f64))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawWeight, A::Error> {
                let mut rules = Vec::new();
                while let Some(rule) = seq.next_element()? {
                    rules.push(rule);
                }
                Ok(RawWeight::Rules(rules))
            }
        }

        deserializer.deserialize_any(WeightVisitor)
    }
}
