//! `modelforge-engine score`: a decoder's forward pass over tokenized texts, giving each token's
//! log-probability. Computed in f32 (weights widened from their dtype), one layer at a time for
//! all texts: memory holds one layer's weights and the texts' hidden states, never the model.
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use modelforge_core::job::{Decoder, Family, ScoreDelta, ScoreJob, Scores, TensorPlace};
use safetensors::Dtype;
use tch::{Device, Kind, Tensor};

use crate::backend::kind;
use crate::error::{shape, EngineError};

/// The checkpoint's tensors, read by name.
struct Weights {
    places: HashMap<String, TensorPlace>,
    files: HashMap<PathBuf, File>,
    device: Device,
    /// The tensors the forward pass has read: any other is a part of the model it would
    /// leave out, and the scores would be wrong.
    read: HashSet<String>,
    /// LoRA deltas to add to tensors as they are read, by tensor name.
    deltas: HashMap<String, Vec<ScoreDelta>>,
}

impl Weights {
    fn has(&self, name: &str) -> bool {
        self.places.contains_key(name)
    }

    /// `name` as an f32 tensor on the device, with the deltas it is given added.
    fn get(&mut self, name: &str) -> Result<Tensor, EngineError> {
        let place = self
            .places
            .get(name)
            .ok_or_else(|| shape!("the model has no tensor `{name}`"))?
            .clone();
        self.read.insert(name.to_owned());
        let mut tensor = self.read_place(&place)?;
        for delta in self.deltas.get(name).cloned().unwrap_or_default() {
            let (a, b) = (self.read_place(&delta.a)?, self.read_place(&delta.b)?);
            let product = b.matmul(&a) * delta.scale;
            let product = if delta.transposed {
                product.tr()
            } else {
                product
            };
            if product.size() != tensor.size() {
                return Err(shape!(
                    "the delta for `{name}` is {:?}, the tensor {:?}",
                    product.size(),
                    tensor.size()
                ));
            }
            tensor += product;
        }
        Ok(tensor)
    }

    fn read_place(&mut self, place: &TensorPlace) -> Result<Tensor, EngineError> {
        if !self.files.contains_key(&place.path) {
            let file = File::open(&place.path).map_err(|e| {
                std::io::Error::new(e.kind(), format!("{}: {e}", place.path.display()))
            })?;
            self.files.insert(place.path.clone(), file);
        }
        // Only floating tensors are weights this pass reads, each as many bytes as its shape
        // says (LibTorch would read past a short buffer).
        let width = match place.dtype {
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
            other => {
                return Err(shape!(
                    "`{}` is {other:?}, not a floating tensor: quantized or integer weights are not scored",
                    place.name
                ))
            }
        };
        let count: usize = place.shape.iter().product();
        if place.len != (count * width) as u64 {
            return Err(shape!(
                "`{}` holds {} bytes, not the {} its shape {:?} takes",
                place.name,
                place.len,
                count * width,
                place.shape
            ));
        }
        let mut bytes = vec![0u8; place.len as usize];
        self.files[&place.path].read_exact_at(&mut bytes, place.start)?;
        let dims: Vec<i64> = place.shape.iter().map(|&d| d as i64).collect();
        Ok(Tensor::from_data_size(&bytes, &dims, kind(place.dtype))
            .to_device(self.device)
            .to_kind(Kind::Float))
    }
}

/// The tensors outside the layers, by family: the token embedding, learned positions if any,
/// and the final norm.
fn outer_names(family: Family) -> (&'static str, Option<&'static str>, &'static str) {
    match family {
        Family::Llama | Family::Phi3 => ("model.embed_tokens.weight", None, "model.norm"),
        Family::GptNeox { .. } => (
            "gpt_neox.embed_in.weight",
            None,
            "gpt_neox.final_layer_norm",
        ),
        Family::Gpt2 => (
            "transformer.wte.weight",
            Some("transformer.wpe.weight"),
            "transformer.ln_f",
        ),
    }
}

