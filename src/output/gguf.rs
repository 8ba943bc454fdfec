//! GGUF, the file llama.cpp, Ollama and LM Studio load: the fused model written as llama.cpp's
//! own converter (`convert_hf_to_gguf.py`) writes it, for the families whose layout it shares
//! with LLaMA (`llama`, `mistral`, `qwen2`). Tensors are renamed (`blk.N.attn_q`, ...), their
//! dimensions listed innermost first, LLaMA's q/k rows permuted into llama.cpp's rotary pairs,
//! 1-D tensors kept in f32 and the rest converted to the chosen type; the tokenizer and the
//! hyper-parameters go into the metadata. What the converter would refuse is refused here, by
//! name, before anything is computed.
use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;
use serde_json::{Map, Value};

use crate::plan::Plan;
use crate::recipe::GgufType;

/// Where tensor data starts and each tensor begins: llama.cpp's default, `general.alignment`.
const ALIGNMENT: u64 = 32;
/// Values per Q8_0 block.
const QK8_0: usize = 32;

/// Why a fused model cannot be written as GGUF.
#[derive(Debug)]
pub(crate) struct Unsupported {
    pub what: String,
    pub help: String,
}

fn unsupported(what: String, help: &str) -> Unsupported {
    Unsupported {
        what,
        help: help.into(),
    }
}

/// ggml's tensor types that modelforge writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ggml {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
    Bf16 = 30,
}

impl Ggml {
    fn bytes(self, values: usize) -> u64 {
        let values = values as u64;
        match self {
            Ggml::F32 => values * 4,
            Ggml::F16 | Ggml::Bf16 => values * 2,
            Ggml::Q8_0 => values / QK8_0 as u64 * (2 + QK8_0 as u64),
        }
    }
}

/// One tensor of the file.
#[derive(Debug)]
pub(crate) struct GgufTensor {
    /// The output tensor it is made from (the model directory's name).
    pub source: String,
    name: String,
    /// As a (rows × cols) matrix; a 1-D tensor is one row.
    rows: usize,
    cols: usize,
    dims: Vec<usize>,
    ggml: Ggml,
    /// LLaMA's q/k rows are permuted within each head of this many rows.
    head_rows: Option<usize>,
    /// The dtype its bytes come in.
    pub dtype: Dtype,
}

impl GgufTensor {
    /// Rows converted at a time: whole heads of a permuted tensor, about 4 MiB otherwise.
    pub fn block_rows(&self) -> usize {
        let rows = ((4 << 20) / (self.cols.max(1) * 4)).max(1);
        match self.head_rows {
            Some(head) => rows.div_ceil(head) * head,
            None => rows,
        }
    }

    /// The bytes of one row of input.
    pub fn row_bytes(&self) -> usize {
        self.cols * self.dtype.bitsize() / 8
    }

    /// Converts `input`, whole rows starting at a multiple of [`GgufTensor::block_rows`], into
    /// the file's bytes, appended to `out`.
    pub fn convert(&self, input: &[u8], out: &mut Vec<u8>) {
        let values = widen(input, self.dtype);
        let rows = values.len() / self.cols.max(1);
        let permuted;
        let values = match self.head_rows {
            Some(head) => {
                // convert_hf_to_gguf's `permute`: within each head, row i·(d/2) + j goes to
                // row 2j + i.
                let half = head / 2;
                let mut rows_out = vec![0f32; values.len()];
                for row in 0..rows {
                    let (base, within) = (row / head * head, row % head);
                    let from = base + (within % 2) * half + within / 2;
                    rows_out[row * self.cols..(row + 1) * self.cols]
                        .copy_from_slice(&values[from * self.cols..(from + 1) * self.cols]);
                }
                permuted = rows_out;
                &permuted
            }
            None => &values,
        };
        match self.ggml {
            Ggml::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
            Ggml::F16 => out.extend(
                values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes()),
            ),
            Ggml::Bf16 => out.extend(
                values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()),
            ),
            Ggml::Q8_0 => {
                for block in values.chunks(QK8_0) {
                    quantize_q8_0(block, out);
                }
            }
        }
    }
}

/// ggml's reference Q8_0 (`quantize_row_q8_0_ref`): a block's f16 scale d = max|x| / 127, then
/// each value x / d rounded half away from zero, computed in f32 as ggml and gguf-py do.
fn quantize_q8_0(block: &[f32], out: &mut Vec<u8>) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out.extend(half::f16::from_f32(d).to_le_bytes());
    out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
}

