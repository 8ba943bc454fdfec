//! How an adapter's modules are carried into the base: which target layers each source layer
//! goes to (`[adapter.map] layers`), how q and k rows move between rotary conventions, and the
//! fate of every module, which the transfer report prints.
use std::collections::BTreeMap;

use crate::arch::Place;
use crate::arch::Role;
use crate::io::peft::PeftAdapter;
use crate::recipe::layer_of;
use modelforge_core::rotary::{Rotary, RotaryMap};

use super::{Adapt, AlignItem, PlanError};

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
    /// Under `exact`, `truncate` or `pad` with a named source base: the node comparing its
    /// weights in the two bases (its `overlap`).
    #[serde(skip)]
    pub compared: Option<AlignItem>,
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
            compared: None,
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

    /// Whether the transfer report speaks of it: mapped, skipped or dropped, or compared with
    /// a source base.
    pub fn is_reported(&self) -> bool {
        !self.is_plain() || self.overlap.is_some()
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

/// The overlap two bases' weights score when nothing relates them: the leading subspaces
/// compared are an eighth of the width (the engine's `OVERLAP_FRACTION`), and two unrelated
/// k-dimensional subspaces of a d-dimensional space score about √(k/d).
pub(crate) const UNRELATED_OVERLAP: f64 = 0.353_553_390_593_273_8; // √(1/8)

/// Where the transfer figure splits the verdicts. Measured on the transfer experiment
/// (experiments/transfer/results.md, 156 carried adapters): those scoring at least 0.8 kept
/// 0.91–1.00 of the target's own LoRA's task-loss gain, those between 0.2 and 0.8 kept
/// 0.43–0.86, and those under 0.2 (all under 0.004) −0.01–0.30 with next-token accuracy
/// unchanged (≤ 0.04 of the LoRA's), what perturbing the weights buys.
const CLOSE: f64 = 0.8;
const PARTIAL: f64 = 0.2;

/// What the report says of one adapter as a whole: how much of it was carried, how alike the
/// bases are where it lands, and in plain words what to expect.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct Carried {
    pub adapter: String,
    /// Its modules, and how many of them were fused somewhere.
    pub modules: usize,
    pub fused: usize,
    /// Means over the fused modules: ‖ΔW_t‖_F / ‖ΔW_s‖_F (1 for a module moved whole) and the
    /// subspace overlap (of those compared).
    pub energy: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlap: Option<f64>,
    /// energy × (overlap − √(1/8)) / (1 − √(1/8)), clamped to [0, 1]: 1 for the adapter's own
    /// base under any map that takes it onto itself, 0 for bases as alike as unrelated ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer: Option<f64>,
    /// With `examples`: how much of the adapter's effect on them the build keeps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effect: Option<Effect>,
    pub verdict: Verdict,
}

/// An adapter's effect on its `examples`, kept: each text's log-likelihood changes by δₛ on the
/// source base when the adapter is added, and by δₜ on the base when the build is (the built
/// model against the base); `kept` = Σ δₛ·δₜ / Σ δₛ², 1 when the build changes every text as
/// the adapter did on its source, 0 when it changes them unrelatedly or not at all.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Effect {
    pub examples: usize,
    pub kept: f64,
    /// Σ δₛ / n and Σ δₜ / n: the mean change of a text's log-likelihood (nats) on each side.
    pub source_change: f64,
    pub target_change: f64,
}

impl Effect {
    /// The effect kept from each text's log-likelihood without and with the adapter, on the
    /// source (`source`: (without, with)) and on the target; `None` where the adapter does not
    /// change the examples at all on its source.
    pub fn of(source: (&[f64], &[f64]), target: (&[f64], &[f64])) -> Option<Effect> {
        let delta = |(without, with): (&[f64], &[f64])| -> Vec<f64> {
            with.iter().zip(without).map(|(a, b)| a - b).collect()
        };
        let (s, t) = (delta(source), delta(target));
        let norm: f64 = s.iter().map(|x| x * x).sum();
        if norm == 0.0 || s.is_empty() {
            return None;
        }
        let n = s.len() as f64;
        Some(Effect {
            examples: s.len(),
            kept: s.iter().zip(&t).map(|(a, b)| a * b).sum::<f64>() / norm,
            source_change: s.iter().sum::<f64>() / n,
            target_change: t.iter().sum::<f64>() / n,
        })
    }
}

