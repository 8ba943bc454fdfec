//! Planning: the opened inputs and the recipe resolved into what each output tensor is made of.
//! Everything that can be checked before computing is checked here, so execution only fails on
//! I/O.
mod dims;
mod error;
mod graph;
mod keys;
mod transfer;

use std::path::Path;

use safetensors::Dtype;

pub(crate) use dims::{Alignment, TensorRef};
pub(crate) use error::PlanError;
pub(crate) use graph::{BuildGraph, Status};
pub(crate) use keys::{pathdiff, Keys, MergeKey, TensorKey};

use crate::arch::{Place, Schema, Schemas};
use crate::exec::job::{Layout, RowMap, Side};
use crate::exec::rotary::{Rotary, RotaryMap};
use crate::io::hf::HfModel;
use crate::io::peft::{LoraKind, PeftAdapter};
use crate::io::safetensors::TensorMeta;
use crate::io::writer::OutTensor;
use crate::recipe::{layer_of, DimsMap, OutputDtype, Recipe, ResolvedRule, Weight};
pub(crate) use transfer::Fate;
use transfer::{map_layers, rotary_between, Mapped};

/// The opened inputs of a recipe.
pub(crate) struct Inputs {
    pub base: HfModel,
    /// One per `[[adapter]]`, in the recipe's order.
    pub adapters: Vec<Source>,
}

/// What an `[[adapter]]` names: a PEFT LoRA adapter, or a full fine-tuned model of the base's
/// architecture whose delta is (model − base).
pub(crate) enum Source {
    Lora(PeftAdapter),
    Model(HfModel),
}

impl Source {
    fn open(dir: &Path) -> Result<Source, crate::io::InputError> {
        if !dir.join("adapter_config.json").exists() && dir.join("config.json").exists() {
            return Ok(Source::Model(HfModel::open(dir)?));
        }
        Ok(Source::Lora(PeftAdapter::open(dir)?))
    }

    pub fn lora(&self) -> Option<&PeftAdapter> {
        match self {
            Source::Lora(adapter) => Some(adapter),
            Source::Model(_) => None,
        }
    }

    /// The files whose digests stand for this source in node keys and the lock.
    pub fn files(&self) -> Vec<std::path::PathBuf> {
        match self {
            Source::Lora(adapter) => vec![
                adapter.dir.join("adapter_config.json"),
                adapter.file.path.clone(),
            ],
            Source::Model(model) => {
                let mut files = model.weight_files();
                files.push(model.dir.join("config.json"));
                files
            }
        }
    }

    /// The file and place of a tensor that a delta reads.
    pub fn tensor_file(&self, tensor: &str) -> Option<&crate::io::safetensors::SafetensorsFile> {
        match self {
            Source::Lora(adapter) => Some(&adapter.file),
            Source::Model(model) => model.weights.get(tensor).map(|(file, _)| file),
        }
    }
}

/// Where a tensor's starting value comes from.
#[derive(Clone, Debug)]
pub(crate) enum Origin {
    Base(TensorMeta),
    /// A `modules_to_save` tensor of adapter `adapter` replaces the base's.
    Replacement {
        adapter: usize,
        meta: TensorMeta,
    },
}

/// One adapter's contribution to a tensor: `factor · delta`.
#[derive(Clone, Debug)]
pub(crate) struct Delta {
    pub adapter: usize,
    /// The recipe's weight for this adapter and module.
    pub weight: f64,
    /// The adapter's own scaling.
    pub scaling: f64,
    pub kind: DeltaKind,
}

#[derive(Clone, Debug)]
pub(crate) enum DeltaKind {
    /// B·A, transposed for `LoraKind::LinearTransposed` and `Embedding`.
    LowRank {
        kind: LoraKind,
        a: TensorMeta,
        b: TensorMeta,
        /// In a fused target tensor (another architecture's layout), where B's rows go.
        rows: Option<RowMap>,
        /// q/k rows carried into the target's rotary convention, before `rows` places them.
        rotary: Option<RotaryMap>,
        /// Made for other widths (`[adapter.map] dims`).
        adapt: Option<Adapt>,
    },
    /// A bias vector (`lora_bias`).
    Vector(TensorMeta),
    /// A full model's tensor: the delta is it minus the base's.
    Difference(TensorMeta),
}

/// How a delta made for other widths fits its tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Adapt {
    /// Its leading rows and columns, zeros after (`truncate`, `pad`); the energy this keeps
    /// is measured by `Plan::align.fits[i]`.
    Fit(usize),
    /// `Plan::align.deltas[i]`, computed before fusing (`align`).
    Aligned(usize),
}