/// Little-endian floats of `dtype` as f32 (exact for f16 and bf16).
fn widen(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => unreachable!("the layout admits floating tensors only, not {other}"),
    }
}

/// The file, short of its tensors' data: what to write first, and what follows.
pub(crate) struct Layout {
    /// Header, metadata and tensor infos, padded to the alignment.
    pub header: Vec<u8>,
    pub tensors: Vec<GgufTensor>,
    /// Ollama's Modelfile for it.
    pub modelfile: String,
}

impl Layout {
    /// Zeros after a tensor of `ggml` bytes, up to the next tensor's aligned start.
    pub fn padding(&self, tensor: &GgufTensor) -> usize {
        let len = tensor.ggml.bytes(tensor.rows * tensor.cols);
        (len.next_multiple_of(ALIGNMENT) - len) as usize
    }
}

/// A family llama.cpp loads with LLaMA's tensor layout.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Arch {
    /// LLaMA, Mistral: q/k rows permuted into llama.cpp's rotary pairs.
    Llama,
    /// Qwen2: rotary as HF has it (NeoX style), q/k/v biases.
    Qwen2,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// The GGUF layout of `plan`'s fused model, named `name` (`general.name`) and written as
/// `file` (for the Modelfile), or why llama.cpp could not load it.
pub(crate) fn layout(
    plan: &Plan,
    weights: GgufType,
    name: &str,
    file: &str,
) -> Result<Layout, Unsupported> {
    let config = &plan.inputs.base.config;
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let arch = match model_type {
        "llama" | "mistral" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => {
            return Err(unsupported(
                format!("the base's architecture (`model_type = \"{other}\"`) has no GGUF layout in modelforge"),
                "GGUF output knows `llama`, `mistral` and `qwen2` for now; write the model directory (`path`) and convert it with llama.cpp's convert_hf_to_gguf.py",
            ))
        }
    };
    let hp = Hyper::read(config, plan)?;
    let mut kv = Metadata::default();
    let arch_name = arch.name();
    kv.string("general.architecture", arch_name);
    kv.string("general.name", name);
    kv.u32("general.quantization_version", 2);
    kv.u32(
        "general.file_type",
        match weights {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::Bf16 => 32,
        },
    );
    let key = |k: &str| format!("{arch_name}.{k}");
    kv.u32(&key("vocab_size"), hp.vocab as u32);
    kv.u32(&key("context_length"), hp.context as u32);
    kv.u32(&key("embedding_length"), hp.hidden as u32);
    kv.u32(&key("block_count"), hp.layers as u32);
    kv.u32(&key("feed_forward_length"), hp.intermediate as u32);
    kv.u32(&key("rope.dimension_count"), hp.head_dim as u32);
    kv.u32(&key("attention.head_count"), hp.heads as u32);
    kv.u32(&key("attention.head_count_kv"), hp.kv_heads as u32);
    if hp.head_dim * hp.heads != hp.hidden {
        kv.u32(&key("attention.key_length"), hp.head_dim as u32);
        kv.u32(&key("attention.value_length"), hp.head_dim as u32);
    }
    kv.f32(&key("attention.layer_norm_rms_epsilon"), hp.eps as f32);
    kv.f32(&key("rope.freq_base"), hp.rope_theta as f32);
    if let Some(factor) = hp.linear_rope {
        kv.string(&key("rope.scaling.type"), "linear");
        kv.f32(&key("rope.scaling.factor"), factor as f32);
    }
    let stop = tokenizer(plan, &hp, &mut kv)?;

    let mut tensors = Vec::new();
    for tensor in &plan.tensors {
        let source = &tensor.out.name;
        let Some(gguf_name) = tensor_name(source) else {
            if source.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            return Err(unsupported(
                format!("the fused model's tensor `{source}` has no GGUF name"),
                "GGUF output knows the tensors of LLaMA-shaped models; write the model directory (`path`) instead",
            ));
        };
        if !crate::plan::is_float(tensor.out.dtype) {
            return Err(unsupported(
                format!("`{source}` is {}, not a floating tensor", tensor.out.dtype),
                "GGUF output converts floating tensors only",
            ));
        }
        let shape = &tensor.out.shape;
        let (rows, cols) = match shape[..] {
            [n] => (1, n),
            [rows, cols] => (rows, cols),
            _ => {
                return Err(unsupported(
                    format!("`{source}` has {} dimensions", shape.len()),
                    "GGUF output writes 1-D and 2-D tensors",
                ))
            }
        };
        let ggml = match (shape.len(), weights) {
            (1, _) | (_, GgufType::F32) => Ggml::F32,
            (_, GgufType::F16) => Ggml::F16,
            (_, GgufType::Bf16) => Ggml::Bf16,
            // The converter falls back to f16 where rows do not split into whole blocks.
            (_, GgufType::Q8_0) if cols % QK8_0 == 0 => Ggml::Q8_0,
            (_, GgufType::Q8_0) => Ggml::F16,
        };
        let heads = match source.rsplit('.').nth(1) {
            Some("q_proj") if arch == Arch::Llama => Some(hp.heads),
            Some("k_proj") if arch == Arch::Llama => Some(hp.kv_heads),
            _ => None,
        };
        let head_rows = match heads {
            Some(heads) if shape.len() == 2 && heads > 0 && rows % heads == 0 => Some(rows / heads),
            // A 1-D q/k bias (LLaMA's `attention_bias`) would be permuted element by element.
            Some(_) => {
                return Err(unsupported(
                    format!("`{source}` ({shape:?}) does not split into its heads"),
                    "the config's head counts must divide the q and k projections",
                ))
            }
            None => None,
        };
        tensors.push(GgufTensor {
            source: source.clone(),
            name: gguf_name,
            rows,
            cols,
            dims: shape.iter().rev().copied().collect(),
            ggml,
            head_rows,
            dtype: tensor.out.dtype,
        });
    }
    if tensors
        .iter()
        .any(|t| t.head_rows.is_some_and(|h| h % 2 != 0))
    {
        return Err(unsupported(
            "a head of q or k has an odd number of rows".into(),
            "rotary pairs need an even head dimension",
        ));
    }
    // The converter's order: as the checkpoint lists them, which for modelforge's output is
    // sorted by name; llama.cpp reads them by name.
    let mut header = Vec::new();
    header.extend(b"GGUF");
    header.extend(3u32.to_le_bytes());
    header.extend((tensors.len() as u64).to_le_bytes());
    header.extend((kv.count as u64).to_le_bytes());
    header.extend(&kv.bytes);
    let mut offset = 0u64;
    for tensor in &tensors {
        put_string(&mut header, &tensor.name);
        header.extend((tensor.dims.len() as u32).to_le_bytes());
        for dim in &tensor.dims {
            header.extend((*dim as u64).to_le_bytes());
        }
        header.extend((tensor.ggml as u32).to_le_bytes());
        header.extend(offset.to_le_bytes());
        offset += tensor
            .ggml
            .bytes(tensor.rows * tensor.cols)
            .next_multiple_of(ALIGNMENT);
    }
    header.resize(
        (header.len() as u64).next_multiple_of(ALIGNMENT) as usize,
        0,
    );
    Ok(Layout {
        header,
        tensors,
        modelfile: modelfile(file, &stop),
    })
}

