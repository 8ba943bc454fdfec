//! How an adapter's modules are carried into the base: which target layers each source layer
//! goes to (`[adapter.map] layers`), how q and k rows move between rotary conventions, and the
//! fate of every module, which the transfer report prints.
use crate::arch::Place;
use crate::arch::Role;
use crate::io::peft::PeftAdapter;
use crate::recipe::layer_of;
use modelforge_core::rotary::{Rotary, RotaryMap};

use super::{Adapt, PlanError};

/// The permutation carrying a `role` delta's rows from the adapter's rotary convention into the
/// base's: only q and k, and only when the two differ. `Err`: the conventions and why a delta of
/// `out` rows cannot be carried.
pub(super) fn rotary_between(
    role: Role,
    from: Option<Rotary>,
    to: Option<Rotary>,
    head_dim: usize,
    out: usize,
) -> Result<Option<RotaryMap>, (Rotary, Rotary, String)> {
    let (Some(from), Some(to)) = (from, to) else {
        return Ok(None);
    };
    if from == to || !role.is_rotated() {
        return Ok(None);
    }
    if !from.fits(head_dim) || !to.fits(head_dim) {
        let reason = format!("a head of {head_dim} rows cannot hold both conventions' pairs");
        return Err((from, to, reason));
    }
    if !out.is_multiple_of(head_dim) {
        let reason = format!("its {out} rows are not whole heads of {head_dim}");
        return Err((from, to, reason));
    }
    Ok(Some(RotaryMap { from, to, head_dim }))
}

/// What became of one source module.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum What {
    /// Fused into `tensor` (a part of it, when `part`), with `share` of its delta (1/n when n
    /// source layers meet there).
    Fused {
        tensor: String,
        part: bool,
        /// Its rows land in the tensor's columns: placed by role, or by name, into a tensor
        /// stored (in × out).
        transposed: bool,
        by_role: bool,
        share: f64,
        rotary: Option<RotaryMap>,
    },
    /// No place in the base (`[output] adapter` writes it as it is).
    NoTarget,
    /// Left out by the recipe's `modules = { ... = "skip" }`.
    SkippedByRecipe,
    /// The base's architecture has nothing doing this role's work (a SwiGLU gate into a
    /// non-gated MLP).
    NoCounterpart(Role),
    /// `dims = "align"` has no map for it.
    NoAlignMap,
    /// Its layer maps to no layer of the base.
    Dropped { layer: usize },
}

impl std::fmt::Display for What {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            What::Fused {
                tensor,
                part,
                transposed,
                by_role,
                share,
                rotary,
            } => {
                let permuted = rotary.map_or(String::new(), |r| {
                    format!(
                        "; rows permuted from `{}` into `{}` rotary pairs",
                        r.from.name(),
                        r.to.name()
                    )
                });
                match (part, *transposed && *by_role) {
                    (true, columns) => write!(
                        f,
                        "fused by role into part of `{tensor}`{} (share {share}){permuted}",
                        if columns { ", as columns" } else { "" }
                    ),
                    (false, transposed) => write!(
                        f,
                        "fused into `{tensor}`{} (share {share}){permuted}",
                        if transposed { ", transposed" } else { "" }
                    ),
                }
            }
            What::NoTarget => f.write_str("no target"),
            What::SkippedByRecipe => f.write_str("skipped by the recipe"),
            What::NoCounterpart(role) => {
                write!(f, "skipped: {role} has no counterpart in the base")
            }
            What::NoAlignMap => f.write_str(
                "skipped: dims = align has no map for it (not a linear layer of a known architecture)",
            ),
            What::Dropped { layer } => {
                write!(f, "dropped: source layer {layer} maps to no layer of the base")
            }
        }
    }
}

impl serde::Serialize for What {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The fate of one source module, for the transfer report.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct Fate {
    pub adapter: String,
    pub module: String,
    pub fate: What,
    /// The width adaptation used, when widths were adapted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dims: Option<String>,
    /// ‖ΔW_t‖_F / ‖ΔW_s‖_F of an aligned delta (filled in after the build).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy: Option<f64>,
    /// Mean cosine of the principal angles between the mapped source weight's and the target
    /// weight's leading residual-side subspaces (filled in after the build).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlap: Option<f64>,
    /// The relative residual of the residual map's fit on the shared tokens' embeddings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residual_fit: Option<f64>,
    /// How its widths were adapted, when they were.
    #[serde(skip)]
    pub adapted: Option<Adapt>,
}

impl Fate {
    pub(super) fn new(adapter: &str, module: &str, fate: What) -> Fate {
        Fate {
            adapter: adapter.to_owned(),
            module: module.to_owned(),
            fate,
            dims: None,
            energy: None,
            overlap: None,
            residual_fit: None,
            adapted: None,
        }
    }

