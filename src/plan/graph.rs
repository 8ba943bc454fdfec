//! The build as a petgraph DAG: input files → nodes → output files. Each node carries its one
//! description ([`Node`]), from which its key comes and which the engine is sent as it is; the
//! build schedules and executes by walking this graph, and `modelforge plan` prints it.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use modelforge_core::job::Place;
use modelforge_core::node::{
    Content, DeviceClass, Fuse, Input, LoraKind, Merge, Node, Refactor, Truncation, Weighted,
};
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;

use super::{AlignItem, DeltaKind, Origin, Plan, TensorPlan};
use crate::digest::{FileDigest, NodeKey, TensorDigest};
use crate::io::safetensors::{SafetensorsFile, TensorMeta};
use crate::io::writer::Shard;
use crate::recipe::RankChoice;
use crate::store::Store;

/// An input file of the build.
#[derive(Clone, Debug)]
pub(crate) struct InputFile {
    pub path: PathBuf,
    /// The path relative to the recipe's folder, as the lock file records it.
    pub shown: String,
    pub digest: FileDigest,
}

/// A node with its key and the name it is shown by.
#[derive(Clone, Debug)]
pub(crate) struct Keyed {
    pub key: NodeKey,
    pub name: String,
    pub node: Node,
}

impl Keyed {
    fn new(name: String, node: Node) -> Keyed {
        Keyed {
            key: node.key(),
            name,
            node,
        }
    }

    /// The fusion it describes, for a fused tensor.
    pub fn fuse(&self) -> Option<&Fuse> {
        match &self.node {
            Node::Fuse(fuse) => Some(fuse),
            _ => None,
        }
    }
}

// A graph holds one input per file and one node per tensor: boxing nodes saves little.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub(crate) enum Step {
    Input(InputFile),
    Node(Keyed),
    Output { file: String },
}

/// What a build would do for a node.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum Status {
    /// Copied byte for byte from its input; never cached.
    Copy,
    /// Its result is in the cache.
    Cached,
    /// To compute, and why.
    Compute { why: Vec<String> },
}

/// Settings of the build that nodes take.
pub(crate) struct Settings<'a> {
    pub device: DeviceClass,
    pub merge: &'a crate::recipe::Merge,
    /// The seed of DARE's random pruning.
    pub seed: u64,
    /// With `[output] adapter`: how its deltas are re-factored.
    pub refactor: Option<RankChoice>,
}

pub(crate) struct BuildGraph {
    pub graph: DiGraph<Step, ()>,
    pub files: Vec<InputFile>,
    /// Each output tensor's node (a copy or a fusion), by the tensor's name.
    tensors: HashMap<String, NodeIndex>,
    /// With `[output] adapter`: the node re-factoring a tensor's delta, by the tensor's name.
    refactors: HashMap<String, NodeIndex>,
    /// The nodes of `dims` adaptation, by what the plan calls them.
    align: HashMap<AlignItem, NodeIndex>,
    /// Where each input tensor's bytes are.
    places: HashMap<(Content, String), Place>,
    by_key: HashMap<NodeKey, NodeIndex>,
}