/// The GGUF name of an output tensor of a LLaMA-shaped model.
fn tensor_name(name: &str) -> Option<String> {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, gguf)) = fixed.iter().find(|(hf, _)| *hf == name) {
        return Some((*gguf).to_owned());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let gguf = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    matches!(kind, "weight" | "bias").then(|| format!("blk.{layer}.{gguf}.{kind}"))
}

/// The hyper-parameters llama.cpp needs, from config.json.
struct Hyper {
    vocab: usize,
    context: usize,
    hidden: usize,
    layers: usize,
    intermediate: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    rope_theta: f64,
    linear_rope: Option<f64>,
}

impl Hyper {
    fn read(config: &Map<String, Value>, plan: &Plan) -> Result<Hyper, Unsupported> {
        let int = |key: &str| config.get(key).and_then(Value::as_u64).map(|v| v as usize);
        let need = |key: &str| {
            int(key).ok_or_else(|| {
                unsupported(
                    format!("config.json has no `{key}`"),
                    "GGUF metadata needs it; give the base a complete config.json",
                )
            })
        };
        let hidden = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        // A resized vocabulary's size is the plan's, not the base's.
        let vocab = match plan.config.get("vocab_size").and_then(Value::as_u64) {
            Some(v) => v as usize,
            None => need("vocab_size")?,
        };
        // transformers 5 keeps the rotary settings in `rope_parameters`.
        let rope = config
            .get("rope_parameters")
            .or_else(|| config.get("rope_scaling"))
            .filter(|v| !v.is_null());
        let rope_type = rope
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let linear_rope = match rope_type {
            "default" => None,
            "linear" => rope.and_then(|r| r.get("factor")).and_then(Value::as_f64),
            other => {
                return Err(unsupported(
                    format!("config.json's rope scaling is `{other}`"),
                    "GGUF output writes plain and linearly scaled rotary embeddings; write the model directory (`path`) and convert it with llama.cpp's converter",
                ))
            }
        };
        let rope_theta = config
            .get("rope_theta")
            .or_else(|| rope.and_then(|r| r.get("rope_theta")))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        Ok(Hyper {
            vocab,
            context: int("max_position_embeddings").unwrap_or(2048),
            hidden,
            layers: need("num_hidden_layers")?,
            intermediate: need("intermediate_size")?,
            heads,
            kv_heads: int("num_key_value_heads").unwrap_or(heads),
            head_dim: int("head_dim").unwrap_or(hidden / heads.max(1)),
            eps: config
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            linear_rope,
        })
    }
}