/// What to expect of a carried adapter, from its transfer figure; written in plain words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Close,
    Partial,
    Unrelated,
    /// No module was compared: the recipe names no source base, or none is a linear layer of a
    /// known architecture.
    Unknown,
    /// With `examples`, from the effect kept on them (see [`EFFECT_KEPT`]).
    KeepsEffect,
    KeepsPart,
    Little,
    Nothing,
}

/// Where the effect kept on the examples splits the verdicts, from the transfer experiment
/// (experiments/transfer/results.md): over its 156 carried adapters the effect kept orders the
/// task-loss gain they keep at Spearman 0.99, about one for one. Those keeping ≥ 0.8 of it kept
/// 0.79–1.00 of the gain, ≥ 0.2 0.24–0.78, and the 66 between 0.05 and 0.2 kept 0.05–0.18 with
/// next-token accuracy unchanged (≤ 0.03): what perturbing a base that is wrong on the task
/// buys (random directions of the adapter's size: up to 0.11).
const EFFECT_KEPT: [f64; 3] = [0.8, 0.2, 0.05];

impl Verdict {
    fn of(transfer: Option<f64>) -> Verdict {
        match transfer {
            None => Verdict::Unknown,
            Some(t) if t >= CLOSE => Verdict::Close,
            Some(t) if t >= PARTIAL => Verdict::Partial,
            Some(_) => Verdict::Unrelated,
        }
    }

    fn of_effect(kept: f64) -> Verdict {
        match kept {
            k if k >= EFFECT_KEPT[0] => Verdict::KeepsEffect,
            k if k >= EFFECT_KEPT[1] => Verdict::KeepsPart,
            k if k >= EFFECT_KEPT[2] => Verdict::Little,
            _ => Verdict::Nothing,
        }
    }

    pub fn words(self) -> &'static str {
        match self {
            Verdict::KeepsEffect => "keeps its effect on the examples",
            Verdict::KeepsPart => "keeps part of its effect on the examples",
            Verdict::Little => {
                "little of its effect on the examples: no more than perturbing the base does"
            }
            Verdict::Nothing => "none of its effect on the examples",
            Verdict::Close => "close to the source",
            Verdict::Partial => "partial",
            Verdict::Unrelated => "unrelated bases: expect nothing",
            Verdict::Unknown => {
                "the report cannot tell (name the adapter's `source` base to compare them)"
            }
        }
    }
}

impl serde::Serialize for Verdict {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.words())
    }
}

impl Carried {
    /// One entry per adapter the report speaks of, in their order: those with a module mapped,
    /// skipped or dropped, or compared with a source base (not one fused into its own base as
    /// it is).
    pub fn of(fates: &[Fate], effects: &BTreeMap<String, Effect>) -> Vec<Carried> {
        let mut names: Vec<&str> = Vec::new();
        for fate in fates {
            if fate.is_reported() && !names.contains(&fate.adapter.as_str()) {
                names.push(&fate.adapter);
            }
        }
        names
            .into_iter()
            .map(|name| {
                let all: Vec<&Fate> = fates.iter().filter(|f| f.adapter == name).collect();
                let fused: Vec<&Fate> = all
                    .iter()
                    .copied()
                    .filter(|f| matches!(f.fate, What::Fused { .. }))
                    .collect();
                let mean =
                    |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
                let energy =
                    mean(fused.iter().map(|f| f.energy.unwrap_or(1.0)).collect()).unwrap_or(0.0);
                let overlap = mean(fused.iter().filter_map(|f| f.overlap).collect());
                let transfer = overlap.map(|o| {
                    energy * ((o - UNRELATED_OVERLAP) / (1.0 - UNRELATED_OVERLAP)).clamp(0.0, 1.0)
                });
                let effect = effects.get(name).cloned();
                Carried {
                    adapter: name.to_owned(),
                    modules: all.len(),
                    fused: fused.len(),
                    energy,
                    overlap,
                    transfer,
                    verdict: match &effect {
                        Some(effect) => Verdict::of_effect(effect.kept),
                        None => Verdict::of(transfer),
                    },
                    effect,
                }
            })
            .collect()
    }

