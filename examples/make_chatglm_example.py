#!/usr/bin/env python3
"""Makes examples/tiny-chatglm: a ChatGLM-6B-shaped model (real tensor names and fused,
per-head-interleaved query_key_value with bias; small sizes) with one layer, built from
examples/tiny-llama's first layer, so that recipes/llama-to-chatglm.toml can carry the
two-layer LLaMA adapter examples/tiny-llama-lora into it with `layers = "interpolate"`.

Grouped-query k/v heads are repeated for the query heads they serve (ChatGLM-6B has none), the
SwiGLU MLP's up and down projections become dense_h_to_4h and dense_4h_to_h (the gate has no
place), norms get zero biases. q and k rows are permuted head by head into ChatGLM-6B's 2D rotary
convention, as modelforge permutes a LLaMA adapter's (src/exec/rotary.rs): LLaMA's pair
(i, i + d/2) lands on ChatGLM's pair of slot i. Deterministic: re-running rewrites the same files.

    .venv/bin/python examples/make_chatglm_example.py
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent


def main() -> None:
    llama_dir = HERE / "tiny-llama"
    config = json.loads((llama_dir / "config.json").read_text())
    llama = load_file(llama_dir / "model.safetensors")
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    hidden, group = config["hidden_size"], heads // kv_heads

    def mha(t: torch.Tensor) -> torch.Tensor:
        return t.view(kv_heads, 1, head_dim, hidden).expand(kv_heads, group, head_dim, hidden).reshape(heads * head_dim, hidden)

    def glm_2d(t: torch.Tensor) -> torch.Tensor:
        # LLaMA row r of a head: pair i = r mod d/2, element r div d/2. ChatGLM-6B slot i: pair
        # i/2 of the first half (i even) or of the second (i odd), pairs (j, j + d/4) in a half.
        d = head_dim
        rows = [(i % 2) * (d // 2) + i // 2 + e * (d // 4) for e in range(2) for i in range(d // 2)]
        h = t.view(-1, d, hidden)
        out = torch.empty_like(h)
        out[:, rows] = h
        return out.reshape(t.shape)

    p, n = "model.layers.0", "transformer.layers.0"
    q, k, v = (llama[f"{p}.self_attn.{m}_proj.weight"] for m in "qkv")
    q, k = glm_2d(q), glm_2d(mha(k))
    qkv = torch.stack([q.view(heads, head_dim, hidden), k.view(heads, head_dim, hidden),
                       mha(v).view(heads, head_dim, hidden)], 1).reshape(3 * heads * head_dim, hidden)
    zeros = lambda n: torch.zeros(n)  # noqa: E731
    tensors = {
        "transformer.word_embeddings.weight": llama["model.embed_tokens.weight"],
        f"{n}.input_layernorm.weight": llama[f"{p}.input_layernorm.weight"],
        f"{n}.input_layernorm.bias": zeros(hidden),
        f"{n}.attention.query_key_value.weight": qkv,
        f"{n}.attention.query_key_value.bias": zeros(3 * heads * head_dim),
        f"{n}.attention.dense.weight": llama[f"{p}.self_attn.o_proj.weight"],
        f"{n}.attention.dense.bias": zeros(hidden),
        f"{n}.post_attention_layernorm.weight": llama[f"{p}.post_attention_layernorm.weight"],
        f"{n}.post_attention_layernorm.bias": zeros(hidden),
        f"{n}.mlp.dense_h_to_4h.weight": llama[f"{p}.mlp.up_proj.weight"],
        f"{n}.mlp.dense_h_to_4h.bias": zeros(config["intermediate_size"]),
        f"{n}.mlp.dense_4h_to_h.weight": llama[f"{p}.mlp.down_proj.weight"],
        f"{n}.mlp.dense_4h_to_h.bias": zeros(hidden),
        "transformer.final_layernorm.weight": llama["model.norm.weight"],
        "transformer.final_layernorm.bias": zeros(hidden),
        "lm_head.weight": llama["lm_head.weight"],
    }
    out = HERE / "tiny-chatglm"
    out.mkdir(exist_ok=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    chatglm_config = {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_layers": 1,
        "inner_hidden_size": config["intermediate_size"],
        "vocab_size": config["vocab_size"],
        "position_encoding_2d": True,
        "layernorm_epsilon": 1e-5,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(chatglm_config, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
