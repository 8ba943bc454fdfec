//! The rest of an output directory around the weights: the base's config and tokenizer files,
//! a model card, and a manifest of what went in.
mod card;
pub(crate) mod gguf;

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::digest::FileDigest;
use crate::plan::{Carried, Fate, Plan};
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

/// What the files around the weights are made from.
pub(crate) struct Surroundings<'a> {
    pub recipe: &'a Recipe,
    pub recipe_digest: FileDigest,
    pub plan: &'a Plan,
    /// The fate of every module, with the figures of width adaptation.
    pub fates: Vec<Fate>,
    /// The effect adapters keep on their examples.
    pub effects: BTreeMap<String, crate::plan::Effect>,
    /// Every input file, as the lock names it, and its digest.
    pub inputs: BTreeMap<String, FileDigest>,
}

/// Everything but the weights, as (file name, bytes): the base's config and tokenizer files,
/// the model card and the manifest.
pub(crate) fn files(around: &Surroundings<'_>) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let (recipe, plan) = (around.recipe, around.plan);
    let base_dir = &plan.inputs.base.dir;
    let mut names: Vec<String> = std::fs::read_dir(base_dir)?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| is_copied(name))
        .collect();
    names.sort();
    // A resized vocabulary's tokenizer replaces the base's, file by file.
    let tokenizer: BTreeMap<String, &std::path::PathBuf> = plan
        .tokenizer
        .iter()
        .filter_map(|path| Some((path.file_name()?.to_string_lossy().into_owned(), path)))
        .collect();
    names.retain(|name| !tokenizer.contains_key(name));
    names.extend(tokenizer.keys().cloned());
    names.sort();
    let mut files = Vec::new();
    for name in names {
        if let Some(path) = tokenizer.get(&name) {
            files.push((name, std::fs::read(path)?));
            continue;
        }
        let edited = recipe.output.dtype != OutputDtype::Base || !plan.config.is_empty();
        let bytes = if name == "config.json" && edited {
            config_json(plan, recipe.output.dtype)
        } else {
            std::fs::read(base_dir.join(&name))?
        };
        files.push((name, bytes));
    }
    files.push((
        "README.md".into(),
        card::model_card(recipe, plan).into_bytes(),
    ));
    files.extend(transfer_files(&around.fates, &around.effects)?);
    let mut manifest =
        serde_json::to_vec_pretty(&manifest(around)).map_err(std::io::Error::other)?;
    manifest.push(b'\n');
    files.push((MANIFEST.into(), manifest));
    Ok(files)
}

/// `transfer.json` and `transfer.txt`, when something was mapped, skipped or dropped, or
/// compared with a source base: what to expect of each adapter, and what became of every
/// module.
pub(crate) fn transfer_files(
    fates: &[Fate],
    effects: &BTreeMap<String, crate::plan::Effect>,
) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    if !fates.iter().any(Fate::is_reported) {
        return Ok(Vec::new());
    }
    let adapters = Carried::of(fates, effects);
    let mut json = serde_json::to_vec_pretty(&json!({ "adapters": adapters, "modules": fates }))
        .map_err(std::io::Error::other)?;
    json.push(b'\n');
    let text: String = adapters
        .iter()
        .map(|a| format!("{}: {}\n", a.adapter, a.describe()))
        .chain(fates.iter().map(transfer_line))
        .collect();
    Ok(vec![
        ("transfer.json".into(), json),
        ("transfer.txt".into(), text.into_bytes()),
    ])
}

fn transfer_line(fate: &Fate) -> String {
    let mut line = format!("{}: {}: {}", fate.adapter, fate.module, fate.fate);
    if let Some(dims) = &fate.dims {
        line += &format!("; dims {dims}");
    }
    if let Some(fit) = fate.residual_fit {
        line += &format!(" (embedding fit residual {fit:.3})");
    }
    if let Some(energy) = fate.energy {
        line += &format!("; energy kept {energy:.3}");
    }
    if let Some(overlap) = fate.overlap {
        line += &format!("; subspace overlap {overlap:.3}");
    }
    line + "\n"
}

/// The base's config.json with the dtype the recipe asks for and the plan's changes.
fn config_json(plan: &Plan, dtype: OutputDtype) -> Vec<u8> {
    let mut config = plan.inputs.base.config.clone();
    let name = match dtype {
        OutputDtype::Base => None,
        OutputDtype::F32 => Some("float32"),
        OutputDtype::F16 => Some("float16"),
        OutputDtype::Bf16 => Some("bfloat16"),
    };
    if let Some(name) = name {
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
    }
    for (key, value) in &plan.config {
        config.insert(key.clone(), value.clone());
    }
    let mut bytes = serde_json::to_vec_pretty(&config).expect("a JSON map serialises");
    bytes.push(b'\n');
    bytes
}

/// What went into the build, by blake3 digest; no timestamps, so the same inputs give the same
/// manifest. (The lock file beside the recipe also records what came out.)
fn manifest(around: &Surroundings<'_>) -> Value {
    let inputs: BTreeMap<&str, String> = around
        .inputs
        .iter()
        .map(|(shown, digest)| (shown.as_str(), digest.hex()))
        .collect();
    json!({
        "modelforge": env!("CARGO_PKG_VERSION"),
        "recipe": {
            "path": around.recipe.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "blake3": around.recipe_digest.hex(),
        },
        "inputs": inputs,
    })
}
