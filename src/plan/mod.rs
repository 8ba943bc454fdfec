//! Planning: the opened inputs and the recipe resolved into what each output tensor is made of.
//! Everything that can be checked before computing is checked here, so execution only fails on
//! I/O.
mod adapter;
mod dims;
mod error;
mod examples;
mod graph;
mod tie;
mod transfer;

use std::path::Path;

use safetensors::Dtype;

pub(crate) use dims::{Alignment, TensorRef};
pub(crate) use error::PlanError;
pub(crate) use examples::Examples;
pub(crate) use graph::{pathdiff, BuildGraph, Keyed, Settings, Status};

use crate::arch::{Place, Schema, Schemas};
use crate::io::hf::HfModel;
use crate::io::peft::{LoraKind, PeftAdapter};
use crate::io::safetensors::TensorMeta;
use crate::io::writer::OutTensor;
use crate::recipe::{layer_of, DimsMap, OutputDtype, Recipe, ResolvedRule, Weight};
use adapter::{AdapterPlan, Planned};
use transfer::map_layers;
pub(crate) use transfer::{Carried, Effect, Fate};

/// The opened inputs of a recipe.
pub(crate) struct Inputs {
    pub base: HfModel,
    /// One per `[[adapter]]`, in the recipe's order.
    pub adapters: Vec<Source>,
}

/// What an `[[adapter]]` names: a PEFT LoRA adapter, or a full fine-tuned model of the base's
/// architecture whose delta is (model − base).
pub(crate) enum Source {
    Lora(Box<PeftAdapter>),
    Model(HfModel),
}

impl Source {
    fn open(dir: &Path) -> Result<Source, crate::io::InputError> {
        if !dir.join("adapter_config.json").exists() && dir.join("config.json").exists() {
            return Ok(Source::Model(HfModel::open(dir)?));
        }
        Ok(Source::Lora(Box::new(PeftAdapter::open(dir)?)))
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
    /// The base's tensor `tensor`: the output's own name, or, for the output embedding of a
    /// tied model written on its own (see [`tie`]), the input embedding's.
    Base { tensor: String, meta: TensorMeta },
    /// A `modules_to_save` tensor of adapter `adapter` replaces the base's. `cast`: the
    /// base's dtype, when the replacement has another: PEFT loads it into the base's layer,
    /// rounding it, before anything is added.
    Replacement {
        adapter: usize,
        meta: TensorMeta,
        cast: Option<Dtype>,
    },
}

/// One adapter's contribution to a tensor: `factor · delta`.
#[derive(Clone, Debug)]
pub(crate) struct Delta {
    pub adapter: usize,
    /// The recipe's weight for this adapter and module.
    pub weight: f64,
    /// Where the recipe gives that weight (`None`: the default, 1).
    pub weight_span: Option<miette::SourceSpan>,
    /// The adapter's own scaling.
    pub scaling: f64,
    pub kind: DeltaKind,
}

/// What an adapter adds to a tensor, as the node that fuses it will say (see
/// [`modelforge_core::node::Delta`]): tensors named by their place in the adapter's file, and
/// the nodes of width adaptation by what the plan calls them.
pub(crate) type DeltaKind = modelforge_core::node::Delta<TensorMeta, AlignItem>;

/// How a delta made for other widths fits its tensor.
pub(crate) type Adapt = modelforge_core::node::Adapt<AlignItem>;

/// A node of width adaptation, by its place in [`Alignment`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum AlignItem {
    Residual(usize),
    Inner(usize),
    Delta(usize),
    /// The energy `truncate` or `pad` keeps, measured for the report.
    Fit(usize),
    /// A module's two base weights compared under the index modes' identity map, for the report.
    Overlap(usize),
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
        let dtype = origin_meta(&self.origin).dtype;
        let cast = matches!(self.origin, Origin::Replacement { cast: Some(_), .. });
        self.deltas.is_empty() && dtype == self.out.dtype && !cast
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
    /// What the output's config.json changes from the base's (`tie_word_embeddings`,
    /// `vocab_size`), besides the dtype.
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Said in the build's summary and the model card: how the output differs in shape from the
    /// base (untied embeddings, a resized vocabulary).
    pub notes: Vec<String>,
    /// Tokenizer files taken from an adapter trained on a resized vocabulary, in place of the
    /// base's; inputs of the build like the weights.
    pub tokenizer: Vec<std::path::PathBuf>,
    /// The adapters' `examples`, which the transfer report scores.
    pub examples: Vec<Examples>,
}

