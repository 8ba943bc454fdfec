//! One LoRA adapter planned onto the base: where each of its modules goes (by name, or by role
//! into another architecture's fused tensors), in which rows and rotary convention, how its
//! widths are adapted, and what the transfer report says of it.
use std::collections::BTreeMap;

use super::dims::{self, TensorRef};
use super::transfer::{rotary_between, Fate, Mapped, What};
use super::{
    check_float, origin_meta, Adapt, Alignment, Delta, DeltaKind, Located, Origin, PlanError,
    TensorPlan,
};
use crate::arch::Role;
use crate::arch::{Place, Schema, Schemas};
use crate::io::hf::HfModel;
use crate::io::peft::{LoraKind, PeftAdapter};
use crate::recipe::{layer_of, DimsMap, Recipe, Weight};
use modelforge_core::node::{Layout, RowMap, Side};
use modelforge_core::rotary::{Rotary, RotaryMap};

/// What planning builds up, adapter by adapter.
pub(super) struct Planned {
    pub(super) tensors: BTreeMap<String, TensorPlan>,
    pub(super) warnings: Vec<String>,
    pub(super) transfer: Vec<Fate>,
    pub(super) align: Alignment,
    /// LoRA modules placed by role into parts of fused tensors.
    pub(super) by_role: usize,
    /// Vocabulary tensors an adapter replaces with more (or fewer) rows.
    pub(super) resized: Vec<Resize>,
    /// (adapter, tensor) of replacements that are a copy of the layer's own weight
    /// (`X.base_layer.weight`): they do not untie a tie.
    pub(super) copies: Vec<(usize, String)>,
}

/// A vocabulary tensor replaced by one of another number of rows: the adapter was trained
/// after `resize_token_embeddings`.
#[derive(Clone)]
pub(super) struct Resize {
    pub(super) adapter: usize,
    pub(super) tensor: String,
    pub(super) from: usize,
    pub(super) to: usize,
}

