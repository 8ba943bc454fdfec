//! A node of the build, described once: the operation, its parameters, and its inputs named by
//! content (a file's digest or a tensor's own, with the tensor's name) or by another node's key,
//! never by path. The node's key is the blake3 of this description's canonical encoding with
//! the operation's version; the engine's job is the same description plus a table saying where
//! each input's bytes are. What the engine reads is what the key holds, by construction: a
//! field cannot reach one and not the other.
//!
//! A new kind of node is a variant of [`Node`]; a new parameter of a delta is a field of
//! [`Delta`]. Nothing else needs to know, except the planner that fills it in and the engine
//! that reads it (`key_covers_every_field` checks the key follows).
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::digest::{FileDigest, NodeKey, TensorDigest};
use crate::rotary::RotaryMap;

/// Bumped whenever the fusion arithmetic changes, so that old cache entries are not reused.
const FUSE_VERSION: u32 = 1;
/// Bumped whenever the alignment arithmetic (`dims = "align"`) changes.
const ALIGN_VERSION: u32 = 1;
/// Bumped whenever the re-factoring of a delta (`[output] adapter`) changes.
const REFACTOR_VERSION: u32 = 1;
/// A copied tensor's bytes are its input's: nothing to version but the description.
const COPY_VERSION: u32 = 1;

/// What an input's bytes are named by: the digest of the base file they are read from (a base
/// is hashed once per file), or, for an adapter's tensor, the digest of its own bytes, so that
/// changing one tensor of an adapter changes only the nodes that read it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Content {
    File(FileDigest),
    Bytes(TensorDigest),
}

/// An input tensor, named by content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Input {
    pub content: Content,
    pub tensor: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

/// Where the engine computes, as far as results differ: the same on every GPU, not across CPU
/// and GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceClass {
    Cpu,
    Cuda,
}

impl DeviceClass {
    /// As the lock file and node descriptions write it.
    pub fn name(self) -> &'static str {
        match self {
            DeviceClass::Cpu => "cpu",
            DeviceClass::Cuda => "cuda",
        }
    }
}

/// One node of the build.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Node {
    /// A tensor copied byte for byte from its input: never computed nor cached, but its key
    /// names its bytes for the output's shard keys.
    Copy { origin: Input },
    /// `round(origin + Σ weight · scaling · delta)`, or a merge of the deltas.
    Fuse(Fuse),
    /// Instead of fusing, the combined delta of `fuse` factored for a PEFT adapter.
    Refactor { fuse: Fuse, refactor: Refactor },
    /// R (d_t × d_s), orthonormal rows or columns, from the embedding rows of the tokens both
    /// vocabularies share (`[source id, target id]`): the polar factor of the least-squares map
    /// of source rows onto target rows. The entry's `overlap` is the fit's relative residual.
    ResidualMap {
        source: Input,
        target: Input,
        pairs: Vec<[u32; 2]>,
    },
    /// M (inner_t × inner_s) for one module: the orthogonal map closest to taking the
    /// residual-mapped source weight onto the target's, with ties broken toward the identity.
    /// The entry's `overlap` is the mean cosine of the principal angles between the two
    /// weights' leading residual-side subspaces.
    InnerMap {
        residual: NodeKey,
        side: Side,
        source: Input,
        target: Input,
        /// Where the module's weight sits in the target tensor.
        #[serde(default, skip_serializing_if = "Layout::is_whole")]
        layout: Layout,
    },
    /// A LoRA module's B·A carried across: M·B·A·Rᵀ (input side) or R·B·A·Mᵀ (output side),
    /// re-factored to `rank`; the object holds A's then B's f32 bytes, the entry's `energy` is
    /// ‖ΔW_t‖_F / ‖ΔW_s‖_F.
    AlignDelta {
        residual: NodeKey,
        inner: NodeKey,
        side: Side,
        a: Input,
        b: Input,
        rank: usize,
    },
    /// What `truncate` or `pad` keeps of B·A cut or zero-padded to `to` (out, in): an empty
    /// object whose entry's `energy` is ‖ΔW_t‖_F / ‖ΔW_s‖_F.
    FitEnergy { a: Input, b: Input, to: [usize; 2] },
    /// How alike the two bases' weights of one carried module are under the map `exact`,
    /// `truncate` and `pad` use for the residual stream: the identity, cut or zero-padded to
    /// the target's width. An empty object whose entry's `overlap` is the figure `InnerMap`
    /// gives under R (the mean cosine of the principal angles between the two weights' leading
    /// residual-side subspaces), with R the identity.
    Overlap {
        side: Side,
        source: Input,
        target: Input,
        /// Where the module's weight sits in the target tensor.
        #[serde(default, skip_serializing_if = "Layout::is_whole")]
        layout: Layout,
    },
}