impl BuildGraph {
    /// Digests every input file (through the stat cache) and describes every node.
    pub fn new(
        plan: &Plan,
        recipe_dir: &Path,
        store: &Store,
        rehash: bool,
        settings: &Settings<'_>,
    ) -> std::io::Result<BuildGraph> {
        let files = hash_inputs(plan, recipe_dir, store, rehash)?;
        let mut namer = Namer::new(plan, store, &files)?;
        let mut graph = DiGraph::new();
        let file_nodes: HashMap<PathBuf, NodeIndex> = files
            .iter()
            .map(|f| (f.path.clone(), graph.add_node(Step::Input(f.clone()))))
            .collect();
        let mut this = BuildGraph {
            graph,
            files,
            tensors: HashMap::new(),
            refactors: HashMap::new(),
            align: HashMap::new(),
            places: HashMap::new(),
            by_key: HashMap::new(),
        };
        this.add_alignment(plan, &mut namer);
        for tensor in &plan.tensors {
            let node = match tensor.is_copy() {
                true => Node::Copy {
                    origin: namer.origin(plan, tensor),
                },
                false => Node::Fuse(this.fuse(plan, tensor, &mut namer, settings)),
            };
            let index = this.add(Keyed::new(tensor.out.name.clone(), node));
            this.tensors.insert(tensor.out.name.clone(), index);
            if let Some(refactor) = settings
                .refactor
                .and_then(|rank| refactor(plan, tensor, rank))
            {
                if let Step::Node(Keyed {
                    node: Node::Fuse(fuse),
                    ..
                }) = &this.graph[index]
                {
                    let node = Node::Refactor {
                        fuse: fuse.clone(),
                        refactor,
                    };
                    let at = this.add(Keyed::new(tensor.out.name.clone(), node));
                    this.refactors.insert(tensor.out.name.clone(), at);
                }
            }
        }
        // Each node after the files it reads.
        for index in this.graph.node_indices().collect::<Vec<_>>() {
            let Step::Node(keyed) = &this.graph[index] else {
                continue;
            };
            let mut read: Vec<&Path> = keyed
                .node
                .inputs()
                .into_iter()
                .filter_map(|input| namer.places.get(&place_key(input)))
                .map(|place| place.path.as_path())
                .collect();
            read.sort();
            read.dedup();
            let sources: Vec<NodeIndex> = read
                .iter()
                .filter_map(|path| file_nodes.get(*path).copied())
                .collect();
            for source in sources {
                this.graph.add_edge(source, index, ());
            }
        }
        this.places = namer.places;
        Ok(this)
    }

    /// Adds a node, after the nodes whose results it reads.
    fn add(&mut self, keyed: Keyed) -> NodeIndex {
        let (key, after) = (keyed.key, keyed.node.after());
        let index = self.graph.add_node(Step::Node(keyed));
        for before in after.iter().filter_map(|key| self.by_key.get(key).copied()) {
            self.graph.add_edge(before, index, ());
        }
        self.by_key.entry(key).or_insert(index);
        index
    }

    /// The nodes `dims` adaptation computes before fusing. Each key depends on the digests of
    /// what its node reads and on the keys of the nodes it reads, never on paths: moving a
    /// base changes nothing, and a second adapter on the same pair of bases finds the maps
    /// already made.
    fn add_alignment(&mut self, plan: &Plan, namer: &mut Namer) {
        let align = &plan.align;
        let tensor =
            |namer: &mut Namer, t: &super::TensorRef| namer.input(&t.path, &t.name, &t.meta);
        for (i, r) in align.residuals.iter().enumerate() {
            let node = Node::ResidualMap {
                source: tensor(namer, &r.source),
                target: tensor(namer, &r.target),
                pairs: r.pairs.clone(),
            };
            let name = format!("{} -> {}", r.source.name, r.target.name);
            let index = self.add(Keyed::new(name, node));
            self.align.insert(AlignItem::Residual(i), index);
        }
        for (i, m) in align.inners.iter().enumerate() {
            let node = Node::InnerMap {
                residual: self.align_key(AlignItem::Residual(m.residual)),
                side: m.side,
                source: tensor(namer, &m.source),
                target: tensor(namer, &m.target),
                layout: m.layout.clone(),
            };
            let name = format!("{} -> {}", m.source.name, m.target.name);
            let index = self.add(Keyed::new(name, node));
            self.align.insert(AlignItem::Inner(i), index);
        }
        let lora_file = |adapter: usize| {
            &plan.inputs.adapters[adapter]
                .lora()
                .expect("only LoRA modules are adapted")
                .file
        };
        for (i, d) in align.deltas.iter().enumerate() {
            let file = lora_file(d.adapter);
            let inner = &align.inners[d.inner];
            let node = Node::AlignDelta {
                residual: self.align_key(AlignItem::Residual(inner.residual)),
                inner: self.align_key(AlignItem::Inner(d.inner)),
                side: inner.side,
                a: namer.in_file(file, &d.a, None),
                b: namer.in_file(file, &d.b, None),
                rank: d.rank,
            };
            let index = self.add(Keyed::new(inner.target.name.clone(), node));
            self.align.insert(AlignItem::Delta(i), index);
        }
        for (i, f) in align.fits.iter().enumerate() {
            let file = lora_file(f.adapter);
            let node = Node::FitEnergy {
                a: namer.in_file(file, &f.a, None),
                b: namer.in_file(file, &f.b, None),
                to: f.to,
            };
            let name = namer.name_in(file, &f.a).unwrap_or_default();
            let index = self.add(Keyed::new(name, node));
            self.align.insert(AlignItem::Fit(i), index);
        }
        for (i, o) in align.overlaps.iter().enumerate() {
            let node = Node::Overlap {
                side: o.side,
                source: tensor(namer, &o.source),
                target: tensor(namer, &o.target),
                layout: o.layout.clone(),
            };
            let name = format!("{} ~ {}", o.source.name, o.target.name);
            let index = self.add(Keyed::new(name, node));
            self.align.insert(AlignItem::Overlap(i), index);
        }
    }