/// One LoRA adapter of the recipe, with what placing its modules needs to know.
pub(super) struct AdapterPlan<'a> {
    pub(super) recipe: &'a Recipe,
    pub(super) entry: &'a crate::recipe::AdapterEntry,
    pub(super) index: usize,
    pub(super) adapter: &'a PeftAdapter,
    /// The adapter as the recipe names it.
    pub(super) name: String,
    /// ` (its adapter_config.json names …)`, for messages, or empty.
    pub(super) made_for: String,
    pub(super) src: &'a crate::recipe::Src,
    pub(super) base: &'a HfModel,
    pub(super) schemas: &'a Schemas,
    /// The base's architecture, and its widths, when known.
    pub(super) target_schema: Option<&'a Schema>,
    pub(super) dims: Option<crate::arch::Dims>,
    /// The architecture the adapter's module names follow, when known.
    pub(super) source_schema: Option<&'a Schema>,
    /// `dims = "align"`: the residual map of this pair of bases.
    pub(super) residual: Option<usize>,
    /// The adapter's source base, opened (an index in the alignment's `sources`), when the
    /// recipe names it: the report compares each module's weights in the two bases.
    pub(super) source_base: Option<usize>,
    pub(super) weight: &'a Weight,
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
    fn source_role(&self, module: &str) -> Option<(Role, usize, Option<Rotary>)> {
        let tensor = format!("{module}.weight");
        let schema = self
            .source_schema
            .or_else(|| self.schemas.schema_of(&tensor))?;
        let (role, layer) = schema.role_of(&tensor)?;
        Some((role, layer, schema.rotary))
    }

    /// Where a module goes in the base: by name, or, where the base lacks the name, by role
    /// (a LLaMA q_proj goes to the q rows of a fused qkv_proj).
    pub(super) fn place(
        &self,
        module: &str,
        tensors: &BTreeMap<String, TensorPlan>,
    ) -> Option<Place> {
        let tensor = format!("{module}.weight");
        if tensors.contains_key(&tensor) {
            return Some(Place::named(tensor));
        }
        // A `target_parameters` LoRA is keyed by the parameter's own name.
        if tensors.contains_key(module)
            && self.adapter.modules.get(module).is_some_and(|m| {
                matches!(m.kind, LoraKind::Experts { .. } | LoraKind::Expert { .. })
                    || !self.adapter.config.target_parameters.is_empty()
            })
        {
            return Some(Place::named(module.to_owned()));
        }
        let (role, layer, _) = self.source_role(module)?;
        self.target_schema?
            .place_of(role, layer, self.dims.as_ref())
            .filter(|p| tensors.contains_key(&p.tensor))
    }

    /// The module's role, when the base's architecture has no such role at all (a SwiGLU gate
    /// going into a non-gated MLP): it is skipped with a warning, never silently.
    fn no_counterpart(&self, module: &str) -> Option<Role> {
        let target = self.target_schema?;
        let (role, _, _) = self.source_role(module)?;
        target.has_no(role).then_some(role)
    }

    /// Refuses an adapter none of whose modules has a place in the base, saying why.
    pub(super) fn check_places(
        &self,
        places: &BTreeMap<&str, Option<Place>>,
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
    /// A replacement of a vocabulary tensor (embedding or head) may have other rows: the
    /// adapter was trained on a resized vocabulary. The copies of the base's own tensors PEFT
    /// saves beside them (`original_module`) must fit the base, or the resized one.
    pub(super) fn replace_tensors(&self, out: &mut Planned) -> Result<(), PlanError> {
        let vocabulary = super::tie::vocabulary_tensors(self.base);
        let is_vocabulary =
            |tensor: &str| vocabulary.is_some_and(|(e, h)| tensor == e || tensor == h);
        for (tensor, meta) in &self.adapter.originals {
            let plan = out
                .tensors
                .get(tensor)
                .ok_or_else(|| self.unknown(tensor))?;
            let resized = self.adapter.replacements.get(tensor).map(|r| &r.shape);
            if meta.shape != plan.out.shape && Some(&meta.shape) != resized {
                return Err(self.shape_error(tensor, meta.shape.clone(), &plan.out.shape));
            }
        }
        for (tensor, meta) in &self.adapter.replacements {
            let plan = out
                .tensors
                .get_mut(tensor)
                .ok_or_else(|| self.unknown(tensor))?;
            if meta.shape != plan.out.shape {
                let rows_only = meta.shape.len() == 2
                    && plan.out.shape.len() == 2
                    && meta.shape[1] == plan.out.shape[1];
                if !(rows_only && is_vocabulary(tensor)) {
                    return Err(self.shape_error(tensor, meta.shape.clone(), &plan.out.shape));
                }
                out.resized.push(Resize {
                    adapter: self.index,
                    tensor: tensor.clone(),
                    from: plan.out.shape[0],
                    to: meta.shape[0],
                });
                plan.out.shape = meta.shape.clone();
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
            if self.adapter.copies.contains(tensor) {
                out.copies.push((self.index, tensor.clone()));
            }
            let dtype = match &plan.origin {
                Origin::Base { meta, .. } => meta.dtype,
                Origin::Replacement { meta, cast, .. } => cast.unwrap_or(meta.dtype),
            };
            plan.origin = Origin::Replacement {
                adapter: self.index,
                meta: meta.clone(),
                cast: (dtype != meta.dtype).then_some(dtype),
            };
        }
        Ok(())
    }

    /// Plans one module of the adapter: where its delta goes (`target`, found by name or
    /// role), in which rows, rotary convention and width adaptation, and what the transfer
    /// report says of it.
    pub(super) fn place_module(
        &self,
        mapped: &Mapped,
        target: Option<Place>,
        planned: &mut Planned,
    ) -> Result<(), PlanError> {
        if target.is_none() && self.skip_without_counterpart(mapped, planned)? {
            return Ok(());
        }
        let landing = self.land(mapped, target, &planned.tensors)?;
        let widths = if self.aligning() {
            self.align_widths(mapped, &landing, planned)?
        } else {
            self.fit_widths(mapped, &landing, planned)?
        };
        let (adapt, note) = match widths {
            Widths::Exact => (None, None),
            Widths::Adapted(adapt, note) => (Some(adapt), Some(note)),
            Widths::Skipped => return Ok(()),
        };
        let compared = match self.aligning() {
            // The inner map compares the weights under R.
            true => None,
            false => self.compare(mapped, &landing, planned),
        };
        planned.transfer.push(Fate {
            dims: note,
            adapted: adapt,
            compared,
            ..Fate::new(
                &self.name,
                mapped.source,
                match &landing.place {
                    Some(place) => {
                        Fate::fused(place, landing.by_role, mapped.share, landing.rotary)
                    }
                    None => What::NoTarget,
                },
            )
        });
        self.push_deltas(mapped, &landing, adapt, planned)
    }

    /// For the report, under `exact`, `truncate` or `pad`: the node comparing the module's
    /// weight in the source base with the target's where its delta lands, under the identity
    /// map those modes use. Only where the recipe names the source base and the module is a
    /// linear layer of a known role (which side faces the residual stream).
    fn compare(
        &self,
        mapped: &Mapped,
        landing: &Landing,
        planned: &mut Planned,
    ) -> Option<super::AlignItem> {
        let source = self.source_base?;
        landing.place.as_ref()?;
        if mapped.lora.kind != LoraKind::Linear {
            return None;
        }
        // A fused module placed by name (Phi-3's qkv_proj into Phi-3) has no single role, but
        // all its parts face the residual stream from the same side.
        let tensor = format!("{}.weight", mapped.source);
        let writes = self
            .source_schema
            .or_else(|| self.schemas.schema_of(&tensor))?
            .writes_residual(&tensor)?;
        let side = if writes { Side::Output } else { Side::Input };
        let target = TensorRef::of(self.base, &landing.tensor)?;
        let delta = [mapped.lora.b.shape[0], mapped.lora.a.shape[1]];
        planned
            .align
            .overlap(source, side, (&tensor, delta), (target, landing.layout()))
            .map(super::AlignItem::Overlap)
    }

    /// Whether `dims = "align"` adapts this adapter's widths.
    fn aligning(&self) -> bool {
        matches!(self.entry.dims.map, DimsMap::Align { .. })
    }

    /// Skips a module without a place whose role the base's architecture lacks (a SwiGLU
    /// gate going into a non-gated MLP), with a warning, or refuses it where the recipe says
    /// `unmatched = "error"`. `false` for any other module without a place, which
    /// [`AdapterPlan::land`] then refuses as unknown.
    fn skip_without_counterpart(
        &self,
        mapped: &Mapped,
        planned: &mut Planned,
    ) -> Result<bool, PlanError> {
        let (name, module) = (&self.name, mapped.target.as_str());
        let Some(role) = self.no_counterpart(module) else {
            return Ok(false);
        };
        if let Some(span) = self.entry.refuse_unmatched {
            return Err(PlanError::Unmatched {
                adapter: name.clone(),
                module: mapped.source.to_string(),
                leaf: mapped.source.rsplit('.').next().unwrap_or_default().into(),
                role: role.name().into(),
                arch: self.target_schema.map_or("?", |s| s.name.as_str()).into(),
                src: self.src.clone(),
                span,
            });
        }
        planned.warnings.push(format!(
            "`{name}`: `{module}` ({role}) has no counterpart in the base's architecture; skipped"
        ));
        planned
            .transfer
            .push(Fate::new(name, mapped.source, What::NoCounterpart(role)));
        Ok(true)
    }

    /// Where the module's delta lands in its target tensor, and in which rows: checks that
    /// the target's fused height is what the schema says and that grouped kv heads divide,
    /// and carries q and k rows into the base's rotary convention.
    fn land(
        &self,
        mapped: &Mapped,
        place: Option<Place>,
        tensors: &BTreeMap<String, TensorPlan>,
    ) -> Result<Landing, PlanError> {
        let (module, lora) = (mapped.target.as_str(), mapped.lora);
        let tensor = place
            .as_ref()
            .map_or_else(|| format!("{module}.weight"), |p| p.tensor.clone());
        let shape = tensors
            .get(&tensor)
            .ok_or_else(|| self.unknown(&format!("{module}.weight")))?
            .out
            .shape
            .clone();
        let by_role = tensor != format!("{module}.weight") && tensor != module;
        let transposed = place.as_ref().is_some_and(|p| p.transposed);
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
        let mut rows = place.as_ref().and_then(|p| p.rows);
        let part_rows = place.as_ref().and_then(|p| p.part_rows);
        let role = self.source_role(module).map(|(role, _, _)| role);
        let head_dim = self.dims.map_or(0, |d| d.head_dim);
        if let (Some(map), Some(part_rows), Some(dims)) = (rows.as_mut(), part_rows, self.dims) {
            if role.is_some_and(Role::is_kv) {
                *map = repeat_kv_heads(*map, out, part_rows, dims.head_dim);
            }
        }
        let repeat = match rows {
            Some(RowMap::PerHead { repeat, .. } | RowMap::Repeated { repeat, .. }) => repeat,
            _ => 1,
        };
        let out_axis = usize::from(transposed);
        let extent = |axis: usize| shape.get(axis).copied().unwrap_or(0);
        self.check_fused_height(&tensor, extent(out_axis), place.as_ref())?;
        // The rows the delta has when it reaches the fusion: an aligned one is made in
        // the target's rows (of its part, once per group of repeated kv heads), whatever
        // the source's head count.
        let aligning = self.aligning();
        let delta_rows = match (aligning, part_rows) {
            (false, _) => out,
            (true, Some(part_rows)) => part_rows / repeat,
            (true, None) => extent(out_axis),
        };
        if let (Some(part_rows), true, false) = (part_rows, role.is_some_and(Role::is_kv), aligning)
        {
            if out * repeat != part_rows && head_dim > 0 && out % head_dim == 0 {
                return Err(PlanError::KvHeads {
                    adapter: self.name.clone(),
                    module: mapped.source.to_string(),
                    tensor: tensor.clone(),
                    source_heads: out / head_dim,
                    target_heads: part_rows / head_dim,
                    src: self.src.clone(),
                    span: self.entry.span,
                });
            }
        }
        let rotary = match by_role {
            true => self.rotary(mapped, head_dim, delta_rows)?,
            false => None,
        };
        Ok(Landing {
            place,
            tensor,
            shape,
            by_role,
            transposed,
            kind,
            out,
            inner,
            rows,
            part_rows,
            repeat,
            delta_rows,
            rotary,
        })
    }

    /// A fused tensor's height must be the sum of its parts' by the schema.
    fn check_fused_height(
        &self,
        tensor: &str,
        found: usize,
        place: Option<&Place>,
    ) -> Result<(), PlanError> {
        let (Some(expected), Some(schema)) = (place.and_then(|p| p.fused_rows), self.target_schema)
        else {
            return Ok(());
        };
        if found == expected {
            return Ok(());
        }
        Err(PlanError::SchemaMismatch {
            tensor: tensor.to_owned(),
            found,
            expected,
            what: "the sum of its parts".into(),
            arch: schema.name.clone(),
            src: self.src.clone(),
            span: self.recipe.base.span,
        })
    }

    /// How a module placed by role carries its q and k rows into the base's rotary
    /// convention, head by head.
    fn rotary(
        &self,
        mapped: &Mapped,
        head_dim: usize,
        delta_rows: usize,
    ) -> Result<Option<RotaryMap>, PlanError> {
        let (Some((role, _, from)), Some(schema)) =
            (self.source_role(&mapped.target), self.target_schema)
        else {
            return Ok(None);
        };
        rotary_between(role, from, schema.rotary, head_dim, delta_rows).map_err(
            |(from, to, reason)| PlanError::Rotary {
                adapter: self.name.clone(),
                module: mapped.source.to_string(),
                from: from.name().into(),
                to: to.name().into(),
                reason,
                src: self.src.clone(),
                span: self.entry.span,
            },
        )
    }

    fn dims_error(&self, message: String, help: &str) -> PlanError {
        PlanError::Dims {
            message,
            help: help.into(),
            src: self.src.clone(),
            span: self.entry.dims.span,
            label: "this width adaptation",
        }
    }

    /// The widths of a delta that is not aligned: into a part of a fused tensor, only a linear
    /// layer of the part's height; elsewhere the target's shape, or cut or padded to it as
    /// `dims = "truncate"` or `"pad"` says.
    fn fit_widths(
        &self,
        mapped: &Mapped,
        landing: &Landing,
        planned: &mut Planned,
    ) -> Result<Widths, PlanError> {
        let Landing {
            tensor,
            shape,
            kind,
            out,
            inner,
            ..
        } = landing;
        let (kind, out, inner) = (*kind, *out, *inner);
        if let (Some(_), Some(part_rows)) = (landing.rows, landing.part_rows) {
            let in_extent = shape.get(1 - landing.out_axis()).copied().unwrap_or(0);
            if kind == LoraKind::Embedding
                || out * landing.repeat != part_rows
                || inner != in_extent
            {
                return Err(self.shape_error(tensor, vec![out, inner], &[part_rows, in_extent]));
            }
            planned.by_role += 1;
            return Ok(Widths::Exact);
        }
        let delta_shape = match kind {
            LoraKind::Linear => vec![out, inner],
            LoraKind::LinearTransposed | LoraKind::Embedding => vec![inner, out],
            LoraKind::Expert { .. } => {
                if self.entry.dims.map != DimsMap::Exact {
                    return Err(self.dims_error(
                        format!("`{}` is a LoRA on the experts' parameter `{tensor}`, whose widths `dims` cannot adapt", mapped.target),
                        "leave `dims` out for an adapter made for this base's experts",
                    ));
                }
                // Fitted to the expert's tensor when the adapter was read.
                return Ok(Widths::Exact);
            }
            LoraKind::Experts { count, transposed } => {
                // Fitted to the parameter's shape when the adapter was read.
                let (d1, d2) = if transposed {
                    (inner, out)
                } else {
                    (out, inner)
                };
                let delta_shape = vec![count, d1, d2];
                if delta_shape != *shape {
                    return Err(self.shape_error(tensor, delta_shape, shape));
                }
                if self.entry.dims.map != DimsMap::Exact {
                    return Err(self.dims_error(
                        format!("`{}` is a LoRA on the experts' parameter `{tensor}`, whose widths `dims` cannot adapt", mapped.target),
                        "leave `dims` out for an adapter made for this base's experts",
                    ));
                }
                return Ok(Widths::Exact);
            }
        };
        let truncate = match self.entry.dims.map {
            _ if delta_shape == *shape => return Ok(Widths::Exact),
            DimsMap::Exact | DimsMap::Align { .. } => {
                return Err(self.shape_error(tensor, delta_shape, shape));
            }
            DimsMap::Truncate => true,
            DimsMap::Pad => false,
        };
        if let Err(dim) = dims::fits(truncate, &delta_shape, shape) {
            let module = &mapped.target;
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
            return Err(self.dims_error(
                format!(
                    "`{module}`'s delta is {delta_shape:?} but `{tensor}` is {shape:?}, with {more} {what}: {cannot}"
                ),
                &format!("use {other}, or `\"align\"`"),
            ));
        }
        let to = match kind {
            LoraKind::Linear => [shape[0], shape[1]],
            _ => [shape[1], shape[0]],
        };
        let fit = planned.align.fit(self.index, mapped.lora, to);
        let how = if truncate { "truncate" } else { "pad" };
        Ok(Widths::Adapted(
            Adapt::Fit {
                energy: super::AlignItem::Fit(fit),
            },
            format!("{how} {delta_shape:?} -> {shape:?}"),
        ))
    }

    /// `dims = "align"`: the delta mapped through this pair of bases' residual map and the
    /// module's inner map, made in the target's rows. Only linear layers of a known
    /// architecture have maps; others are skipped with a warning.
    fn align_widths(
        &self,
        mapped: &Mapped,
        landing: &Landing,
        planned: &mut Planned,
    ) -> Result<Widths, PlanError> {
        let (name, source_module, lora) = (&self.name, mapped.source, mapped.lora);
        let Landing { tensor, rows, .. } = landing;
        let source_tensor = format!("{source_module}.weight");
        let role = self
            .source_role(source_module)
            .map(|(role, layer, _)| (role, layer));
        let Some((role, _)) = role.filter(|_| lora.kind == LoraKind::Linear) else {
            planned.warnings.push(format!(
                "`{name}`: `{source_module}` is not a linear layer of a known architecture; `dims = \"align\"` has no map for it, so it is skipped"
            ));
            planned
                .transfer
                .push(Fate::new(name, source_module, What::NoAlignMap));
            return Ok(Widths::Skipped);
        };
        if lora.bias.is_some() {
            return Err(self.dims_error(
                format!("`{source_module}` has a `lora_bias`, which `dims = \"align\"` does not map yet"),
                "skip the module with `modules = { <name> = \"skip\" }` or use `dims = \"truncate\"` or `\"pad\"`",
            ));
        }
        let side = dims::side_of(role);
        if rows.is_some() && side == Side::Output {
            return Err(self.dims_error(
                format!("`{}` writes the residual stream but goes into part of the fused tensor `{tensor}`; `dims = \"align\"` maps only the input side of fused tensors", mapped.target),
                "skip the module with `modules = { <name> = \"skip\" }`, or use `dims = \"truncate\"` or `\"pad\"`",
            ));
        }
        let Some(target_ref) = TensorRef::of(self.base, tensor) else {
            return Err(self.unknown(tensor));
        };
        // The module's rows of the target (the first head of each group a grouped kv head
        // fills), in the adapter's rotary convention: the aligned delta is then placed exactly
        // as an exact one would be.
        let layout = landing.layout();
        let rank = match self.entry.dims.map {
            DimsMap::Align { rank } => rank,
            _ => None,
        };
        let aligned = planned
            .align
            .module(
                self.residual
                    .expect("align plans a residual map per adapter"),
                side,
                &source_tensor,
                (target_ref, layout),
                (self.index, lora),
                rank,
            )
            .map_err(|m| {
                self.dims_error(
                    m.to_string(),
                    "`source` must be the base the adapter was trained on",
                )
            })?;
        if rows.is_some() {
            planned.by_role += 1;
        }
        let note = planned.align.describe(aligned);
        let adapt = Adapt::Aligned {
            node: super::AlignItem::Delta(aligned),
            rank: planned.align.deltas[aligned].rank,
        };
        Ok(Widths::Adapted(adapt, note))
    }

    /// The module's deltas on its target tensor (and on its bias, for a `lora_bias`), once
    /// the inputs are checked to be floats. A zero weight plans nothing to compute.
    fn push_deltas(
        &self,
        mapped: &Mapped,
        landing: &Landing,
        adapt: Option<Adapt>,
        planned: &mut Planned,
    ) -> Result<(), PlanError> {
        let (module, lora) = (mapped.target.as_str(), mapped.lora);
        let (weight, weight_span) = self.weight.rule_for(module, layer_of(module));
        let weight = weight * mapped.share;
        let at = self.at();
        let tensor = &landing.tensor;
        let plan = planned
            .tensors
            .get_mut(tensor)
            .ok_or_else(|| self.unknown(tensor))?;
        check_float(&at, tensor, origin_meta(&plan.origin))?;
        check_float(&at, tensor, &lora.a)?;
        check_float(&at, tensor, &lora.b)?;
        let delta = |kind| Delta {
            adapter: self.index,
            weight,
            weight_span,
            scaling: lora.scaling,
            kind,
        };
        if matches!(
            landing.kind,
            LoraKind::Experts { .. } | LoraKind::Expert { .. }
        ) && self.recipe.output.adapter.is_some()
        {
            return Err(self.refuse(
                format!("changes the experts' parameter `{tensor}` (`target_parameters`), which `[output] adapter` cannot write yet"),
                "leave `[output] adapter` out, or the experts' parameters out of the adapter",
            ));
        }
        if let Some(magnitude) = &lora.magnitude {
            self.check_dora(mapped, adapt)?;
            check_float(&at, tensor, magnitude)?;
        }
        let factor = weight * lora.scaling;
        if factor != 0.0 {
            plan.deltas.push(delta(DeltaKind::LowRank {
                kind: landing.kind,
                a: lora.a.clone(),
                b: lora.b.clone(),
                rows: landing.rows,
                rotary: landing.rotary,
                adapt,
                magnitude: lora.magnitude.clone(),
            }));
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
                plan.deltas.push(delta(DeltaKind::Vector(bias.clone())));
            }
        }
        Ok(())
    }
}