/// Buffers some checkpoints keep that the pass computes itself (rotary frequencies, causal
/// masks).
fn is_buffer(name: &str) -> bool {
    [
        "rotary_emb.inv_freq",
        ".attn.bias",
        ".attn.masked_bias",
        ".attention.bias",
        ".attention.masked_bias",
    ]
    .iter()
    .any(|end| name.ends_with(end))
}

/// Each text's token log-probabilities (from its second token on).
pub fn score(job: &ScoreJob, device: Device) -> Result<Scores, EngineError> {
    let _guard = tch::no_grad_guard();
    let mut weights = Weights {
        places: job
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.clone()))
            .collect(),
        files: HashMap::new(),
        device,
        read: HashSet::new(),
        deltas: HashMap::new(),
    };
    for replacement in &job.replacements {
        let place = weights.places.get_mut(&replacement.name).ok_or_else(|| {
            shape!(
                "the adapter replaces `{}`, which the model does not have",
                replacement.name
            )
        })?;
        if place.shape != replacement.shape {
            return Err(shape!(
                "the adapter's `{}` is {:?}, the model's {:?}",
                replacement.name,
                replacement.shape,
                place.shape
            ));
        }
        *place = replacement.clone();
    }
    for delta in &job.deltas {
        if !weights.has(&delta.weight) {
            return Err(shape!(
                "the adapter changes `{}`, which the model does not have",
                delta.weight
            ));
        }
        weights
            .deltas
            .entry(delta.weight.clone())
            .or_default()
            .push(delta.clone());
    }
    let d = &job.decoder;
    let (embed, positions, final_norm) = outer_names(d.family);
    let embedding = weights.get(embed)?;
    if embedding.dim() != 2 {
        return Err(shape!(
            "`{embed}` is {:?}, not a table of rows",
            embedding.size()
        ));
    }
    let (vocab, width) = (embedding.size()[0], embedding.size()[1]);
    for (i, text) in job.texts.iter().enumerate() {
        if let Some(bad) = text.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(shape!(
                "text {i} holds token {bad}, outside the embedding's {vocab} rows"
            ));
        }
    }
    let ids: Vec<Tensor> = job
        .texts
        .iter()
        .map(|t| Tensor::from_slice(t).to_device(device))
        .collect();
    let longest = job.texts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let mut hidden: Vec<Tensor> = ids.iter().map(|t| embedding.index_select(0, t)).collect();
    // A tied head is the embedding: kept for the end rather than read again.
    let tied = (d.head == embed).then_some(embedding);
    if let Some(positions) = positions {
        let table = weights.get(positions)?;
        expect(&table, &[table.size()[0], width], positions)?;
        if table.size()[0] < longest {
            return Err(shape!(
                "a text of {longest} tokens is longer than the model's {} positions",
                table.size()[0]
            ));
        }
        for h in hidden.iter_mut() {
            *h = &*h + table.narrow(0, 0, h.size()[0]);
        }
    }
    let rotary = (!d.inv_freq.is_empty()).then(|| Rotary::new(&d.inv_freq, longest, device));
    for layer in 0..d.layers {
        let block = Block::load(&mut weights, d, layer)?;
        block.check(d, width, layer)?;
        let window = d.windows.get(layer).copied().flatten();
        for h in hidden.iter_mut() {
            *h = block.forward(h, d, rotary.as_ref(), window);
        }
    }
    let norm = Norm::load(&mut weights, final_norm, d)?;
    norm.check(width, final_norm)?;
    let head = match tied {
        Some(embedding) => embedding,
        None => weights.get(&d.head)?,
    };
    expect(&head, &[head.size()[0], width], &d.head)?;
    if head.size()[0] < vocab {
        return Err(shape!(
            "`{}` has {} rows, fewer than the embedding's {vocab}",
            d.head,
            head.size()[0]
        ));
    }
    let mut unread: Vec<&String> = weights
        .places
        .keys()
        .filter(|name| !weights.read.contains(*name) && !is_buffer(name))
        .collect();
    unread.sort();
    if let Some(first) = unread.first() {
        return Err(shape!(
            "the model holds {} tensor(s) this forward pass does not use, such as `{first}`: it is not the decoder its config.json describes",
            unread.len()
        ));
    }
    let logprobs = hidden
        .iter()
        .zip(&ids)
        .map(|(h, ids)| {
            let n = ids.size()[0];
            if n < 2 {
                return Ok(Vec::new());
            }
            let logits = norm.apply(&h.narrow(0, 0, n - 1)).matmul(&head.tr());
            let chosen = logits
                .to_kind(Kind::Double)
                .log_softmax(-1, Kind::Double)
                .gather(1, &ids.narrow(0, 1, n - 1).unsqueeze(1), false)
                .squeeze_dim(1)
                .to_device(Device::Cpu);
            let chosen =
                Vec::<f64>::try_from(chosen).map_err(|e| shape!("log-probabilities: {e}"))?;
            match chosen.iter().all(|lp| lp.is_finite()) {
                true => Ok(chosen),
                false => Err(shape!(
                    "a log-probability of a text is not finite: the model's weights hold NaN or infinity, or overflow in f32"
                )),
            }
        })
        .collect::<Result<_, EngineError>>()?;
    Ok(Scores { logprobs })
}