/// A vocabulary as llama.cpp reads it: its tokens in id order with their types (1 normal,
/// 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), and the model's own data.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    model: VocabModel,
}

enum VocabModel {
    /// A byte-level BPE `tokenizer.json`: `gpt2` in llama.cpp.
    Bpe {
        merges: Vec<String>,
        pre: &'static str,
    },
    /// A SentencePiece `tokenizer.model`: `llama` in llama.cpp.
    SentencePiece { scores: Vec<f32> },
}

/// The tokenizer's metadata (`tokenizer.ggml.*`) from the output's tokenizer files, as the
/// converter writes it: from `tokenizer.model` where there is one (SentencePiece), else from a
/// byte-level BPE `tokenizer.json`; returns the stop tokens for the Modelfile.
fn tokenizer(plan: &Plan, hp: &Hyper, kv: &mut Metadata) -> Result<Vec<String>, Unsupported> {
    let file = |name: &str| {
        plan.tokenizer
            .iter()
            .find(|p| p.file_name().is_some_and(|n| n == name))
            .cloned()
            .unwrap_or_else(|| plan.inputs.base.dir.join(name))
    };
    let json = |path: &Path| -> Option<Value> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let config = json(&file("tokenizer_config.json")).unwrap_or(Value::Null);
    let spm = file("tokenizer.model");
    let mut vocab = if spm.is_file() {
        sentencepiece_vocab(&spm, &config)?
    } else {
        let Some(tokenizer) = json(&file("tokenizer.json")) else {
            return Err(unsupported(
                "the base has neither tokenizer.json nor tokenizer.model".into(),
                "GGUF output reads a BPE tokenizer.json or a SentencePiece tokenizer.model; give the base its tokenizer files",
            ));
        };
        bpe_vocab(&tokenizer)?
    };
    if vocab.tokens.len() > hp.vocab {
        return Err(unsupported(
            format!(
                "the tokenizer has {} tokens but the model's vocabulary {}",
                vocab.tokens.len(),
                hp.vocab
            ),
            "llama.cpp needs an embedding row for every token; give the model its own tokenizer",
        ));
    }
    // The converter's filler for ids the tokenizer lacks.
    for id in vocab.tokens.len()..hp.vocab {
        vocab.tokens.push(format!("[PAD{id}]"));
        vocab.types.push(5);
        if let VocabModel::SentencePiece { scores } = &mut vocab.model {
            scores.push(-1000.0);
        }
    }
    match &vocab.model {
        VocabModel::Bpe { pre, .. } => {
            kv.string("tokenizer.ggml.model", "gpt2");
            kv.string("tokenizer.ggml.pre", pre);
        }
        VocabModel::SentencePiece { .. } => kv.string("tokenizer.ggml.model", "llama"),
    }
    kv.strings("tokenizer.ggml.tokens", &vocab.tokens);
    match &vocab.model {
        VocabModel::Bpe { merges, .. } => {
            kv.i32s("tokenizer.ggml.token_type", &vocab.types);
            kv.strings("tokenizer.ggml.merges", merges);
        }
        VocabModel::SentencePiece { scores } => {
            kv.f32s("tokenizer.ggml.scores", scores);
            kv.i32s("tokenizer.ggml.token_type", &vocab.types);
        }
    }

    let id_of = |token: &str| vocab.tokens.iter().position(|t| t == token);
    let token_text = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    };
    let model_config = &plan.inputs.base.config;
    let mut stop = Vec::new();
    for (which, key) in [
        ("bos", "bos"),
        ("eos", "eos"),
        ("unk", "unknown"),
        ("pad", "padding"),
    ] {
        let from_tokenizer = config
            .get(format!("{which}_token"))
            .and_then(token_text)
            .and_then(|t| id_of(&t));
        let from_config = model_config
            .get(&format!("{which}_token_id"))
            .and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(Value::as_u64)))
            .map(|v| v as usize);
        if let Some(id) = from_tokenizer.or(from_config) {
            kv.u32(&format!("tokenizer.ggml.{key}_token_id"), id as u32);
            if which == "eos" {
                stop.extend(vocab.tokens.get(id).cloned());
            }
        }
    }
    for (key, flag) in [
        ("add_bos_token", "add_bos_token"),
        ("add_eos_token", "add_eos_token"),
    ] {
        if let Some(add) = config.get(key).and_then(Value::as_bool) {
            kv.bool(&format!("tokenizer.ggml.{flag}"), add);
        }
    }
    let template = config
        .get("chat_template")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| std::fs::read_to_string(file("chat_template.jinja")).ok());
    if let Some(template) = template {
        kv.string("tokenizer.chat_template", &template);
    }
    Ok(stop)
}

