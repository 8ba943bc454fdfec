"""A candidate improvement of `dims = "align"` (issue 19, item 3), tried here before modelforge:
the residual map R fitted on the hidden states of shared text instead of on the embedding rows
of shared tokens, either one map for all layers or one map per layer.

modelforge's align arithmetic is recomputed here (R, then per module the orthogonal inner map M
with the identity prior, then M·B·A·Rᵀ for a module reading the residual stream and R·B·A·Mᵀ for
one writing it, as engine/src/align.rs does); with modelforge's own R (fitted on the embeddings)
it must give modelforge's align rows' gain, which run.py checks, so that the only difference
between the variants is the map."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

IDENTITY_PRIOR = 1e-3  # engine/src/align.rs
WRITERS = ("o_proj", "down_proj")


def polar(a: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def fitted_map(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """R (d_t × d_s): the polar factor of the least-squares map of rows `xs` onto rows `ys`."""
    return polar(torch.linalg.lstsq(xs, ys, driver="gelsd").solution.T)


def inner_map(ws: torch.Tensor, wt: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """M: the orthogonal map closest to taking ws·Rᵀ onto wt (both inner × residual)."""
    p = wt @ (ws @ r.T).T
    prior = torch.eye(*p.shape, dtype=p.dtype) * (IDENTITY_PRIOR * torch.linalg.svdvals(p).max())
    return polar(p + prior)


def carried(lora_dir: Path, source: dict, target: dict, maps) -> dict[str, torch.Tensor]:
    """The target's weights with the source LoRA carried in through `maps(layer)` (R for the
    modules of that layer): {tensor name: new weight}. Both bases LLaMA-layout, same layers."""
    lora = load_file(lora_dir / "adapter_model.safetensors")
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    out = {}
    for key in sorted(k for k in lora if ".lora_A." in k):
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        name = f"{module}.weight"
        a, b = lora[key].double(), lora[key.replace(".lora_A.", ".lora_B.")].double()
        ws, wt = source[name].double(), target[name].double()
        r = maps(int(module.split(".layers.")[1].split(".")[0]))
        if module.endswith(WRITERS):
            delta = r @ b @ a @ inner_map(ws.T, wt.T, r).T
        else:
            delta = inner_map(ws, wt, r) @ b @ a @ r.T
        out[name] = (wt + scaling * delta).float()
    return out


def variants(source_emb, target_emb, source_streams, target_streams):
    """The maps compared, as functions of the layer: modelforge's (embedding rows), one fitted on
    the residual streams of every layer, one per layer."""
    embedding = fitted_map(source_emb, target_emb)
    one = fitted_map(torch.cat(source_streams), torch.cat(target_streams))
    per_layer = [fitted_map(s, t) for s, t in zip(source_streams, target_streams)]
    return {
        "embedding rows (modelforge's R)": lambda layer: embedding,
        "hidden states, one map": lambda layer: one,
        "hidden states, a map per layer": lambda layer: per_layer[layer],
    }
