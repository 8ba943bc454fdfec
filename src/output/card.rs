//! The model card (README.md) in the Hugging Face convention: YAML front matter, then what the
//! model is made of and the recipe that made it.
use std::fmt::Write;

use crate::plan::Plan;
use crate::recipe::Recipe;

pub(crate) fn model_card(recipe: &Recipe, plan: &Plan) -> String {
    let base = &recipe.base.written;
    let mut card = String::new();
    let _ = writeln!(card, "---");
    let _ = writeln!(card, "base_model: {}", yaml_string(base));
    let _ = writeln!(card, "library_name: transformers");
    let _ = writeln!(card, "tags:\n- modelforge\n- lora\n- merge");
    let _ = writeln!(card, "---\n");
    let title = recipe
        .primary_output()
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let _ = writeln!(card, "# {title}\n");
    let _ = writeln!(
        card,
        "Built by modelforge {} from the base model `{base}` ({}) with {} LoRA adapter(s) fused into its weights.\n",
        env!("CARGO_PKG_VERSION"),
        plan.inputs.base.architecture(),
        recipe.adapters.len()
    );
    if !recipe.adapters.is_empty() {
        let _ = writeln!(
            card,
            "| adapter | weight | rank | alpha | modules | trained on |"
        );
        let _ = writeln!(card, "|---|---|---|---|---|---|");
        for (entry, source) in recipe.adapters.iter().zip(&plan.inputs.adapters) {
            let weight = match entry.weight.as_slice() {
                [rule] if rule.layers.is_none() && rule.modules.is_none() => rule.value.to_string(),
                rules => format!("{} rules (see recipe)", rules.len()),
            };
            let Some(adapter) = source.lora() else {
                let _ = writeln!(
                    card,
                    "| `{}` | {weight} | full model | - | all | - |",
                    entry.entry.written
                );
                continue;
            };
            let _ = writeln!(
                card,
                "| `{}` | {weight} | {} | {} | {} | {} |",
                entry.entry.written,
                adapter.config.r,
                adapter.config.alpha,
                adapter.modules.len() + adapter.replacements.len(),
                adapter
                    .config
                    .base_model
                    .as_deref()
                    .map(|b| format!("`{b}`"))
                    .unwrap_or_else(|| "unknown".into()),
            );
        }
        let _ = writeln!(card);
    }
    let _ = writeln!(
        card,
        "Each fused tensor is W + Σ weight · scaling · B·A, computed in f32 and rounded once to the output dtype.\n"
    );
    if !plan.notes.is_empty() {
        let _ = writeln!(card, "## Differences from the base\n");
        for note in &plan.notes {
            let _ = writeln!(card, "- {note}");
        }
        let _ = writeln!(card);
    }
    let _ = writeln!(
        card,
        "## Recipe\n\n```toml\n{}\n```\n",
        recipe.text.trim_end()
    );
    let _ = writeln!(
        card,
        "## Reproduce\n\nRun `modelforge build {}` beside the same inputs; `modelforge.json` lists their blake3 digests and those of the files written.",
        recipe.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    );
    card
}

fn yaml_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}