impl Plan {
    /// Every file the build reads whose digest goes into node keys and the lock.
    pub fn input_files(&self) -> Vec<std::path::PathBuf> {
        let mut paths = self.inputs.base.weight_files();
        paths.push(self.inputs.base.dir.join("config.json"));
        for source in &self.inputs.adapters {
            paths.extend(source.files());
        }
        paths.extend(self.arch_files.iter().cloned());
        paths.extend(self.align.files());
        paths.extend(self.tokenizer.iter().cloned());
        for examples in &self.examples {
            for file in examples.files() {
                if !paths.contains(&file) {
                    paths.push(file);
                }
            }
        }
        paths
    }

    pub fn new(recipe: &Recipe, schemas: &Schemas) -> Result<Plan, PlanError> {
        let src = recipe.src();

        let base = HfModel::open(&recipe.base.path)
            .map_err(|e| PlanError::input(e, src.clone(), recipe.base.span, "this base model"))?;
        let layers = base.layer_count();

        let mut weights = Vec::new();
        let mut adapters = Vec::new();
        for entry in &recipe.adapters {
            weights.push(resolve_rules(&entry.weight, layers, &src)?);
            let at = |e| PlanError::input(e, src.clone(), entry.entry.span, "this adapter");
            let mut source = Source::open(&entry.entry.path).map_err(at)?;
            if let Source::Lora(adapter) = &mut source {
                adapter
                    .resolve_parameters(|name| base.weights.get(name).map(|(_, m)| m.shape.clone()))
                    .map_err(at)?;
            }
            adapters.push(source);
        }

        let tensors = base
            .weights
            .tensors
            .iter()
            .map(|(name, (_, meta))| {
                let plan = TensorPlan {
                    origin: Origin::Base {
                        tensor: name.clone(),
                        meta: meta.clone(),
                    },
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
        let mut tensors = tensors;
        let tie = tie::Tie::of(&base);
        if let Some(tie) = &tie {
            tie.add_head(&mut tensors);
        }
        let mut out = Planned {
            tensors,
            warnings: Vec::new(),
            transfer: Vec::new(),
            align: Alignment::default(),
            by_role: 0,
            resized: Vec::new(),
            copies: Vec::new(),
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
            let target = (target_schema, dims.as_ref());
            plan_lora(
                recipe,
                schemas,
                &base,
                target,
                (index, adapter),
                &weights[index],
                &mut out,
            )?;
        }

        let mut config = serde_json::Map::new();
        let mut notes = Vec::new();
        if let Some(tie) = &tie {
            let names: Vec<String> = recipe
                .adapters
                .iter()
                .map(|a| a.entry.written.clone())
                .collect();
            if let tie::Settled::Untied(why) =
                tie::settle(tie, &mut out.tensors, &names, &out.copies)
            {
                config.insert("tie_word_embeddings".into(), false.into());
                notes.push(why);
            }
        }
        let tokenizer = resized_vocabulary(recipe, &base, &mut out, &mut config, &mut notes)?;
        let mut examples = Vec::new();
        for (entry, source) in recipe.adapters.iter().zip(&adapters) {
            if let Some(given) = &entry.examples {
                let refuse = |message: &str| PlanError::Examples {
                    message: message.into(),
                    src: src.clone(),
                    span: given.span,
                };
                if recipe.output.path.is_none() {
                    return Err(refuse("`examples` are scored on the built model, and this recipe writes none (`[output] path`)"));
                }
                if recipe.adapters.len() > 1 {
                    return Err(refuse("`examples` measure one adapter carried alone, and this recipe stacks several: build the adapter in a recipe of its own to measure it"));
                }
            }
            match source {
                Source::Lora(adapter) => {
                    examples.extend(Examples::of(entry, adapter, &base, &src)?)
                }
                Source::Model(_) if entry.examples.is_some() => return Err(PlanError::Examples {
                    message:
                        "`examples` are scored for a LoRA adapter; this adapter is a whole model"
                            .into(),
                    src: src.clone(),
                    span: entry.examples.as_ref().map_or(entry.span, |e| e.span),
                }),
                Source::Model(_) => {}
            }
        }
        let Planned {
            tensors,
            mut warnings,
            mut transfer,
            align,
            by_role,
            resized: _,
            copies: _,
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
            config,
            notes,
            tokenizer,
            examples,
        })
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
            span: rule.span,
            layers: layers_range,
            modules: rule.modules.clone(),
        });
    }
    Ok(Weight::new(resolved))
}