/// A byte-level BPE `tokenizer.json`: its vocabulary and added tokens (special ones are
/// control tokens, others user-defined), and its merges.
fn bpe_vocab(tokenizer: &Value) -> Result<Vocab, Unsupported> {
    let model = &tokenizer["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(unsupported(
            format!(
                "the tokenizer is a `{}` model",
                model["type"].as_str().unwrap_or("?")
            ),
            "GGUF output writes BPE tokenizers (tokenizer.json) and SentencePiece ones (tokenizer.model)",
        ));
    }
    if model["byte_fallback"].as_bool() == Some(true) {
        return Err(unsupported(
            "tokenizer.json is a SentencePiece-style BPE (`byte_fallback`) without its tokenizer.model".into(),
            "give the base the tokenizer.model it was converted from, which llama.cpp reads as a SentencePiece vocabulary",
        ));
    }
    let mut by_id: BTreeMap<usize, (String, i32)> = BTreeMap::new();
    if let Some(vocab) = model["vocab"].as_object() {
        for (token, id) in vocab {
            if let Some(id) = id.as_u64() {
                by_id.insert(id as usize, (token.clone(), 1));
            }
        }
    }
    for added in tokenizer["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) {
            let kind = if added["special"].as_bool().unwrap_or(false) {
                3
            } else {
                4
            };
            by_id.insert(id as usize, (content.to_owned(), kind));
        }
    }
    let size = by_id.keys().next_back().map_or(0, |id| id + 1);
    let (mut tokens, mut types) = (Vec::with_capacity(size), Vec::with_capacity(size));
    for id in 0..size {
        let (token, kind) = by_id
            .remove(&id)
            .unwrap_or_else(|| (format!("[PAD{id}]"), 5));
        tokens.push(token);
        types.push(kind);
    }
    let merges = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(pair) => Some(
                pair.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => None,
        })
        .collect();
    Ok(Vocab {
        tokens,
        types,
        model: VocabModel::Bpe {
            merges,
            pre: pre_tokenizer(tokenizer),
        },
    })
}

/// A SentencePiece `tokenizer.model`: its pieces, scores and types, then the tokens
/// tokenizer_config.json adds (`added_tokens_decoder`: control when special, else
/// user-defined), as the converter's `_create_vocab_sentencepiece` does.
fn sentencepiece_vocab(path: &Path, config: &Value) -> Result<Vocab, Unsupported> {
    let bad = |why: String| {
        unsupported(
            format!("`{}` cannot be read: {why}", path.display()),
            "give the base a valid SentencePiece tokenizer.model",
        )
    };
    let len = std::fs::metadata(path)
        .map_err(|e| bad(e.to_string()))?
        .len();
    if len > crate::io::sentencepiece::MAX_LEN {
        return Err(bad(format!("it has {len} bytes")));
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let pieces = crate::io::sentencepiece::scored_pieces(&bytes).map_err(bad)?;
    let mut tokens: Vec<String> = pieces.iter().map(|p| p.text.clone()).collect();
    let mut scores: Vec<f32> = pieces.iter().map(|p| p.score).collect();
    let mut types: Vec<i32> = pieces.iter().map(|p| p.kind as i32).collect();
    if let Some(added) = config["added_tokens_decoder"].as_object() {
        for (id, token) in added {
            let (Ok(id), Some(content)) = (id.parse::<usize>(), token["content"].as_str()) else {
                continue;
            };
            if id >= tokens.len() {
                tokens.resize(id + 1, String::new());
                scores.resize(id + 1, -1000.0);
                types.resize(id + 1, 5);
            }
            tokens[id] = content.to_owned();
            types[id] = if token["special"].as_bool().unwrap_or(false) {
                3
            } else {
                4
            };
        }
    }
    for (id, token) in tokens.iter_mut().enumerate() {
        if token.is_empty() {
            *token = format!("[PAD{id}]");
        }
    }
    Ok(Vocab {
        tokens,
        types,
        model: VocabModel::SentencePiece { scores },
    })
}

/// llama.cpp's name for the tokenizer's pre-tokenization, where its regular expression says it
/// (the converter recognises tokenizers by their output instead); `default` otherwise.
fn pre_tokenizer(tokenizer: &Value) -> &'static str {
    let text = tokenizer["pre_tokenizer"].to_string();
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let has = |pattern: &str| text.contains(&serde_json::to_string(pattern).unwrap_or_default());
    if has(LLAMA3) {
        "llama-bpe"
    } else if has(QWEN2) {
        "qwen2"
    } else {
        "default"
    }
}