impl Node {
    /// The version of the arithmetic behind this node.
    pub fn version(&self) -> u32 {
        match self {
            Node::Copy { .. } => COPY_VERSION,
            Node::Fuse(_) => FUSE_VERSION,
            Node::Refactor { .. } => REFACTOR_VERSION,
            Node::ResidualMap { .. }
            | Node::InnerMap { .. }
            | Node::AlignDelta { .. }
            | Node::FitEnergy { .. }
            | Node::Overlap { .. } => ALIGN_VERSION,
        }
    }

    /// The blake3 of the description and its version.
    pub fn key(&self) -> NodeKey {
        #[derive(Serialize)]
        struct Versioned<'a> {
            version: u32,
            node: &'a Node,
        }
        NodeKey::of_value(&Versioned {
            version: self.version(),
            node: self,
        })
    }

    /// The input tensors it reads.
    pub fn inputs(&self) -> Vec<&Input> {
        match self {
            Node::Copy { origin } => vec![origin],
            Node::Fuse(fuse) | Node::Refactor { fuse, .. } => fuse.inputs(),
            Node::ResidualMap { source, target, .. }
            | Node::InnerMap { source, target, .. }
            | Node::Overlap { source, target, .. } => vec![source, target],
            Node::AlignDelta { a, b, .. } | Node::FitEnergy { a, b, .. } => vec![a, b],
        }
    }

    /// The nodes whose results it reads.
    pub fn after(&self) -> Vec<NodeKey> {
        match self {
            Node::Fuse(fuse) | Node::Refactor { fuse, .. } => fuse
                .deltas
                .iter()
                .filter_map(|d| match &d.delta {
                    Delta::LowRank {
                        adapt: Some(adapt), ..
                    } => Some(*adapt.node()),
                    _ => None,
                })
                .collect(),
            Node::InnerMap { residual, .. } => vec![*residual],
            Node::AlignDelta {
                residual, inner, ..
            } => vec![*residual, *inner],
            Node::Copy { .. }
            | Node::ResidualMap { .. }
            | Node::FitEnergy { .. }
            | Node::Overlap { .. } => Vec::new(),
        }
    }
}

/// One output tensor: `round(origin + Σ weight · scaling · delta)` in `dtype`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fuse {
    pub origin: Input,
    /// Round the origin to this dtype first (a replacement loaded into a layer of the base's
    /// dtype, as PEFT does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_cast: Option<Dtype>,
    pub deltas: Vec<Weighted<Input, NodeKey>>,
    /// `None`: the weighted sum, streamed block by block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<Merge>,
    pub dtype: Dtype,
    pub device: DeviceClass,
}

impl Fuse {
    pub fn inputs(&self) -> Vec<&Input> {
        std::iter::once(&self.origin)
            .chain(self.deltas.iter().flat_map(|d| d.delta.tensors()))
            .collect()
    }
}

/// One adapter's delta of a tensor, with the recipe's weight and the adapter's own scaling.
/// `T` is how a tensor is named (an [`Input`] in a node; the planner's own reference while
/// planning), `N` how another node is (a [`NodeKey`] in a node).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Weighted<T, N> {
    /// The adapter's weight in the recipe.
    pub weight: f64,
    /// The adapter's own scaling (α/r or α/√r).
    pub scaling: f64,
    pub delta: Delta<T, N>,
}

impl<T, N> Weighted<T, N> {
    /// What a plain weighted sum multiplies the delta by.
    pub fn factor(&self) -> f64 {
        self.weight * self.scaling
    }
}

/// What one adapter adds to a tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delta<T, N> {
    /// `B·A` (see [`LoraKind`] for its orientation).
    LowRank {
        kind: LoraKind,
        a: T,
        b: T,
        /// In a fused target, where B's rows go (the columns of a transposed target).
        #[serde(skip_serializing_if = "Option::is_none")]
        rows: Option<RowMap>,
        /// q/k rows carried into the target's rotary convention, before `rows` places them.
        #[serde(skip_serializing_if = "Option::is_none")]
        rotary: Option<RotaryMap>,
        /// Made for other widths: how it fits the tensor.
        #[serde(skip_serializing_if = "Option::is_none")]
        adapt: Option<Adapt<N>>,
        /// DoRA: after adding the delta, each output row (column, when transposed) of the sum
        /// is scaled by m / ‖W + Δ‖, with m these values and W the tensor's starting value.
        #[serde(skip_serializing_if = "Option::is_none")]
        magnitude: Option<T>,
    },
    /// Trainable tokens: rows `indices` of the sum become `values`' rows (weighted: moved that
    /// fraction of the way).
    Tokens { indices: Vec<usize>, values: T },
    /// A dense delta of the tensor's own shape (a `lora_bias` vector).
    Vector(T),
    /// A full fine-tuned model's tensor: the delta is it minus the base's.
    Difference(T),
}