/// What to write for one output tensor.
#[derive(Clone, Debug)]
pub(crate) struct TensorPlan {
    pub origin: Origin,
    pub deltas: Vec<Delta>,
    pub out: OutTensor,
}

impl TensorPlan {
    /// Whether the bytes can be copied from the input unchanged.
    pub fn is_copy(&self) -> bool {
        let dtype = match &self.origin {
            Origin::Base(meta) | Origin::Replacement { meta, .. } => meta.dtype,
        };
        self.deltas.is_empty() && dtype == self.out.dtype
    }
}

pub(crate) struct Plan {
    pub inputs: Inputs,
    /// The user's schema files (`--arch`), inputs of the build like the models.
    pub arch_files: Vec<std::path::PathBuf>,
    /// What became of every LoRA module: where it was fused, or why it was not.
    pub transfer: Vec<Fate>,
    /// What `dims = "align"` computes before fusing.
    pub align: Alignment,
    /// `[merge] density`, per module and layer.
    pub density: Weight,
    /// Sorted by name.
    pub tensors: Vec<TensorPlan>,
    pub warnings: Vec<String>,
}

impl Plan {
    pub fn new(recipe: &Recipe, schemas: &Schemas) -> Result<Plan, PlanError> {
        let src = recipe.src();

        let base = HfModel::open(&recipe.base.path)
            .map_err(|e| PlanError::input(e, src.clone(), recipe.base.span, "this base model"))?;
        let layers = base.layer_count();

        let mut weights = Vec::new();
        let mut adapters = Vec::new();
        for entry in &recipe.adapters {
            weights.push(resolve_rules(&entry.weight, layers, &src)?);
            adapters.push(
                Source::open(&entry.entry.path).map_err(|e| {
                    PlanError::input(e, src.clone(), entry.entry.span, "this adapter")
                })?,
            );
        }

        let tensors = base
            .weights
            .tensors
            .iter()
            .map(|(name, (_, meta))| {
                let plan = TensorPlan {
                    origin: Origin::Base(meta.clone()),
                    deltas: Vec::new(),
                    out: OutTensor {
                        name: name.clone(),
                        dtype: out_dtype(meta.dtype, recipe.output.dtype),
                        shape: meta.shape.clone(),
                    },
                };
                (name.clone(), plan)
            })
            .collect();
        let mut out = Planned {
            tensors,
            warnings: Vec::new(),
            transfer: Vec::new(),
            align: Alignment::default(),
            by_role: 0,
        };

        let target_schema = match &recipe.base_arch {
            Some(named) => Some(resolve_arch(schemas, named, &src)?),
            None => schemas.detect(&base.config),
        };
        let dims = target_schema.and_then(|s| s.dims(&base.config));
        for (index, (source, entry)) in adapters.iter().zip(&recipe.adapters).enumerate() {
            let adapter = match source {
                Source::Lora(adapter) => adapter,
                Source::Model(model) => {
                    model_deltas(model, index, entry, &weights[index], &mut out.tensors, &src)?;
                    continue;
                }
            };
            let name = entry.entry.written.clone();
            // The schema the adapter's module names follow: as the recipe says, else as its
            // source base's config.json says, else whichever schema knows the name.
            let source_schema = match &entry.arch {
                Some(named) => Some(resolve_arch(schemas, named, &src)?),
                None => entry
                    .source
                    .as_ref()
                    .and_then(|s| crate::io::hf::read_json(&s.path.join("config.json")).ok())
                    .and_then(|config| config.as_object().and_then(|c| schemas.detect(c))),
            };
            // `dims = "align"`: one residual map per pair of bases, shared by their adapters.
            let residual = match (entry.dims.map, &entry.source) {
                (DimsMap::Align { .. }, Some(source)) => {
                    Some(out.align.residual(&source.path, &base).map_err(|message| {
                        PlanError::Dims {
                            message: format!("cannot align `{name}`: {message}"),
                            help: "alignment maps the residual stream through the embeddings of the tokens both bases share; give both a tokenizer.json, or use `dims = \"truncate\"` or `\"pad\"`".into(),
                            src: src.clone(),
                            span: source.span,
                            label: "this source base",
                        }
                    })?)
                }
                _ => None,
            };
            let plan = AdapterPlan {
                recipe,
                entry,
                index,
                adapter,
                made_for: adapter
                    .config
                    .base_model
                    .as_ref()
                    .map(|b| format!(" (its adapter_config.json names `{b}`)"))
                    .unwrap_or_default(),
                name,
                src: &src,
                base: &base,
                schemas,
                target_schema,
                source_schema,
                dims,
                residual,
                weight: &weights[index],
            };
            // Layers: each source module goes to the target layers its layer maps to, sharing
            // its delta when several source layers meet in one target.
            let mapped = map_layers(entry, adapter, layers, &mut out.transfer, &src)?;
            let places: std::collections::BTreeMap<&str, Option<Place>> = mapped
                .iter()
                .map(|m| (m.target.as_str(), plan.place(&m.target, &out.tensors)))
                .collect();
            plan.check_places(&places)?;
            plan.replace_tensors(&mut out)?;
            for mapped in &mapped {
                let target = places[mapped.target.as_str()].clone();
                plan.place_module(mapped, target, &mut out)?;
            }
        }

        let Planned {
            tensors,
            mut warnings,
            mut transfer,
            align,
            by_role,
        } = out;
        if by_role > 0 {
            warnings.push(format!(
                "{by_role} LoRA modules were placed by role into fused tensors of the base ({})",
                target_schema.map_or("?", |s| s.name.as_str())
            ));
        }
        transfer.sort_by(|a, b| (&a.adapter, &a.module).cmp(&(&b.adapter, &b.module)));
        Ok(Plan {
            arch_files: schemas.files.clone(),
            transfer,
            align,
            density: resolve_rules(&recipe.merge.density, layers, &src)?,
            inputs: Inputs { base, adapters },
            tensors: tensors.into_values().collect(),
            warnings,
        })
    }
}