/// Ollama's Modelfile: the GGUF beside it, and its stop tokens. The chat template is in the
/// GGUF (`tokenizer.chat_template`), which Ollama reads; its own TEMPLATE syntax is not Jinja.
fn modelfile(file: &str, stop: &[String]) -> String {
    let mut text = format!(
        "# Written by modelforge. Create the model with `ollama create NAME -f <this file>`.\nFROM ./{file}\n"
    );
    for token in stop {
        text += &format!(
            "PARAMETER stop {}\n",
            serde_json::to_string(token).unwrap_or_default()
        );
    }
    text
}

/// GGUF metadata: key–value pairs in the order they are added.
#[derive(Default)]
struct Metadata {
    bytes: Vec<u8>,
    count: usize,
}

impl Metadata {
    fn key(&mut self, key: &str, kind: u32) {
        put_string(&mut self.bytes, key);
        self.bytes.extend(kind.to_le_bytes());
        self.count += 1;
    }
    fn u32(&mut self, key: &str, value: u32) {
        self.key(key, 4);
        self.bytes.extend(value.to_le_bytes());
    }
    fn f32(&mut self, key: &str, value: f32) {
        self.key(key, 6);
        self.bytes.extend(value.to_le_bytes());
    }
    fn bool(&mut self, key: &str, value: bool) {
        self.key(key, 7);
        self.bytes.push(u8::from(value));
    }
    fn string(&mut self, key: &str, value: &str) {
        self.key(key, 8);
        put_string(&mut self.bytes, value);
    }
    fn strings(&mut self, key: &str, values: &[String]) {
        self.key(key, 9);
        self.bytes.extend(8u32.to_le_bytes());
        self.bytes.extend((values.len() as u64).to_le_bytes());
        for value in values {
            put_string(&mut self.bytes, value);
        }
    }
    fn f32s(&mut self, key: &str, values: &[f32]) {
        self.key(key, 9);
        self.bytes.extend(6u32.to_le_bytes());
        self.bytes.extend((values.len() as u64).to_le_bytes());
        for value in values {
            self.bytes.extend(value.to_le_bytes());
        }
    }
    fn i32s(&mut self, key: &str, values: &[i32]) {
        self.key(key, 9);
        self.bytes.extend(5u32.to_le_bytes());
        self.bytes.extend((values.len() as u64).to_le_bytes());
        for value in values {
            self.bytes.extend(value.to_le_bytes());
        }
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_matches_ggml_reference() {
        // max |x| = 2.54 → d = 0.02, and x / d rounded to the nearest integer.
        let mut block = vec![0f32; 32];
        block[0] = 2.54;
        block[1] = -1.0;
        block[2] = 0.01;
        let mut out = Vec::new();
        quantize_q8_0(&block, &mut out);
        assert_eq!(out.len(), 34);
        let d = half::f16::from_le_bytes([out[0], out[1]]).to_f32();
        assert!((d - 0.02).abs() < 1e-5);
        assert_eq!(out[2] as i8, 127);
        assert_eq!(out[3] as i8, -50);
        assert_eq!(out[4] as i8, 1);
    }

    #[test]
    fn hf_names_become_gguf_names() {
        assert_eq!(
            tensor_name("model.layers.3.self_attn.q_proj.bias").as_deref(),
            Some("blk.3.attn_q.bias")
        );
        assert_eq!(
            tensor_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(tensor_name("model.layers.0.mlp.experts.0.w1.weight"), None);
    }
}