/// The rotary angles' cosines and sines for positions 0..n, [n, rotated].
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(inv_freq: &[f64], positions: i64, device: Device) -> Rotary {
        // As transformers computes them: frequencies in f32, angles position × frequency in f32.
        let inv_freq = Tensor::from_slice(inv_freq)
            .to_kind(Kind::Float)
            .to_device(device);
        let position = Tensor::arange(positions, (Kind::Float, device));
        let angles = position.unsqueeze(1) * inv_freq.unsqueeze(0);
        let angles = Tensor::cat(&[&angles, &angles], 1);
        Rotary {
            cos: angles.cos(),
            sin: angles.sin(),
        }
    }

    /// Rotates the first `rotated` dimensions of each head of `x` [heads, n, head_dim], their
    /// two halves as pairs (transformers' `rotate_half`).
    fn apply(&self, x: &Tensor) -> Tensor {
        let (n, rotated) = (x.size()[1], self.cos.size()[1]);
        let head_dim = x.size()[2];
        let (cos, sin) = (self.cos.narrow(0, 0, n), self.sin.narrow(0, 0, n));
        let part = x.narrow(2, 0, rotated);
        let half = rotated / 2;
        let turned = Tensor::cat(
            &[&part.narrow(2, half, half).neg(), &part.narrow(2, 0, half)],
            2,
        );
        let part = &part * &cos + turned * &sin;
        if rotated == head_dim {
            part
        } else {
            Tensor::cat(&[&part, &x.narrow(2, rotated, head_dim - rotated)], 2)
        }
    }
}

/// RMSNorm (LLaMA's: x / √(mean(x²) + ε) · w) or LayerNorm (with its bias).
struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    /// The norm `prefix`.weight (and .bias) as the family uses it.
    fn load(w: &mut Weights, prefix: &str, d: &Decoder) -> Result<Norm, EngineError> {
        let weight = w.get(&format!("{prefix}.weight"))?;
        let bias = match d.family {
            Family::Llama | Family::Phi3 => None,
            Family::GptNeox { .. } | Family::Gpt2 => Some(w.get(&format!("{prefix}.bias"))?),
        };
        Ok(Norm {
            weight,
            bias,
            eps: d.norm_eps,
        })
    }

    fn check(&self, hidden: i64, what: &str) -> Result<(), EngineError> {
        expect(&self.weight, &[hidden], what)?;
        match &self.bias {
            Some(bias) => expect(bias, &[hidden], &format!("{what} (bias)")),
            None => Ok(()),
        }
    }

    fn apply(&self, x: &Tensor) -> Tensor {
        match &self.bias {
            None => {
                let variance = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
                x * (variance + self.eps).rsqrt() * &self.weight
            }
            Some(bias) => {
                let width = self.weight.size();
                x.layer_norm(&width, Some(&self.weight), Some(bias), self.eps, false)
            }
        }
    }
}

