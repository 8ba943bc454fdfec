#!/usr/bin/env python3
"""Makes examples/tiny-chatglm: a ChatGLM-6B-shaped model (real tensor names and fused,
per-head-interleaved query_key_value with bias; small sizes) with one layer, built from
examples/tiny-llama's first layer, so that recipes/llama-to-chatglm.toml can carry the
two-layer LLaMA adapter examples/tiny-llama-lora into it with `layers = "interpolate"`.

Grouped-query k/v heads are repeated for the query heads they serve (ChatGLM-6B has none), the
SwiGLU MLP's up and down projections become dense_h_to_4h and dense_4h_to_h (the gate has no
place), norms get zero biases. q and k rows are permuted head by head into ChatGLM-6B's 2D rotary
convention, as modelforge permutes a LLaMA adapter's (src/exec/rotary.rs): LLaMA's pair
(i, i + d/2) lands on ChatGLM's pair of slot i.

Also makes examples/tiny-chatglm-narrow, for recipes/llama-to-narrower-chatglm.toml: the same
layer at another width, 48 instead of 64, and with 3 of the 4 heads. Its residual stream is
tiny-llama's turned by a random orthogonal matrix and cut to 48 dimensions (SliceGPT-style, each
norm's scale folded into the layers it feeds): every weight reading the residual stream is W·Q,
every weight writing it Qᵀ·W, the embedding E·Q. That relation is in the weights only; the model
is not equivalent to tiny-llama (ChatGLM's LayerNorm does not commute with the rotation). It is a
fixture for `dims = "align"` across widths, whose transfer report should show a related pair.

Deterministic: re-running rewrites the same files.

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
    write(HERE / "tiny-chatglm", *chatglm(llama, config))
    write(HERE / "tiny-chatglm-narrow", *chatglm(llama, config, basis=narrow_basis(config["hidden_size"]), heads=3))


def narrow_basis(hidden: int, width: int = 48) -> torch.Tensor:
    """tiny-chatglm-narrow's residual basis: `width` orthonormal columns of a random rotation."""
    q, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(48), dtype=torch.float64))
    return q[:, :width].float()


def chatglm(llama: dict[str, torch.Tensor], config: dict, basis: torch.Tensor | None = None,
            heads: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and config.json of a one-layer ChatGLM-6B made from tiny-llama's first layer;
    with `basis` (hidden × width, orthonormal columns), its residual stream carried through it;
    with `heads`, only the first `heads` attention heads."""
    all_heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    hidden, group = config["hidden_size"], all_heads // kv_heads
    heads = heads or all_heads

    def mha(t: torch.Tensor) -> torch.Tensor:
        return t.view(kv_heads, 1, head_dim, hidden).expand(kv_heads, group, head_dim, hidden).reshape(all_heads * head_dim, hidden)

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
    width = hidden if basis is None else basis.shape[1]
    kept = heads * head_dim
    norm1, norm2, norm_f = (llama[f"{p}.input_layernorm.weight"], llama[f"{p}.post_attention_layernorm.weight"],
                            llama["model.norm.weight"])

    def reads(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """A weight reading the residual stream, after a norm of scale `scale`."""
        return w if basis is None else (w * scale) @ basis

    def writes(w: torch.Tensor) -> torch.Tensor:
        return w if basis is None else basis.T @ w

    def norm(scale: torch.Tensor) -> torch.Tensor:
        return scale if basis is None else torch.ones(width)

    q, k, v = (llama[f"{p}.self_attn.{m}_proj.weight"] for m in "qkv")
    q, k, v = (t[:kept] for t in (glm_2d(q), glm_2d(mha(k)), mha(v)))
    qkv = torch.stack([t.view(heads, head_dim, hidden) for t in (q, k, v)], 1).reshape(3 * kept, hidden)
    zeros = lambda n: torch.zeros(n)  # noqa: E731
    tensors = {
        "transformer.word_embeddings.weight": reads(llama["model.embed_tokens.weight"], torch.ones(hidden)),
        f"{n}.input_layernorm.weight": norm(norm1),
        f"{n}.input_layernorm.bias": zeros(width),
        f"{n}.attention.query_key_value.weight": reads(qkv, norm1),
        f"{n}.attention.query_key_value.bias": zeros(3 * kept),
        f"{n}.attention.dense.weight": writes(llama[f"{p}.self_attn.o_proj.weight"][:, :kept]),
        f"{n}.attention.dense.bias": zeros(width),
        f"{n}.post_attention_layernorm.weight": norm(norm2),
        f"{n}.post_attention_layernorm.bias": zeros(width),
        f"{n}.mlp.dense_h_to_4h.weight": reads(llama[f"{p}.mlp.up_proj.weight"], norm2),
        f"{n}.mlp.dense_h_to_4h.bias": zeros(config["intermediate_size"]),
        f"{n}.mlp.dense_4h_to_h.weight": writes(llama[f"{p}.mlp.down_proj.weight"]),
        f"{n}.mlp.dense_4h_to_h.bias": zeros(width),
        "transformer.final_layernorm.weight": norm(norm_f),
        "transformer.final_layernorm.bias": zeros(width),
        "lm_head.weight": reads(llama["lm_head.weight"], norm_f),
    }
    chatglm_config = {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "hidden_size": width,
        "num_attention_heads": heads,
        "num_layers": 1,
        "inner_hidden_size": config["intermediate_size"],
        "vocab_size": config["vocab_size"],
        "position_encoding_2d": True,
        "layernorm_epsilon": 1e-5,
        "torch_dtype": "float32",
    }
    return tensors, chatglm_config


def write(out: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    out.mkdir(exist_ok=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
