//! Entry points for the fuzz targets in `fuzz/`, not a stable API. Each takes bytes as a file
//! would hold them and must return, whatever they are: a panic is a bug. Errors are rendered as
//! a person would see them, so that the diagnostics (spans, source snippets) are fuzzed too.
use std::path::Path;

use miette::{Diagnostic, GraphicalReportHandler, GraphicalTheme};

/// One tensor of a safetensors header, as the `safetensors` crate would describe it.
#[derive(Debug, PartialEq, Eq)]
pub struct HeaderTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// Relative to the data section, as in the file.
    pub data_offsets: (u64, u64),
}

/// Why a safetensors file was refused.
#[derive(Debug)]
pub struct HeaderRejection {
    pub message: String,
    /// The `safetensors` crate accepts such a file (it keeps the last of two tensors with one
    /// name); every other rejection must be one the crate makes too.
    pub stricter_than_the_crate: bool,
}

/// Reads a whole safetensors file held in memory: the header length and its tensors, sorted by
/// name, or why it is not a valid file.
pub fn safetensors_header(bytes: &[u8]) -> Result<(u64, Vec<HeaderTensor>), HeaderRejection> {
    use crate::io::safetensors::header;
    match header::parse(bytes) {
        Ok((json_len, entries)) => {
            let mut tensors: Vec<HeaderTensor> = entries
                .into_iter()
                .map(|e| HeaderTensor {
                    name: e.name,
                    dtype: e.dtype,
                    shape: e.shape,
                    data_offsets: (e.start, e.end),
                })
                .collect();
            tensors.sort_by(|a, b| a.name.cmp(&b.name));
            Ok((json_len, tensors))
        }
        Err(fault) => Err(HeaderRejection {
            message: fault.to_string(),
            stricter_than_the_crate: fault.stricter_than_the_crate(),
        }),
    }
}

/// Reads `adapter_config.json` bytes as `PeftAdapter::open` does, then asks the parsed config
/// what the fuser asks it: the rank, alpha and scaling of a few module paths. Returns a rendered
/// diagnostic on refusal.
pub fn adapter_config(bytes: &[u8]) -> Result<(), String> {
    use crate::io::peft::LoraConfig;
    let path = Path::new("adapter_config.json");
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let config = LoraConfig::parse(path, value).map_err(|e| render(&e))?;
    for module in [
        "model.layers.0.self_attn.q_proj",
        "model.embed_tokens",
        "transformer.h.11.attn.c_attn",
        "",
    ] {
        let (rank, alpha) = config.rank_and_alpha(module);
        let _ = config.scaling(rank, alpha);
    }
    Ok(())
}

/// Parses and checks a recipe as `modelforge build` does. The recipe sits in a folder (made on
/// the first call, under the temporary directory) that holds the directories `base`, `lora`,
/// `a`, `b` and `../models/base`, so that recipes naming them get past the path checks to the
/// values after them. What is fuzzed is the TOML, the schema, the values and the diagnostics
/// that point into the text.
pub fn recipe(bytes: &[u8]) -> Result<(), String> {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("modelforge-fuzz-{}", std::process::id()));
        for sub in [
            "recipes/base",
            "recipes/lora",
            "recipes/a",
            "recipes/b",
            "models/base",
        ] {
            // A directory that cannot be made only makes recipes naming it fail earlier.
            let _ = std::fs::create_dir_all(root.join(sub));
        }
        root.join("recipes")
    });
    let text = String::from_utf8_lossy(bytes).into_owned();
    crate::recipe::Recipe::parse(&dir.join("recipe.toml"), text)
        .map(drop)
        .map_err(|e| render(&e))
}

/// Reads an architecture schema as `--arch FILE` does, then asks it what a build asks: the
/// widths of a model and the place of every role. Returns a rendered diagnostic on refusal.
pub fn arch_schema(bytes: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(bytes);
    let schema = crate::arch::parse("schema.toml", &text).map_err(|e| render(&e))?;
    let config = serde_json::json!({
        "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "kv_channels": 8,
        "multi_query_attention": true, "multi_query_group_num": 2, "n_embd": 32, "n_head": 4,
        "intermediate_size": 48,
    });
    let config = config.as_object().expect("an object");
    let dims = schema.dims(config);
    for (_, role) in crate::arch::Role::ALL {
        let _ = schema.place_of(role, 3, dims.as_ref());
        let _ = schema.needs_widths(role);
    }
    let _ = schema.role_of("model.layers.3.self_attn.q_proj.weight");
    Ok(())
}

/// Reads a SentencePiece model file (`tokenizer.model`, `ice_text.model`) as alignment does:
/// its pieces, or why it cannot be read.
pub fn sentencepiece(bytes: &[u8]) -> Result<usize, String> {
    crate::io::sentencepiece::pieces(bytes).map(|pieces| pieces.len())
}

/// The report a person would see, without colour.
fn render(diagnostic: &dyn Diagnostic) -> String {
    let mut out = String::new();
    let handler = GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor());
    if handler.render_report(&mut out, diagnostic).is_err() {
        out = diagnostic.to_string();
    }
    out
}
