//! `modelforge score`: how likely a model finds each of a file's texts — each text tokenized
//! with the model's own `tokenizer.json` and run through the model's forward pass by the
//! engine (LibTorch, f32, one layer at a time). A text's log-likelihood does not depend on how
//! a tokenizer cuts it, so two models with different vocabularies compare on the same texts:
//! a fused output against its base, a carried adapter against its source.
use std::path::{Path, PathBuf};

use miette::Diagnostic;
use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::io::hf::HfModel;
use crate::io::peft::{LoraKind, PeftAdapter};
use crate::io::safetensors::TensorMeta;
use modelforge_core::job::{Decoder, Device, Family, ScoreDelta, ScoreJob, TensorPlace};

/// The `model_type`s whose forward pass the engine computes.
const FAMILIES: &[&str] = &["llama", "mistral", "qwen2", "phi3", "gpt_neox", "gpt2"];

#[derive(Debug, Error, Diagnostic)]
pub(crate) enum ScoreError {
    #[error("`{}` is a `{model_type}` model, whose forward pass modelforge does not compute", dir.display())]
    #[diagnostic(
        code(modelforge::score::family),
        help("`score` runs the model types {}", FAMILIES.join(", "))
    )]
    Family { dir: PathBuf, model_type: String },

    #[error("`{}`: {message}", path.display())]
    #[diagnostic(code(modelforge::score::config), help("{help}"))]
    Config {
        path: PathBuf,
        message: String,
        help: String,
    },

    #[error("cannot use the tokenizer `{}`: {message}", path.display())]
    #[diagnostic(
        code(modelforge::score::tokenizer),
        help("`score` tokenizes with the model's tokenizer.json, as `tokenizers` (and transformers' fast tokenizers) read it; save it with the model (`tokenizer.save_pretrained`)")
    )]
    Tokenizer { path: PathBuf, message: String },

    #[error("`{}`: {message}, which `score --adapter` does not add", dir.display())]
    #[diagnostic(
        code(modelforge::score::adapter),
        help("build the adapter into the model with `modelforge build` and score the output")
    )]
    Adapter { dir: PathBuf, message: String },

    #[error("cannot read the texts `{}`: {message}", path.display())]
    #[diagnostic(
        code(modelforge::score::texts),
        help("give a UTF-8 text file, one text per line")
    )]
    Texts { path: PathBuf, message: String },
}