/// What planning builds up, adapter by adapter.
struct Planned {
    tensors: std::collections::BTreeMap<String, TensorPlan>,
    warnings: Vec<String>,
    transfer: Vec<Fate>,
    align: Alignment,
    /// LoRA modules placed by role into parts of fused tensors.
    by_role: usize,
}

/// One LoRA adapter of the recipe, with what placing its modules needs to know.
struct AdapterPlan<'a> {
    recipe: &'a Recipe,
    entry: &'a crate::recipe::AdapterEntry,
    index: usize,
    adapter: &'a PeftAdapter,
    /// The adapter as the recipe names it.
    name: String,
    /// ` (its adapter_config.json names …)`, for messages, or empty.
    made_for: String,
    src: &'a crate::recipe::Src,
    base: &'a HfModel,
    schemas: &'a Schemas,
    /// The base's architecture, and its widths, when known.
    target_schema: Option<&'a Schema>,
    dims: Option<crate::arch::Dims>,
    /// The architecture the adapter's module names follow, when known.
    source_schema: Option<&'a Schema>,
    /// `dims = "align"`: the residual map of this pair of bases.
    residual: Option<usize>,
    weight: &'a Weight,
}

impl<'a> AdapterPlan<'a> {
    fn at(&self) -> Located<'_> {
        Located {
            path: &self.adapter.dir,
            src: self.src,
            span: self.entry.span,
        }
    }

    fn unknown(&self, tensor: &str) -> PlanError {
        PlanError::UnknownTarget {
            adapter: self.name.clone(),
            tensor: tensor.to_owned(),
            made_for: self.made_for.clone(),
            src: self.src.clone(),
            span: self.entry.span,
        }
    }

    fn shape_error(&self, tensor: &str, delta: Vec<usize>, base: &[usize]) -> PlanError {
        PlanError::Shape {
            adapter: self.name.clone(),
            tensor: tensor.to_owned(),
            delta,
            base: base.to_vec(),
            made_for: self.made_for.clone(),
            src: self.src.clone(),
            span: self.entry.span,
        }
    }

    /// A source module's role, layer and rotary convention, by the adapter's schema.
    fn source_role(&self, module: &str) -> Option<(&'a str, usize, Option<Rotary>)> {
        let tensor = format!("{module}.weight");
        let schema = self
            .source_schema
            .or_else(|| self.schemas.schema_of(&tensor))?;
        let (role, layer) = schema.role_of(&tensor)?;
        Some((role, layer, schema.rotary))
    }

    /// Where a module goes in the base: by name, or, where the base lacks the name, by role
    /// (a LLaMA q_proj goes to the q rows of a fused qkv_proj).
    fn place(
        &self,
        module: &str,
        tensors: &std::collections::BTreeMap<String, TensorPlan>,
    ) -> Option<Place> {
        let tensor = format!("{module}.weight");
        if tensors.contains_key(&tensor) {
            return Some(Place::named(tensor));
        }
        let (role, layer, _) = self.source_role(module)?;
        self.target_schema?
            .place_of(role, layer, self.dims.as_ref())
            .filter(|p| tensors.contains_key(&p.tensor))
    }

    /// The module's role, when the base's architecture has no such role at all (a SwiGLU gate
    /// going into a non-gated MLP): it is skipped with a warning, never silently.
    fn no_counterpart(&self, module: &str) -> Option<String> {
        let target = self.target_schema?;
        let (role, _, _) = self.source_role(module)?;
        target.has_no(role).then(|| role.to_owned())
    }

    /// Refuses an adapter none of whose modules has a place in the base, saying why.
    fn check_places(
        &self,
        places: &std::collections::BTreeMap<&str, Option<Place>>,
    ) -> Result<(), PlanError> {
        // Placing by role needs the base's widths: say so rather than that nothing matches.
        if let (Some(schema), None) = (self.target_schema, self.dims) {
            let needs_role = places.iter().any(|(module, p)| {
                p.is_none()
                    && self
                        .source_role(module)
                        .is_some_and(|(role, _, _)| schema.needs_widths(role))
            });
            if needs_role {
                return Err(PlanError::NoWidths {
                    arch: schema.name.clone(),
                    src: self.src.clone(),
                    span: self.recipe.base.span,
                });
            }
        }
        let matched = places.values().filter(|p| p.is_some()).count();
        if matched == 0 && !places.is_empty() {
            let adapter = self.adapter;
            return Err(PlanError::NothingMatches {
                adapter: self.name.clone(),
                modules: {
                    let first = adapter.modules.keys().next().cloned().unwrap_or_default();
                    match adapter.modules.len() {
                        1 => format!("`{first}`"),
                        n => format!("{n} modules, first `{first}`"),
                    }
                },
                made_for: self.made_for.clone(),
                unknown_arch: match self.target_schema {
                    Some(_) => String::new(),
                    None => format!(
                        "; or, if it can be placed by role, tell modelforge the base's architecture (its config.json's model_type `{}` matches no schema): `[base] arch = \"...\"`, or a schema of your own with `--arch FILE`",
                        self.base.config.get("model_type").and_then(serde_json::Value::as_str).unwrap_or("?")
                    ),
                },
                src: self.src.clone(),
                span: self.entry.span,
            });
        }
        Ok(())
    }

    /// Whole tensors the adapter replaces (`modules_to_save`).
    fn replace_tensors(&self, out: &mut Planned) -> Result<(), PlanError> {
        for (tensor, meta) in &self.adapter.replacements {
            let plan = out
                .tensors
                .get_mut(tensor)
                .ok_or_else(|| self.unknown(tensor))?;
            if meta.shape != plan.out.shape {
                return Err(self.shape_error(tensor, meta.shape.clone(), &plan.out.shape));
            }
            if let Origin::Replacement {
                adapter: earlier, ..
            } = plan.origin
            {
                out.warnings.push(format!(
                    "`{tensor}` is replaced by both `{}` and `{}`; the later one wins",
                    self.recipe.adapters[earlier].entry.written, self.name
                ));
            }
            check_float(&self.at(), tensor, meta)?;
            plan.origin = Origin::Replacement {
                adapter: self.index,
                meta: meta.clone(),
            };
        }
        Ok(())
    }

    /// Plans one module of the adapter: where its delta goes (`target`, found by name or
    /// role), in which rows, rotary convention and width adaptation, and what the transfer
    /// report says of it.
    fn place_module(
        &self,
        mapped: &Mapped,
        target: Option<Place>,
        planned: &mut Planned,
    ) -> Result<(), PlanError> {
        let Mapped {
            source: source_module,
            target: module,
            lora,
            share,
        } = mapped;
        let AdapterPlan {
            recipe,
            entry,
            index,
            name,
            src,
            base,
            target_schema,
            dims,
            residual,
            ..
        } = self;
        let (index, target_schema, dims, residual, src) =
            (*index, *target_schema, *dims, *residual, *src);
        let at = self.at();
        let (module, lora) = (module.as_str(), *lora);
        let weight = self.weight.for_module(module, layer_of(module)) * share;
        let factor = weight * lora.scaling;
        if target.is_none() {
            if let Some(role) = self.no_counterpart(module) {
                if let Some(span) = entry.refuse_unmatched {
                    return Err(PlanError::Unmatched {
                        adapter: name.clone(),
                        module: source_module.to_string(),
                        leaf: source_module.rsplit('.').next().unwrap_or_default().into(),
                        role,
                        arch: target_schema.map_or("?", |s| s.name.as_str()).into(),
                        src: src.clone(),
                        span,
                    });
                }
                planned.warnings.push(format!(
                    "`{name}`: `{module}` ({role}) has no counterpart in the base's architecture; skipped"
                ));
                planned.transfer.push(Fate::new(
                    name,
                    source_module,
                    format!("skipped: {role} has no counterpart in the base"),
                ));
                return Ok(());
            }
        }
        let tensor = target
            .as_ref()
            .map_or_else(|| format!("{module}.weight"), |p| p.tensor.clone());
        let plan = planned
            .tensors
            .get_mut(&tensor)
            .ok_or_else(|| self.unknown(&format!("{module}.weight")))?;
        let by_role = tensor != format!("{module}.weight");
        let transposed = target.as_ref().is_some_and(|p| p.transposed);
        // Placed by role, a linear layer's delta takes the target's orientation: a
        // LLaMA q_proj going into GPT-2's Conv1D c_attn is transposed.
        let kind = match lora.kind {
            LoraKind::Linear | LoraKind::LinearTransposed if by_role => {
                if transposed {
                    LoraKind::LinearTransposed
                } else {
                    LoraKind::Linear
                }
            }
            kind => kind,
        };
        let (out, inner) = (lora.b.shape[0], lora.a.shape[1]);
        let mut rows = target.as_ref().and_then(|p| p.rows);
        let part_rows = target.as_ref().and_then(|p| p.part_rows);
        let role = self.source_role(module).map(|(role, _, _)| role);
        let align_rank = match entry.dims.map {
            DimsMap::Align { rank } => Some(rank),
            _ => None,
        };
        let aligning = align_rank.is_some();
        if let (Some(map), Some(part_rows), Some(head_dim)) =
            (rows.as_mut(), part_rows, dims.map(|d| d.head_dim))
        {
            if matches!(role, Some("attn.k" | "attn.v")) {
                *map = repeat_kv_heads(*map, out, part_rows, head_dim);
            }
        }
        let repeat = match rows {
            Some(RowMap::PerHead { repeat, .. } | RowMap::Repeated { repeat, .. }) => repeat,
            _ => 1,
        };
        // The axis of the target that a delta's rows (output features) run along.
        let (out_axis, in_axis) = if transposed { (1, 0) } else { (0, 1) };
        let extent = |axis: usize| plan.out.shape.get(axis).copied().unwrap_or(0);
        if let (Some(place), Some(schema)) = (&target, target_schema) {
            if let Some(expected) = place.fused_rows {
                if extent(out_axis) != expected {
                    return Err(PlanError::SchemaMismatch {
                        tensor: tensor.clone(),
                        found: extent(out_axis),
                        expected,
                        what: "the sum of its parts".into(),
                        arch: schema.name.clone(),
                        src: src.clone(),
                        span: recipe.base.span,
                    });
                }
            }
        }
        let head_dim = dims.map_or(0, |d| d.head_dim);
        // The rows the delta has when it reaches the fusion: an aligned one is made in
        // the target's rows (of its part, once per group of repeated kv heads), whatever
        // the source's head count.
        let delta_rows = match (aligning, part_rows) {
            (false, _) => out,
            (true, Some(part_rows)) => part_rows / repeat,
            (true, None) => extent(out_axis),
        };
        if let (Some(part_rows), Some("attn.k" | "attn.v"), false) = (part_rows, role, aligning) {
            if out * repeat != part_rows && head_dim > 0 && out % head_dim == 0 {
                return Err(PlanError::KvHeads {
                    adapter: name.clone(),
                    module: source_module.to_string(),
                    tensor: tensor.clone(),
                    source_heads: out / head_dim,
                    target_heads: part_rows / head_dim,
                    src: src.clone(),
                    span: entry.span,
                });
            }
        }
        // q and k rows carried into the base's rotary convention, head by head.
        let rotary = match (by_role, self.source_role(module), target_schema) {
            (true, Some((role, _, from)), Some(schema)) => {
                rotary_between(role, from, schema.rotary, head_dim, delta_rows).map_err(
                    |(from, to, reason)| PlanError::Rotary {
                        adapter: name.clone(),
                        module: source_module.to_string(),
                        from: from.name().into(),
                        to: to.name().into(),
                        reason,
                        src: src.clone(),
                        span: entry.span,
                    },
                )?
            }
            _ => None,
        };
        let fate = Fate::new(
            name,
            source_module,
            match &target {
                Some(place) => Fate::fused(place, by_role, *share, rotary),
                None => "no target".into(),
            },
        );
        let dims_error = |message: String, help: &str| PlanError::Dims {
            message,
            help: help.into(),
            src: src.clone(),
            span: entry.dims.span,
            label: "this width adaptation",
        };
        let mut adapt = None;
        let mut dims_note = None;
        match (rows, part_rows) {
            // Into a part of a fused tensor: only linear layers, of the part's height.
            (Some(_), Some(part_rows)) if !aligning => {
                if kind == LoraKind::Embedding
                    || out * repeat != part_rows
                    || inner != extent(in_axis)
                {
                    return Err(self.shape_error(
                        &tensor,
                        vec![out, inner],
                        &[part_rows, extent(in_axis)],
                    ));
                }
                planned.by_role += 1;
            }
            _ if aligning => {
                let source_tensor = format!("{source_module}.weight");
                let role = self
                    .source_role(source_module)
                    .map(|(role, layer, _)| (role, layer));
                let Some((role, _)) = role.filter(|_| lora.kind == LoraKind::Linear) else {
                    planned.warnings.push(format!(
                        "`{name}`: `{source_module}` is not a linear layer of a known architecture; `dims = \"align\"` has no map for it, so it is skipped"
                    ));
                    planned.transfer.push(Fate::new(
                        name,
                        source_module,
                        "skipped: dims = align has no map for it (not a linear layer of a known architecture)".into(),
                    ));
                    return Ok(());
                };
                if lora.bias.is_some() {
                    return Err(dims_error(
                        format!("`{source_module}` has a `lora_bias`, which `dims = \"align\"` does not map yet"),
                        "skip the module with `modules = { <name> = \"skip\" }` or use `dims = \"truncate\"` or `\"pad\"`",
                    ));
                }
                let side = dims::side_of(role);
                if rows.is_some() && side == Side::Output {
                    return Err(dims_error(
                        format!("`{module}` writes the residual stream but goes into part of the fused tensor `{tensor}`; `dims = \"align\"` maps only the input side of fused tensors"),
                        "skip the module with `modules = { <name> = \"skip\" }`, or use `dims = \"truncate\"` or `\"pad\"`",
                    ));
                }
                let Some(target_ref) = TensorRef::of(base, &tensor) else {
                    return Err(self.unknown(&tensor));
                };
                // The module's rows of the target (the first head of each group a
                // grouped kv head fills), in the adapter's rotary convention: the aligned
                // delta is then placed exactly as an exact one would be.
                let gather = (rows.is_some() || rotary.is_some()).then(|| {
                    let map = rows.unwrap_or(RowMap::Offset { offset: 0 });
                    (0..delta_rows)
                        .filter_map(|row| map.targets(rotary.map_or(row, |r| r.row(row))).next())
                        .map(|row| row as u32)
                        .collect::<Vec<u32>>()
                });
                let layout = Layout {
                    transposed,
                    rows: gather,
                };
                let aligned = planned
                    .align
                    .module(
                        residual.expect("align plans a residual map per adapter"),
                        side,
                        &source_tensor,
                        (target_ref, layout),
                        (index, lora),
                        align_rank.flatten(),
                    )
                    .map_err(|m| {
                        dims_error(m, "`source` must be the base the adapter was trained on")
                    })?;
                if rows.is_some() {
                    planned.by_role += 1;
                }
                adapt = Some(Adapt::Aligned(aligned));
                dims_note = Some(planned.align.describe(aligned));
            }
            _ => {
                let delta_shape = match kind {
                    LoraKind::Linear => vec![out, inner],
                    LoraKind::LinearTransposed | LoraKind::Embedding => vec![inner, out],
                };
                match entry.dims.map {
                    _ if delta_shape == plan.out.shape => {}
                    // (`align` was planned above.)
                    DimsMap::Exact | DimsMap::Align { .. } => {
                        return Err(self.shape_error(&tensor, delta_shape, &plan.out.shape));
                    }
                    DimsMap::Truncate | DimsMap::Pad => {
                        let truncate = entry.dims.map == DimsMap::Truncate;
                        if let Err(dim) = dims::fits(truncate, &delta_shape, &plan.out.shape) {
                            let what = if dim == 0 { "rows" } else { "columns" };
                            let (more, cannot, other) = if truncate {
                                (
                                    "more",
                                    "`truncate` cannot widen a delta",
                                    "`dims = \"pad\"` (zeros) for a wider base",
                                )
                            } else {
                                (
                                    "fewer",
                                    "`pad` cannot narrow a delta",
                                    "`dims = \"truncate\"` for a narrower base",
                                )
                            };
                            return Err(dims_error(
                                format!(
                                    "`{module}`'s delta is {delta_shape:?} but `{tensor}` is {:?}, with {more} {what}: {cannot}",
                                    plan.out.shape
                                ),
                                &format!("use {other}, or `\"align\"`"),
                            ));
                        }
                        let to = match kind {
                            LoraKind::Linear => [plan.out.shape[0], plan.out.shape[1]],
                            _ => [plan.out.shape[1], plan.out.shape[0]],
                        };
                        adapt = Some(Adapt::Fit(planned.align.fit(index, lora, to)));
                        dims_note = Some(format!(
                            "{} {delta_shape:?} -> {:?}",
                            if truncate { "truncate" } else { "pad" },
                            plan.out.shape
                        ));
                    }
                }
            }
        }
        planned.transfer.push(Fate {
            dims: dims_note,
            adapted: adapt,
            ..fate
        });
        check_float(&at, &tensor, origin_meta(&plan.origin))?;
        check_float(&at, &tensor, &lora.a)?;
        check_float(&at, &tensor, &lora.b)?;
        if factor != 0.0 {
            plan.deltas.push(Delta {
                adapter: index,
                weight,
                scaling: lora.scaling,
                kind: DeltaKind::LowRank {
                    kind,
                    a: lora.a.clone(),
                    b: lora.b.clone(),
                    rows,
                    rotary,
                    adapt,
                },
            });
        }
        if let Some(bias) = &lora.bias {
            let tensor = format!("{module}.bias");
            let plan = planned
                .tensors
                .get_mut(&tensor)
                .ok_or_else(|| self.unknown(&tensor))?;
            if bias.shape != plan.out.shape {
                return Err(self.shape_error(&tensor, bias.shape.clone(), &plan.out.shape));
            }
            check_float(&at, &tensor, bias)?;
            if factor != 0.0 {
                plan.deltas.push(Delta {
                    adapter: index,
                    weight,
                    scaling: lora.scaling,
                    kind: DeltaKind::Vector(bias.clone()),
                });
            }
        }
        Ok(())
    }
}

