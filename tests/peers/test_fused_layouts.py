"""A LLaMA adapter fused into bases whose attention (and MLP) projections are fused tensors.

Known answers: the Phi-3 base is the LLaMA base with q/k/v stacked into `qkv_proj` and gate/up
into `gate_up_proj` (the two models give the same logits), so the LLaMA adapter fused into it
must give exactly the Phi-3 layout of LLaMA + adapter, and the same logits. The GPT-NeoX-shaped
base interleaves q/k/v per head in `query_key_value`; the fused tensor must be the per-head
interleave of the LLaMA + adapter projections.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("MODELFORGE_BIN", REPO / "target" / "debug" / "modelforge"))
DIMS = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
            rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False)


def llama_with_adapter(ws: Path, kv_heads: int, targets: list[str]) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny LLaMA, a LoRA on `targets`, and PEFT's merge of the two."""
    torch.manual_seed(kv_heads)
    base = ws / f"llama-kv{kv_heads}"
    LlamaForCausalLM(LlamaConfig(num_key_value_heads=kv_heads, **DIMS)).save_pretrained(base)
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    adapter = ws / f"lora-kv{kv_heads}"
    peft.save_pretrained(adapter)
    merged = {k: v.detach().clone() for k, v in peft.merge_and_unload().state_dict().items()}
    return base, adapter, merged


