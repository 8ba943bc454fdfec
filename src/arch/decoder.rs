//! The forward pass a model's config.json describes, as the engine runs it (`modelforge
//! score`, and the transfer report's examples): its family's layout and its sizes, read from
//! the keys transformers writes (and the older names of them).
use serde_json::{Map, Value};

use modelforge_core::job::{Biases, Decoder, Family};

/// The `model_type`s whose forward pass the engine computes.
pub(crate) const FAMILIES: &[&str] = &["llama", "mistral", "qwen2", "phi3", "gpt_neox", "gpt2"];

/// Why the engine cannot run a model's forward pass.
#[derive(Debug)]
pub(crate) enum Unsupported {
    /// A `model_type` not in [`FAMILIES`].
    Family(String),
    /// A setting of config.json it does not compute, or a value missing or malformed.
    Config(String),
}

/// The forward pass a model's `config` describes (`has` says whether its checkpoint holds a
/// tensor), or why the engine cannot run it.
pub(crate) fn decoder(
    config: &Map<String, Value>,
    has: impl Fn(&str) -> bool,
) -> Result<Decoder, Unsupported> {
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let bad = Unsupported::Config;
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
    let count = |keys: &[&str]| -> Result<usize, Unsupported> {
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
            if setting(&["scale_attn_weights"]).and_then(Value::as_bool) == Some(false) {
                return Err(bad(
                    "`scale_attn_weights` is false, which `score` does not compute".into(),
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
        _ => return Err(Unsupported::Family(model_type)),
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
    let neox = matches!(family, Family::GptNeox { .. });
    let inv_freq = if family == Family::Gpt2 {
        Vec::new()
    } else {
        // GPT-NeoX's own names first, and its own default share of each head rotated.
        let (theta_keys, partial_keys, partial_default): (&[&str], &[&str], f64) = if neox {
            (
                &["rotary_emb_base", "rope_theta"],
                &["rotary_pct", "partial_rotary_factor"],
                0.25,
            )
        } else {
            (&["rope_theta"], &["partial_rotary_factor"], 1.0)
        };
        let theta = setting(theta_keys)
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let partial = setting(partial_keys)
            .and_then(Value::as_f64)
            .unwrap_or(partial_default);
        let rotated = (head_dim as f64 * partial) as usize;
        if !(partial > 0.0 && partial <= 1.0) || rotated == 0 || !rotated.is_multiple_of(2) {
            return Err(bad(format!(
                "{partial} of each {head_dim}-wide head rotated is not an even number of dimensions, which `score` computes"
            )));
        }
        let scaling = config
            .get("rope_scaling")
            .filter(|v| !v.is_null())
            .and_then(Value::as_object)
            .or_else(|| config.get("rope_parameters").and_then(Value::as_object));
        rotary_frequencies(theta, rotated, scaling).map_err(bad)?
    };
    // transformers' defaults, where config.json leaves the key out.
    let default_eps = match model_type.as_str() {
        "llama" | "mistral" | "qwen2" => 1e-6,
        _ => 1e-5,
    };
    let norm_eps = setting(&[eps_key])
        .and_then(Value::as_f64)
        .unwrap_or(default_eps);
    let flag =
        |key: &str, default: bool| setting(&[key]).and_then(Value::as_bool).unwrap_or(default);
    let biases = match model_type.as_str() {
        "llama" => Biases {
            qkv: flag("attention_bias", false),
            o: flag("attention_bias", false),
            mlp: flag("mlp_bias", false),
        },
        "qwen2" => Biases {
            qkv: true,
            o: false,
            mlp: false,
        },
        "gpt_neox" => Biases {
            qkv: flag("attention_bias", true),
            o: flag("attention_bias", true),
            mlp: true,
        },
        "gpt2" => Biases {
            qkv: true,
            o: true,
            mlp: true,
        },
        _ => Biases {
            qkv: false,
            o: false,
            mlp: false,
        },
    };
    // Tied as the build decides it: by config.json, else by the checkpoint (an embedding
    // without its head is tied).
    let head = match (
        has(head),
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
    // Mistral's window is 4096 when config.json does not say (null: none).
    let window = match config.get("sliding_window") {
        None if model_type == "mistral" => Some(4096),
        _ => setting(&["sliding_window"])
            .and_then(Value::as_u64)
            .map(|w| w as usize),
    };
    if window == Some(0) {
        return Err(bad(
            "`sliding_window` is 0: a token would see nothing".into()
        ));
    }
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
        biases,
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
pub(crate) fn embedding(family: Family) -> &'static str {
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
