"""Full-model merges against mergekit 0.1.5 (installed by the test set-up).

Two full fine-tunes of a tiny LLaMA (the base with a PEFT adapter merged in) are merged by
mergekit and by modelforge with the fine-tunes as delta sources. mergekit's `linear` averages
the models with normalised weights, which is the base plus the same weighted average of the
deltas; `task_arithmetic` adds the weighted deltas; `ties` elects signs on the weighted deltas
and normalises by the agreeing weights, which equals PEFT's TIES (modelforge's) at weights 1.
mergekit's DARE rescales by an L1-norm ratio and draws its own masks, so it is not compared.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import support

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MERGEKIT = Path(sys.executable).with_name("mergekit-yaml")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("mergekit")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(ws / "base")
    for name, targets in (("ft1", ["q_proj", "v_proj", "up_proj"]), ("ft2", ["q_proj", "o_proj", "down_proj"])):
        peft = get_peft_model(LlamaForCausalLM.from_pretrained(ws / "base"), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        for param_name, param in peft.named_parameters():
            if "lora_B" in param_name:
                torch.nn.init.normal_(param, std=0.2)
        peft.merge_and_unload().save_pretrained(ws / name)
    return ws


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def mergekit(ws: Path, name: str, method: str, weights: tuple[float, float], density: float | None) -> dict[str, torch.Tensor]:
    params = lambda w: f"{{weight: {w}" + (f", density: {density}" if density else "") + "}"  # noqa: E731
    base = f"base_model: {ws / 'base'}\n" if method != "linear" else ""
    config = ws / f"{name}.yml"
    config.write_text(
        f"merge_method: {method}\n{base}dtype: float32\nmodels:\n"
        f"  - model: {ws / 'ft1'}\n    parameters: {params(weights[0])}\n"
        f"  - model: {ws / 'ft2'}\n    parameters: {params(weights[1])}\n"
    )
    out = ws / f"mergekit-{name}"
    subprocess.run([str(MERGEKIT), str(config), str(out)], check=True, capture_output=True)
    return load_dir(out)


def modelforge(ws: Path, name: str, method: str, weights: tuple[float, float], density: float | None) -> dict[str, torch.Tensor]:
    merge = f'[merge]\nmethod = "{method}"\n' + (f"density = {density}\n" if density else "")
    recipe = ws / f"{name}.toml"
    recipe.write_text(
        f'[base]\npath = "base"\n[[adapter]]\npath = "ft1"\nweight = {weights[0]}\n'
        f'[[adapter]]\npath = "ft2"\nweight = {weights[1]}\n[output]\npath = "modelforge-{name}"\n{merge}'
    )
    support.modelforge("build", recipe, "--quiet")
    return load_dir(ws / f"modelforge-{name}")


CASES = {
    # mergekit normalises linear weights; modelforge adds deltas: give it the normalised weights.
    "linear": (("linear", (0.7, 0.4), None), ("linear", (0.7 / 1.1, 0.4 / 1.1), None)),
    "task_arithmetic": (("task_arithmetic", (0.7, 0.4), None), ("linear", (0.7, 0.4), None)),
    "ties": (("ties", (1.0, 1.0), 0.5), ("ties", (1.0, 1.0), 0.5)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_mergekit(ws, case):
    (mk_method, mk_weights, mk_density), (mf_method, mf_weights, mf_density) = CASES[case]
    theirs = mergekit(ws, case, mk_method, mk_weights, mk_density)
    ours = modelforge(ws, case, mf_method, mf_weights, mf_density)
    assert set(ours) == set(theirs)
    changed = 0
    for name, want in theirs.items():
        err = (ours[name] - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item(), f"{case} {name}: {err}"
        changed += not torch.equal(want, load_dir(ws / "base")[name])
    assert changed > 0