/// Grouped-query k/v rows going into a layout of more kv heads: each of the `out` source rows'
/// heads fills the target heads it serves (per head), or its share of the groups (stacked).
/// The map is unchanged when the heads do not divide evenly (the caller refuses that).
fn repeat_kv_heads(map: RowMap, out: usize, part_rows: usize, head_dim: usize) -> RowMap {
    let divides = out > 0
        && out < part_rows
        && head_dim > 0
        && out.is_multiple_of(head_dim)
        && part_rows.is_multiple_of(out);
    if !divides {
        return map;
    }
    let repeat = part_rows / out;
    match map {
        RowMap::PerHead {
            parts,
            part,
            head_dim,
            ..
        } => RowMap::PerHead {
            parts,
            part,
            head_dim,
            repeat,
        },
        RowMap::Offset { offset } => RowMap::Repeated {
            offset,
            head_dim,
            repeat,
        },
        other => other,
    }
}

/// The schema `named` names, or a diagnostic listing the known ones.
fn resolve_arch<'a>(
    schemas: &'a Schemas,
    named: &crate::recipe::Named,
    src: &crate::recipe::Src,
) -> Result<&'a Schema, PlanError> {
    schemas
        .named(&named.name)
        .ok_or_else(|| PlanError::UnknownArch {
            name: named.name.clone(),
            known: schemas
                .names()
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", "),
            src: src.clone(),
            span: named.span,
        })
}

