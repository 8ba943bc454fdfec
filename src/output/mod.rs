//! The rest of an output directory around the weights: the base's config and tokenizer files,
//! a model card, and a manifest of what went in.
mod card;

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::io::writer::WrittenFile;
use crate::plan::Plan;
use crate::recipe::{OutputDtype, Recipe};

pub(crate) const MANIFEST: &str = "modelforge.json";

/// Files of the base never copied: its weights (rewritten), its card and manifest (rewritten).
fn is_copied(name: &str) -> bool {
    let weights = [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".msgpack",
        ".gguf",
    ];
    !(name.starts_with('.')
        || weights.iter().any(|ext| name.ends_with(ext))
        || name == crate::io::hf::INDEX
        || name.ends_with(".index.json")
        || name == "README.md"
        || name == MANIFEST)
}

/// Writes everything but the weights into the staged output directory.
pub(crate) fn finish(
    dir: &Path,
    recipe: &Recipe,
    plan: &Plan,
    written: &[WrittenFile],
) -> std::io::Result<()> {
    let base_dir = &plan.inputs.base.dir;
    let mut names: Vec<String> = std::fs::read_dir(base_dir)?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_type()
                .map(|t| t.is_file() || t.is_symlink())
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| is_copied(name))
        .collect();
    names.sort();
    for name in &names {
        if name == "config.json" && recipe.output.dtype != OutputDtype::Base {
            std::fs::write(dir.join(name), config_json(plan, recipe.output.dtype))?;
        } else {
            std::fs::copy(base_dir.join(name), dir.join(name))?;
        }
    }
    std::fs::write(dir.join("README.md"), card::model_card(recipe, plan))?;
    let manifest = manifest(recipe, plan, written)?;
    let mut bytes = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    std::fs::write(dir.join(MANIFEST), bytes)?;
    Ok(())
}

/// The base's config.json with the dtype the recipe asks for.
fn config_json(plan: &Plan, dtype: OutputDtype) -> Vec<u8> {
    let mut config = plan.inputs.base.config.clone();
    let name = match dtype {
        OutputDtype::Base | OutputDtype::F32 => "float32",
        OutputDtype::F16 => "float16",
        OutputDtype::Bf16 => "bfloat16",
    };
    let mut set = false;
    for key in ["torch_dtype", "dtype"] {
        if let Some(value) = config.get_mut(key) {
            *value = Value::from(name);
            set = true;
        }
    }
    if !set {
        config.insert("dtype".into(), Value::from(name));
    }
    let mut bytes = serde_json::to_vec_pretty(&config).expect("a JSON map serialises");
    bytes.push(b'\n');
    bytes
}

/// What went into the build and what came out, by blake3 digest; no timestamps, so the same
/// inputs give the same manifest.
fn manifest(recipe: &Recipe, plan: &Plan, written: &[WrittenFile]) -> std::io::Result<Value> {
    let recipe_dir = recipe.path.parent().unwrap_or(Path::new(""));
    let mut inputs: Vec<std::path::PathBuf> = plan.inputs.base.weight_files();
    inputs.push(plan.inputs.base.dir.join("config.json"));
    for adapter in &plan.inputs.adapters {
        inputs.push(adapter.dir.join("adapter_config.json"));
        inputs.push(adapter.file.path.clone());
    }
    let digests: Vec<(String, String)> = inputs
        .par_iter()
        .map(|path| {
            let mut hasher = blake3::Hasher::new();
            hasher.update_reader(std::fs::File::open(path)?)?;
            let shown = path
                .strip_prefix(recipe_dir)
                .unwrap_or(path)
                .display()
                .to_string();
            Ok((shown, hasher.finalize().to_hex().to_string()))
        })
        .collect::<std::io::Result<_>>()?;
    let outputs: BTreeMap<String, String> = written
        .iter()
        .map(|f| {
            let name = f
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, f.blake3.to_hex().to_string())
        })
        .collect();
    Ok(json!({
        "modelforge": env!("CARGO_PKG_VERSION"),
        "recipe": {
            "path": recipe.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "blake3": blake3::hash(recipe.text.as_bytes()).to_hex().to_string(),
        },
        "inputs": digests.into_iter().collect::<BTreeMap<_, _>>(),
        "outputs": outputs,
    }))
}
