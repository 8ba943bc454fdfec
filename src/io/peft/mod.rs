//! PEFT LoRA adapters: `adapter_config.json` and `adapter_model.safetensors`, read into the
//! modules they change, each with its A/B matrices and scaling.
pub(crate) mod write;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::Value;

use super::hf::{present, read_json, shown};
use super::safetensors::{SafetensorsFile, TensorMeta};
use super::InputError;

const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT saves keys relative to the `PeftModel`, whose base model sits at `base_model.model`.
const PREFIX: &str = "base_model.model.";

use modelforge_core::job::{Decoder, ScoreDelta, TensorPlace};
pub(crate) use modelforge_core::node::LoraKind;

/// One LoRA module: the base tensor it changes and how.
#[derive(Clone, Debug)]
pub(crate) struct LoraModule {
    pub kind: LoraKind,
    pub a: TensorMeta,
    pub b: TensorMeta,
    /// `lora_bias = true`: B's bias, added (scaled) to the base's bias.
    pub bias: Option<TensorMeta>,
    pub rank: usize,
    /// PEFT's scaling: α/r, or α/√r with rsLoRA.
    pub scaling: f64,
    /// DoRA (`use_dora`): the learned magnitude of each output row, `lora_magnitude_vector`.
    pub magnitude: Option<TensorMeta>,
    /// A LoRA on a bare parameter (`target_parameters`) not yet matched to its base tensor:
    /// see [`PeftAdapter::resolve_parameters`].
    pub parameter: Option<Parameter>,
}

/// A `target_parameters` LoRA as saved: PEFT nests one wrapper per parameter of a module, the
/// first-defined innermost (`X.base_layer.lora_A` ...), so the key alone does not say which
/// parameter it changes.
#[derive(Clone, Debug)]
pub(crate) struct Parameter {
    /// The module holding the parameter, without the wrappers' `base_layer`s.
    pub module: String,
    /// How many `base_layer`s deep the wrapper is.
    pub depth: usize,
    /// The parameter names `target_parameters` gives for this module, in the config's order.
    pub candidates: Vec<String>,
}

/// PEFT's trainable tokens (`trainable_token_indices`): rows of an embedding replaced by
/// trained ones.
#[derive(Clone, Debug)]
pub(crate) struct TokenRows {
    /// The rows replaced, in the order of the delta's rows.
    pub indices: Vec<usize>,
    /// `trainable_tokens_delta`: (indices × dim), the new rows themselves (not differences).
    pub values: TensorMeta,
}

#[derive(Debug)]
pub(crate) struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub fan_in_fan_out: bool,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub target_modules: Value,
    pub base_model: Option<String>,
    pub use_dora: bool,
    /// `target_parameters`: parameters (not modules) the LoRA wraps, by their path's tail.
    pub target_parameters: Vec<String>,
    /// `trainable_token_indices`: per module name (or `None` for the input embedding, when
    /// the config gives a bare list), the token rows trained.
    pub token_indices: Vec<(Option<String>, Vec<usize>)>,
}

#[derive(Debug)]
pub(crate) struct PeftAdapter {
    pub dir: PathBuf,
    pub config: LoraConfig,
    pub file: SafetensorsFile,
    /// Module path in the base (e.g. `model.layers.0.self_attn.q_proj`) → its LoRA.
    pub modules: BTreeMap<String, LoraModule>,
    /// Base tensor name → the adapter's full replacement for it (`modules_to_save`).
    pub replacements: BTreeMap<String, TensorMeta>,
    /// Base tensor name → the copy of the base's tensor PEFT saves beside a `modules_to_save`
    /// one (`X.original_module.weight`): checked against the base, never fused.
    pub originals: BTreeMap<String, TensorMeta>,
    /// Embedding tensor name → its trainable tokens.
    pub tokens: BTreeMap<String, TokenRows>,
    /// The replacements that are PEFT's copy of a targeted embedding's own weight
    /// (`X.base_layer.weight`, `save_embedding_layers`): loaded into the layer as it is, so
    /// into both sides of a tie.
    pub copies: std::collections::BTreeSet<String>,
}