/// Rules with their layer ranges resolved against the base's layer count.
fn resolve_rules(
    rules: &[crate::recipe::WeightRule],
    layers: Option<usize>,
    src: &crate::recipe::Src,
) -> Result<Weight, PlanError> {
    let mut resolved = Vec::new();
    for rule in rules {
        let layers_range =
            match (&rule.layers, layers) {
                (None, _) => None,
                (Some((range, span)), Some(count)) => Some(range.resolve(count).map_err(
                    |reason| PlanError::LayerRange {
                        range: range.to_string(),
                        reason,
                        src: src.clone(),
                        span: *span,
                    },
                )?),
                (Some((range, span)), None) => {
                    return Err(PlanError::LayerRange {
                        range: range.to_string(),
                        reason: "the base's config.json gives no layer count".into(),
                        src: src.clone(),
                        span: *span,
                    })
                }
            };
        resolved.push(ResolvedRule {
            value: rule.value,
            layers: layers_range,
            modules: rule.modules.clone(),
        });
    }
    Ok(Weight::new(resolved))
}

/// A full fine-tuned model as a delta source: every tensor it shares with the base contributes
/// weight × (model − base). It must have the base's architecture: no tensor the base lacks,
/// none of another shape.
fn model_deltas(
    model: &HfModel,
    index: usize,
    entry: &crate::recipe::AdapterEntry,
    weight: &Weight,
    tensors: &mut std::collections::BTreeMap<String, TensorPlan>,
    src: &crate::recipe::Src,
) -> Result<(), PlanError> {
    let made_for = format!(" (a full model, `{}`)", model.architecture());
    for (name, (_, meta)) in &model.weights.tensors {
        let Some(plan) = tensors.get_mut(name) else {
            return Err(PlanError::UnknownTarget {
                adapter: entry.entry.written.clone(),
                tensor: name.clone(),
                made_for,
                src: src.clone(),
                span: entry.span,
            });
        };
        if meta.shape != plan.out.shape {
            return Err(PlanError::Shape {
                adapter: entry.entry.written.clone(),
                tensor: name.clone(),
                delta: meta.shape.clone(),
                base: plan.out.shape.clone(),
                made_for,
                src: src.clone(),
                span: entry.span,
            });
        }
        let at = Located {
            path: &model.dir,
            src,
            span: entry.span,
        };
        check_float(&at, name, meta)?;
        check_float(&at, name, origin_meta(&plan.origin))?;
        let module = name
            .rsplit_once('.')
            .map_or(name.as_str(), |(module, _)| module);
        let w = weight.for_module(module, layer_of(module));
        if w != 0.0 {
            plan.deltas.push(Delta {
                adapter: index,
                weight: w,
                scaling: 1.0,
                kind: DeltaKind::Difference(meta.clone()),
            });
        }
    }
    Ok(())
}

