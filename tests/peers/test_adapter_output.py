"""`[output] adapter`: the combined delta re-factored into one PEFT adapter (truncated SVD).

Checked against the math (B·A reproduces the combined delta at the exact rank; the energy the
report gives equals the SVD's at a reduced rank) and against peft and transformers (the
written adapter loads onto the base and gives the fused model's logits).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from support import modelforge

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ADAPTERS = {"one": (4, 8, ["q_proj", "v_proj"], 0.7), "two": (2, 3, ["q_proj", "k_proj", "o_proj", "up_proj"], 0.4)}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("adapter-out")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(ws / "base")
    for name, (r, alpha, targets, _) in ADAPTERS.items():
        model = LlamaForCausalLM.from_pretrained(ws / "base")
        peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
        for param_name, param in peft.named_parameters():
            if "lora_B" in param_name:
                torch.nn.init.normal_(param, std=0.2)
        peft.save_pretrained(ws / name)
    return ws


def build(ws: Path, name: str, output_extra: str) -> Path:
    recipe = ws / f"{name}.toml"
    adapters = "".join(f'[[adapter]]\npath = "{a}"\nweight = {w}\n' for a, (_, _, _, w) in ADAPTERS.items())
    recipe.write_text(f'[base]\npath = "base"\n{adapters}[output]\npath = "fused-{name}"\nadapter = "lora-{name}"\n{output_extra}')
    modelforge("build", recipe, "--quiet")
    return ws / f"lora-{name}"


def combined_deltas(ws: Path) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for name, (r, alpha, _, weight) in ADAPTERS.items():
        t = load_file(ws / name / "adapter_model.safetensors")
        for key in t:
            if key.endswith("lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                delta = (t[key.replace("lora_A", "lora_B")] @ t[key]) * (alpha / r) * weight
                total[module] = total.get(module, 0) + delta
    return total


def test_exact_rank_reproduces_the_combined_delta(ws):
    out = build(ws, "exact", "")
    config = json.loads((out / "adapter_config.json").read_text())
    factors = load_file(out / "adapter_model.safetensors")
    report = json.loads((out / "refactor.json").read_text())["modules"]
    deltas = combined_deltas(ws)
    assert set(report) == set(deltas)
    for module, delta in deltas.items():
        a = factors[f"base_model.model.{module}.lora_A.weight"]
        b = factors[f"base_model.model.{module}.lora_B.weight"]
        # Modules both adapters touch get rank 4 + 2; the others their own.
        assert a.shape[0] == (6 if module.endswith("q_proj") else 4 if module.endswith("v_proj") else 2)
        err = (b @ a - delta).abs().max().item()
        assert err <= 1e-5 * delta.abs().max().item(), f"{module}: {err}"
        assert report[module]["energy"] == pytest.approx(1.0, abs=1e-6)
    assert config["lora_alpha"] == config["r"]


def test_written_adapter_loads_in_peft_with_the_fused_logits(ws):
    out = build(ws, "exact", "")
    fused = AutoModelForCausalLM.from_pretrained(ws / "fused-exact").eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws / "base"), out).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = fused(ids).logits, peft(ids).logits
    assert (want - got).abs().max().item() <= 1e-5


def test_reduced_rank_reports_the_svd_energy(ws):
    out = build(ws, "rank1", "adapter_rank = 1\n")
    report = json.loads((out / "refactor.json").read_text())["modules"]
    factors = load_file(out / "adapter_model.safetensors")
    for module, delta in combined_deltas(ws).items():
        s = torch.linalg.svdvals(delta.double())
        energy = (s[0] ** 2 / (s**2).sum()).item()
        assert report[module]["rank"] == 1
        assert report[module]["energy"] == pytest.approx(energy, rel=1e-5)
        assert factors[f"base_model.model.{module}.lora_A.weight"].shape[0] == 1


def test_energy_picks_the_smallest_rank_that_keeps_it(ws):
    out = build(ws, "energy", "adapter_energy = 0.9\n")
    report = json.loads((out / "refactor.json").read_text())["modules"]
    for module, delta in combined_deltas(ws).items():
        s2 = torch.linalg.svdvals(delta.double()) ** 2
        kept = torch.cumsum(s2, 0) / s2.sum()
        want = int((kept < 0.9 - 1e-12).sum().item()) + 1
        assert report[module]["rank"] == want, module
        assert report[module]["energy"] >= 0.9 - 1e-6


@pytest.fixture(scope="module")
def extracted(ws) -> Path:
    """One full model as the only source: its delta from the base, factored at rank 4 (what
    mergekit-extract-lora does). The fine-tune is the base with adapter `one` merged by PEFT."""
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws / "base"), ws / "one")
    peft.merge_and_unload().save_pretrained(ws / "tuned")
    recipe = ws / "extract.toml"
    recipe.write_text('[base]\npath = "base"\n[[adapter]]\npath = "tuned"\n[output]\npath = "fused-extract"\n'
                      'adapter = "lora-extract"\nadapter_rank = 4\n')
    modelforge("build", recipe, "--quiet")
    return ws / "lora-extract"


def test_extracting_an_adapter_from_a_full_fine_tune(ws, extracted):
    out = extracted
    factors = load_file(out / "adapter_model.safetensors")
    report = json.loads((out / "refactor.json").read_text())
    base, tuned = load_file(ws / "base" / "model.safetensors"), load_file(ws / "tuned" / "model.safetensors")
    for module, entry in report["modules"].items():
        delta = tuned[f"{module}.weight"] - base[f"{module}.weight"]
        if delta.abs().max() == 0:
            continue
        # The fine-tune's delta has rank 4 (r of adapter `one`): rank 4 keeps all of it.
        assert entry["energy"] == pytest.approx(1.0, abs=1e-5), module
        b, a = factors[f"base_model.model.{module}.lora_B.weight"], factors[f"base_model.model.{module}.lora_A.weight"]
        assert (b @ a - delta).abs().max().item() <= 1e-5 * delta.abs().max().item() + 1e-7, module
    # Norms changed nowhere, but they are full-model deltas without a LoRA form: named, not dropped.
    assert all("norm" in name for name in report["not_in_adapter"])
    extracted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws / "base"), out).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(ws / "tuned").eval()(ids).logits
        got = extracted(ids).logits
    assert (want - got).abs().max().item() <= 1e-4


def test_extraction_agrees_with_mergekit_extract_lora(ws, extracted):
    """mergekit-extract-lora on the same fine-tune, same rank: the two adapters, merged by peft,
    give the same weights (the factors may be split differently between A and B)."""
    import sys

    out = ws / "mergekit-extract"
    tool = Path(sys.executable).with_name("mergekit-extract-lora")
    subprocess.run([str(tool), "--model", str(ws / "tuned"), "--base-model", str(ws / "base"),
                    "--out-path", str(out), "--max-rank", "4"], check=True, capture_output=True)

    def merged(adapter: Path) -> dict[str, torch.Tensor]:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ws / "base"), adapter)
        return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}

    ours, theirs = merged(extracted), merged(out)
    assert set(ours) == set(theirs)
    for name, want in theirs.items():
        assert (ours[name] - want).abs().max().item() <= 1e-5 * max(want.abs().max().item(), 1e-6), name


def test_a_tied_heads_lora_is_written_as_the_embeddings(tmp_path):
    """A LoRA on a tied model's lm_head changes the one shared tensor (the embedding): the written
    adapter carries it as PEFT's embedding LoRA, and PEFT's merge of it gives the fused model.
    (Unmerged, PEFT applies an embedding LoRA to the lookup only, not to the tied head.)"""
    torch.manual_seed(3)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "lora")
    (tmp_path / "recipe.toml").write_text('[base]\npath = "base"\n[[adapter]]\npath = "lora"\n'
                                         '[output]\npath = "out"\nadapter = "out-lora"\n')
    modelforge("build", tmp_path / "recipe.toml", "--quiet")
    written = load_file(tmp_path / "out-lora" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in written, sorted(written)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                       tmp_path / "out-lora").merge_and_unload().eval()
    with torch.no_grad():
        assert (loaded(ids).logits - fused(ids).logits).abs().max().item() < 1e-4