impl<T, N> Delta<T, N> {
    /// B·A of `kind` read from `a` and `b`, placed as it is: every optional field unset.
    pub fn low_rank(kind: LoraKind, a: T, b: T) -> Delta<T, N> {
        Delta::LowRank {
            kind,
            a,
            b,
            rows: None,
            rotary: None,
            adapt: None,
            magnitude: None,
        }
    }

    /// The tensors it reads.
    pub fn tensors(&self) -> Vec<&T> {
        match self {
            Delta::LowRank {
                a, b, magnitude, ..
            } => [Some(a), Some(b), magnitude.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            Delta::Tokens { values, .. } => vec![values],
            Delta::Vector(v) | Delta::Difference(v) => vec![v],
        }
    }

    /// The same delta with its tensors and node references named another way.
    pub fn map<U, M>(
        &self,
        tensor: &mut impl FnMut(&T) -> U,
        node: &mut impl FnMut(&N) -> M,
    ) -> Delta<U, M> {
        match self {
            Delta::LowRank {
                kind,
                a,
                b,
                rows,
                rotary,
                adapt,
                magnitude,
            } => Delta::LowRank {
                kind: *kind,
                a: tensor(a),
                b: tensor(b),
                rows: *rows,
                rotary: *rotary,
                adapt: adapt.as_ref().map(|adapt| match adapt {
                    Adapt::Fit { energy } => Adapt::Fit {
                        energy: node(energy),
                    },
                    Adapt::Aligned { node: n, rank } => Adapt::Aligned {
                        node: node(n),
                        rank: *rank,
                    },
                }),
                magnitude: magnitude.as_ref().map(&mut *tensor),
            },
            Delta::Tokens { indices, values } => Delta::Tokens {
                indices: indices.clone(),
                values: tensor(values),
            },
            Delta::Vector(v) => Delta::Vector(tensor(v)),
            Delta::Difference(v) => Delta::Difference(tensor(v)),
        }
    }
}

/// How a module's low-rank product becomes a delta of the base tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraKind {
    /// `nn.Linear`: Δ = B·A, shaped (out, in).
    Linear,
    /// GPT-2's `Conv1D` stores weights as (in, out): Δ = (B·A)ᵀ.
    LinearTransposed,
    /// `nn.Embedding`: A is (r, vocab), B is (dim, r), Δ = (B·A)ᵀ shaped (vocab, dim).
    Embedding,
    /// PEFT's `ParamWrapper` on a 3-D parameter of `count` experts (`target_parameters`, e.g.
    /// transformers 5's `mlp.experts.gate_up_proj` [E, out, in]): A is (E·r, in), B is
    /// (out, E·r) with expert e's rank columns interleaved (column k·E + e), and expert e's delta
    /// is B_e·A_e, or (B_e·A_e)ᵀ when the parameter is stored [E, in, out] (`transposed`).
    Experts { count: usize, transposed: bool },
    /// The same LoRA landing on one expert's 2-D tensor in a checkpoint that stores experts
    /// apart (`block_sparse_moe.experts.N.w1`, `mlp.experts.N.gate_proj`, as transformers
    /// writes Mixtral and Qwen-MoE checkpoints): expert `index`'s delta rows `offset..` (the
    /// gate half of `gate_up_proj` is `w1`, the up half `w3`).
    Expert {
        count: usize,
        index: usize,
        offset: usize,
    },
}

impl LoraKind {
    /// Whether the tensor holds (B·A)ᵀ rather than B·A.
    pub fn transposed(self) -> bool {
        match self {
            LoraKind::Linear | LoraKind::Expert { .. } => false,
            LoraKind::LinearTransposed | LoraKind::Embedding => true,
            LoraKind::Experts { transposed, .. } => transposed,
        }
    }
}

/// How a low-rank delta of other widths is made to fit its tensor.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Adapt<N> {
    /// The leading rows and columns kept, zeros after (`truncate`, `pad`); node `energy`
    /// measures what that keeps, for the report.
    Fit { energy: N },
    /// The aligned factors in the cache object of node `node`, of rank `rank`.
    Aligned { node: N, rank: usize },
}

