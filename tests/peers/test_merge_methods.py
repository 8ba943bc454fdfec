"""Merge methods against PEFT's own merge utilities, applied to the full deltas.

PEFT's `add_weighted_adapter` combines the A and B factors separately (cross terms, and equal
ranks required), so the exact reference is `peft.utils.merge_utils` on each adapter's full delta
scaling·B·A, with the recipe's weights: W' = W + merge([Δ₁, Δ₂], weights). DARE draws its masks
from LibTorch's generator seeded per tensor; the test seeds torch the same way, so both sides
draw the same masks (one LibTorch, one generator).
"""
from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest
import torch
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file

from support import modelforge

torch.set_num_threads(1)

HIDDEN, LAYERS, RANK_A, RANK_B = 32, 2, 4, 6
MODULES = ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"]
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, HIDDEN), "mlp.up_proj": (2 * HIDDEN, HIDDEN)}
WEIGHTS = (0.7, 0.4)
SEED = 1234


def tensor_seed(seed: int, name: str) -> int:
    """modelforge's per-tensor seed: the first 8 bytes of blake3("{seed}:{name}"), halved."""
    return int.from_bytes(blake3.blake3(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("merge")
    gen = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(16, HIDDEN, generator=gen)}
    for layer in range(LAYERS):
        for module, shape in SHAPES.items():
            base[f"model.layers.{layer}.{module}.weight"] = torch.randn(*shape, generator=gen) * 0.1
    (ws / "base").mkdir()
    save_file(base, ws / "base" / "model.safetensors", metadata={"format": "pt"})
    (ws / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": LAYERS}))
    for name, rank, alpha in (("a", RANK_A, 8), ("b", RANK_B, 6)):
        tensors = {}
        for layer in range(LAYERS):
            for module, (out, inp) in SHAPES.items():
                key = f"base_model.model.model.layers.{layer}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=gen) * 0.3
                tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.3
        (ws / name).mkdir()
        save_file(tensors, ws / name / "adapter_model.safetensors", metadata={"format": "pt"})
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj", "up_proj"]}
        (ws / name / "adapter_config.json").write_text(json.dumps(config))
    # The same two fine-tunes as full models: the base with each adapter merged (in f32), a
    # different norm too, so that full-model deltas reach beyond the LoRA modules.
    for name, rank, alpha in (("a", RANK_A, 8), ("b", RANK_B, 6)):
        t = load_file(ws / name / "adapter_model.safetensors")
        model = dict(base)
        for key, a in t.items():
            if key.endswith("lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                model[f"{module}.weight"] = base[f"{module}.weight"] + (t[key.replace("lora_A", "lora_B")] @ a) * (alpha / rank)
        model["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + torch.randn(16, HIDDEN, generator=gen) * 0.01
        (ws / f"full-{name}").mkdir()
        save_file(model, ws / f"full-{name}" / "model.safetensors", metadata={"format": "pt"})
        (ws / f"full-{name}" / "config.json").write_text((ws / "base" / "config.json").read_text())
    return ws


def build(ws: Path, method: str, extra: str, full: bool = False) -> dict[str, torch.Tensor]:
    tag = f"{method}-full" if full else method
    a, b = ("full-a", "full-b") if full else ("a", "b")
    recipe = ws / f"{tag}.toml"
    recipe.write_text(
        f'[base]\npath = "base"\n[[adapter]]\npath = "{a}"\nweight = {WEIGHTS[0]}\n'
        f'[[adapter]]\npath = "{b}"\nweight = {WEIGHTS[1]}\n'
        f'[output]\npath = "out-{tag}"\n[merge]\nmethod = "{method}"\n{extra}'
    )
    modelforge("build", recipe, "--quiet")
    return load_file(ws / f"out-{tag}" / "model.safetensors")


def deltas(ws: Path, name: str, full: bool = False) -> list[torch.Tensor]:
    if full:
        base = load_file(ws / "base" / "model.safetensors")[name]
        return [load_file(ws / f"full-{m}" / "model.safetensors")[name] - base for m in ("a", "b")]
    module = name.removesuffix(".weight")
    out = []
    for adapter, rank, alpha in (("a", RANK_A, 8), ("b", RANK_B, 6)):
        t = load_file(ws / adapter / "adapter_model.safetensors")
        a, b = t[f"base_model.model.{module}.lora_A.weight"], t[f"base_model.model.{module}.lora_B.weight"]
        out.append((b @ a) * (alpha / rank))
    return out


CASES = {
    "linear": ("", lambda d, w: merge_utils.task_arithmetic(d, w)),
    "ties": ("density = 0.5\n", lambda d, w: merge_utils.ties(d, w, 0.5, "total")),
    "ties_frequency": (
        'density = 0.3\nmajority_sign = "frequency"\n',
        lambda d, w: merge_utils.ties(d, w, 0.3, "frequency"),
    ),
    "magnitude_prune": ("density = 0.4\n", lambda d, w: merge_utils.magnitude_prune(d, w, 0.4)),
    # Density rules, like weight rules: layer 1 keeps less, q_proj of layer 0 more.
    "magnitude_prune_rules": (
        'density = [ { value = 0.4 }, { layers = "1..", value = 0.2 }, { modules = ["q_proj"], layers = "0", value = 0.7 } ]\n',
        None,
    ),
    "dare_linear": (f"density = 0.5\nseed = {SEED}\n", lambda d, w: merge_utils.dare_linear(d, w, 0.5)),
    "dare_ties": (f"density = 0.6\nseed = {SEED}\n", lambda d, w: merge_utils.dare_ties(d, w, 0.6, "total")),
}


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full-models"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_peft_merge_utils(workspace, case, full):
    extra, reference = CASES[case]
    method = {"ties_frequency": "ties", "magnitude_prune_rules": "magnitude_prune"}.get(case, case)
    ours = build(workspace, method, extra, full)
    base = load_file(workspace / "base" / "model.safetensors")
    weights = torch.tensor(WEIGHTS, dtype=torch.float32)
    checked = 0
    for name, w in base.items():
        if "layers" not in name and not full:
            assert torch.equal(ours[name], w), name
            continue
        torch.manual_seed(tensor_seed(SEED, name))
        if reference is None:
            density = 0.7 if "layers.0.self_attn.q_proj" in name else 0.2 if "layers.1." in name else 0.4
            want = w + merge_utils.magnitude_prune(deltas(workspace, name, full), weights, density)
        else:
            want = w + reference(deltas(workspace, name, full), weights)
        err = (ours[name] - want).abs().max().item()
        assert err <= 1e-6 * want.abs().max().item(), f"{case} {name}: {err}"
        checked += 1
    # A full model's delta reaches every tensor it changed, the embeddings too.
    assert checked == LAYERS * len(MODULES) + (1 if full else 0)


def test_a_full_model_alone_gives_itself_back(workspace):
    recipe = workspace / "itself.toml"
    recipe.write_text('[base]\npath = "base"\n[[adapter]]\npath = "full-a"\n[output]\npath = "out-itself"\n')
    modelforge("build", recipe, "--quiet")
    ours = load_file(workspace / "out-itself" / "model.safetensors")
    model = load_file(workspace / "full-a" / "model.safetensors")
    for name, m in model.items():
        # W + (M − W) in f32 is M up to one rounding of the difference.
        assert (ours[name] - m).abs().max().item() <= 1e-6 * m.abs().max().item(), name


def test_dare_is_reproducible_and_the_seed_matters(workspace):
    first = build(workspace, "dare_ties", f"density = 0.5\nseed = {SEED}\n")
    again = build(workspace, "dare_ties", f"density = 0.5\nseed = {SEED}\n")
    other = build(workspace, "dare_ties", "density = 0.5\nseed = 99\n")
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[name], other[name])
    # The kept fraction is the density, within sampling error (2 × 2048 entries per tensor).
    d = deltas(workspace, name)
    torch.manual_seed(tensor_seed(SEED, name))
    masks = [torch.bernoulli(torch.full_like(t, 0.5)) for t in d]
    kept = sum(m.sum().item() for m in masks) / sum(m.numel() for m in masks)
    assert abs(kept - 0.5) < 0.03