    /// `close to the source (transfer 0.93: energy kept 1.000, subspace overlap 0.957, 21 of 21 modules fused)`
    pub fn describe(&self) -> String {
        let figures = match (self.transfer, self.overlap) {
            (Some(t), Some(o)) => format!(
                "transfer {t:.2}: energy kept {:.3}, subspace overlap {o:.3}, ",
                self.energy
            ),
            _ => format!("energy kept {:.3}, ", self.energy),
        };
        let examples = match &self.effect {
            Some(e) => format!(
                "kept {:.2} of the adapter's effect on {} examples, ",
                e.kept, e.examples
            ),
            None => String::new(),
        };
        format!(
            "{} ({examples}{figures}{} of {} modules fused)",
            self.verdict.words(),
            self.fused,
            self.modules
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fused(adapter: &str, module: &str, energy: Option<f64>, overlap: Option<f64>) -> Fate {
        let place = Place::named(format!("{module}.weight"));
        Fate {
            energy,
            overlap,
            ..Fate::new(adapter, module, Fate::fused(&place, false, 1.0, None))
        }
    }

    /// The figure is the mean energy (1 for a module moved whole) times the mean overlap's
    /// place between unrelated bases (√(1/8)) and identical ones (1), over the fused modules
    /// only; an adapter fused into its own base as it is is not spoken of.
    #[test]
    fn the_effect_kept_on_examples_and_its_verdict() {
        let (without, with) = ([-10.0, -20.0, -30.0], [-8.0, -16.0, -30.0]);
        // The build changes each text half as much as the adapter did on its source.
        let half = Effect::of(
            (&without, &with),
            (&[-5.0, -5.0, -5.0], &[-4.0, -3.0, -5.0]),
        )
        .expect("the adapter changes the examples");
        assert_eq!((half.examples, half.kept), (3, 0.5));
        assert_eq!((half.source_change, half.target_change), (2.0, 1.0));
        assert_eq!(Verdict::of_effect(half.kept), Verdict::KeepsPart);
        // Changes unrelated to the adapter's: nothing kept.
        let other = Effect::of((&without, &with), (&[0.0; 3], &[2.0, -1.0, 7.0])).unwrap();
        assert_eq!(other.kept, 0.0);
        assert_eq!(Verdict::of_effect(other.kept), Verdict::Nothing);
        assert_eq!(Verdict::of_effect(1.01), Verdict::KeepsEffect);
        assert_eq!(Verdict::of_effect(0.1), Verdict::Little);
        // An adapter that changes none of its examples gives no figure.
        assert!(Effect::of((&without, &without), (&without, &with)).is_none());
    }

    #[test]
    fn the_transfer_figure_and_its_verdict() {
        let u = UNRELATED_OVERLAP;
        let fates = vec![
            fused("a", "m.0.q", None, Some(1.0)),
            fused("a", "m.1.q", Some(0.5), Some(u + 0.5 * (1.0 - u))),
            Fate::new("a", "m.2.q", What::Dropped { layer: 2 }),
            fused("b", "m.0.q", None, Some(0.2)),
            fused("own", "m.0.q", None, None),
        ];
        let carried = Carried::of(&fates, &BTreeMap::new());
        assert_eq!(carried.len(), 2, "{carried:?}");
        let a = &carried[0];
        assert_eq!((a.modules, a.fused), (3, 2));
        assert!((a.energy - 0.75).abs() < 1e-12, "{a:?}");
        assert!((a.transfer.unwrap() - 0.75 * 0.75).abs() < 1e-12, "{a:?}");
        assert_eq!(a.verdict, Verdict::Partial);
        // Below the unrelated level, clamped to 0.
        assert_eq!(carried[1].transfer, Some(0.0));
        assert_eq!(carried[1].verdict, Verdict::Unrelated);
        assert_eq!(Verdict::of(Some(CLOSE)), Verdict::Close);
        assert_eq!(Verdict::of(Some(PARTIAL - 1e-9)), Verdict::Unrelated);
        assert_eq!(Verdict::of(None), Verdict::Unknown);
        assert_eq!(
            a.describe(),
            "partial (transfer 0.56: energy kept 0.750, subspace overlap 0.838, 2 of 3 modules fused)"
        );
    }
}