pub fn score(
    model: &Path,
    adapter: Option<&Path>,
    texts: &Path,
    device: Device,
    json: bool,
) -> miette::Result<()> {
    let hf = HfModel::open(model)?;
    let decoder = decoder(&hf)?;
    let (deltas, replacements) = match adapter {
        Some(dir) => adapted(&PeftAdapter::open(dir)?, &decoder, &hf)?,
        None => (Vec::new(), Vec::new()),
    };
    let texts = read_texts(texts)?;
    let tokenizer_path = model.join("tokenizer.json");
    let tokenizer =
        tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| ScoreError::Tokenizer {
            path: tokenizer_path.clone(),
            message: e.to_string(),
        })?;
    let ids = texts
        .iter()
        .map(|text| {
            tokenizer
                .encode(text.as_str(), true)
                .map(|e| e.get_ids().iter().map(|&id| id as i64).collect::<Vec<_>>())
                .map_err(|e| ScoreError::Tokenizer {
                    path: tokenizer_path.clone(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tensors = hf
        .weights
        .tensors
        .iter()
        .map(|(name, (file, meta))| TensorPlace {
            name: name.clone(),
            path: hf.weights.files[*file].path.clone(),
            dtype: meta.dtype,
            shape: meta.shape.clone(),
            start: meta.start,
            len: meta.len,
        })
        .collect();
    let scores = crate::exec::score(&ScoreJob {
        device,
        decoder,
        tensors,
        deltas,
        replacements,
        texts: ids.clone(),
    })?;
    let report = report(model, &texts, &ids, &scores.logprobs);
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report serialises")
        );
    } else {
        print_text(&report, &texts);
    }
    Ok(())
}

/// The adapter as the engine adds it to the model's tensors: its LoRA modules (plain LoRA on
/// linear layers, `Conv1D`s and embeddings) as deltas, its `modules_to_save` as replacements,
/// as PEFT merges them; what else an adapter can hold is refused.
fn adapted(
    adapter: &PeftAdapter,
    decoder: &Decoder,
    model: &HfModel,
) -> Result<(Vec<ScoreDelta>, Vec<TensorPlace>), ScoreError> {
    let refuse = |message: String| ScoreError::Adapter {
        dir: adapter.dir.clone(),
        message,
    };
    if let Some(name) = adapter.tokens.keys().next() {
        return Err(refuse(format!("it trains tokens of `{name}`")));
    }
    let place = |meta: &TensorMeta, name: &str| TensorPlace {
        name: name.to_owned(),
        path: adapter.file.path.clone(),
        dtype: meta.dtype,
        shape: meta.shape.clone(),
        start: meta.start,
        len: meta.len,
    };
    // With a tied head, one tensor is both sides: a replacement of one side would untie them,
    // which a build handles (and says) and this pass does not.
    let embed = embedding(decoder.family);
    let tied = decoder.head == embed;
    let mut replacements = Vec::new();
    for (name, meta) in &adapter.replacements {
        if tied
            && !adapter.copies.contains(name)
            && (name == embed || name.ends_with("lm_head.weight"))
        {
            return Err(refuse(format!(
                "it replaces `{name}`, one side of the model's tied embedding and head"
            )));
        }
        if model.weights.get(name).is_none() {
            return Err(refuse(format!(
                "it replaces `{name}`, which the model does not have"
            )));
        }
        replacements.push(place(meta, name));
    }
    let deltas = adapter
        .modules
        .iter()
        .map(|(module, lora)| {
            let transposed = match lora.kind {
                LoraKind::Linear => false,
                LoraKind::LinearTransposed | LoraKind::Embedding => true,
                _ => return Err(refuse(format!("`{module}` is a LoRA on expert weights"))),
            };
            if lora.magnitude.is_some() {
                return Err(refuse(format!("`{module}` is DoRA")));
            }
            if lora.bias.is_some() || lora.parameter.is_some() {
                return Err(refuse(format!(
                    "`{module}` has a bias or wraps a bare parameter"
                )));
            }
            Ok(ScoreDelta {
                weight: format!("{module}.weight"),
                a: place(&lora.a, &format!("{module}.lora_A")),
                b: place(&lora.b, &format!("{module}.lora_B")),
                scale: lora.scaling,
                transposed,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((deltas, replacements))
}

/// The texts of `path`, one per line; empty lines are skipped.
fn read_texts(path: &Path) -> Result<Vec<String>, ScoreError> {
    let bytes = std::fs::read(path).map_err(|e| ScoreError::Texts {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| ScoreError::Texts {
        path: path.to_owned(),
        message: format!("not UTF-8 (at byte {})", e.utf8_error().valid_up_to()),
    })?;
    let texts: Vec<String> = text
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    if texts.is_empty() {
        return Err(ScoreError::Texts {
            path: path.to_owned(),
            message: "it holds no text".into(),
        });
    }
    Ok(texts)
}

fn report(model: &Path, texts: &[String], ids: &[Vec<i64>], logprobs: &[Vec<f64>]) -> Value {
    let mut total = 0.0;
    let mut predicted = 0usize;
    let rows: Vec<Value> = texts
        .iter()
        .zip(ids)
        .zip(logprobs)
        .map(|((_, ids), lp)| {
            let sum = lp.iter().fold(0.0, |sum, x| sum + x);
            total += sum;
            predicted += lp.len();
            json!({
                "tokens": ids.len(),
                "logprob": sum,
                "nats_per_token": if lp.is_empty() { 0.0 } else { -sum / lp.len() as f64 },
            })
        })
        .collect();
    let nats = if predicted == 0 {
        0.0
    } else {
        -total / predicted as f64
    };
    json!({
        "model": model.display().to_string(),
        "texts": rows,
        "tokens": predicted,
        "nats_per_token": nats,
        "perplexity": nats.exp(),
    })
}

fn print_text(report: &Value, texts: &[String]) {
    outln!("{:>7} {:>12} {:>10}  text", "tokens", "logprob", "nats/tok");
    for (row, text) in report["texts"].as_array().into_iter().flatten().zip(texts) {
        let shown: String = text.chars().take(60).collect();
        let more = if shown.len() < text.len() { "…" } else { "" };
        outln!(
            "{:>7} {:>12.4} {:>10.4}  {shown}{more}",
            row["tokens"].as_u64().unwrap_or(0),
            row["logprob"].as_f64().unwrap_or(0.0),
            row["nats_per_token"].as_f64().unwrap_or(0.0),
        );
    }
    outln!(
        "{} tokens predicted: {:.4} nats per token, perplexity {:.4}",
        report["tokens"],
        report["nats_per_token"].as_f64().unwrap_or(0.0),
        report["perplexity"].as_f64().unwrap_or(0.0),
    );
}

/// The forward pass `model`'s config.json describes, or why the engine cannot run it.
fn decoder(model: &HfModel) -> Result<Decoder, ScoreError> {
    let config = &model.config;
    let path = model.dir.join("config.json");
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let bad = |message: String| ScoreError::Config {
        path: path.clone(),
        message,
        help: "config.json is what transformers writes with the model; re-export it".into(),
    };
    // The first of `keys` config.json sets (transformers 5 writes the rotary settings in
    // `rope_parameters`, older versions at the top level, some under older names).
    let setting = |keys: &[&str]| {
        let rope = config.get("rope_parameters").and_then(Value::as_object);
        keys.iter().find_map(|key| {
            rope.and_then(|r| r.get(*key))
                .or_else(|| config.get(*key))
                .filter(|v| !v.is_null())
        })
    };
    let count = |keys: &[&str]| -> Result<usize, ScoreError> {
        setting(keys)
            .and_then(Value::as_u64)
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| {
                bad(format!(
                    "`{}` is missing or not a positive integer",
                    keys[0]
                ))
            })
    };
    let text = |key: &str, default: &str| {
        setting(&[key])
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_owned()
    };
    let (family, activation, wanted, eps_key, head) = match model_type.as_str() {
        "llama" | "mistral" | "qwen2" => (
            Family::Llama,
            text("hidden_act", "silu"),
            "silu",
            "rms_norm_eps",
            "lm_head.weight",
        ),
        "phi3" => (
            Family::Phi3,
            text("hidden_act", "silu"),
            "silu",
            "rms_norm_eps",
            "lm_head.weight",
        ),
        "gpt_neox" => (
            Family::GptNeox {
                parallel_residual: setting(&["use_parallel_residual"])
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            },
            text("hidden_act", "gelu"),
            "gelu",
            "layer_norm_eps",
            "embed_out.weight",
        ),
        "gpt2" => {
            if setting(&["scale_attn_by_inverse_layer_idx"]).and_then(Value::as_bool) == Some(true)
            {
                return Err(bad(
                    "`scale_attn_by_inverse_layer_idx` is true, which `score` does not compute"
                        .into(),
                ));
            }
            let activation = text("activation_function", "gelu_new");
            let activation = if activation == "gelu_pytorch_tanh" {
                "gelu_new".into()
            } else {
                activation
            };
            (
                Family::Gpt2,
                activation,
                "gelu_new",
                "layer_norm_epsilon",
                "lm_head.weight",
            )
        }
        _ => {
            return Err(ScoreError::Family {
                dir: model.dir.clone(),
                model_type,
            })
        }
    };
    if activation != wanted {
        return Err(bad(format!(
            "a `{model_type}` model with the activation `{activation}`: `score` computes `{wanted}` for this family"
        )));
    }
    let hidden = count(&["hidden_size", "n_embd"])?;
    let heads = count(&["num_attention_heads", "n_head"])?;
    let kv_heads = match setting(&["num_key_value_heads"]) {
        None => heads,
        Some(_) => count(&["num_key_value_heads"])?,
    };
    if heads % kv_heads != 0 {
        return Err(bad(format!(
            "{heads} attention heads cannot share {kv_heads} key/value heads evenly"
        )));
    }
    let head_dim = match setting(&["head_dim"]) {
        None => hidden / heads,
        Some(_) => count(&["head_dim"])?,
    };
    let inv_freq = if family == Family::Gpt2 {
        Vec::new()
    } else {
        let theta = setting(&["rope_theta", "rotary_emb_base"])
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let partial = setting(&["partial_rotary_factor", "rotary_pct"])
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        let rotated = ((head_dim as f64 * partial) as usize) / 2 * 2;
        let scaling = config
            .get("rope_scaling")
            .filter(|v| !v.is_null())
            .and_then(Value::as_object)
            .or_else(|| config.get("rope_parameters").and_then(Value::as_object));
        rotary_frequencies(theta, rotated, scaling).map_err(bad)?
    };
    let default_eps = if family == Family::Llama || family == Family::Phi3 {
        1e-6
    } else {
        1e-5
    };
    let norm_eps = setting(&[eps_key])
        .and_then(Value::as_f64)
        .unwrap_or(default_eps);
    // Tied as the build decides it: by config.json, else by the checkpoint (an embedding
    // without its head is tied).
    let head = match (
        model.weights.get(head).is_some(),
        setting(&["tie_word_embeddings"]).and_then(Value::as_bool),
    ) {
        (true, _) => head,
        (false, Some(true) | None) => embedding(family),
        (false, Some(false)) => {
            return Err(bad(format!(
                "the checkpoint has no `{head}` and `tie_word_embeddings` is false"
            )))
        }
    };
    let layers = count(&["num_hidden_layers", "n_layer"])?;
    let window = setting(&["sliding_window"])
        .and_then(Value::as_u64)
        .map(|w| w as usize);
    let windows = match model_type.as_str() {
        // Mistral and Phi-3 slide every layer's window when config.json sets one.
        "mistral" | "phi3" => vec![window; layers],
        // Qwen2 where `layer_types` says so.
        "qwen2" => match setting(&["layer_types"]).and_then(Value::as_array) {
            Some(types) => types
                .iter()
                .map(|t| (t.as_str() == Some("sliding_attention")).then_some(window).flatten())
                .collect(),
            None if setting(&["use_sliding_window"]).and_then(Value::as_bool) == Some(true) => {
                return Err(bad(
                    "`use_sliding_window` is true but `layer_types` does not say which layers slide"
                        .into(),
                ))
            }
            None => vec![None; layers],
        },
        _ => vec![None; layers],
    };
    if windows.len() != layers {
        return Err(bad(format!(
            "`layer_types` names {} layers, the model has {layers}",
            windows.len()
        )));
    }
    Ok(Decoder {
        family,
        layers,
        windows,
        heads,
        kv_heads,
        head_dim,
        inv_freq,
        norm_eps,
        head: head.into(),
    })
}

/// The input embedding's tensor in `family`'s checkpoints.
fn embedding(family: Family) -> &'static str {
    match family {
        Family::Llama | Family::Phi3 => "model.embed_tokens.weight",
        Family::GptNeox { .. } => "gpt_neox.embed_in.weight",
        Family::Gpt2 => "transformer.wte.weight",
    }
}

/// The rotary frequencies θ^(−2i/d) for i < d/2, rescaled as `scaling` (`rope_type` or `type`:
/// `default`, `linear`, `llama3`) says.
fn rotary_frequencies(
    theta: f64,
    rotated: usize,
    scaling: Option<&Map<String, Value>>,
) -> Result<Vec<f64>, String> {
    let base: Vec<f64> = (0..rotated / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / rotated as f64))
        .collect();
    let Some(scaling) = scaling else {
        return Ok(base);
    };
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let number = |key: &str| {
        scaling
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope scaling `{kind}` needs `{key}`"))
    };
    match kind {
        "default" => Ok(base),
        "linear" => {
            let factor = number("factor")?;
            Ok(base.iter().map(|f| f / factor).collect())
        }
        "llama3" => {
            let factor = number("factor")?;
            let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
            let context = number("original_max_position_embeddings")?;
            let (low_wavelen, high_wavelen) = (context / low, context / high);
            Ok(base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (context / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect())
        }
        other => Err(format!(
            "rope scaling `{other}` is not one `score` computes (default, linear, llama3)"
        )),
    }
}
