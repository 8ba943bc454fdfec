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
    pub device: Device,
    /// Bytes of tensor blocks in flight.
    pub budget: u64,
    /// Flush each object to disk before recording it (`build --fsync`).
    pub fsync: bool,
    /// Refuse a result holding NaN or infinity (the default; `build --allow-non-finite`).
    pub check_finite: bool,
    /// Alignment maps and aligned deltas, computed in this order before the tensors, which
    /// may read them from the cache.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub align: Vec<AlignStep>,
    pub tensors: Vec<TensorJob>,
}

/// Where the engine computes; written `cpu` or `cuda:N` in the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// What node keys hold: results are the same on every GPU, not across CPU and GPU.
    pub fn class(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("cuda:").map(str::parse) {
            None if s == "cpu" => Ok(Device::Cpu),
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => Err(format!("unknown device `{s}`")),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One node of `dims = "align"`; each writes an f32 object and answers like a tensor.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlignStep {
    /// R (d_t × d_s), orthonormal rows or columns, from the embedding rows of the tokens both
    /// vocabularies share (`[source id, target id]`): the polar factor of the least-squares map
    /// of source rows onto target rows. The entry's `overlap` is the fit's relative residual.
    Residual {
        key: NodeKey,
        source: Slice,
        target: Slice,
        pairs: Vec<[u32; 2]>,
    },
    /// M (inner_t × inner_s) for one module: the orthogonal map closest to taking the
    /// residual-mapped source weight onto the target's, with ties broken toward the identity.
    /// The entry's `overlap` is the mean cosine of the principal angles between the two
    /// weights' leading residual-side subspaces.
    Inner {
        key: NodeKey,
        residual: NodeKey,
        side: Side,
        source: Slice,
        target: Slice,
        /// Where the module's weight sits in the target tensor.
        #[serde(default)]
        layout: Layout,
    },
    /// A LoRA module's B·A carried across: M·B·A·Rᵀ (input side) or R·B·A·Mᵀ (output side),
    /// re-factored to `rank`; the object holds A's then B's f32 bytes, the entry's `energy` is
    /// ‖ΔW_t‖_F / ‖ΔW_s‖_F.
    Delta {
        key: NodeKey,
        residual: NodeKey,
        inner: NodeKey,
        side: Side,
        a: Slice,
        b: Slice,
        rank: usize,
    },
    /// What `truncate` or `pad` keeps of B·A cut or zero-padded to `to` (out, in): an empty
    /// object whose entry's `energy` is ‖ΔW_t‖_F / ‖ΔW_s‖_F.
    Fit {
        key: NodeKey,
        a: Slice,
        b: Slice,
        to: [usize; 2],
    },
}

/// Where a module's weight sits in a target tensor: the whole tensor by default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Stored (in × out), as GPT-2's Conv1D: transposed before anything else.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transposed: bool,
    /// The target's rows (output features, after any transposition) that make the module's
    /// weight, in the order of the aligned delta's rows: the module's part of a fused tensor,
    /// in the adapter's rotary convention. `None`: every row, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<Vec<u32>>,
}

impl AlignStep {
    pub fn key(&self) -> NodeKey {
        match self {
            AlignStep::Residual { key, .. }
            | AlignStep::Inner { key, .. }
            | AlignStep::Delta { key, .. }
            | AlignStep::Fit { key, .. } => *key,
        }
    }
}

/// Which side of a weight (out × in) faces the residual stream.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// Reads the residual stream: its columns (q, k, v, gate, up).
    Input,
    /// Writes it: its rows (o, down).
    Output,
}

/// How a low-rank delta of other widths is made to fit its tensor.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Adapt {
    /// The leading rows and columns kept, zeros after (`truncate`, `pad`).
    Fit,
    /// The aligned factors in the cache object of node `node`, of rank `rank`.
    Aligned { node: NodeKey, rank: usize },
}

/// One output tensor: `round(origin + Σ factor · delta)` in `out_dtype`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TensorJob {
    pub key: NodeKey,
    pub name: String,
    pub origin: Slice,
    pub deltas: Vec<DeltaJob>,
    /// `None`: the weighted sum, streamed block by block.
    pub merge: Option<MergeJob>,
    /// Instead of fusing, factor the combined delta for a PEFT adapter.
    pub refactor: Option<Refactor>,
    /// Round the origin to this dtype first (a replacement loaded into a layer of the base's
    /// dtype, as PEFT does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_cast: Option<Dtype>,
    pub out_dtype: Dtype,
}

/// Factor the combined delta Δ (or Δᵀ when `transpose`), shaped (p × q), by a truncated SVD
/// into A (k × q) and B (p × k) with B·A ≈ Δ; the result object holds A's then B's f32 bytes,
/// and the action entry the fraction of ‖Δ‖²_F kept.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Refactor {
    pub truncation: Truncation,
    pub transpose: bool,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    Rank(usize),
    /// The smallest rank keeping this fraction of the squared singular values.
    Energy(f64),
}

