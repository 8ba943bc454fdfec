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
    Input { path: String },
    Tensor { name: String, status: Status },
    Output { file: String },
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
    pub fn new(plan: &Plan, keys: &Keys, statuses: &[Status], shards: &[Shard]) -> BuildGraph {
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
        let mut tensor_nodes = std::collections::HashMap::new();
        for (tensor, status) in plan.tensors.iter().zip(statuses) {
            let node = graph.add_node(Node::Tensor {
                name: tensor.out.name.clone(),
                status: status.clone(),
            });
            tensor_nodes.insert(tensor.out.name.as_str(), node);
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