/// How a full model's delta of `tensor` becomes a LoRA module when re-factored: embeddings as
/// PEFT's embedding LoRA, everything else as a linear layer.
pub(crate) fn difference_kind(tensor: &str) -> LoraKind {
    let module = tensor.rsplit_once('.').map_or(tensor, |(module, _)| module);
    let leaf = module.rsplit('.').next().unwrap_or(module);
    if matches!(
        leaf,
        "embed_tokens" | "wte" | "word_embeddings" | "embed_in"
    ) {
        LoraKind::Embedding
    } else {
        LoraKind::Linear
    }
}

/// The files a tensor's bytes are read from.
pub(crate) fn tensor_inputs(plan: &Plan, tensor: &TensorPlan) -> Vec<std::path::PathBuf> {
    let mut paths = vec![match &tensor.origin {
        Origin::Base(_) => plan
            .inputs
            .base
            .weights
            .get(&tensor.out.name)
            .map(|(file, _)| file.path.clone())
            .unwrap_or_default(),
        Origin::Replacement { adapter, .. } => plan.inputs.adapters[*adapter]
            .tensor_file(&tensor.out.name)
            .map(|file| file.path.clone())
            .unwrap_or_default(),
    }];
    for delta in &tensor.deltas {
        let Some(path) = plan.inputs.adapters[delta.adapter]
            .tensor_file(&tensor.out.name)
            .map(|file| &file.path)
        else {
            continue;
        };
        if !paths.contains(path) {
            paths.push(path.clone());
        }
    }
    paths
}