/// Where the rows of a delta (its output features) land in a fused target tensor: row i of the
/// delta becomes row `target(i)` of the tensor (its column, when the tensor is stored
/// transposed, as GPT-2's Conv1D); the other rows get nothing.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RowMap {
    /// A stacked part ([Q; K; V]) starting at `offset`.
    Offset { offset: usize },
    /// Part `part` of `parts` interleaved per head, `head_dim` rows a head; each source head
    /// fills `repeat` target heads (grouped-query k/v going into a multi-head layout).
    PerHead {
        parts: usize,
        part: usize,
        head_dim: usize,
        #[serde(default = "one")]
        repeat: usize,
    },
    /// A stacked part starting at `offset` whose source heads (`head_dim` rows each) each fill
    /// `repeat` consecutive target heads: grouped-query k/v going into more groups (ChatGLM2's
    /// `multi_query_group_num`).
    Repeated {
        offset: usize,
        head_dim: usize,
        repeat: usize,
    },
}

fn one() -> usize {
    1
}

impl RowMap {
    /// The rows of the target that row `row` of the delta lands on.
    pub fn targets(&self, row: usize) -> impl Iterator<Item = usize> {
        let (first, count, step) = match *self {
            RowMap::Offset { offset } => (offset + row, 1, 0),
            RowMap::Repeated {
                offset,
                head_dim,
                repeat,
            } => {
                let (head, within) = (row / head_dim, row % head_dim);
                (offset + head * repeat * head_dim + within, repeat, head_dim)
            }
            RowMap::PerHead {
                parts,
                part,
                head_dim,
                repeat,
            } => {
                let (head, within) = (row / head_dim, row % head_dim);
                (
                    (head * repeat * parts + part) * head_dim + within,
                    repeat,
                    parts * head_dim,
                )
            }
        };
        (0..count).map(move |i| first + i * step)
    }
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
    /// The adapter's weight in the recipe.
    pub weight: f64,
    /// The adapter's own scaling (α/r or α/√r).
    pub scaling: f64,
    pub values: DeltaValues,
}

impl DeltaJob {
    /// What a plain weighted sum multiplies the delta by.
    pub fn factor(&self) -> f64 {
        self.weight * self.scaling
    }
}

/// A task-arithmetic merge of a tensor's deltas (each `scaling · B·A`): optionally pruned,
/// optionally reduced to the entries that agree with an elected sign, then weighted and
/// summed (or averaged over the agreeing ones).
#[derive(Debug, Serialize, Deserialize)]
pub struct MergeJob {
    pub sparsify: Option<Sparsify>,
    pub elect_sign: Option<SignElection>,
    /// Fraction of each delta's entries kept.
    pub density: f64,
    /// Seeds LibTorch's generator before this tensor's random pruning.
    pub seed: i64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Sparsify {
    /// Keep the `density` fraction of entries largest in magnitude.
    Magnitude,
    /// Keep each entry with probability `density`, rescaled by 1/density.
    Random,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SignElection {
    /// The sign of the deltas' sum.
    Total,
    /// The sign most deltas have.
    Frequency,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// One value per delta of a job, sent once as JSON: the low-rank variant's size costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum DeltaValues {
    /// `B·A`, or `(B·A)ᵀ` when `transposed` (GPT-2's Conv1D, embeddings).
    LowRank {
        transposed: bool,
        a: Slice,
        b: Slice,
        /// In a fused target, where B's rows go (the columns of a transposed target).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rows: Option<RowMap>,
        /// q/k rows carried into the target's rotary convention, before `rows` places them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rotary: Option<crate::rotary::RotaryMap>,
        /// Made for other widths: how it fits the tensor.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        adapt: Option<Adapt>,
        /// A 3-D parameter of this many experts (PEFT's `ParamWrapper`): A is (E·r × in), B
        /// (out × E·r) with expert e's columns at k·E + e, and the tensor's rows are the experts'
        /// rows one after the other; `transposed` then transposes each expert's B_e·A_e.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        experts: Option<usize>,
        /// With `experts`: the tensor is one expert's, `[index, offset]`, taking rows
        /// `offset..` of that expert's delta (a checkpoint storing experts apart).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expert: Option<[usize; 2]>,
        /// DoRA: after adding the delta, each output row (column, when `transposed`) of the sum
        /// is scaled by m / ‖W + Δ‖, with m these values and W the tensor's starting value.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        magnitude: Option<Slice>,
    },
    /// Trainable tokens: rows `indices` of the sum become `values`' rows (weighted: moved that
    /// fraction of the way).
    Tokens { indices: Vec<usize>, values: Slice },
    /// A dense delta of the tensor's own shape (a `lora_bias` vector).
    Dense(Slice),
    /// A full fine-tuned model's tensor: the delta is it minus the base's.
    Model(Slice),
}

/// The engine's answer for one tensor, written to the cache under `key`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Done {
    pub key: NodeKey,
    pub entry: ActionEntry,
}

/// The engine's answer when a result holds NaN or infinity (and the job asks for the check):
/// nothing of that tensor reaches the cache, and the engine stops.
#[derive(Debug, Serialize, Deserialize)]
pub struct NonFinite {
    pub tensor: String,
    /// The first such element, counted row-major from the tensor's start.
    pub index: u64,
    /// `NaN`, `+inf` or `-inf`.
    pub what: String,
}

/// One line of the engine's answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Done(Done),
    NonFinite(NonFinite),
}