/// A linear map, its weight stored out × in.
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// The weight is `shape` (out × in), the bias as long as its rows.
    fn check(&self, shape: &[i64], what: &str) -> Result<(), EngineError> {
        expect(&self.weight, shape, what)?;
        match &self.bias {
            Some(bias) => expect(bias, &shape[..1], &format!("{what} (bias)")),
            None => Ok(()),
        }
    }

    fn apply(&self, x: &Tensor) -> Tensor {
        let y = x.matmul(&self.weight.tr());
        match &self.bias {
            Some(b) => y + b,
            None => y,
        }
    }
}

/// How the MLP's hidden units are made.
#[derive(Clone, Copy)]
enum Activation {
    /// silu(gate) · up, gate and up stacked by rows in one map (LLaMA, Phi-3).
    GatedSilu,
    /// GELU, exact (GPT-NeoX's `gelu`).
    Gelu,
    /// GELU's tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
}

/// One layer's weights, in one layout whatever the family's: the query, key and value rows
/// stacked as [q of every head | k | v].
struct Block {
    attn_norm: Norm,
    qkv: Linear,
    o: Linear,
    mlp_norm: Norm,
    up: Linear,
    activation: Activation,
    down: Linear,
    parallel: bool,
}

impl Block {
    fn load(w: &mut Weights, d: &Decoder, layer: usize) -> Result<Block, EngineError> {
        let b = d.biases;
        let block = match d.family {
            Family::Llama | Family::Phi3 => {
                let p = format!("model.layers.{layer}");
                let (qkv, up) = if d.family == Family::Phi3 {
                    (
                        linear(w, &format!("{p}.self_attn.qkv_proj"), b.qkv)?,
                        linear(w, &format!("{p}.mlp.gate_up_proj"), b.mlp)?,
                    )
                } else {
                    (
                        stacked(
                            w,
                            &p,
                            &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                            b.qkv,
                        )?,
                        stacked(w, &p, &["mlp.gate_proj", "mlp.up_proj"], b.mlp)?,
                    )
                };
                Block {
                    attn_norm: Norm::load(w, &format!("{p}.input_layernorm"), d)?,
                    qkv,
                    o: linear(w, &format!("{p}.self_attn.o_proj"), b.o)?,
                    mlp_norm: Norm::load(w, &format!("{p}.post_attention_layernorm"), d)?,
                    up,
                    activation: Activation::GatedSilu,
                    down: linear(w, &format!("{p}.mlp.down_proj"), b.mlp)?,
                    parallel: false,
                }
            }
            Family::GptNeox { parallel_residual } => {
                let p = format!("gpt_neox.layers.{layer}");
                // Stored per head as [q k v] of head_dim rows each: regrouped by kind.
                let fused = linear(w, &format!("{p}.attention.query_key_value"), b.qkv)?;
                let (heads, hd) = (d.heads as i64, d.head_dim as i64);
                let rows = fused.weight.size().first().copied();
                if fused.weight.dim() != 2 || rows != Some(3 * heads * hd) {
                    return Err(shape!(
                        "`{p}.attention.query_key_value.weight` is {:?}, not {} query, key and value rows of {heads} heads",
                        fused.weight.size(),
                        3 * heads * hd
                    ));
                }
                let regroup = |t: &Tensor| {
                    let rest: Vec<i64> = t.size()[1..].to_vec();
                    let mut by_head = vec![heads, 3, hd];
                    by_head.extend(&rest);
                    let mut flat = vec![3 * heads * hd];
                    flat.extend(&rest);
                    t.reshape(by_head.as_slice())
                        .transpose(0, 1)
                        .reshape(flat.as_slice())
                };
                Block {
                    attn_norm: Norm::load(w, &format!("{p}.input_layernorm"), d)?,
                    qkv: Linear {
                        weight: regroup(&fused.weight),
                        bias: fused.bias.as_ref().map(regroup),
                    },
                    o: linear(w, &format!("{p}.attention.dense"), b.o)?,
                    mlp_norm: Norm::load(w, &format!("{p}.post_attention_layernorm"), d)?,
                    up: linear(w, &format!("{p}.mlp.dense_h_to_4h"), b.mlp)?,
                    activation: Activation::Gelu,
                    down: linear(w, &format!("{p}.mlp.dense_4h_to_h"), b.mlp)?,
                    parallel: parallel_residual,
                }
            }
            Family::Gpt2 => {
                let p = format!("transformer.h.{layer}");
                // Conv1D stores its weight in × out.
                let conv = |w: &mut Weights, m: &str, bias: bool| {
                    linear(w, &format!("{p}.{m}"), bias).map(|l| Linear {
                        weight: l.weight.tr(),
                        bias: l.bias,
                    })
                };
                Block {
                    attn_norm: Norm::load(w, &format!("{p}.ln_1"), d)?,
                    qkv: conv(w, "attn.c_attn", b.qkv)?,
                    o: conv(w, "attn.c_proj", b.o)?,
                    mlp_norm: Norm::load(w, &format!("{p}.ln_2"), d)?,
                    up: conv(w, "mlp.c_fc", b.mlp)?,
                    activation: Activation::GeluTanh,
                    down: conv(w, "mlp.c_proj", b.mlp)?,
                    parallel: false,
                }
            }
        };
        Ok(block)
    }

