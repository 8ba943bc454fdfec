"""A LLaMA adapter fused into bases whose attention (and MLP) projections are fused tensors.

Known answers: the Phi-3 base is the LLaMA base with q/k/v stacked into `qkv_proj` and gate/up
into `gate_up_proj` (the two models give the same logits), so the LLaMA adapter fused into it
must give exactly the Phi-3 layout of LLaMA + adapter, and the same logits. The GPT-NeoX-shaped
base interleaves q/k/v per head in `query_key_value`; the fused tensor must be the per-head
interleave of the LLaMA + adapter projections. Then every fused layout (GPT-NeoX, ChatGLM-6B,
ChatGLM2, Phi-3, GPT-2) against one LLaMA + adapter, weights and attention outputs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from support import REPO, modelforge

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DIMS = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
            rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False)


def llama_with_adapter(ws: Path, kv_heads: int, targets: list[str],
                       dora: bool = False) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny LLaMA, a LoRA (a DoRA adapter, with its magnitudes moved off the weights' norms, when
    `dora`) on `targets`, and PEFT's merge of the two."""
    torch.manual_seed(kv_heads)
    base = ws / f"llama-kv{kv_heads}"
    LlamaForCausalLM(LlamaConfig(num_key_value_heads=kv_heads, **DIMS)).save_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora)
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(base), config)
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
        if "lora_magnitude_vector" in name:
            with torch.no_grad():
                param.mul_(1.0 + 0.3 * torch.rand(param.shape, generator=torch.Generator().manual_seed(7)))
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
    modelforge("build", path, "--quiet")
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
    run = modelforge("build", tmp_path / "neox.toml")
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
        # q and k rows in ChatGLM-6B's 2D rotary convention (see GLM_2D_ROWS below).
        q, k = permuted(q, GLM_2D_ROWS), permuted(mha(k), GLM_2D_ROWS)
        return torch.stack([q.view(heads, head_dim, -1), k.view(heads, head_dim, -1), mha(v).view(heads, head_dim, -1)], 1).reshape(3 * heads * head_dim, -1)

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
    run = modelforge("build", tmp_path / "glm.toml")
    assert "transfer.txt" in run.stderr, run.stderr
    ours = load_file(tmp_path / "out-glm" / "model.safetensors")
    for name, t in want.items():
        assert (ours[name] - t).abs().max().item() <= 1e-6 * t.abs().max().item(), name
    report = json.loads((tmp_path / "out-glm" / "transfer.json").read_text())["modules"]
    assert len(report) == 4 * 7, "every source module is accounted for"
    fate = {r["module"]: r["fate"] for r in report}
    assert fate["model.layers.1.self_attn.q_proj"].startswith("dropped: source layer 1"), fate
    assert "transformer.layers.1.attention.query_key_value" in fate["model.layers.3.self_attn.k_proj"], fate
    assert sum(r["fate"].startswith("dropped") for r in report) == 2 * 7
    assert sum(r["fate"].startswith("skipped") for r in report) == 2, "the two kept layers' gates"


# --- Every fused layout against one LLaMA + adapter -------------------------------------------
#
# Each target model's fused tensors are exactly the LLaMA base's q/k/v (and MLP) rearranged as
# its architecture lays them out; the LLaMA adapter transferred onto it must give exactly the
# same rearrangement of LLaMA + adapter. Then the target's attention, computed from its weights
# the way its own modeling code does (ChatGLM's is remote code, never executed: it is written out
# below from THUDM's modeling_chatglm.py), must equal LLaMA + adapter's attention.
#
# Rotary embeddings: ChatGLM pairs q/k rows differently from LLaMA's rotate_half, so its q and k
# rows are permuted head by head (below, the known answers for head_dim 8). ChatGLM has only
# LLaMA's even-indexed frequencies (base^(-4j/d)); LLaMA's odd pairs land where ChatGLM-6B
# rotates with the block position (0 over a prompt) and ChatGLM2 does not rotate. So ChatGLM's
# attention equals LLaMA + adapter's with the odd frequencies switched off: what the permutation
# can preserve, and only if it is right. GPT-2 has no rotary embedding: compared with LLaMA's
# attention without one.

