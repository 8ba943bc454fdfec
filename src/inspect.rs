//! `modelforge inspect`: what a model or adapter directory holds.
use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::io::hf::HfModel;
use crate::io::peft::{LoraKind, PeftAdapter};

pub fn inspect(path: &std::path::Path, json: bool) -> miette::Result<()> {
    let report = if path.join("adapter_config.json").is_file() {
        adapter(&PeftAdapter::open(path)?)
    } else {
        model(&HfModel::open(path)?)
    };
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report serialises")
        );
    } else {
        print_text(&report);
    }
    Ok(())
}

fn model(model: &HfModel) -> Value {
    let mut dtypes: BTreeMap<String, u64> = BTreeMap::new();
    let mut parameters = 0u64;
    for (_, meta) in model.weights.tensors.values() {
        let n = meta.numel() as u64;
        parameters += n;
        *dtypes.entry(meta.dtype.to_string()).or_default() += n;
    }
    json!({
        "kind": "model",
        "path": model.dir.display().to_string(),
        "architecture": model.architecture(),
        "model_type": model.config.get("model_type"),
        // The shipped schema a recipe would place adapters by (`[base] arch` overrides it).
        "schema": crate::arch::Schemas::load(&[])
            .ok()
            .and_then(|s| s.detect(&model.config).map(|s| s.name.clone())),
        "layers": model.layer_count(),
        "hidden_size": model.config.get("hidden_size").or_else(|| model.config.get("n_embd")),
        "parameters": parameters,
        "tensors": model.weights.tensors.len(),
        "files": model.weights.files.len(),
        "dtypes": dtypes,
    })
}

fn adapter(adapter: &PeftAdapter) -> Value {
    let mut targets: BTreeMap<String, usize> = BTreeMap::new();
    for module in adapter.modules.keys() {
        let leaf = module.rsplit('.').next().unwrap_or(module).to_owned();
        *targets.entry(leaf).or_default() += 1;
    }
    let ranks: std::collections::BTreeSet<usize> =
        adapter.modules.values().map(|m| m.rank).collect();
    let embedding = adapter
        .modules
        .values()
        .any(|m| m.kind == LoraKind::Embedding);
    json!({
        "kind": "adapter",
        "path": adapter.dir.display().to_string(),
        "base_model": adapter.config.base_model,
        "r": adapter.config.r,
        "ranks": ranks,
        "lora_alpha": adapter.config.alpha,
        "use_rslora": adapter.config.use_rslora,
        "fan_in_fan_out": adapter.config.fan_in_fan_out,
        "target_modules": adapter.config.target_modules,
        "modules": targets,
        "embedding_lora": embedding,
        "modules_to_save": adapter.replacements.keys().collect::<Vec<_>>(),
        "lora_modules": adapter.modules.len(),
    })
}

fn print_text(report: &Value) {
    let Value::Object(map) = report else { return };
    for (key, value) in map {
        let shown = match value {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            other => other.to_string(),
        };
        outln!("{key:>16}: {shown}");
    }
}