impl<N> Adapt<N> {
    pub fn node(&self) -> &N {
        match self {
            Adapt::Fit { energy } => energy,
            Adapt::Aligned { node, .. } => node,
        }
    }
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

impl Layout {
    fn is_whole(&self) -> bool {
        *self == Layout::default()
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

/// A task-arithmetic merge of a tensor's deltas (each `scaling · B·A`): optionally pruned,
/// optionally reduced to the entries that agree with an elected sign, then weighted and
/// summed (or averaged over the agreeing ones).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Merge {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsify: Option<Sparsify>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elect_sign: Option<SignElection>,
    /// Fraction of each delta's entries kept.
    pub density: f64,
    /// Seeds LibTorch's generator before this tensor's random pruning.
    pub seed: i64,
}

/// How a merge prunes each delta (`ties` and `dare_*`'s first step).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Sparsify {
    /// Keep the `density` fraction of entries largest in magnitude.
    Magnitude,
    /// Keep each entry with probability `density`, rescaled by 1/density.
    Random,
}

/// How a merge elects each entry's sign (`ties`, `dare_ties`: `majority_sign`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SignElection {
    /// The sign of the deltas' sum.
    #[default]
    Total,
    /// The sign most deltas have.
    Frequency,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn input(name: &str) -> Input {
        Input {
            content: Content::Bytes(TensorDigest::of(name.as_bytes())),
            tensor: name.into(),
            dtype: Dtype::BF16,
            shape: vec![4, 8],
        }
    }

    /// Every kind of node, with every optional field set.
    fn every_node() -> Vec<Node> {
        let key = |s: &str| NodeKey::of(s.as_bytes());
        let low_rank = Delta::LowRank {
            kind: LoraKind::Expert {
                count: 4,
                index: 1,
                offset: 2,
            },
            a: input("a"),
            b: input("b"),
            rows: Some(RowMap::PerHead {
                parts: 3,
                part: 1,
                head_dim: 2,
                repeat: 2,
            }),
            rotary: Some(RotaryMap {
                from: crate::rotary::Rotary::Half,
                to: crate::rotary::Rotary::Glm2d,
                head_dim: 8,
            }),
            adapt: Some(Adapt::Aligned {
                node: key("aligned"),
                rank: 4,
            }),
            magnitude: Some(input("m")),
        };
        let fuse = Fuse {
            origin: input("w"),
            origin_cast: Some(Dtype::F16),
            deltas: vec![
                Weighted {
                    weight: 0.5,
                    scaling: 2.0,
                    delta: low_rank,
                },
                Weighted {
                    weight: 1.0,
                    scaling: 1.0,
                    delta: Delta::Tokens {
                        indices: vec![1, 3],
                        values: input("t"),
                    },
                },
                Weighted {
                    weight: 1.0,
                    scaling: 1.0,
                    delta: Delta::Vector(input("v")),
                },
                Weighted {
                    weight: 1.0,
                    scaling: 1.0,
                    delta: Delta::Difference(input("d")),
                },
                Weighted {
                    weight: 1.0,
                    scaling: 1.0,
                    delta: Delta::LowRank {
                        kind: LoraKind::Experts {
                            count: 2,
                            transposed: true,
                        },
                        a: input("a2"),
                        b: input("b2"),
                        rows: Some(RowMap::Repeated {
                            offset: 1,
                            head_dim: 2,
                            repeat: 3,
                        }),
                        rotary: None,
                        adapt: Some(Adapt::Fit { energy: key("fit") }),
                        magnitude: None,
                    },
                },
            ],
            merge: Some(Merge {
                sparsify: Some(Sparsify::Random),
                elect_sign: Some(SignElection::Frequency),
                density: 0.5,
                seed: 7,
            }),
            dtype: Dtype::BF16,
            device: DeviceClass::Cpu,
        };
        vec![
            Node::Copy { origin: input("c") },
            Node::Fuse(fuse.clone()),
            Node::Refactor {
                fuse,
                refactor: Refactor {
                    truncation: Truncation::Energy(0.9),
                    transpose: true,
                },
            },
            Node::ResidualMap {
                source: input("s"),
                target: input("t"),
                pairs: vec![[1, 2], [3, 4]],
            },
            Node::InnerMap {
                residual: key("r"),
                side: Side::Output,
                source: input("s"),
                target: input("t"),
                layout: Layout {
                    transposed: true,
                    rows: Some(vec![0, 2]),
                },
            },
            Node::AlignDelta {
                residual: key("r"),
                inner: key("i"),
                side: Side::Input,
                a: input("a"),
                b: input("b"),
                rank: 2,
            },
            Node::FitEnergy {
                a: input("a"),
                b: input("b"),
                to: [3, 5],
            },
            Node::Overlap {
                side: Side::Output,
                source: input("s"),
                target: input("t"),
                layout: Layout {
                    transposed: true,
                    rows: Some(vec![1, 3]),
                },
            },
        ]
    }

