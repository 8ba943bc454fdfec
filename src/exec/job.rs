//! What the build asks of the engine (`modelforge-engine`, the only process that loads
//! LibTorch), as JSON on its standard input, and what the engine answers, as one JSON line per
//! tensor on its standard output. The engine writes each result into the cache itself, so a
//! result survives even if the build that asked for it is killed.
use std::path::PathBuf;

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::digest::NodeKey;
use crate::store::ActionEntry;

#[derive(Debug, Serialize, Deserialize)]
pub struct Job {
    /// The cache directory (as given to `Store::open`).
    pub cache: PathBuf,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Bytes of tensor blocks in flight.
    pub budget: u64,
    /// Flush each object to disk before recording it (`build --fsync`).
    pub fsync: bool,
    pub tensors: Vec<TensorJob>,
}

/// One output tensor: `round(origin + Σ factor · delta)` in `out_dtype`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TensorJob {
    pub key: NodeKey,
    pub name: String,
    pub origin: Slice,
    pub deltas: Vec<DeltaJob>,
    pub out_dtype: Dtype,
}

/// Where a tensor's bytes are.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Slice {
    pub path: PathBuf,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: u64,
    pub len: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DeltaJob {
    pub factor: f64,
    pub values: DeltaValues,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeltaValues {
    /// `B·A`, or `(B·A)ᵀ` when `transposed` (GPT-2's Conv1D, embeddings).
    LowRank {
        transposed: bool,
        a: Slice,
        b: Slice,
    },
    /// A dense delta of the tensor's own shape (a `lora_bias` vector).
    Dense(Slice),
}

/// The engine's answer for one tensor, written to the cache under `key`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Done {
    pub key: NodeKey,
    pub entry: ActionEntry,
}
