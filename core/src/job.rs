//! What the build asks of the engine (`modelforge-engine`, the only process that loads
//! LibTorch), as JSON on its standard input, and what the engine answers, as one JSON line per
//! tensor on its standard output. The engine writes each result into the cache itself, so a
//! result survives even if the build that asked for it is killed; except a fused tensor the
//! job marks `hand_off`, which it leaves in a file for the build to write into an output shard
//! (the shard then becomes its cache object).
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::NodeKey;
use crate::node::{Content, DeviceClass, Node};
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
    /// The nodes to compute, each after the nodes it reads (which may also be in the cache
    /// from an earlier build). The engine writes each result under the node's key, or hands it
    /// over (`Task::hand_off`).
    pub nodes: Vec<Task>,
    /// Where each input the nodes read is.
    pub places: Vec<Place>,
    /// Slots of shared memory the engine inherited from the build (as file descriptors), into
    /// which it hands the results that fit ([`SLOT_BYTES`]) rather than into files: a slot
    /// is written over tensor after tensor, so its pages are allocated once, not once per
    /// tensor as a new file's are. The build gives a slot back by writing its number, one a
    /// line, on the engine's standard input (the job is the first line); with no slot free,
    /// the engine waits briefly for one (it is then ahead of the build's writing), and hands
    /// its result in a file if none comes back.
    #[serde(default)]
    pub slots: Vec<i32>,
}

/// The largest result handed over in a slot (see [`Job::slots`]); a larger one goes in a file.
pub const SLOT_BYTES: u64 = 256 << 20;

/// How many slots a build shares with its engine: enough that an engine running ahead of the
/// build's writes rarely finds none free (on the benchmark's 2.2 GB model, 3 left 92 of 154
/// results in files; 6 left 8).
pub const SLOTS: usize = 6;

/// Where the engine computes; written `cpu` or `cuda:N` in the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// What node keys hold: results are the same on every GPU, not across CPU and GPU.
    pub fn class(self) -> DeviceClass {
        match self {
            Device::Cpu => DeviceClass::Cpu,
            Device::Cuda(_) => DeviceClass::Cuda,
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

/// A node to compute, and the name it is shown by (the tensor's, for a fused tensor).
#[derive(Debug, Serialize, Deserialize)]
pub struct Task {
    pub name: String,
    /// The key the build gave the node: the engine keys the node as it read it, and refuses
    /// one that reads back otherwise than it was written.
    pub key: NodeKey,
    pub node: Node,
    /// Hand the result to the build (which writes it into an output shard, then records it
    /// there) rather than make it an object: its bytes are then written to disk once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hand_off: bool,
}

/// Where the bytes of an input named by content are: any file holding them will do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Place {
    pub content: Content,
    pub tensor: String,
    pub path: PathBuf,
    pub start: u64,
    pub len: u64,
}

/// The engine's answer for one tensor: written to the cache under `key`, or, for a task to
/// hand off, left where `handed` says for the build to settle (see `Store::handed_writer`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Done {
    pub key: NodeKey,
    pub entry: ActionEntry,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed: Option<Handed>,
}

/// Where a handed result's bytes are (`entry.len` of them, from the start).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Handed {
    /// A file the build removes once it has written the bytes where it needs them.
    File(PathBuf),
    /// One of the job's slots (by its index in [`Job::slots`]), the engine's to write again
    /// once the build gives it back.
    Slot(usize),
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

/// What `modelforge score` asks of the engine (`modelforge-engine score`): a decoder's forward
/// pass over tokenized texts, in f32, streamed one layer at a time. The engine answers with one
/// [`Scores`] line.
#[derive(Debug, Serialize, Deserialize)]
pub struct ScoreJob {
    pub device: Device,
    pub decoder: Decoder,
    /// Where each tensor the decoder reads is, by its name in the checkpoint.
    pub tensors: Vec<TensorPlace>,
    /// LoRA deltas added to the checkpoint's tensors as they are read (an adapter scored
    /// without fusing it first).
    #[serde(default)]
    pub deltas: Vec<ScoreDelta>,
    /// Tensors read from elsewhere instead of the checkpoint's (an adapter's
    /// `modules_to_save`), by the checkpoint's name.
    #[serde(default)]
    pub replacements: Vec<TensorPlace>,
    /// Each text's token ids.
    pub texts: Vec<Vec<i64>>,
}

/// A decoder-only transformer: its family's layout (tensor names, norms, attention, MLP) and
/// its sizes, as config.json gives them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Decoder {
    pub family: Family,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The rotary frequencies, one per pair of rotated dimensions (the rotated part of each
    /// head is twice as long; the rest of the head passes unrotated); empty without rotary
    /// embeddings.
    pub inv_freq: Vec<f64>,
    pub norm_eps: f64,
    /// Per layer, how many positions back a token sees (itself included), when the layer's
    /// attention is a sliding window.
    pub windows: Vec<Option<usize>>,
    /// The output head's tensor (the input embedding's when the two are tied).
    pub head: String,
    /// Which linear maps have biases, as config.json says (a checkpoint holding others is
    /// refused, as transformers would drop them).
    pub biases: Biases,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Biases {
    /// The query, key and value projections.
    pub qkv: bool,
    /// The attention's output projection.
    pub o: bool,
    /// The MLP's maps.
    pub mlp: bool,
}

/// The layouts the engine's forward pass knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// LLaMA, Mistral, Qwen2: RMSNorm, separate q/k/v (biases optional), gated SiLU MLP.
    Llama,
    /// Phi-3: LLaMA's blocks with fused `qkv_proj` and `gate_up_proj`.
    Phi3,
    /// GPT-NeoX: LayerNorm, `query_key_value` interleaved per head, GELU MLP, and the
    /// attention and MLP read the same input when `parallel_residual`.
    GptNeox { parallel_residual: bool },
    /// GPT-2: learned positions, LayerNorm, Conv1D weights (in × out), tanh-GELU MLP.
    Gpt2,
}

/// A LoRA delta, scale · B·A (transposed for a `Conv1D` or an embedding), on the tensor
/// `weight`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreDelta {
    pub weight: String,
    pub a: TensorPlace,
    pub b: TensorPlace,
    pub scale: f64,
    pub transposed: bool,
}

/// Where one tensor's bytes are.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorPlace {
    pub name: String,
    pub path: PathBuf,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub start: u64,
    pub len: u64,
}

/// The engine's answer to a [`ScoreJob`]: for each text, the log-probability of each of its
/// tokens after the first given those before it (natural log).
#[derive(Debug, Serialize, Deserialize)]
pub struct Scores {
    pub logprobs: Vec<Vec<f64>>,
}