fn origin_meta(origin: &Origin) -> &TensorMeta {
    match origin {
        Origin::Base(meta) | Origin::Replacement { meta, .. } => meta,
    }
}

pub(crate) fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// Deltas are computed in floating point; an integer or 8-bit tensor cannot take one.
fn check_float(at: &Located<'_>, tensor: &str, meta: &TensorMeta) -> Result<(), PlanError> {
    if is_float(meta.dtype) {
        return Ok(());
    }
    let err = crate::io::InputError::UnsupportedDtype {
        path: at.path.to_owned(),
        tensor: tensor.to_owned(),
        dtype: meta.dtype.to_string(),
    };
    Err(PlanError::input(
        err,
        at.src.clone(),
        at.span,
        "this adapter",
    ))
}

/// Where an adapter's faults point.
struct Located<'a> {
    path: &'a Path,
    src: &'a crate::recipe::Src,
    span: miette::SourceSpan,
}

/// The dtype a tensor is written in: floating tensors take the requested dtype, others keep theirs.
fn out_dtype(input: Dtype, requested: OutputDtype) -> Dtype {
    if !is_float(input) {
        return input;
    }
    match requested {
        OutputDtype::Base => input,
        OutputDtype::F32 => Dtype::F32,
        OutputDtype::F16 => Dtype::F16,
        OutputDtype::Bf16 => Dtype::BF16,
    }
}