    fn fuse(
        &self,
        plan: &Plan,
        tensor: &TensorPlan,
        namer: &mut Namer,
        settings: &Settings<'_>,
    ) -> Fuse {
        let name = &tensor.out.name;
        let deltas = tensor
            .deltas
            .iter()
            .map(|delta| {
                let file = plan.inputs.adapters[delta.adapter]
                    .tensor_file(name)
                    .expect("planned tensors exist");
                Weighted {
                    weight: delta.weight,
                    scaling: delta.scaling,
                    delta: delta.kind.map(
                        &mut |meta: &TensorMeta| namer.in_file(file, meta, Some(name)),
                        &mut |item: &AlignItem| self.align_key(*item),
                    ),
                }
            })
            .collect();
        let method = settings.merge.method;
        let merge = (method.sparsify().is_some() || method.elects_sign()).then(|| {
            let module = name.rsplit_once('.').map_or(name.as_str(), |(m, _)| m);
            Merge {
                sparsify: method.sparsify(),
                elect_sign: method.elects_sign().then_some(settings.merge.majority_sign),
                density: plan
                    .density
                    .for_module(module, crate::recipe::layer_of(module)),
                seed: tensor_seed(settings.seed, name),
            }
        });
        Fuse {
            origin: namer.origin(plan, tensor),
            origin_cast: match &tensor.origin {
                Origin::Replacement { cast, .. } => *cast,
                Origin::Base { .. } => None,
            },
            deltas,
            merge,
            dtype: tensor.out.dtype,
            device: settings.device,
        }
    }

    fn keyed(&self, index: NodeIndex) -> &Keyed {
        match &self.graph[index] {
            Step::Node(keyed) => keyed,
            _ => unreachable!("indices kept are of nodes"),
        }
    }

    fn align_key(&self, item: AlignItem) -> NodeKey {
        self.align(item).key
    }

    /// A node of `dims` adaptation.
    pub fn align(&self, item: AlignItem) -> &Keyed {
        self.keyed(self.align[&item])
    }

    /// The node of the output tensor `name`: a copy or a fusion.
    pub fn tensor(&self, name: &str) -> &Keyed {
        self.keyed(self.tensors[name])
    }

    /// The node that fuses the output tensor `name`, unless it is copied.
    pub fn fused(&self, name: &str) -> Option<&Keyed> {
        let keyed = self.tensor(name);
        keyed.fuse().map(|_| keyed)
    }

