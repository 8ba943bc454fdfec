//! The build as a petgraph DAG: input files → output tensors → output files. `modelforge plan`
//! prints it; the executor walks its tensors in the order the output files need them.
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;

use super::keys::Keys;
use super::Plan;
use crate::io::writer::Shard;

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Node {
    Input {
        path: String,
    },
    Tensor {
        name: String,
        status: Status,
    },
    /// A node of `dims = "align"`: a residual map, an inner map or an aligned delta.
    Align {
        op: String,
        of: String,
        cached: bool,
    },
    Output {
        file: String,
    },
}

/// What a build would do for a tensor.
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

pub(crate) struct BuildGraph {
    pub graph: DiGraph<Node, ()>,
}

impl BuildGraph {
    /// `cached` says whether the cache holds an alignment node.
    pub fn new(
        plan: &Plan,
        keys: &Keys,
        statuses: &[Status],
        shards: &[Shard],
        cached: &dyn Fn(&crate::digest::NodeKey) -> bool,
    ) -> BuildGraph {
        let mut graph = DiGraph::new();
        let inputs: Vec<NodeIndex> = keys
            .files
            .iter()
            .map(|f| {
                graph.add_node(Node::Input {
                    path: f.shown.clone(),
                })
            })
            .collect();
        let input_of = |path: &std::path::Path| {
            keys.files
                .iter()
                .position(|f| f.path == path)
                .map(|i| inputs[i])
        };
        let align = &plan.align;
        // An alignment node, after the files it reads and the node it depends on.
        let align_node = |graph: &mut DiGraph<Node, ()>,
                          (op, of): (&str, String),
                          key,
                          reads: &[&std::path::Path],
                          after: Option<NodeIndex>| {
            let node = graph.add_node(Node::Align {
                op: op.into(),
                of,
                cached: cached(key),
            });
            for input in reads.iter().filter_map(|path| input_of(path)).chain(after) {
                graph.add_edge(input, node, ());
            }
            node
        };
        let mut residuals = Vec::new();
        for (r, key) in align.residuals.iter().zip(&keys.align.residuals) {
            let of = format!("{} -> {}", r.source.name, r.target.name);
            let reads = [r.source.path.as_path(), r.target.path.as_path()];
            residuals.push(align_node(
                &mut graph,
                ("residual_map", of),
                key,
                &reads,
                None,
            ));
        }
        let mut inners = Vec::new();
        for (m, key) in align.inners.iter().zip(&keys.align.inners) {
            let of = format!("{} -> {}", m.source.name, m.target.name);
            let reads = [m.source.path.as_path(), m.target.path.as_path()];
            let after = Some(residuals[m.residual]);
            inners.push(align_node(
                &mut graph,
                ("inner_map", of),
                key,
                &reads,
                after,
            ));
        }
        let mut deltas = Vec::new();
        for (d, key) in align.deltas.iter().zip(&keys.align.deltas) {
            let of = align.inners[d.inner].target.name.clone();
            let reads: Vec<&std::path::Path> = plan.inputs.adapters[d.adapter]
                .lora()
                .map(|a| a.file.path.as_path())
                .into_iter()
                .collect();
            let after = Some(inners[d.inner]);
            deltas.push(align_node(
                &mut graph,
                ("align_delta", of),
                key,
                &reads,
                after,
            ));
        }
        let mut tensor_nodes = std::collections::HashMap::new();
        for (tensor, status) in plan.tensors.iter().zip(statuses) {
            let node = graph.add_node(Node::Tensor {
                name: tensor.out.name.clone(),
                status: status.clone(),
            });
            tensor_nodes.insert(tensor.out.name.as_str(), node);
            for delta in &tensor.deltas {
                if let super::DeltaKind::LowRank {
                    adapt: Some(super::Adapt::Aligned(i)),
                    ..
                } = delta.kind
                {
                    graph.add_edge(deltas[i], node, ());
                }
            }
            for path in super::tensor_inputs(plan, tensor) {
                if let Some(input) = input_of(&path) {
                    graph.add_edge(input, node, ());
                }
            }
        }
        for shard in shards {
            let out = graph.add_node(Node::Output {
                file: shard.file_name.clone(),
            });
            for tensor in &shard.tensors {
                graph.add_edge(tensor_nodes[tensor.name.as_str()], out, ());
            }
        }
        BuildGraph { graph }
    }

    /// Graphviz, for `plan --format dot`.
    pub fn dot(&self) -> String {
        let mut out = String::from("digraph build {\n  rankdir=LR;\n");
        for index in self.graph.node_indices() {
            let (label, style) = match &self.graph[index] {
                Node::Input { path } => (path.clone(), "shape=note"),
                Node::Tensor { name, status } => (
                    name.clone(),
                    match status {
                        Status::Copy => "shape=box,color=gray",
                        Status::Cached => "shape=box,color=green",
                        Status::Compute { .. } => "shape=box,color=red",
                    },
                ),
                Node::Align { op, of, cached } => (
                    format!("{op} {of}"),
                    if *cached {
                        "shape=ellipse,color=green"
                    } else {
                        "shape=ellipse,color=red"
                    },
                ),
                Node::Output { file } => (file.clone(), "shape=folder"),
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