def to_phi3(llama: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in llama.items():
        if ".self_attn.q_proj." in name:
            p = name.replace(".q_proj.", ".")
            out[name.replace("q_proj", "qkv_proj")] = torch.cat([t, llama[p.replace("self_attn.", "self_attn.k_proj.")],
                                                               llama[p.replace("self_attn.", "self_attn.v_proj.")]])
        elif ".mlp.gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, llama[name.replace("gate_proj", "up_proj")]])
        elif not any(k in name for k in (".k_proj.", ".v_proj.", ".up_proj.")):
            out[name] = t
    return out


def recipe(ws: Path, name: str, base: Path, adapter: Path) -> Path:
    path = ws / f"{name}.toml"
    path.write_text(f'[base]\npath = "{base.name}"\n[[adapter]]\npath = "{adapter.name}"\n[output]\npath = "out-{name}"\n')
    subprocess.run([str(BIN), "build", str(path), "--quiet"], check=True)
    return ws / f"out-{name}"


def test_llama_adapter_into_phi3(tmp_path):
    base, adapter, merged = llama_with_adapter(tmp_path, 2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    llama = LlamaForCausalLM.from_pretrained(base)
    phi3 = Phi3ForCausalLM(Phi3Config(num_key_value_heads=2, pad_token_id=0, **DIMS)).eval()
    phi3.load_state_dict(to_phi3(llama.state_dict()))
    phi3.save_pretrained(tmp_path / "phi3")
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (phi3(ids).logits - llama.eval()(ids).logits).abs().max() < 1e-5, "the two bases are the same model"

    out = recipe(tmp_path, "phi3", tmp_path / "phi3", adapter)
    ours = load_file(out / "model.safetensors")
    want = to_phi3(merged)
    assert set(ours) == set(want)
    for name, t in want.items():
        assert (ours[name] - t).abs().max().item() <= 1e-6 * t.abs().max().item(), name
    fused = Phi3ForCausalLM.from_pretrained(out).eval()
    reference = LlamaForCausalLM.from_pretrained(base)
    reference.load_state_dict(merged)
    with torch.no_grad():
        assert (fused(ids).logits - reference.eval()(ids).logits).abs().max().item() <= 1e-5


def test_llama_adapter_into_gpt_neox_layout(tmp_path):
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base, adapter, merged = llama_with_adapter(tmp_path, 4, seven)
    llama = load_file(base / "model.safetensors")
    heads, head_dim = 4, 8

    def interleave(q, k, v):
        # [q_h; k_h; v_h] for each head h, as GPT-NeoX lays out query_key_value.
        return torch.stack([q.view(heads, head_dim, -1), k.view(heads, head_dim, -1), v.view(heads, head_dim, -1)], 1).reshape(3 * heads * head_dim, -1)

    neox, want = {}, {}
    for layer in range(2):
        p, n = f"model.layers.{layer}.self_attn", f"gpt_neox.layers.{layer}.attention"
        neox[f"{n}.query_key_value.weight"] = interleave(llama[f"{p}.q_proj.weight"], llama[f"{p}.k_proj.weight"], llama[f"{p}.v_proj.weight"])
        neox[f"{n}.dense.weight"] = llama[f"{p}.o_proj.weight"]
        want[f"{n}.query_key_value.weight"] = interleave(merged[f"{p}.q_proj.weight"], merged[f"{p}.k_proj.weight"], merged[f"{p}.v_proj.weight"])
        want[f"{n}.dense.weight"] = merged[f"{p}.o_proj.weight"]
        # The non-gated MLP takes LLaMA's up and down projections (same widths here).
        m, lm = f"gpt_neox.layers.{layer}.mlp", f"model.layers.{layer}.mlp"
        neox[f"{m}.dense_h_to_4h.weight"], want[f"{m}.dense_h_to_4h.weight"] = llama[f"{lm}.up_proj.weight"], merged[f"{lm}.up_proj.weight"]
        neox[f"{m}.dense_4h_to_h.weight"], want[f"{m}.dense_4h_to_h.weight"] = llama[f"{lm}.down_proj.weight"], merged[f"{lm}.down_proj.weight"]
    (tmp_path / "neox").mkdir()
    save_file({k: v.contiguous() for k, v in neox.items()}, tmp_path / "neox" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "neox" / "config.json").write_text(json.dumps(
        {"model_type": "gpt_neox", "hidden_size": 32, "num_attention_heads": heads, "num_hidden_layers": 2, "intermediate_size": 48}))
    (tmp_path / "neox.toml").write_text(f'[base]\npath = "neox"\n[[adapter]]\npath = "{adapter.name}"\n[output]\npath = "out-neox"\n')
    run = subprocess.run([str(BIN), "build", str(tmp_path / "neox.toml")], check=True, capture_output=True, text=True)
    # GPT-NeoX's MLP is not gated: the gate has no counterpart and is skipped, with a warning.
    assert "model.layers.1.mlp.gate_proj` (mlp.gate) has no counterpart" in run.stderr, run.stderr
    assert "up_proj` (mlp" not in run.stderr
    ours = load_file(tmp_path / "out-neox" / "model.safetensors")
    for name, t in want.items():
        assert (ours[name] - t).abs().max().item() <= 1e-6 * t.abs().max().item(), name


def test_llama_adapter_into_chatglm_with_fewer_layers(tmp_path):
    """LLaMA (4 layers, grouped-query attention) into a ChatGLM-6B-shaped base of 2 layers with
    `layers = "interpolate"`: target layer 0 takes source layer 0, layer 1 takes layer 3; layers 1
    and 2 are dropped, and the report says so for every module."""
    torch.manual_seed(7)
    dims = dict(DIMS, num_hidden_layers=4)
    base = tmp_path / "llama4"
    LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **dims)).save_pretrained(base)
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules=seven))
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    peft.save_pretrained(tmp_path / "lora4")
    merged = {k: v.detach().clone() for k, v in peft.merge_and_unload().state_dict().items()}
    llama = load_file(base / "model.safetensors")
    heads, head_dim = 4, 8

    def mha(t):  # grouped k/v heads repeated for the query heads they serve (2 each)
        return t.view(2, 1, head_dim, -1).expand(2, 2, head_dim, t.shape[-1]).reshape(heads * head_dim, -1)

    def interleave(q, k, v):
        return torch.stack([q.view(heads, head_dim, -1), mha(k).view(heads, head_dim, -1), mha(v).view(heads, head_dim, -1)], 1).reshape(3 * heads * head_dim, -1)

    glm, want = {}, {}
    for target, source in ((0, 0), (1, 3)):
        p, n = f"model.layers.{source}", f"transformer.layers.{target}"
        for out, src in ((glm, llama), (want, merged)):
            out[f"{n}.attention.query_key_value.weight"] = interleave(src[f"{p}.self_attn.q_proj.weight"], src[f"{p}.self_attn.k_proj.weight"], src[f"{p}.self_attn.v_proj.weight"])
            out[f"{n}.attention.dense.weight"] = src[f"{p}.self_attn.o_proj.weight"]
            out[f"{n}.mlp.dense_h_to_4h.weight"] = src[f"{p}.mlp.up_proj.weight"]
            out[f"{n}.mlp.dense_4h_to_h.weight"] = src[f"{p}.mlp.down_proj.weight"]
        glm[f"{n}.attention.query_key_value.bias"] = torch.zeros(3 * heads * head_dim)
    (tmp_path / "glm").mkdir()
    save_file({k: v.contiguous() for k, v in glm.items()}, tmp_path / "glm" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "glm" / "config.json").write_text(json.dumps({
        "model_type": "chatglm", "position_encoding_2d": True, "hidden_size": 32, "num_attention_heads": heads,
        "num_layers": 2, "inner_hidden_size": 48}))
    (tmp_path / "glm.toml").write_text(
        '[base]\npath = "glm"\n[[adapter]]\npath = "lora4"\nsource = "llama4"\n[adapter.map]\nlayers = "interpolate"\n'
        '[output]\npath = "out-glm"\n')
    run = subprocess.run([str(BIN), "build", str(tmp_path / "glm.toml")], check=True, capture_output=True, text=True)
    assert "transfer.txt" in run.stderr, run.stderr
    ours = load_file(tmp_path / "out-glm" / "model.safetensors")
    for name, t in want.items():
        assert (ours[name] - t).abs().max().item() <= 1e-6 * t.abs().max().item(), name
    report = json.loads((tmp_path / "out-glm" / "transfer.json").read_text())
    assert len(report) == 4 * 7, "every source module is accounted for"
    fate = {r["module"]: r["fate"] for r in report}
    assert fate["model.layers.1.self_attn.q_proj"].startswith("dropped: source layer 1"), fate
    assert "transformer.layers.1.attention.query_key_value" in fate["model.layers.3.self_attn.k_proj"], fate
    assert sum(r["fate"].startswith("dropped") for r in report) == 2 * 7
    assert sum(r["fate"].startswith("skipped") for r in report) == 2, "the two kept layers' gates"