    /// Every weight's shape against the sizes config.json gives and the embedding's width, so
    /// that a checkpoint that disagrees is said, not computed with.
    fn check(&self, d: &Decoder, hidden: i64, layer: usize) -> Result<(), EngineError> {
        let at = |what: &str| format!("layer {layer}'s {what}");
        let (q, kv) = (
            (d.heads * d.head_dim) as i64,
            (d.kv_heads * d.head_dim) as i64,
        );
        self.attn_norm.check(hidden, &at("attention norm"))?;
        self.mlp_norm.check(hidden, &at("MLP norm"))?;
        self.qkv.check(
            &[q + 2 * kv, hidden],
            &at("query, key and value projections"),
        )?;
        self.o.check(&[hidden, q], &at("attention output"))?;
        let up = self.up.weight.size();
        let width = match (up.as_slice(), self.activation) {
            ([rows, _], Activation::GatedSilu) if rows % 2 == 0 => rows / 2,
            ([rows, _], Activation::Gelu | Activation::GeluTanh) => *rows,
            _ => return Err(shape!("{} is {up:?}", at("MLP's first map"))),
        };
        self.up.check(&[up[0], hidden], &at("MLP's first map"))?;
        self.down.check(&[hidden, width], &at("MLP's last map"))
    }

    /// The residual stream `x` [n, hidden] after this layer.
    fn forward(
        &self,
        x: &Tensor,
        d: &Decoder,
        rotary: Option<&Rotary>,
        window: Option<usize>,
    ) -> Tensor {
        let attention = self.attention(&self.attn_norm.apply(x), d, rotary, window);
        if self.parallel {
            x + attention + self.mlp(&self.mlp_norm.apply(x))
        } else {
            let x = x + attention;
            let mlp = self.mlp(&self.mlp_norm.apply(&x));
            x + mlp
        }
    }