HEADS, HEAD_DIM, HIDDEN = 4, 8, 32
# LLaMA row r of a head → ChatGLM row: LLaMA pair (i, i + 4) lands on a ChatGLM pair.
GLM_2D_ROWS = [0, 4, 1, 5, 2, 6, 3, 7]  # pairs (0,2) (1,3) | (4,6) (5,7)
INTERLEAVED_ROWS = [0, 4, 2, 6, 1, 5, 3, 7]  # pairs (0,1) (2,3) | second half unrotated
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def heads_of(t, n):
    return t.reshape(n, HEAD_DIM, -1)


def permuted(t, rows):
    """Each head's rows placed as `rows` says: LLaMA row r goes to row rows[r]."""
    h = heads_of(t, t.shape[0] // HEAD_DIM)
    out = torch.empty_like(h)
    out[:, rows] = h
    return out.reshape(t.shape)


def repeated(t, kv):
    """Grouped k/v heads repeated for the query heads they serve."""
    return heads_of(t, kv).repeat_interleave(HEADS // kv, 0).reshape(HEADS * HEAD_DIM, -1)


def per_head(*parts):
    return torch.stack([heads_of(p, HEADS) for p in parts], 1).reshape(len(parts) * HEADS * HEAD_DIM, -1)


def layer_of(w, layer):
    p = f"model.layers.{layer}"
    names = dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                 gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")
    return {k: w[f"{p}.{n}.weight"] for k, n in names.items()}


def to_layout(arch, w, kv, groups=None):
    """The target architecture's tensors holding LLaMA weights `w`, and its config.json;
    ChatGLM2's `groups` (default: kv) repeat each of LLaMA's kv heads for the groups it fills."""
    groups = groups or kv
    out = {}
    for layer in range(2):
        t = layer_of(w, layer)
        if arch == "gpt_neox":
            n = f"gpt_neox.layers.{layer}"
            out[f"{n}.attention.query_key_value.weight"] = per_head(t["q"], repeated(t["k"], kv), repeated(t["v"], kv))
            out[f"{n}.attention.dense.weight"] = t["o"]
            out[f"{n}.mlp.dense_h_to_4h.weight"], out[f"{n}.mlp.dense_4h_to_h.weight"] = t["up"], t["down"]
        elif arch == "chatglm":
            n = f"transformer.layers.{layer}"
            out[f"{n}.attention.query_key_value.weight"] = per_head(
                permuted(t["q"], GLM_2D_ROWS), permuted(repeated(t["k"], kv), GLM_2D_ROWS), repeated(t["v"], kv))
            out[f"{n}.attention.query_key_value.bias"] = torch.zeros(3 * HIDDEN)
            out[f"{n}.attention.dense.weight"] = t["o"]
            out[f"{n}.mlp.dense_h_to_4h.weight"], out[f"{n}.mlp.dense_4h_to_h.weight"] = t["up"], t["down"]
        elif arch == "chatglm2":
            n = f"transformer.encoder.layers.{layer}"
            k, v = (heads_of(t[n], kv).repeat_interleave(groups // kv, 0).reshape(groups * HEAD_DIM, -1) for n in "kv")
            qkv = torch.cat([permuted(t["q"], INTERLEAVED_ROWS), permuted(k, INTERLEAVED_ROWS), v])
            out[f"{n}.self_attention.query_key_value.weight"] = qkv
            out[f"{n}.self_attention.query_key_value.bias"] = torch.zeros(qkv.shape[0])
            out[f"{n}.self_attention.dense.weight"] = t["o"]
            out[f"{n}.mlp.dense_h_to_4h.weight"] = torch.cat([t["gate"], t["up"]])
            out[f"{n}.mlp.dense_4h_to_h.weight"] = t["down"]
        elif arch == "phi3":
            n = f"model.layers.{layer}"
            out[f"{n}.self_attn.qkv_proj.weight"] = torch.cat([t["q"], t["k"], t["v"]])
            out[f"{n}.self_attn.o_proj.weight"] = t["o"]
            out[f"{n}.mlp.gate_up_proj.weight"] = torch.cat([t["gate"], t["up"]])
            out[f"{n}.mlp.down_proj.weight"] = t["down"]
        elif arch == "gpt2":  # Conv1D: (in × out), [Q | K | V] side by side
            n = f"transformer.h.{layer}"
            out[f"{n}.attn.c_attn.weight"] = torch.cat([t["q"], t["k"], t["v"]]).T
            out[f"{n}.attn.c_proj.weight"] = t["o"].T
            out[f"{n}.mlp.c_fc.weight"], out[f"{n}.mlp.c_proj.weight"] = t["up"].T, t["down"].T
    common = dict(hidden_size=HIDDEN, num_attention_heads=HEADS)
    config = {
        "gpt_neox": dict(model_type="gpt_neox", num_hidden_layers=2, intermediate_size=48, rotary_pct=1.0, **common),
        "chatglm": dict(model_type="chatglm", position_encoding_2d=True, num_layers=2, inner_hidden_size=48, **common),
        "chatglm2": dict(model_type="chatglm", num_layers=2, kv_channels=HEAD_DIM, multi_query_attention=True,
                         multi_query_group_num=groups, ffn_hidden_size=48, add_qkv_bias=True, **common),
        "phi3": dict(model_type="phi3", num_hidden_layers=2, num_key_value_heads=kv, intermediate_size=48, **common),
        "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=HIDDEN, n_head=HEADS, n_layer=2, n_inner=48),
    }[arch]
    return out, config


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def llama_rope(x, pos, odd=True, base=10000.0):
    """HF LLaMA's rotary embedding on x [T, heads, d]; `odd=False` switches off the odd pairs."""
    inv_freq = 1.0 / base ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    if not odd:
        inv_freq[1::2] = 0
    angles = torch.cat([pos[:, None] * inv_freq] * 2, -1)[:, None, :]
    return x * angles.cos() + rotate_half(x) * angles.sin()


def glm_2d_rope(x, pos, base=10000.0):
    """ChatGLM-6B's 2D rotary: rotate_half within each half of a head, the first half with the
    position ids, the second with the block position ids (0 over a prompt)."""
    dim = HEAD_DIM // 2
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    def rope(x, p):
        angles = torch.cat([p[:, None] * inv_freq] * 2, -1)[:, None, :]
        return x * angles.cos() + rotate_half(x) * angles.sin()

    x1, x2 = x.chunk(2, -1)
    return torch.cat([rope(x1, pos), rope(x2, torch.zeros_like(pos))], -1)


def glm2_rope(x, pos, base=10000.0):
    """ChatGLM2/3's rotary: adjacent pairs of the first half of each head; the rest passes."""
    n_elem = HEAD_DIM // 2
    theta = 1.0 / base ** (torch.arange(0, n_elem, 2, dtype=torch.float64) / n_elem)
    angles = pos[:, None] * theta  # [T, d/4]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    rot, rest = x[..., :n_elem], x[..., n_elem:]
    pairs = rot.reshape(*rot.shape[:-1], n_elem // 2, 2)
    out = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return torch.cat([out.flatten(-2), rest], -1)


def attention(x, q, k, v, o, rope):
    """Causal multi-head attention of x [T, hidden] from (out × in) projections; k/v may have
    fewer heads than q (grouped-query)."""
    T = x.shape[0]
    pos = torch.arange(T, dtype=torch.float64)
    qh, kh, vh = (x @ w.T for w in (q, k, v))
    qh, kh, vh = (t.reshape(T, -1, HEAD_DIM) for t in (qh, kh, vh))
    qh, kh = rope(qh, pos), rope(kh, pos)
    group = HEADS // kh.shape[1]
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    scores = torch.einsum("thd,shd->hts", qh, kh) / HEAD_DIM ** 0.5
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    out = torch.einsum("hts,shd->thd", scores.softmax(-1), vh).reshape(T, -1)
    return out @ o.T


def target_attention(arch, w, layer, x, kv):
    """The attention of layer `layer` of a model of `arch` with weights `w`, split as its own
    modeling code splits its fused tensors."""
    d = torch.float64
    if arch == "gpt_neox":
        qkv = w[f"gpt_neox.layers.{layer}.attention.query_key_value.weight"].to(d).reshape(HEADS, 3, HEAD_DIM, -1)
        q, k, v = (qkv[:, i].reshape(HIDDEN, -1) for i in range(3))
        return attention(x, q, k, v, w[f"gpt_neox.layers.{layer}.attention.dense.weight"].to(d), llama_rope)
    if arch == "chatglm":
        qkv = w[f"transformer.layers.{layer}.attention.query_key_value.weight"].to(d).reshape(HEADS, 3, HEAD_DIM, -1)
        q, k, v = (qkv[:, i].reshape(HIDDEN, -1) for i in range(3))
        return attention(x, q, k, v, w[f"transformer.layers.{layer}.attention.dense.weight"].to(d), glm_2d_rope)
    if arch == "chatglm2":
        n = f"transformer.encoder.layers.{layer}.self_attention"
        q, k, v = w[f"{n}.query_key_value.weight"].to(d).split([HIDDEN, kv * HEAD_DIM, kv * HEAD_DIM])
        return attention(x, q, k, v, w[f"{n}.dense.weight"].to(d), glm2_rope)
    if arch == "phi3":
        n = f"model.layers.{layer}.self_attn"
        q, k, v = w[f"{n}.qkv_proj.weight"].to(d).split([HIDDEN, kv * HEAD_DIM, kv * HEAD_DIM])
        return attention(x, q, k, v, w[f"{n}.o_proj.weight"].to(d), llama_rope)
    if arch == "gpt2":
        n = f"transformer.h.{layer}.attn"
        q, k, v = w[f"{n}.c_attn.weight"].to(d).T.split([HIDDEN] * 3)
        return attention(x, q, k, v, w[f"{n}.c_proj.weight"].to(d).T, lambda t, pos: t)
    raise ValueError(arch)


def reference_attention(arch, merged, layer, x):
    """LLaMA + adapter's attention, with the rotary frequencies the target can hold."""
    t = {k: v.to(torch.float64) for k, v in layer_of(merged, layer).items()}
    rope = {
        "chatglm": lambda y, pos: llama_rope(y, pos, odd=False),
        "chatglm2": lambda y, pos: llama_rope(y, pos, odd=False),
        "gpt2": lambda y, pos: y,
    }.get(arch, llama_rope)
    return attention(x, t["q"], t["k"], t["v"], t["o"], rope)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", ["gpt_neox", "chatglm", "chatglm2", "phi3", "gpt2"])
def test_llama_adapter_into_every_fused_layout(tmp_path, arch, dora):
    # GPT-2's c_attn stacks full-height K and V: it takes a multi-head LLaMA only. A DoRA adapter's
    # magnitudes go with their rows: each row of a module's part is scaled as in the LLaMA.
    kv = 4 if arch == "gpt2" else 2
    base, adapter, merged = llama_with_adapter(tmp_path, kv, SEVEN, dora)
    fused_base, config = to_layout(arch, load_file(base / "model.safetensors"), kv)
    want, _ = to_layout(arch, merged, kv)
    (tmp_path / arch).mkdir()
    save_file({k: v.contiguous() for k, v in fused_base.items()}, tmp_path / arch / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / arch / "config.json").write_text(json.dumps(config))
    (tmp_path / f"{arch}.toml").write_text(
        f'[base]\npath = "{arch}"\n[[adapter]]\npath = "{adapter.name}"\n[output]\npath = "out-{arch}"\n')
    modelforge("build", tmp_path / f"{arch}.toml", "--quiet")

    ours = load_file(tmp_path / f"out-{arch}" / "model.safetensors")
    assert set(ours) == set(want)
    for name, t in want.items():
        assert (ours[name] - t).abs().max().item() <= 1e-6 * max(t.abs().max().item(), 1.0), name

    x = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for layer in range(2):
        got, ref = target_attention(arch, ours, layer, x, kv), reference_attention(arch, merged, layer, x)
        assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), (arch, layer)

    report = {r["module"]: r["fate"] for r in json.loads((tmp_path / f"out-{arch}" / "transfer.json").read_text())["modules"]}
    q_fate = report["model.layers.0.self_attn.q_proj"]
    if arch.startswith("chatglm"):
        convention = "glm_2d" if arch == "chatglm" else "interleaved_first_half"
        assert f"rows permuted from `half` into `{convention}` rotary pairs" in q_fate, q_fate
        assert "rotary" not in report["model.layers.0.self_attn.v_proj"]
    else:
        assert "rotary" not in q_fate, q_fate
    if arch == "gpt2":
        assert "as columns" in q_fate, q_fate


def test_fewer_kv_heads_fill_chatglm2_groups(tmp_path):
    """A LLaMA with one kv head into a ChatGLM2 base with 2 query groups, each holding LLaMA's
    head: the adapter's k and v fill both groups, and attention matches."""
    base, adapter, merged = llama_with_adapter(tmp_path, 1, SEVEN)
    fused, config = to_layout("chatglm2", load_file(base / "model.safetensors"), 1, groups=2)
    want, _ = to_layout("chatglm2", merged, 1, groups=2)
    (tmp_path / "glm2").mkdir()
    save_file({k: v.contiguous() for k, v in fused.items()}, tmp_path / "glm2" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "glm2" / "config.json").write_text(json.dumps(config))
    (tmp_path / "r.toml").write_text(f'[base]\npath = "glm2"\n[[adapter]]\npath = "{adapter.name}"\n[output]\npath = "out"\n')
    modelforge("build", tmp_path / "r.toml", "--quiet")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    for name, t in want.items():
        assert (ours[name] - t).abs().max().item() <= 1e-6 * max(t.abs().max().item(), 1.0), name
    x = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for layer in range(2):
        got, ref = target_attention("chatglm2", ours, layer, x, 2), reference_attention("chatglm2", merged, layer, x)
        assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), layer


def test_grouped_kv_heads_that_do_not_fit_a_chatglm2_base(tmp_path):
    """A multi-head LLaMA adapter (4 kv heads) into a ChatGLM2 base with 2 query groups: its k
    and v cannot be placed exactly, and the build says so."""
    base, adapter, merged = llama_with_adapter(tmp_path, 4, ["k_proj"])
    fused, config = to_layout("chatglm2", load_file(base / "model.safetensors"), 4)
    config["multi_query_group_num"] = 2
    for name in list(fused):
        if name.endswith("query_key_value.weight"):
            fused[name] = fused[name][: HIDDEN + 2 * 2 * HEAD_DIM]
        if name.endswith("query_key_value.bias"):
            fused[name] = fused[name][: HIDDEN + 2 * 2 * HEAD_DIM]
    (tmp_path / "glm2").mkdir()
    save_file({k: v.contiguous() for k, v in fused.items()}, tmp_path / "glm2" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "glm2" / "config.json").write_text(json.dumps(config))
    (tmp_path / "r.toml").write_text(f'[base]\npath = "glm2"\n[[adapter]]\npath = "{adapter.name}"\n[output]\npath = "out"\n')
    run = modelforge("build", tmp_path / "r.toml", check=False)
    assert run.returncode != 0
    assert "has 4 key/value heads" in run.stderr and "has 2" in run.stderr, run.stderr


# --- `dims = "align"` into fused layouts --------------------------------------------------------
#
# Aligning a LLaMA adapter onto the LLaMA's own weights in another layout: the residual map (from
# the shared embedding) and every inner map (from the module's two weights, the target's rows
# gathered from its fused tensor in the adapter's rotary convention) come out as the identity, so
# the aligned transfer must give the exact one, to f32 rounding: the known answer that pins where
# an aligned delta lands in a fused tensor.

EMBEDDING = {"gpt_neox": "gpt_neox.embed_in.weight", "chatglm": "transformer.word_embeddings.weight",
             "chatglm2": "transformer.embedding.word_embeddings.weight", "phi3": "model.embed_tokens.weight",
             "gpt2": "transformer.wte.weight"}


@pytest.mark.parametrize("arch", ["gpt_neox", "chatglm", "chatglm2", "phi3", "gpt2"])
def test_align_into_a_relayout_of_the_source_is_the_exact_transfer(tmp_path, arch):
    kv = 4 if arch == "gpt2" else 2
    base, adapter, merged = llama_with_adapter(tmp_path, kv, SEVEN)
    llama = load_file(base / "model.safetensors")
    fused_base, config = to_layout(arch, llama, kv)
    fused_base[EMBEDDING[arch]] = llama["model.embed_tokens.weight"]
    want, _ = to_layout(arch, merged, kv)
    (tmp_path / arch).mkdir()
    save_file({k: v.contiguous() for k, v in fused_base.items()}, tmp_path / arch / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / arch / "config.json").write_text(json.dumps(config))
    (tmp_path / "r.toml").write_text(
        f'[base]\npath = "{arch}"\n[[adapter]]\npath = "{adapter.name}"\nsource = "{base.name}"\n'
        '[adapter.map]\ndims = "align"\n[output]\npath = "out"\n')
    modelforge("build", tmp_path / "r.toml")

    ours = load_file(tmp_path / "out" / "model.safetensors")
    for name, t in want.items():
        base_t = fused_base[name]
        delta = (t - base_t).abs().max().item()
        assert (ours[name] - t).abs().max().item() <= 1e-4 * max(delta, 1e-6), name
    report = json.loads((tmp_path / "out" / "transfer.json").read_text())["modules"]
    aligned = [r for r in report if "dims" in r]
    assert len(aligned) == (14 if arch in ("phi3", "chatglm2") else 12), report
    for r in aligned:
        assert r["dims"].startswith("align rank 4"), r
        assert abs(r["energy"] - 1) < 1e-4 and r["overlap"] > 0.999, r
    q = next(r for r in report if r["module"] == "model.layers.0.self_attn.q_proj")
    if arch.startswith("chatglm"):
        assert "rotary pairs" in q["fate"], q


def test_shipped_recipe_carries_llama_into_a_narrower_chatglm(tmp_path):
    """recipes/llama-to-narrower-chatglm.toml on the shipped fixtures: the LLaMA adapter (2
    layers, width 64, 4 heads) into a ChatGLM-6B-shaped base of 1 layer, width 48 and 3 heads,
    made from the LLaMA by a known rotation and cut of its residual stream and by dropping its
    last head (examples/make_chatglm_example.py). The report accounts for every source module,
    and each aligned delta is close to the ideal one: the LLaMA delta carried through that same
    rotation, cut and rotary permutation."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_chatglm", REPO / "examples" / "make_chatglm_example.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)

    recipe = tmp_path / "recipe.toml"
    text = (REPO / "recipes" / "llama-to-narrower-chatglm.toml").read_text().replace("../", f"{REPO}/")
    recipe.write_text(text.replace(f'{REPO}/build/llama-to-narrower-chatglm', str(tmp_path / "out")))
    modelforge("build", recipe)
    report = json.loads((tmp_path / "out" / "transfer.json").read_text())["modules"]
    assert len(report) == 2 * 7, "every source module is accounted for"
    fate = {r["module"]: r for r in report}
    assert sum(r["fate"].startswith("dropped: source layer 1") for r in report) == 7, report
    assert fate["model.layers.0.mlp.gate_proj"]["fate"].startswith("skipped"), fate

    config = json.loads((REPO / "examples" / "tiny-llama" / "config.json").read_text())
    heads, kv, d = 3, config["num_key_value_heads"], config["head_dim"]
    basis = make.narrow_basis(config["hidden_size"]).double()
    lora = load_file(REPO / "examples" / "tiny-llama-lora" / "adapter_model.safetensors")
    lora_config = json.loads((REPO / "examples" / "tiny-llama-lora" / "adapter_config.json").read_text())
    scaling = lora_config["lora_alpha"] / lora_config["r"]

    def delta(module):
        p = f"base_model.model.model.layers.0.{module}"
        return scaling * lora[f"{p}.lora_B.weight"].double() @ lora[f"{p}.lora_A.weight"].double()

    glm_2d = [(i % 2) * (d // 2) + i // 2 + e * (d // 4) for e in range(2) for i in range(d // 2)]

    def rows(t, rotary):  # into ChatGLM's 2D rotary rows, then the first `heads` heads
        h = t.reshape(-1, d, t.shape[1])
        if rotary:
            out = torch.empty_like(h)
            out[:, glm_2d] = h
            h = out
        return h[:heads].reshape(heads * d, -1)

    mha = lambda t: t.reshape(kv, 1, d, -1).expand(kv, 2, d, t.shape[1]).reshape(-1, t.shape[1])  # noqa: E731
    ideal = {
        "self_attn.q_proj": rows(delta("self_attn.q_proj"), True) @ basis,
        "self_attn.k_proj": rows(mha(delta("self_attn.k_proj")), True) @ basis,
        "self_attn.v_proj": rows(mha(delta("self_attn.v_proj")), False) @ basis,
        "self_attn.o_proj": basis.T @ delta("self_attn.o_proj")[:, : heads * d],
        "mlp.up_proj": delta("mlp.up_proj") @ basis,
        "mlp.down_proj": basis.T @ delta("mlp.down_proj"),
    }
    base = load_file(REPO / "examples" / "tiny-chatglm-narrow" / "model.safetensors")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    got = {k: (ours[k].double() - base[k].double()) for k in base}
    n = "transformer.layers.0"
    qkv = got[f"{n}.attention.query_key_value.weight"].reshape(heads, 3, d, -1)
    got = {
        "self_attn.q_proj": qkv[:, 0].reshape(heads * d, -1), "self_attn.k_proj": qkv[:, 1].reshape(heads * d, -1),
        "self_attn.v_proj": qkv[:, 2].reshape(heads * d, -1), "self_attn.o_proj": got[f"{n}.attention.dense.weight"],
        "mlp.up_proj": got[f"{n}.mlp.dense_h_to_4h.weight"], "mlp.down_proj": got[f"{n}.mlp.dense_4h_to_h.weight"],
    }
    cosines = {m: torch.nn.functional.cosine_similarity(got[m].flatten(), ideal[m].flatten(), 0).item() for m in ideal}
    energies = {m: fate[f"model.layers.0.{m}"]["energy"] for m in ideal}
    overlaps = {m: fate[f"model.layers.0.{m}"]["overlap"] for m in ideal}
    print("narrower ChatGLM: cosines with the ideal", cosines, "energy", energies, "overlap", overlaps)
    # The MLP keeps its inner width, so its inner maps are exact: the ideal, to f32 rounding.
    assert min(cosines["mlp.up_proj"], cosines["mlp.down_proj"]) >= 0.9999, cosines
    # Attention loses a head: each inner map is fitted on weights whose residual side was cut,
    # and is only near the ideal head selection (measured: q 0.80, o 0.85, k 0.98, v 0.99).
    assert min(cosines.values()) >= 0.75, cosines
    # A related pair (unrelated bases score 0.25-0.36, tests/peers/test_dims.py).
    assert min(overlaps.values()) >= 0.8, overlaps
    # The retained energy agrees with the ideal's, but for k and v: the ideal repeats one of
    # LLaMA's two kv heads for ChatGLM's third head, which an orthogonal map cannot do.
    for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        want = (ideal[m].norm() / delta(m).norm()).item()
        assert abs(energies[m] - want) <= 0.1 * want, (m, energies[m], want)