    /// Where a module was fused, and how.
    pub(super) fn fused(
        place: &Place,
        by_role: bool,
        share: f64,
        rotary: Option<RotaryMap>,
    ) -> What {
        What::Fused {
            tensor: place.tensor.clone(),
            part: place.rows.is_some(),
            transposed: place.transposed,
            by_role,
            share,
            rotary,
        }
    }

    /// Whether the module landed on its own name (a parameter's LoRA is keyed by the
    /// tensor's name itself), with nothing mapped.
    pub fn is_plain(&self) -> bool {
        let own = |tensor: &str| {
            tensor == self.module || tensor.strip_suffix(".weight") == Some(&self.module)
        };
        self.dims.is_none()
            && matches!(&self.fate, What::Fused {
                tensor,
                part: false,
                transposed,
                by_role,
                share,
                rotary: None,
            } if own(tensor) && *share == 1.0 && !(*transposed && *by_role))
    }
}

/// A source module sent to one target layer.
pub(super) struct Mapped<'a> {
    pub source: &'a str,
    /// The module path with the target layer.
    pub target: String,
    pub lora: &'a crate::io::peft::LoraModule,
    /// Its share of the target: 1, or 1/n when n source layers meet there.
    pub share: f64,
}

/// Where each of an adapter's modules goes, layer by layer, as `[adapter.map]` says.
pub(super) fn map_layers<'a>(
    entry: &crate::recipe::AdapterEntry,
    adapter: &'a PeftAdapter,
    target_layers: Option<usize>,
    transfer: &mut Vec<Fate>,
    src: &crate::recipe::Src,
) -> Result<Vec<Mapped<'a>>, PlanError> {
    use crate::recipe::{module_matches, LayerMap};
    let name = &entry.entry.written;
    let source_layers = match &entry.source {
        Some(source) => crate::io::hf::read_json(&source.path.join("config.json"))
            .ok()
            .and_then(|c| {
                ["num_hidden_layers", "n_layer", "num_layers"]
                    .iter()
                    .find_map(|k| c.get(*k).and_then(serde_json::Value::as_u64))
            })
            .map(|n| n as usize),
        None => None,
    }
    .or_else(|| {
        adapter
            .modules
            .keys()
            .filter_map(|m| layer_of(m))
            .max()
            .map(|l| l + 1)
    });
    let (s_count, t_count) = (source_layers.unwrap_or(0), target_layers.unwrap_or(0));
    let targets = |layer: usize| -> Vec<(usize, f64)> {
        match &entry.map {
            LayerMap::Same => vec![(layer, 1.0)],
            LayerMap::Truncate => (layer < t_count)
                .then_some((layer, 1.0))
                .into_iter()
                .collect(),
            LayerMap::Interpolate => (0..t_count)
                .filter(|&t| {
                    let nearest = if t_count <= 1 {
                        0.0
                    } else {
                        t as f64 * (s_count.saturating_sub(1)) as f64 / (t_count - 1) as f64
                    };
                    nearest.round() as usize == layer
                })
                .map(|t| (t, 1.0))
                .collect(),
            LayerMap::Table(pairs, _) => pairs
                .iter()
                .filter(|(s, _)| *s == layer)
                .map(|(_, t)| {
                    (
                        *t,
                        1.0 / pairs.iter().filter(|(_, u)| u == t).count() as f64,
                    )
                })
                .collect(),
        }
    };
    if let LayerMap::Table(pairs, span) = &entry.map {
        if let Some((_, t)) = pairs.iter().find(|(_, t)| *t >= t_count) {
            return Err(PlanError::LayerRange {
                range: t.to_string(),
                reason: format!("the base has {t_count} layers"),
                src: src.clone(),
                span: *span,
            });
        }
    }
    let mut mapped = Vec::new();
    for (module, lora) in &adapter.modules {
        if entry.skip.iter().any(|skip| module_matches(module, skip)) {
            transfer.push(Fate::new(name, module, What::SkippedByRecipe));
            continue;
        }
        let Some(layer) = layer_of(module) else {
            mapped.push(Mapped {
                source: module,
                target: module.clone(),
                lora,
                share: 1.0,
            });
            continue;
        };
        let to = targets(layer);
        if to.is_empty() {
            transfer.push(Fate::new(name, module, What::Dropped { layer }));
        }
        for (t, share) in to {
            mapped.push(Mapped {
                source: module,
                target: with_layer(module, layer, t),
                lora,
                share,
            });
        }
    }
    Ok(mapped)
}

/// `model.layers.3.mlp.up_proj` with layer 3 replaced by `to`.
fn with_layer(module: &str, from: usize, to: usize) -> String {
    let mut replaced = false;
    module
        .split('.')
        .map(|part| {
            if !replaced && part.parse::<usize>().ok() == Some(from) {
                replaced = true;
                to.to_string()
            } else {
                part.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}