impl PeftAdapter {
    pub fn open(dir: &Path) -> Result<Self, InputError> {
        let config_path = dir.join(CONFIG);
        if !present(&config_path)? {
            return Err(InputError::BadConfig {
                path: dir.to_owned(),
                message: format!("has no {CONFIG}, so it is not a PEFT adapter directory"),
                help: format!("a PEFT adapter directory holds {CONFIG} beside {WEIGHTS}"),
            });
        }
        let config = LoraConfig::parse(&config_path, read_json(&config_path)?)?;
        let weights_path = dir.join(WEIGHTS);
        if !present(&weights_path)? {
            let pickle = dir.join("adapter_model.bin");
            if present(&pickle)? {
                return Err(InputError::Pickle {
                    path: pickle,
                    suggested: weights_path.display().to_string(),
                });
            }
            return Err(InputError::io(
                &weights_path,
                std::io::ErrorKind::NotFound.into(),
            ));
        }
        let file = SafetensorsFile::open(&weights_path)?;
        if file.tensors.is_empty() {
            return Err(InputError::EmptyAdapter { path: weights_path });
        }
        let read = read_modules(&file, &config)?;
        let (modules, replacements) = (read.modules, read.replacements);
        let param_only =
            !config.target_parameters.is_empty() && modules.values().all(|m| m.parameter.is_some());
        if let Some(message) = config.matches_none(modules.keys()).filter(|_| !param_only) {
            return Err(InputError::BadConfig {
                path: config_path,
                message,
                help: format!("the config and {WEIGHTS} disagree, so the adapter was saved from another configuration than its weights: correct `target_modules`, or save the adapter again with PEFT"),
            });
        }
        let tokens = token_rows(&config, &file.path, &config_path, read.tokens)?;
        Ok(PeftAdapter {
            dir: dir.to_owned(),
            config,
            file,
            modules,
            replacements,
            originals: read.originals,
            tokens,
            copies: read.copies,
        })
    }