impl AdapterPlan<'_> {
    fn refuse(&self, message: String, help: &str) -> PlanError {
        PlanError::Adapter {
            adapter: self.name.clone(),
            message,
            help: help.into(),
            src: self.src.clone(),
            span: self.entry.span,
        }
    }

    /// DoRA rescales each output row by its magnitude over the row's norm, so it is exact only
    /// in its own widths (its rows may move: into another name or a fused tensor's part), and
    /// where the deltas are summed as they are.
    fn check_dora(&self, mapped: &Mapped, adapt: Option<Adapt>) -> Result<(), PlanError> {
        let module = &mapped.target;
        let refuse = |why: &str, help: &str| {
            Err(self.refuse(
                format!("is a DoRA adapter (`use_dora`), and `{module}` {why}"),
                help,
            ))
        };
        if adapt.is_some() {
            return refuse(
                "is fused with adapted widths (`dims`)",
                "DoRA's magnitude belongs to the rows it was trained with, so it cannot be truncated, padded or aligned; fuse it into a base of its own widths",
            );
        }
        if self.recipe.merge.method.sparsify().is_some() || self.recipe.merge.method.elects_sign() {
            return refuse(
                &format!("would be pruned by `[merge] method = \"{}\"`", serde_json::to_value(self.recipe.merge.method).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()),
                "pruning merges combine plain deltas; DoRA rescales the whole weight, so use `method = \"linear\"` with it",
            );
        }
        if self.recipe.output.adapter.is_some() {
            return refuse(
                "would be written into `[output] adapter`",
                "a DoRA merge is not a low-rank delta, so it cannot be written as a plain LoRA; leave `[output] adapter` out",
            );
        }
        Ok(())
    }

    /// PEFT's trainable tokens: each embedding's trained rows replace the base's (a tied head
    /// follows through [`super::tie`]).
    pub(super) fn token_deltas(&self, out: &mut Planned) -> Result<(), PlanError> {
        for (tensor, tokens) in &self.adapter.tokens {
            let plan = out
                .tensors
                .get_mut(tensor)
                .ok_or_else(|| self.unknown(tensor))?;
            let shape = &plan.out.shape;
            let rows = shape.first().copied().unwrap_or(0);
            if shape.len() != 2 || tokens.values.shape.get(1) != shape.get(1) {
                return Err(self.shape_error(tensor, tokens.values.shape.clone(), shape));
            }
            if let Some(bad) = tokens.indices.iter().find(|&&i| i >= rows) {
                return Err(self.refuse(
                    format!("trains token {bad} of `{tensor}`, which has {rows} rows"),
                    "the adapter was trained on a model with a larger vocabulary: fuse it into that base (resized with `resize_token_embeddings`)",
                ));
            }
            if self.recipe.merge.method.sparsify().is_some()
                || self.recipe.merge.method.elects_sign()
                || self.recipe.output.adapter.is_some()
            {
                return Err(self.refuse(
                    format!("has trainable tokens for `{tensor}`, which replace rows rather than add a delta"),
                    "use `[merge] method = \"linear\"` and leave `[output] adapter` out with this adapter",
                ));
            }
            // PEFT refuses adapters whose trainable tokens overlap: which one wins is not defined.
            for delta in &plan.deltas {
                let DeltaKind::Tokens { indices, .. } = &delta.kind else {
                    continue;
                };
                if let Some(token) = tokens.indices.iter().find(|i| indices.contains(i)) {
                    return Err(self.refuse(
                        format!(
                            "trains token {token} of `{tensor}`, which `{}` trains too",
                            self.recipe.adapters[delta.adapter].entry.written
                        ),
                        "trainable tokens replace rows, so two adapters cannot both own one (PEFT refuses them too); train the token in one adapter only, or drop one of them",
                    ));
                }
            }
            check_float(&self.at(), tensor, &tokens.values)?;
            check_float(&self.at(), tensor, origin_meta(&plan.origin))?;
            let module = tensor.strip_suffix(".weight").unwrap_or(tensor);
            let (weight, weight_span) = self.weight.rule_for(module, layer_of(module));
            if weight != 0.0 {
                plan.deltas.push(Delta {
                    adapter: self.index,
                    weight,
                    weight_span,
                    scaling: 1.0,
                    kind: DeltaKind::Tokens {
                        indices: tokens.indices.clone(),
                        values: tokens.values.clone(),
                    },
                });
            }
        }
        Ok(())
    }
}