    /// With `[output] adapter`: the node re-factoring the delta of tensor `name`, when it has
    /// a low-rank one.
    pub fn refactor(&self, name: &str) -> Option<(&Keyed, Refactor)> {
        let keyed = self.keyed(*self.refactors.get(name)?);
        match &keyed.node {
            Node::Refactor { refactor, .. } => Some((keyed, *refactor)),
            _ => None,
        }
    }

    /// Every node, each after the nodes and files it reads.
    pub fn in_order(&self) -> Vec<&Keyed> {
        petgraph::algo::toposort(&self.graph, None)
            .expect("a build graph has no cycles")
            .into_iter()
            .filter_map(|i| match &self.graph[i] {
                Step::Node(keyed) => Some(keyed),
                _ => None,
            })
            .collect()
    }

    /// Where the inputs of `nodes` are, for the engine.
    pub fn places<'a>(&self, nodes: impl IntoIterator<Item = &'a Node>) -> Vec<Place> {
        let mut places: BTreeMap<(Content, String), Place> = BTreeMap::new();
        for input in nodes.into_iter().flat_map(Node::inputs) {
            let key = place_key(input);
            if let Some(place) = self.places.get(&key) {
                places.entry(key).or_insert_with(|| place.clone());
            }
        }
        places.into_values().collect()
    }

    /// Adds the fused model's files, after the tensors each holds.
    pub fn add_outputs(&mut self, shards: &[Shard]) {
        for shard in shards {
            let out = self.graph.add_node(Step::Output {
                file: shard.file_name.clone(),
            });
            for tensor in &shard.tensors {
                self.graph.add_edge(self.tensors[&tensor.name], out, ());
            }
        }
    }

    /// The graph as JSON, for `plan --format json`, with each node's status.
    pub fn json(&self, status: &dyn Fn(&Keyed) -> Status) -> Vec<serde_json::Value> {
        use serde_json::json;
        self.graph
            .node_indices()
            .map(|i| match &self.graph[i] {
                Step::Input(file) => json!({"kind": "input", "path": file.shown}),
                Step::Output { file } => json!({"kind": "output", "file": file}),
                Step::Node(keyed) => {
                    let op =
                        serde_json::to_value(&keyed.node).expect("a node serialises")["op"].clone();
                    let mut value = json!({
                        "kind": "node",
                        "op": op,
                        "name": keyed.name,
                        "key": keyed.key,
                    });
                    let status = serde_json::to_value(status(keyed)).expect("a status serialises");
                    value
                        .as_object_mut()
                        .expect("an object")
                        .extend(status.as_object().expect("an object").clone());
                    value
                }
            })
            .collect()
    }

    /// Graphviz, for `plan --format dot`.
    pub fn dot(&self, status: &dyn Fn(&Keyed) -> Status) -> String {
        let mut out = String::from("digraph build {\n  rankdir=LR;\n");
        for index in self.graph.node_indices() {
            let (label, style) = match &self.graph[index] {
                Step::Input(file) => (file.shown.clone(), "shape=note".to_owned()),
                Step::Node(keyed) => {
                    let shape = match keyed.node {
                        Node::Copy { .. } | Node::Fuse(_) => "box",
                        _ => "ellipse",
                    };
                    let color = match status(keyed) {
                        Status::Copy => "gray",
                        Status::Cached => "green",
                        Status::Compute { .. } => "red",
                    };
                    let op = serde_json::to_value(&keyed.node).expect("a node serialises")["op"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    let label = match keyed.node {
                        Node::Copy { .. } | Node::Fuse(_) => keyed.name.clone(),
                        _ => format!("{op} {}", keyed.name),
                    };
                    (label, format!("shape={shape},color={color}"))
                }
                Step::Output { file } => (file.clone(), "shape=folder".to_owned()),
            };
            out.push_str(&format!(
                "  n{} [label={:?},{style}];\n",
                index.index(),
                label
            ));
        }
        for edge in self.graph.raw_edges() {
            out.push_str(&format!(
                "  n{} -> n{};\n",
                edge.source().index(),
                edge.target().index()
            ));
        }
        out.push_str("}\n");
        out
    }
}