    fn attention(
        &self,
        h: &Tensor,
        d: &Decoder,
        rotary: Option<&Rotary>,
        window: Option<usize>,
    ) -> Tensor {
        let n = h.size()[0];
        let (heads, kv, hd) = (d.heads as i64, d.kv_heads as i64, d.head_dim as i64);
        let qkv = self.qkv.apply(h);
        // [n, count·hd] → [count, n, hd]
        let split = |start: i64, count: i64| {
            qkv.narrow(1, start * hd, count * hd)
                .reshape([n, count, hd])
                .transpose(0, 1)
        };
        let turn = |t: Tensor| match rotary {
            Some(r) => r.apply(&t),
            None => t,
        };
        let q = turn(split(0, heads));
        let k = turn(split(heads, kv));
        let v = split(heads + kv, kv);
        let (k, v) = if heads == kv {
            (k, v)
        } else {
            let groups = heads / kv;
            (
                k.repeat_interleave_self_int(groups, 0, None),
                v.repeat_interleave_self_int(groups, 0, None),
            )
        };
        let scores = q.matmul(&k.transpose(1, 2)) / (hd as f64).sqrt();
        // Hidden from each token: those after it, and with a window, those `window` or more
        // before it.
        let all = Tensor::ones([n, n], (Kind::Bool, h.device()));
        let mut future = all.triu(1);
        if let Some(window) = window {
            future = future.logical_or(&all.tril(-(window as i64)));
        }
        let mixed = scores
            .masked_fill(&future, f64::NEG_INFINITY)
            .softmax(-1, Kind::Float)
            .matmul(&v)
            .transpose(0, 1)
            .reshape([n, heads * hd]);
        self.o.apply(&mixed)
    }

    fn mlp(&self, h: &Tensor) -> Tensor {
        let up = self.up.apply(h);
        let hidden = match self.activation {
            Activation::GatedSilu => {
                let width = up.size()[1] / 2;
                up.narrow(1, 0, width).silu() * up.narrow(1, width, width)
            }
            Activation::Gelu => up.gelu("none"),
            Activation::GeluTanh => up.gelu("tanh"),
        };
        self.down.apply(&hidden)
    }
}

/// The map `name`.weight, and `name`.bias where the model has biases there.
fn linear(w: &mut Weights, name: &str, bias: bool) -> Result<Linear, EngineError> {
    Ok(Linear {
        weight: w.get(&format!("{name}.weight"))?,
        bias: match bias {
            true => Some(w.get(&format!("{name}.bias"))?),
            false => None,
        },
    })
}

/// `modules` (of layer `p`) as one map, their weights (and biases) stacked by rows.
fn stacked(w: &mut Weights, p: &str, modules: &[&str], bias: bool) -> Result<Linear, EngineError> {
    let parts = modules
        .iter()
        .map(|m| linear(w, &format!("{p}.{m}"), bias))
        .collect::<Result<Vec<_>, _>>()?;
    let columns = parts[0].weight.size().get(1).copied();
    if let Some(odd) = parts
        .iter()
        .zip(modules)
        .find(|(l, _)| l.weight.dim() != 2 || l.weight.size().get(1).copied() != columns)
    {
        return Err(shape!(
            "`{p}.{}.weight` is {:?}, unlike `{p}.{}.weight`'s {:?}",
            odd.1,
            odd.0.weight.size(),
            modules[0],
            parts[0].weight.size()
        ));
    }
    let weight = Tensor::cat(&parts.iter().map(|l| &l.weight).collect::<Vec<_>>(), 0);
    let bias = bias.then(|| {
        Tensor::cat(
            &parts
                .iter()
                .filter_map(|l| l.bias.as_ref())
                .collect::<Vec<_>>(),
            0,
        )
    });
    Ok(Linear { weight, bias })
}

/// `t` is `shape`, or an error naming `what`.
fn expect(t: &Tensor, shape: &[i64], what: &str) -> Result<(), EngineError> {
    if t.size() == shape {
        Ok(())
    } else {
        Err(shape!(
            "{what} is {:?}, where config.json and the embedding make it {shape:?}",
            t.size()
        ))
    }
}