/// Where one module's delta lands in its target tensor.
struct Landing {
    /// The place found by name or role, if the module has one.
    place: Option<Place>,
    /// The target tensor and its shape.
    tensor: String,
    shape: Vec<usize>,
    /// Placed by role under another name (a part of a fused tensor).
    by_role: bool,
    /// The target is stored (in × out), as GPT-2's Conv1D.
    transposed: bool,
    /// The LoRA's kind in the target's orientation.
    kind: LoraKind,
    /// B's rows (the delta's output features) and A's columns (its input features).
    out: usize,
    inner: usize,
    /// Where B's rows go in a fused target, and the height of the module's part of it.
    rows: Option<RowMap>,
    part_rows: Option<usize>,
    /// How many target kv heads each of the source's fills.
    repeat: usize,
    /// The rows the delta has when it reaches the fusion.
    delta_rows: usize,
    rotary: Option<RotaryMap>,
}

impl Landing {
    /// The target's axis that the delta's rows (output features) run along.
    fn out_axis(&self) -> usize {
        usize::from(self.transposed)
    }

    /// Where the module's weight sits in the target tensor: its rows (the first head of each
    /// group a grouped kv head fills), in the adapter's rotary convention, so that a delta made
    /// in them is placed exactly as an exact one would be.
    fn layout(&self) -> Layout {
        let rotary = self.rotary;
        let gather = (self.rows.is_some() || rotary.is_some()).then(|| {
            let map = self.rows.unwrap_or(RowMap::Offset { offset: 0 });
            (0..self.delta_rows)
                .filter_map(|row| map.targets(rotary.map_or(row, |r| r.row(row))).next())
                .map(|row| row as u32)
                .collect::<Vec<u32>>()
        });
        Layout {
            transposed: self.transposed,
            rows: gather,
        }
    }
}

/// How a delta's widths meet its target's.
enum Widths {
    /// As they are.
    Exact,
    /// Adapted (`dims = "truncate"`, `"pad"` or `"align"`), with the transfer report's note.
    Adapted(Adapt, String),
    /// Not placed; a warning and the transfer report say why.
    Skipped,
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
