//! Why a fused tensor is computed again: its node compared with the one the last build
//! recorded for it, in the words of the recipe and the inputs the user gave.
use modelforge_core::node::{Content, Fuse, Input};

use super::Resolution;
use crate::plan::{Origin, TensorPlan};

/// Why the tensor `name`, now `new`, differs from what it was, `old`.
pub(crate) fn since(res: &Resolution, name: &str, new: &Fuse, old: &Fuse) -> Vec<String> {
    let Some(tensor) = res.plan.tensors.iter().find(|t| t.out.name == name) else {
        return vec!["it was never built".into()];
    };
    let changed = |new: &Input, old: &Input, i: usize| {
        (new.content != old.content).then(|| format!("{} changed", source(res, tensor, i, new)))
    };
    let mut why = Vec::new();
    why.extend(changed(&new.origin, &old.origin, 0));
    if new.deltas.len() != old.deltas.len() {
        why.push(format!(
            "{} adapter(s) touch it now, {} before",
            new.deltas.len(),
            old.deltas.len()
        ));
    } else {
        for (i, (d_new, d_old)) in new.deltas.iter().zip(&old.deltas).enumerate() {
            let (inputs_new, inputs_old) = (d_new.delta.tensors(), d_old.delta.tensors());
            let read_changed = inputs_new.len() != inputs_old.len()
                || inputs_new
                    .iter()
                    .zip(&inputs_old)
                    .any(|(n, o)| n.content != o.content);
            let delta = &tensor.deltas[i];
            let adapter = &res.recipe.adapters[delta.adapter].entry.written;
            if read_changed {
                let input = inputs_new.first().copied().unwrap_or(&new.origin);
                why.push(format!("{} changed", source(res, tensor, i + 1, input)));
            } else if d_new.weight != d_old.weight {
                let at = delta
                    .weight_span
                    .map(|span| format!(" ({})", res.recipe.line_of(span)))
                    .unwrap_or_default();
                why.push(format!(
                    "the weight of `{adapter}`{at} went from {} to {}",
                    d_old.weight, d_new.weight
                ));
            } else if d_new.scaling != d_old.scaling {
                why.push(format!(
                    "the scaling of `{adapter}` (its `lora_alpha` or rank) went from {} to {}",
                    d_old.scaling, d_new.scaling
                ));
            } else if d_new != d_old {
                why.push(format!("`{adapter}` is fused into it differently"));
            }
        }
    }
    if new.dtype != old.dtype {
        why.push(format!(
            "the output dtype changed from {} to {}",
            old.dtype, new.dtype
        ));
    }
    if new.device != old.device {
        why.push(format!(
            "the device changed from {} to {}",
            old.device.name(),
            new.device.name()
        ));
    }
    if new.merge != old.merge {
        why.push("the merge settings changed".into());
    }
    if new.origin_cast != old.origin_cast {
        why.push("the dtype a replacement is rounded to changed".into());
    }
    if why.is_empty() {
        why.push("its cached result is missing".into());
    }
    why
}

/// How the lock names the file an input is read from: the base's file, or, for an adapter's
/// tensor (keyed by its own bytes), the adapter's file; `i` is 0 for the origin, then each
/// delta's position plus one.
fn source(res: &Resolution, tensor: &TensorPlan, i: usize, input: &Input) -> String {
    let files = &res.graph.files;
    let shown = |path: &std::path::Path| {
        files
            .iter()
            .find(|f| f.path == path)
            .map(|f| format!("`{}`", f.shown))
    };
    let found = match &input.content {
        Content::File(digest) => files
            .iter()
            .find(|f| f.digest == *digest)
            .map(|f| format!("`{}`", f.shown)),
        Content::Bytes(_) => {
            let adapter = match (i, &tensor.origin) {
                (0, Origin::Replacement { adapter, .. }) => Some(*adapter),
                (0, Origin::Base { .. }) => None,
                (i, _) => tensor.deltas.get(i - 1).map(|d| d.adapter),
            };
            adapter
                .and_then(|a| res.plan.inputs.adapters[a].tensor_file(&tensor.out.name))
                .and_then(|file| shown(&file.path))
        }
    };
    found.unwrap_or_else(|| "an input".into())
}