/// Plans one LoRA adapter (number `index` of the recipe) onto the base, whose schema and
/// widths are `target` when known: each module to its layers, places and rows.
fn plan_lora(
    recipe: &Recipe,
    schemas: &Schemas,
    base: &HfModel,
    (target_schema, dims): (Option<&Schema>, Option<&crate::arch::Dims>),
    (index, adapter): (usize, &PeftAdapter),
    weight: &Weight,
    out: &mut Planned,
) -> Result<(), PlanError> {
    let src = recipe.src();
    let entry = &recipe.adapters[index];
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
            Some(out.align.residual(&source.path, base).map_err(|message| {
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
    // The other modes compare each module's weights in the two bases, for the report only:
    // a source base that cannot be opened is said, not refused.
    let source_base = match &entry.source {
        None => None,
        Some(_) if residual.is_some() => None,
        Some(source) => match out.align.source(&source.path) {
            Ok(i) => Some(i),
            Err(e) => {
                out.warnings.push(format!(
                    "`{name}`: cannot compare the source base with this one ({e}); transfer.txt cannot tell how alike they are"
                ));
                None
            }
        },
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
        base,
        schemas,
        target_schema,
        source_schema,
        dims: dims.copied(),
        residual,
        source_base,
        weight,
    };
    // Layers: each source module goes to the target layers its layer maps to, sharing
    // its delta when several source layers meet in one target.
    let mapped = map_layers(entry, adapter, base.layer_count(), &mut out.transfer, &src)?;
    let places: std::collections::BTreeMap<&str, Option<Place>> = mapped
        .iter()
        .map(|m| (m.target.as_str(), plan.place(&m.target, &out.tensors)))
        .collect();
    plan.check_places(&places)?;
    plan.replace_tensors(out)?;
    plan.token_deltas(out)?;
    for mapped in &mapped {
        let target = places[mapped.target.as_str()].clone();
        plan.place_module(mapped, target, out)?;
    }
    Ok(())
}

/// An adapter trained on a resized vocabulary: the resized model, when the adapter carries a
/// full embedding and head of the new size (`vocab_size` and its tokenizer files follow), or
/// why it cannot be built. Returns the tokenizer files to take.
fn resized_vocabulary(
    recipe: &Recipe,
    base: &HfModel,
    out: &mut Planned,
    config: &mut serde_json::Map<String, serde_json::Value>,
    notes: &mut Vec<String>,
) -> Result<Vec<std::path::PathBuf>, PlanError> {
    let Some(resize) = out.resized.first().cloned() else {
        return Ok(Vec::new());
    };
    let src = recipe.src();
    let entry = &recipe.adapters[resize.adapter];
    let adapter = entry.entry.written.clone();
    let refuse = |message: String| {
        PlanError::Adapter {
            adapter: adapter.clone(),
            message,
            help: "fuse it into the base it was trained on (resized with `resize_token_embeddings` and saved), or save the adapter with both the embedding and the output head in `modules_to_save`".into(),
            src: src.clone(),
            span: entry.span,
        }
    };
    let (from, to) = (resize.from, resize.to);
    if let Some(other) = out.resized.iter().find(|r| r.to != to) {
        return Err(refuse(format!(
            "resizes the vocabulary to {to} rows (`{}`), but `{}` to {}",
            resize.tensor, other.tensor, other.to
        )));
    }
    if let Some((embedding, head)) = tie::vocabulary_tensors(base) {
        for name in [embedding, head] {
            match out.tensors.get(name) {
                    Some(plan) if plan.out.shape.first() != Some(&to) => {
                        return Err(refuse(format!(
                            "resizes the vocabulary from {from} to {to} rows (`{}`), but carries no resized `{name}`, which would keep {} rows",
                            resize.tensor,
                            plan.out.shape.first().copied().unwrap_or(0)
                        )))
                    }
                    _ => {}
                }
        }
    }
    config.insert("vocab_size".into(), to.into());
    let dir = &entry.entry.path;
    let tokenizer: Vec<std::path::PathBuf> = crate::io::hf::TOKENIZER_FILES
        .iter()
        .map(|name| dir.join(name))
        .filter(|path| path.is_file())
        .collect();
    let note = format!(
            "`{adapter}` was trained on a vocabulary resized from {from} to {to} tokens: the output has {to} (config.json's `vocab_size`), with {}",
            if tokenizer.is_empty() {
                "the base's tokenizer files, as the adapter directory has none: give it the tokenizer it was trained with".to_owned()
            } else {
                "the tokenizer files of the adapter directory".to_owned()
            }
        );
    out.warnings.push(note.clone());
    notes.push(note);
    Ok(tokenizer)
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
        let (w, weight_span) = weight.rule_for(module, layer_of(module));
        if w != 0.0 {
            plan.deltas.push(Delta {
                adapter: index,
                weight: w,
                weight_span,
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

fn origin_meta(origin: &Origin) -> &TensorMeta {
    match origin {
        Origin::Base { meta, .. } | Origin::Replacement { meta, .. } => meta,
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