fn place_key(input: &Input) -> (Content, String) {
    (input.content.clone(), input.tensor.clone())
}

/// Every input file of the build, digested (through the stat cache).
fn hash_inputs(
    plan: &Plan,
    recipe_dir: &Path,
    store: &Store,
    rehash: bool,
) -> std::io::Result<Vec<InputFile>> {
    plan.input_files()
        .into_iter()
        .map(|path| {
            let digest = store
                .file_digest(&path, rehash)
                .map_err(|e| with_path(e, &path))?;
            // A file of a cached Hugging Face snapshot is named by repository and commit, the
            // same on every machine.
            let shown =
                crate::io::hf_cache::shown(&path).unwrap_or_else(|| pathdiff(&path, recipe_dir));
            Ok(InputFile {
                path,
                shown,
                digest,
            })
        })
        .collect()
}

/// Names input tensors by content, and remembers where each is.
struct Namer {
    files: HashMap<PathBuf, FileDigest>,
    /// An adapter's tensors, keyed by their own bytes.
    tensors: HashMap<PathBuf, BTreeMap<String, TensorDigest>>,
    /// The tensors of adapters' files by their offset and length (LoRA tensors are never
    /// empty, so no two share them).
    names: HashMap<(PathBuf, u64, u64), String>,
    places: HashMap<(Content, String), Place>,
}

impl Namer {
    fn new(plan: &Plan, store: &Store, files: &[InputFile]) -> std::io::Result<Namer> {
        let mut namer = Namer {
            files: files.iter().map(|f| (f.path.clone(), f.digest)).collect(),
            tensors: HashMap::new(),
            names: HashMap::new(),
            places: HashMap::new(),
        };
        for source in &plan.inputs.adapters {
            let Some(adapter) = source.lora() else {
                continue;
            };
            let file = &adapter.file;
            let tensors: Vec<(String, u64, u64)> = file
                .tensors
                .iter()
                .map(|(name, meta)| (name.clone(), meta.start, meta.len))
                .collect();
            let digests = store
                .tensor_digests(&file.path, namer.files[&file.path], &tensors)
                .map_err(|e| with_path(e, &file.path))?;
            namer.tensors.insert(file.path.clone(), digests);
            for (name, start, len) in tensors {
                namer.names.insert((file.path.clone(), start, len), name);
            }
        }
        Ok(namer)
    }

    fn input(&mut self, path: &Path, name: &str, meta: &TensorMeta) -> Input {
        let content = match self.tensors.get(path).and_then(|d| d.get(name)) {
            Some(digest) => Content::Bytes(*digest),
            None => Content::File(self.files[path]),
        };
        self.places
            .entry((content.clone(), name.to_owned()))
            .or_insert_with(|| Place {
                content: content.clone(),
                tensor: name.to_owned(),
                path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
                start: meta.start,
                len: meta.len,
            });
        Input {
            content,
            tensor: name.to_owned(),
            dtype: meta.dtype,
            shape: meta.shape.clone(),
        }
    }

    /// The name of the tensor stored at `meta`'s place in `file`.
    fn name_in(&self, file: &SafetensorsFile, meta: &TensorMeta) -> Option<String> {
        self.names
            .get(&(file.path.clone(), meta.start, meta.len))
            .cloned()
    }

    /// The tensor at `meta`'s place in `file`: an adapter's, found by its place, or a full
    /// model's, named `default`.
    fn in_file(
        &mut self,
        file: &SafetensorsFile,
        meta: &TensorMeta,
        default: Option<&str>,
    ) -> Input {
        let name = self
            .name_in(file, meta)
            .or_else(|| default.map(str::to_owned))
            .unwrap_or_default();
        self.input(&file.path, &name, meta)
    }