    /// The adapter as the engine's forward pass adds it to the tensors of a model (its
    /// `decoder`, its checkpoint holding the tensors `has` says): its LoRA modules (plain LoRA
    /// on linear layers, `Conv1D`s and embeddings) as deltas, its `modules_to_save` as
    /// replacements, as PEFT merges them. What else an adapter can hold is refused, saying
    /// what.
    pub fn as_deltas(
        &self,
        decoder: &Decoder,
        has: impl Fn(&str) -> bool,
    ) -> Result<(Vec<ScoreDelta>, Vec<TensorPlace>), String> {
        if let Some(name) = self.tokens.keys().next() {
            return Err(format!("it trains tokens of `{name}`"));
        }
        let place = |meta: &TensorMeta, name: &str| TensorPlace {
            name: name.to_owned(),
            path: self.file.path.clone(),
            dtype: meta.dtype,
            shape: meta.shape.clone(),
            start: meta.start,
            len: meta.len,
        };
        // With a tied head, one tensor is both sides: a replacement of one side would untie them,
        // which a build handles (and says) and this pass does not.
        let embed = crate::arch::embedding(decoder.family);
        let tied = decoder.head == embed;
        let mut replacements = Vec::new();
        for (name, meta) in &self.replacements {
            if tied
                && !self.copies.contains(name)
                && (name == embed || name.ends_with("lm_head.weight"))
            {
                return Err(format!(
                    "it replaces `{name}`, one side of the model's tied embedding and head"
                ));
            }
            if !has(name) {
                return Err(format!(
                    "it replaces `{name}`, which the model does not have"
                ));
            }
            replacements.push(place(meta, name));
        }
        let deltas = self
            .modules
            .iter()
            .map(|(module, lora)| {
                // PEFT decides by the layer, whatever `fan_in_fan_out` says: GPT-2's blocks are
                // Conv1D (in × out), every other linear layer (its head included) is not.
                let conv1d = decoder.family == modelforge_core::job::Family::Gpt2
                    && module.starts_with("transformer.h.");
                let transposed = match lora.kind {
                    LoraKind::Linear | LoraKind::LinearTransposed => conv1d,
                    LoraKind::Embedding => true,
                    _ => return Err(format!("`{module}` is a LoRA on expert weights")),
                };
                if lora.magnitude.is_some() {
                    return Err(format!("`{module}` is DoRA"));
                }
                if lora.bias.is_some() {
                    return Err(format!("`{module}` trains a bias (`lora_bias`)"));
                }
                if lora.parameter.is_some() {
                    return Err(format!(
                        "`{module}` wraps a bare parameter (`target_parameters`)"
                    ));
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
}

impl LoraConfig {
    /// Reads adapter_config.json's value; `path` is only for messages. Every key modelforge uses
    /// is checked for its type here, so that a wrong one is named instead of ignored.
    pub(crate) fn parse(path: &Path, value: Value) -> Result<Self, InputError> {
        let bad = |message: String, help: &str| InputError::BadConfig {
            path: path.to_owned(),
            message,
            help: help.into(),
        };
        let Value::Object(raw) = value else {
            return Err(bad(
                format!("the top level is `{}`, not a JSON object", shown(&value)),
                "adapter_config.json is an object such as `{\"peft_type\": \"LORA\", \"r\": 8, ...}`; re-save the adapter with PEFT",
            ));
        };
        let peft_type = match raw.get("peft_type") {
            None | Some(Value::Null) => "LORA",
            Some(Value::String(t)) => t.as_str(),
            Some(other) => {
                return Err(bad(
                    format!("`peft_type` is `{}`, not a name", shown(other)),
                    "`peft_type` names the kind of adapter, e.g. \"LORA\"",
                ))
            }
        };
        // PEFT's trainable tokens on their own are a LoRA without modules, as far as merging goes.
        let tokens_only = peft_type == "TRAINABLE_TOKENS";
        if peft_type != "LORA" && !tokens_only {
            return Err(bad(
                format!("is a `{peft_type}` adapter; modelforge fuses LoRA adapters (and trainable tokens) only"),
                "use a LoRA adapter (peft_type \"LORA\") or trainable tokens (\"TRAINABLE_TOKENS\")",
            ));
        }
        let flag = |key: &str| -> Result<bool, InputError> {
            match raw.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(bad(
                    format!("`{key}` is `{}`, not true or false", shown(other)),
                    "set it to true or false",
                )),
            }
        };
        let r = match raw.get("r") {
            None if tokens_only => 1,
            Some(v) => match v.as_u64() {
                Some(r) if r > 0 => r as usize,
                _ => {
                    return Err(bad(
                        format!("`r` is `{}`, not a positive integer", shown(v)),
                        "`r` is the LoRA rank, an integer such as 8; it must match the tensors",
                    ))
                }
            },
            None => {
                return Err(bad(
                    "has no `r`".into(),
                    "`r` is the LoRA rank, an integer such as 8; it must match the tensors",
                ))
            }
        };
        let alpha = match raw.get("lora_alpha") {
            None => 8.0,
            Some(v) => v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| {
                bad(
                    format!("`lora_alpha` is `{}`, not a number", shown(v)),
                    "`lora_alpha` is a number such as 16; the scaling is lora_alpha / r",
                )
            })?,
        };
        let pattern = |key: &str, integer: bool| -> Result<Vec<(String, f64)>, InputError> {
            let (kind, example) = if integer {
                ("a positive integer", "`{\"q_proj\": 16}`")
            } else {
                ("a positive number", "`{\"q_proj\": 32.0}`")
            };
            let help = format!(
                "`{key}` maps module names (regular expressions) to numbers, e.g. {example}"
            );
            match raw.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Object(map)) => map
                    .iter()
                    .map(|(k, v)| {
                        let n = if integer {
                            v.as_u64().filter(|n| *n > 0).map(|n| n as f64)
                        } else {
                            v.as_f64().filter(|n| n.is_finite() && *n > 0.0)
                        };
                        n.map(|n| (k.clone(), n)).ok_or_else(|| {
                            bad(format!("`{key}.{k}` is `{}`, not {kind}", shown(v)), &help)
                        })
                    })
                    .collect(),
                Some(other) => Err(bad(
                    format!("`{key}` is `{}`, not an object", shown(other)),
                    &help,
                )),
            }
        };
        let rank_pattern = pattern("rank_pattern", true)?
            .into_iter()
            .map(|(k, v)| (k, v as usize))
            .collect();
        let target_modules = raw.get("target_modules").cloned().unwrap_or(Value::Null);
        let is_names = match &target_modules {
            Value::Null | Value::String(_) => true,
            Value::Array(items) => items.iter().all(Value::is_string),
            _ => false,
        };
        if !is_names {
            return Err(bad(
                format!("`target_modules` is `{}`, not a name or a list of names", shown(&target_modules)),
                "`target_modules` names the modules the adapter changes, e.g. `[\"q_proj\", \"v_proj\"]`, or is one regular expression",
            ));
        }
        let base_model = match raw.get("base_model_name_or_path") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) => Some(name.clone()),
            Some(other) => {
                return Err(bad(
                    format!("`base_model_name_or_path` is `{}`, not a name", shown(other)),
                    "it names the model the adapter was trained on, e.g. \"meta-llama/Llama-3.2-1B\"; remove it if unknown",
                ))
            }
        };
        let target_parameters =
            match raw.get("target_parameters") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                Some(other) => return Err(bad(
                    format!(
                        "`target_parameters` is `{}`, not a list of names",
                        shown(other)
                    ),
                    "`target_parameters` names parameters such as `[\"mlp.experts.gate_up_proj\"]`",
                )),
            };
        let indices = |v: &Value| -> Option<Vec<usize>> {
            v.as_array()?
                .iter()
                .map(|i| i.as_u64().map(|i| i as usize))
                .collect()
        };
        let token_help = "`trainable_token_indices` is a list of token ids, or an object from module names to such lists";
        let token_indices = match raw.get("trainable_token_indices") {
            // TrainableTokensConfig: `token_indices` for each of `target_modules`.
            None | Some(Value::Null) if tokens_only => {
                let ids = raw
                    .get("token_indices")
                    .and_then(indices)
                    .ok_or_else(|| bad("has no `token_indices` list".into(), token_help))?;
                let targets: Vec<Option<String>> = match &target_modules {
                    Value::String(name) => vec![Some(name.clone())],
                    Value::Array(names) => names
                        .iter()
                        .map(|n| n.as_str().map(str::to_owned))
                        .collect(),
                    _ => vec![None],
                };
                targets.into_iter().map(|t| (t, ids.clone())).collect()
            }
            None | Some(Value::Null) => Vec::new(),
            Some(list @ Value::Array(_)) => vec![(
                None,
                indices(list).ok_or_else(|| {
                    bad(
                        format!("`trainable_token_indices` is `{}`", shown(list)),
                        token_help,
                    )
                })?,
            )],
            Some(Value::Object(map)) => map
                .iter()
                .map(|(module, list)| {
                    indices(list)
                        .map(|ids| (Some(module.clone()), ids))
                        .ok_or_else(|| {
                            bad(
                                format!("`trainable_token_indices.{module}` is `{}`", shown(list)),
                                token_help,
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(bad(
                    format!("`trainable_token_indices` is `{}`", shown(other)),
                    token_help,
                ))
            }
        };
        Ok(LoraConfig {
            r,
            alpha,
            use_rslora: flag("use_rslora")?,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            rank_pattern,
            alpha_pattern: pattern("alpha_pattern", false)?,
            target_modules,
            base_model,
            use_dora: flag("use_dora")?,
            target_parameters,
            token_indices,
        })
    }

    /// The rank and alpha PEFT gives `module`: `rank_pattern`/`alpha_pattern` keys are regular
    /// expressions matched against the module path's tail, first match wins (PEFT's
    /// `get_pattern_key`).
    pub fn rank_and_alpha(&self, module: &str) -> (usize, f64) {
        let r = pattern_lookup(&self.rank_pattern, module).unwrap_or(self.r);
        let alpha = pattern_lookup(&self.alpha_pattern, module).unwrap_or(self.alpha);
        (r, alpha)
    }

    /// Why `target_modules` contradicts the LoRA modules the weights hold, when it names
    /// modules (a list, or one regular expression) and matches none of them; PEFT would inject
    /// no layer to load those weights into. `"all-linear"` and a missing key match anything.
    pub fn matches_none<'a>(
        &self,
        mut modules: impl Iterator<Item = &'a String>,
    ) -> Option<String> {
        let first = modules.next()?;
        let matches = |module: &str| match &self.target_modules {
            Value::String(all) if all == "all-linear" => true,
            // PEFT: `re.fullmatch(target_modules, key)`.
            Value::String(pattern) => regex::Regex::new(&format!("^(?:{pattern})$"))
                .map(|re| re.is_match(module))
                .unwrap_or(false),
            // PEFT: the key itself, or its last dotted parts.
            Value::Array(names) => names
                .iter()
                .filter_map(Value::as_str)
                .any(|name| module == name || module.ends_with(&format!(".{name}"))),
            _ => true,
        };
        if matches(first) {
            return None;
        }
        let mut count = 1;
        for module in modules {
            if matches(module) {
                return None;
            }
            count += 1;
        }
        Some(format!(
            "`target_modules` is `{}`, which matches none of the {count} LoRA modules of its weights (the first is `{first}`)",
            shown(&self.target_modules)
        ))
    }

    pub fn scaling(&self, rank: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

fn pattern_lookup<T: Copy>(patterns: &[(String, T)], module: &str) -> Option<T> {
    patterns.iter().find_map(|(key, value)| {
        let matches = regex::Regex::new(&format!("^(?:.*\\.)?(?:{key})$"))
            .map(|re| re.is_match(module))
            // A key that is not a valid expression can still name a module literally.
            .unwrap_or_else(|_| module == key || module.ends_with(&format!(".{key}")));
        matches.then_some(*value)
    })
}

/// What an adapter file holds, sorted by kind.
struct Read {
    modules: BTreeMap<String, LoraModule>,
    replacements: BTreeMap<String, TensorMeta>,
    originals: BTreeMap<String, TensorMeta>,
    /// Module path → `trainable_tokens_delta`.
    tokens: BTreeMap<String, TensorMeta>,
    copies: std::collections::BTreeSet<String>,
}

fn read_modules(file: &SafetensorsFile, config: &LoraConfig) -> Result<Read, InputError> {
    #[derive(Default)]
    struct Parts {
        a: Option<TensorMeta>,
        b: Option<TensorMeta>,
        bias: Option<TensorMeta>,
        magnitude: Option<TensorMeta>,
        embedding: bool,
    }
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    let mut read = Read {
        modules: BTreeMap::new(),
        replacements: BTreeMap::new(),
        originals: BTreeMap::new(),
        tokens: BTreeMap::new(),
        copies: Default::default(),
    };
    for (key, meta) in &file.tensors {
        let name = key.strip_prefix(PREFIX).unwrap_or(key);
        let suffixes = [
            (".lora_A.weight", 'a', false),
            (".lora_B.weight", 'b', false),
            (".lora_B.bias", 'c', false),
            (".lora_embedding_A", 'a', true),
            (".lora_embedding_B", 'b', true),
            (".lora_magnitude_vector", 'm', false),
            (".lora_magnitude_vector.weight", 'm', false),
        ];
        if let Some((module, which, embedding)) = suffixes
            .iter()
            .find_map(|(suffix, which, emb)| name.strip_suffix(suffix).map(|m| (m, *which, *emb)))
        {
            let entry = parts.entry(module.to_owned()).or_default();
            entry.embedding |= embedding;
            match which {
                'a' => entry.a = Some(meta.clone()),
                'b' => entry.b = Some(meta.clone()),
                'm' => entry.magnitude = Some(meta.clone()),
                _ => entry.bias = Some(meta.clone()),
            }
            continue;
        }
        if let Some(module) = name
            .strip_suffix(".token_adapter.trainable_tokens_delta")
            .or_else(|| name.strip_suffix(".trainable_tokens_delta"))
        {
            read.tokens.insert(module.to_owned(), meta.clone());
            continue;
        }
        if name.contains("lora_") || name.contains("token_adapter.") {
            return Err(InputError::AdapterKey {
                path: file.path.clone(),
                key: key.clone(),
            });
        }
        // The base's own tensor, saved beside a `modules_to_save` copy.
        if let Some(at) = name.find(".original_module.") {
            let tail = &name[at + ".original_module.".len()..];
            read.originals
                .insert(format!("{}.{tail}", &name[..at]), meta.clone());
            continue;
        }
        // Anything else is a full tensor that replaces the base's: saved through
        // `modules_to_save` (older PEFT versions keep the wrapper's path in the key), or the copy
        // of a targeted embedding that PEFT's `save_embedding_layers` writes as
        // `X.base_layer.weight`, which it loads over the base's before adding the delta.
        let base_name = strip_modules_to_save(name).replace(".base_layer.", ".");
        if name.contains(".base_layer.") {
            read.copies.insert(base_name.clone());
        }
        read.replacements.insert(base_name, meta.clone());
    }

    for (module, part) in parts {
        let missing = |present: &str, missing: &str| InputError::LoraPair {
            path: file.path.clone(),
            module: module.clone(),
            present: present.into(),
            missing: missing.into(),
        };
        let (a, b) = match (part.a, part.b) {
            (Some(a), Some(b)) => (a, b),
            (Some(_), None) => return Err(missing("lora_A", "lora_B")),
            (None, Some(_)) => return Err(missing("lora_B", "lora_A")),
            (None, None) => return Err(missing("lora_magnitude_vector", "lora_A")),
        };
        let rank_error = |detail: String, help| InputError::LoraRank {
            path: file.path.clone(),
            module: module.clone(),
            detail,
            help,
        };
        const DAMAGED: &str =
            "A must be (r, in) and B (out, r) with the same r; the adapter file is damaged";
        if a.shape.len() != 2 || b.shape.len() != 2 {
            return Err(rank_error(
                format!(
                    "A is {:?} and B is {:?}; both must be matrices",
                    a.shape, b.shape
                ),
                DAMAGED,
            ));
        }
        let rank = a.shape[0];
        if b.shape[1] != rank {
            return Err(rank_error(
                format!(
                    "A has rank {rank} ({:?}) but B has rank {} ({:?})",
                    a.shape, b.shape[1], b.shape
                ),
                DAMAGED,
            ));
        }
        let parameter = parameter_of(&module, config);
        let named = parameter
            .as_ref()
            .map_or(module.as_str(), |p| p.module.as_str());
        let (config_rank, alpha) = config.rank_and_alpha(named);
        // A wrapped parameter of E experts holds E·r rows; E comes from the base's tensor.
        let fits = match &parameter {
            Some(_) => rank.is_multiple_of(config_rank),
            None => config_rank == rank,
        };
        if !fits {
            return Err(rank_error(format!(
                "adapter_config.json gives rank {config_rank} but the tensors have rank {rank}"
            ), "the scaling depends on the rank, so config and tensors must agree: re-save the adapter with PEFT, or correct `r` or `rank_pattern`"));
        }
        if config.use_dora && part.magnitude.is_none() {
            return Err(rank_error(
                "the config says `use_dora = true` but the module has no `lora_magnitude_vector`".into(),
                "a DoRA adapter saves each module's magnitude vector beside its A and B; the adapter file is incomplete",
            ));
        }
        if let Some(m) = &part.magnitude {
            // B is (out, r) whatever the layer's storage; an embedding's B is (dim, r).
            let rows = b.shape[0];
            if m.shape != [rows] {
                return Err(rank_error(
                    format!(
                        "its DoRA magnitude is {:?}, not one value per output feature ({rows})",
                        m.shape
                    ),
                    "`lora_magnitude_vector` holds one value per output row of the layer; the adapter file is damaged",
                ));
            }
        }
        let kind = if part.embedding {
            LoraKind::Embedding
        } else if config.fan_in_fan_out {
            LoraKind::LinearTransposed
        } else {
            LoraKind::Linear
        };
        read.modules.insert(
            module,
            LoraModule {
                kind,
                a,
                b,
                bias: part.bias,
                // A wrapped parameter's A holds E·r rows; the rank is the config's.
                rank: config_rank,
                scaling: config.scaling(config_rank, alpha),
                magnitude: part.magnitude,
                parameter,
            },
        );
    }
    Ok(read)
}

/// The `target_parameters` wrapper a LoRA module key names, if it is one: `X.base_layer…`
/// (nested wrappers) or a module whose parameters `target_parameters` names.
fn parameter_of(module: &str, config: &LoraConfig) -> Option<Parameter> {
    if config.target_parameters.is_empty() {
        return None;
    }
    let mut stripped = module;
    let mut depth = 0;
    while let Some(inner) = stripped.strip_suffix(".base_layer") {
        stripped = inner;
        depth += 1;
    }
    let candidates: Vec<String> = config
        .target_parameters
        .iter()
        .filter_map(|target| {
            let (owner, leaf) = target.rsplit_once('.').unwrap_or(("", target));
            let owns =
                owner.is_empty() || stripped == owner || stripped.ends_with(&format!(".{owner}"));
            owns.then(|| leaf.to_owned())
        })
        .collect();
    (!candidates.is_empty()).then(|| Parameter {
        module: stripped.to_owned(),
        depth,
        candidates,
    })
}

/// Trainable tokens with their rows: the config's indices matched to each delta tensor, by the
/// module's name (a bare list belongs to the one delta there is).
fn token_rows(
    config: &LoraConfig,
    path: &Path,
    config_path: &Path,
    tokens: BTreeMap<String, TensorMeta>,
) -> Result<BTreeMap<String, TokenRows>, InputError> {
    let mut rows = BTreeMap::new();
    for (module, values) in tokens {
        let indices = config
            .token_indices
            .iter()
            .find_map(|(name, ids)| match name {
                None => Some(ids),
                Some(name) => {
                    (module == *name || module.ends_with(&format!(".{name}"))).then_some(ids)
                }
            });
        let Some(indices) = indices else {
            return Err(InputError::BadConfig {
                path: config_path.to_owned(),
                message: format!("gives no `trainable_token_indices` for `{module}`, whose trained rows the weights hold"),
                help: "the indices say which token rows the deltas replace; re-save the adapter with PEFT".into(),
            });
        };
        if values.shape.len() != 2 || values.shape[0] != indices.len() {
            return Err(InputError::LoraRank {
                path: path.to_owned(),
                module: module.clone(),
                detail: format!(
                    "`trainable_tokens_delta` is {:?} but `trainable_token_indices` names {} tokens",
                    values.shape,
                    indices.len()
                ),
                help: "the delta holds one row per trainable token; the adapter's config and weights disagree",
            });
        }
        rows.insert(
            format!("{module}.weight"),
            TokenRows {
                indices: indices.clone(),
                values,
            },
        );
    }
    Ok(rows)
}

impl PeftAdapter {
    /// Matches each `target_parameters` LoRA to the base tensor it changes, by the parameter
    /// names the config gives for its module and by shape: PEFT nests one wrapper per parameter
    /// in the order the model's code defines them, which a checkpoint does not keep. The
    /// module's key becomes the parameter's full name. An [E, d, d] parameter of square experts
    /// is taken as transformers' [experts, out, in].
    pub fn resolve_parameters(
        &mut self,
        shape_of: impl Fn(&str) -> Option<Vec<usize>>,
    ) -> Result<(), InputError> {
        let pending: Vec<String> = self
            .modules
            .iter()
            .filter(|(_, m)| m.parameter.is_some())
            .map(|(key, _)| key.clone())
            .collect();
        for key in pending {
            let mut lora = self.modules.remove(&key).expect("listed above");
            let param = lora.parameter.take().expect("listed above");
            let named: Vec<(String, Option<Vec<usize>>)> = param
                .candidates
                .iter()
                .map(|leaf| {
                    let name = format!("{}.{leaf}", param.module);
                    let shape = shape_of(&name);
                    (name, shape)
                })
                .collect();
            let fitting: Vec<(&String, LoraKind)> = named
                .iter()
                .filter_map(|(name, shape)| Some((name, fit_parameter(&lora, shape.as_deref()?)?)))
                .collect();
            let error = |detail: String| {
                InputError::LoraRank {
                path: self.file.path.clone(),
                module: key.clone(),
                detail,
                help: "a `target_parameters` LoRA holds A (E·r × in) and B (out × E·r) for a parameter [E, out, in] (or [out, in]); check that the adapter was made for this base",
            }
            };
            if fitting.is_empty() {
                let pieces: Vec<Vec<(String, LoraKind)>> = param
                    .candidates
                    .iter()
                    .filter_map(|leaf| expert_pieces(&lora, &param.module, leaf, &shape_of))
                    .collect();
                if let [pieces] = pieces.as_slice() {
                    for (name, kind) in pieces {
                        let piece = LoraModule {
                            kind: *kind,
                            ..lora.clone()
                        };
                        if self.modules.insert(name.clone(), piece).is_some() {
                            return Err(error(format!(
                                "`{name}` is changed by two of its wrappers"
                            )));
                        }
                    }
                    continue;
                }
            }
            let (name, kind) = match fitting.as_slice() {
                [(name, kind)] => ((*name).clone(), *kind),
                [] => {
                    let found: Vec<String> = named
                        .iter()
                        .map(|(name, shape)| match shape {
                            Some(shape) => format!("`{name}` is {shape:?}"),
                            None => format!("the base has no `{name}`"),
                        })
                        .collect();
                    return Err(error(format!(
                        "A is {:?} and B is {:?} at rank {}, which fit none of the parameters `target_parameters` names here: {}",
                        lora.a.shape,
                        lora.b.shape,
                        lora.rank,
                        found.join(", ")
                    )));
                }
                several => {
                    let names: Vec<String> = several
                        .iter()
                        .map(|(name, _)| format!("`{name}`"))
                        .collect();
                    return Err(error(format!(
                        "its wrapper, {} `base_layer`s deep, fits {} alike; PEFT nests them in the order the model defines them, which the checkpoint does not say",
                        param.depth,
                        names.join(" and ")
                    )));
                }
            };
            lora.kind = kind;
            if self.modules.insert(name.clone(), lora).is_some() {
                return Err(error(format!("`{name}` is changed by two of its wrappers")));
            }
        }
        Ok(())
    }
}

/// Where transformers 5's 3-D expert parameters live in a checkpoint that keeps each expert's
/// projections apart: (parameter, the module's name in the checkpoint, its parts in row order).
const EXPERT_LAYOUTS: &[(&str, &str, &[&str])] = &[
    ("gate_up_proj", "block_sparse_moe.experts", &["w1", "w3"]),
    ("down_proj", "block_sparse_moe.experts", &["w2"]),
    ("gate_up_proj", "mlp.experts", &["gate_proj", "up_proj"]),
    ("down_proj", "mlp.experts", &["down_proj"]),
];

/// A 3-D experts LoRA laid onto a checkpoint whose experts are 2-D tensors each: the tensors
/// and each one's share of the delta, if the LoRA fits them.
fn expert_pieces(
    lora: &LoraModule,
    module: &str,
    leaf: &str,
    shape_of: &impl Fn(&str) -> Option<Vec<usize>>,
) -> Option<Vec<(String, LoraKind)>> {
    let owner = module.strip_suffix("mlp.experts")?;
    EXPERT_LAYOUTS
        .iter()
        .filter(|(param, _, _)| *param == leaf)
        .find_map(|(_, stored, parts)| {
            let tensor = |e: usize, part: &str| format!("{owner}{stored}.{e}.{part}.weight");
            let count = (0..)
                .take_while(|&e| shape_of(&tensor(e, parts[0])).is_some())
                .count();
            let (r, inner, outer) = (lora.rank, lora.a.shape[1], lora.b.shape[0]);
            if count == 0 || lora.a.shape[0] != count * r {
                return None;
            }
            let mut pieces = Vec::new();
            for e in 0..count {
                let mut offset = 0;
                for part in parts.iter() {
                    let name = tensor(e, part);
                    let shape = shape_of(&name)?;
                    if shape.len() != 2 || shape[1] != inner {
                        return None;
                    }
                    pieces.push((
                        name,
                        LoraKind::Expert {
                            count,
                            index: e,
                            offset,
                        },
                    ));
                    offset += shape[0];
                }
                if offset != outer {
                    return None;
                }
            }
            Some(pieces)
        })
}

/// How a `target_parameters` LoRA fits a parameter of `shape`, if it does.
fn fit_parameter(lora: &LoraModule, shape: &[usize]) -> Option<LoraKind> {
    let (rows, inner, outer, r) = (lora.a.shape[0], lora.a.shape[1], lora.b.shape[0], lora.rank);
    match *shape {
        [out, inn] => (rows == r && outer == out && inner == inn).then_some(LoraKind::Linear),
        [experts, d1, d2] if rows == experts * r => {
            if outer == d1 && inner == d2 {
                Some(LoraKind::Experts {
                    count: experts,
                    transposed: false,
                })
            } else if outer == d2 && inner == d1 {
                Some(LoraKind::Experts {
                    count: experts,
                    transposed: true,
                })
            } else {
                None
            }
        }
        _ => None,
    }
}

impl PeftAdapter {
    /// Every floating tensor of the adapter must be finite: a NaN or an infinity in A or B
    /// spreads to a whole row or column of each tensor it is fused into. Adapter files are
    /// small next to the base, so a build reads them once, in blocks, before computing anything.
    pub fn check_finite(&self) -> Result<(), InputError> {
        check_finite(&self.file)
    }
}

fn check_finite(file: &SafetensorsFile) -> Result<(), InputError> {
    const BLOCK: usize = 1 << 20;
    let mut buf = vec![0u8; BLOCK];
    for (name, meta) in &file.tensors {
        let Some(width) = float_width(meta.dtype) else {
            continue;
        };
        // Blocks hold whole elements.
        let block = (BLOCK / width * width) as u64;
        let mut done = 0u64;
        while done < meta.len {
            let n = block.min(meta.len - done) as usize;
            let bytes = &mut buf[..n];
            file.read_into(meta.start + done, bytes)?;
            if let Some((at, what)) = first_non_finite(meta.dtype, bytes) {
                return Err(InputError::NonFinite {
                    path: file.path.clone(),
                    tensor: name.clone(),
                    what,
                    index: done / width as u64 + at as u64,
                });
            }
            done += n as u64;
        }
    }
    Ok(())
}

/// The bytes per element of the floating dtypes modelforge computes with.
fn float_width(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F16 | Dtype::BF16 => Some(2),
        Dtype::F32 => Some(4),
        Dtype::F64 => Some(8),
        _ => None,
    }
}

/// The first element of `bytes` (little-endian `dtype`) that is NaN or infinite, by its bits:
/// all exponent bits set.
fn first_non_finite(dtype: Dtype, bytes: &[u8]) -> Option<(usize, &'static str)> {
    fn scan<const N: usize>(
        bytes: &[u8],
        exponent: u64,
        mantissa: u64,
        bits: impl Fn([u8; N]) -> u64,
    ) -> Option<(usize, &'static str)> {
        bytes.chunks_exact(N).enumerate().find_map(|(i, chunk)| {
            let mut raw = [0u8; N];
            raw.copy_from_slice(chunk);
            let b = bits(raw);
            (b & exponent == exponent).then(|| {
                let what = if b & mantissa != 0 {
                    "NaN"
                } else {
                    "an infinity"
                };
                (i, what)
            })
        })
    }
    match dtype {
        Dtype::F16 => scan::<2>(bytes, 0x7C00, 0x03FF, |b| u16::from_le_bytes(b).into()),
        Dtype::BF16 => scan::<2>(bytes, 0x7F80, 0x007F, |b| u16::from_le_bytes(b).into()),
        Dtype::F32 => scan::<4>(bytes, 0x7F80_0000, 0x007F_FFFF, |b| {
            u32::from_le_bytes(b).into()
        }),
        Dtype::F64 => scan::<8>(
            bytes,
            0x7FF0_0000_0000_0000,
            0x000F_FFFF_FFFF_FFFF,
            u64::from_le_bytes,
        ),
        _ => None,
    }
}

/// `lm_head.modules_to_save.default.weight` → `lm_head.weight`.
fn strip_modules_to_save(name: &str) -> String {
    match name.find(".modules_to_save.") {
        Some(at) => {
            let rest = &name[at + ".modules_to_save.".len()..];
            let rest = rest.split_once('.').map_or(rest, |(_, tail)| tail);
            format!("{}.{rest}", &name[..at])
        }
        None => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_keys_match_like_peft() {
        let patterns = vec![
            ("q_proj".to_string(), 4usize),
            ("layers.1.self_attn.v_proj".to_string(), 2),
        ];
        assert_eq!(
            pattern_lookup(&patterns, "model.layers.0.self_attn.q_proj"),
            Some(4)
        );
        assert_eq!(
            pattern_lookup(&patterns, "model.layers.1.self_attn.v_proj"),
            Some(2)
        );
        assert_eq!(
            pattern_lookup(&patterns, "model.layers.0.self_attn.v_proj"),
            None
        );
        assert_eq!(
            pattern_lookup(&patterns, "model.layers.0.self_attn.xq_proj"),
            None
        );
    }

    #[test]
    fn modules_to_save_keys_name_the_base_tensor() {
        assert_eq!(
            strip_modules_to_save("lm_head.modules_to_save.default.weight"),
            "lm_head.weight"
        );
        assert_eq!(strip_modules_to_save("lm_head.weight"), "lm_head.weight");
    }

    #[test]
    fn saved_embedding_copies_replace_the_base_tensor() {
        let meta = TensorMeta {
            dtype: safetensors::Dtype::F32,
            shape: vec![2],
            start: 0,
            len: 8,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        let data = [0u8; 8];
        let view =
            safetensors::tensor::TensorView::new(meta.dtype, meta.shape.clone(), &data).unwrap();
        safetensors::serialize_to_file(
            [(
                "base_model.model.model.embed_tokens.base_layer.weight",
                view,
            )],
            None,
            &path,
        )
        .unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        let config = LoraConfig::parse(&path, serde_json::json!({"r": 1})).unwrap();
        let read = read_modules(&file, &config).unwrap();
        assert!(read.modules.is_empty());
        assert_eq!(
            read.replacements.keys().collect::<Vec<_>>(),
            ["model.embed_tokens.weight"]
        );
    }
}
