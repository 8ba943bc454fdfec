//! The rest of an output directory around the weights: the base's config and tokenizer files,
//! a model card, and a manifest of what went in.
mod card;
pub(crate) mod gguf;

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::exec::Resolution;
use crate::plan::{Adapt, Plan};
use crate::recipe::OutputDtype;

pub(crate) const MANIFEST: &str = "modelforge.json";

/// The files a tokenizer is saved as (`save_pretrained`): taken from an adapter's directory
/// when it was trained on a resized vocabulary.
pub(crate) const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

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

/// Everything but the weights, as (file name, bytes): the base's config and tokenizer files,
/// the model card and the manifest.
pub(crate) fn files(res: &Resolution) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let (recipe, plan) = (&res.recipe, &res.plan);
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
    files.extend(transfer_files(res)?);
    let mut manifest = serde_json::to_vec_pretty(&manifest(res)).map_err(std::io::Error::other)?;
    manifest.push(b'\n');
    files.push((MANIFEST.into(), manifest));
    Ok(files)
}

/// `transfer.json` and `transfer.txt`, when something was mapped, skipped or dropped: what became
/// of every module.
pub(crate) fn transfer_files(res: &Resolution) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    if res.plan.transfer.iter().all(|f| f.is_plain()) {
        return Ok(Vec::new());
    }
    let transfer = transfer(res);
    let mut json = serde_json::to_vec_pretty(&transfer).map_err(std::io::Error::other)?;
    json.push(b'\n');
    let text: String = transfer.iter().map(transfer_line).collect();
    Ok(vec![
        ("transfer.json".into(), json),
        ("transfer.txt".into(), text.into_bytes()),
    ])
}

/// The fate of every module, with the figures of aligned ones read from their cache entries.
pub(crate) fn transfer(res: &Resolution) -> Vec<crate::plan::Fate> {
    let (align, keys) = (&res.plan.align, &res.keys.align);
    let figure = |key| res.store.action(key).and_then(|e| e.energy.or(e.overlap));
    res.plan
        .transfer
        .iter()
        .map(|fate| {
            let mut fate = fate.clone();
            match fate.adapted {
                Some(Adapt::Aligned(i)) => {
                    let inner = align.deltas[i].inner;
                    let residual = align.inners[inner].residual;
                    fate.energy = figure(&keys.deltas[i]);
                    fate.overlap = figure(&keys.inners[inner]);
                    fate.residual_fit = figure(&keys.residuals[residual]);
                }
                Some(Adapt::Fit(i)) => fate.energy = figure(&keys.fits[i]),
                None => {}
            }
            fate
        })
        .collect()
}

fn transfer_line(fate: &crate::plan::Fate) -> String {
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
fn manifest(res: &Resolution) -> Value {
    let inputs: BTreeMap<&str, String> = res
        .keys
        .files
        .iter()
        .map(|f| (f.shown.as_str(), f.digest.hex()))
        .collect();
    json!({
        "modelforge": env!("CARGO_PKG_VERSION"),
        "recipe": {
            "path": res.recipe.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "blake3": res.recipe_digest.hex(),
        },
        "inputs": inputs,
    })
}