    /// The input tensor a tensor starts from.
    fn origin(&mut self, plan: &Plan, tensor: &TensorPlan) -> Input {
        match &tensor.origin {
            Origin::Base { tensor: name, meta } => {
                let (file, _) = plan
                    .inputs
                    .base
                    .weights
                    .get(name)
                    .expect("planned tensors exist");
                self.input(&file.path, name, meta)
            }
            Origin::Replacement { adapter, meta, .. } => {
                let file = plan.inputs.adapters[*adapter]
                    .tensor_file(&tensor.out.name)
                    .expect("planned tensors exist");
                self.in_file(file, meta, None)
            }
        }
    }
}

/// For `[output] adapter`: how a tensor's combined delta is factored, when it is low-rank (a
/// LoRA module's or a full model's; bias vectors and token rows have no factors).
fn refactor(plan: &Plan, tensor: &TensorPlan, rank: RankChoice) -> Option<Refactor> {
    let kinds: Vec<LoraKind> = tensor
        .deltas
        .iter()
        .filter_map(|d| match &d.kind {
            DeltaKind::LowRank { kind, .. } => Some(*kind),
            DeltaKind::Difference(_) => Some(super::difference_kind(&tensor.out.name)),
            DeltaKind::Vector(_) | DeltaKind::Tokens { .. } => None,
        })
        .collect();
    if kinds.is_empty() || kinds.len() != tensor.deltas.len() || tensor.out.shape.len() != 2 {
        return None;
    }
    let truncation = match rank {
        RankChoice::Exact => Truncation::Rank(
            tensor
                .deltas
                .iter()
                .map(|d| match &d.kind {
                    DeltaKind::LowRank {
                        adapt: Some(modelforge_core::node::Adapt::Aligned { node, .. }),
                        ..
                    } => match node {
                        AlignItem::Delta(i) => plan.align.deltas[*i].rank,
                        _ => 0,
                    },
                    DeltaKind::LowRank { a, .. } => a.shape[0],
                    // A full model's delta has no rank to speak of: keep it all.
                    DeltaKind::Difference(_) => tensor.out.shape[0].min(tensor.out.shape[1]),
                    DeltaKind::Vector(_) | DeltaKind::Tokens { .. } => 0,
                })
                .sum(),
        ),
        RankChoice::Rank(k) => Truncation::Rank(k),
        RankChoice::Energy(e) => Truncation::Energy(e),
    };
    // An input embedding is written as PEFT's embedding LoRA, whatever changed it (a tied
    // head's LoRA lands on it too): (B·A)ᵀ is the delta.
    let embedding = super::difference_kind(&tensor.out.name) == LoraKind::Embedding;
    Some(Refactor {
        truncation,
        transpose: embedding || kinds[0] != LoraKind::Linear,
    })
}

/// The seed of one tensor's random pruning: from the recipe's seed and the tensor's name, so
/// that it does not depend on the order or the thread tensors are computed in.
pub(crate) fn tensor_seed(seed: u64, tensor: &str) -> i64 {
    let hash = blake3::hash(format!("{seed}:{tensor}").as_bytes());
    let bytes: [u8; 8] = hash.as_bytes()[..8].try_into().expect("8 bytes");
    (u64::from_le_bytes(bytes) >> 1) as i64
}

fn with_path(err: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(err.kind(), format!("{}: {err}", path.display()))
}

/// `path` relative to `base` where it lies below it (or beside it, through `..`).
pub(crate) fn pathdiff(path: &Path, base: &Path) -> String {
    use std::path::Component;
    let abs = |p: &Path| {
        let p = if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        };
        std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
    };
    let (path, base) = (abs(path), abs(base));
    let p: Vec<Component> = path.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c);
    }
    out.display().to_string()
}