    /// Another value of the same JSON type as `leaf`, chosen so that the node still reads.
    fn changed(leaf: &Value) -> Vec<Value> {
        match leaf {
            Value::Bool(b) => vec![Value::Bool(!b)],
            Value::Number(n) if n.is_f64() => vec![Value::from(n.as_f64().unwrap() + 0.25)],
            Value::Number(n) => vec![Value::from(n.as_u64().unwrap_or(0) + 1)],
            Value::String(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                vec![Value::from("0".repeat(64))]
            }
            // A tag or a name: any other value it can take, tried until one reads.
            Value::String(s) => [
                "F32",
                "F16",
                "BF16",
                "cuda",
                "cpu",
                "input",
                "output",
                "half",
                "glm2d",
                "interleaved_first_half",
                "magnitude",
                "random",
                "total",
                "frequency",
            ]
            .iter()
            .filter(|other| *other != s)
            .map(|other| Value::from(*other))
            .chain([Value::from(format!("{s}x"))])
            .collect(),
            _ => Vec::new(),
        }
    }

    fn leaves(value: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    path.push(Value::from(k.as_str()));
                    leaves(v, path, out);
                    path.pop();
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    path.push(Value::from(i));
                    leaves(v, path, out);
                    path.pop();
                }
            }
            _ => out.push(path.clone()),
        }
    }

    fn at<'a>(value: &'a mut Value, path: &[Value]) -> &'a mut Value {
        path.iter().fold(value, |v, step| match step {
            Value::String(k) => &mut v[k.as_str()],
            Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
            _ => unreachable!(),
        })
    }

    /// Changing any field of any node (every leaf of its encoding to another value it can
    /// take) changes its key, and the engine reads the changed node back as it was written.
    #[test]
    fn key_covers_every_field() {
        for node in every_node() {
            let value = serde_json::to_value(&node).unwrap();
            let back: Node = serde_json::from_value(value.clone()).unwrap();
            assert_eq!(back, node, "{value}");
            let mut paths = Vec::new();
            leaves(&value, &mut Vec::new(), &mut paths);
            // The operation's tag: another tag is another kind of node, each enumerated here.
            for path in paths.into_iter().filter(|p| p != &[Value::from("op")]) {
                let mut tried = false;
                for new in changed(at(&mut value.clone(), &path)) {
                    let mut other = value.clone();
                    *at(&mut other, &path) = new;
                    let Ok(other) = serde_json::from_value::<Node>(other) else {
                        continue;
                    };
                    tried = true;
                    assert_ne!(other, node, "{path:?}");
                    assert_ne!(other.key(), node.key(), "{:?} at {path:?}", node.version());
                }
                assert!(tried, "no other value of {path:?} in {value} reads");
            }
        }
    }

    /// The engine parses the job and keys each node itself: every float must read back to the
    /// same bits, or it would compute with another weight than the build keyed.
    #[test]
    fn floats_read_back_exactly() {
        let mut node = every_node().remove(1);
        let Node::Fuse(fuse) = &mut node else {
            unreachable!()
        };
        for (i, weight) in [0.6363636363636362, 0.36363636363636365, 1e-300, 0.1 + 0.2]
            .into_iter()
            .enumerate()
        {
            fuse.deltas[i].weight = weight;
        }
        let back: Node = serde_json::from_slice(&serde_json::to_vec(&node).unwrap()).unwrap();
        assert_eq!(back.key(), node.key());
        assert_eq!(back, node);
    }

    /// A field left at its default is absent from the encoding, so that adding an optional
    /// field does not change the keys of the nodes that do not use it.
    #[test]
    fn defaults_are_not_encoded() {
        let node = Node::InnerMap {
            residual: NodeKey::of(b"r"),
            side: Side::Input,
            source: input("s"),
            target: input("t"),
            layout: Layout::default(),
        };
        let value = serde_json::to_value(&node).unwrap();
        assert!(value.get("layout").is_none(), "{value}");
    }
}
