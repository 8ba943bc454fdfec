"""Width adaptation (`[adapter.map] dims`) against known answers.

The fixtures are made here: a tiny LLaMA whose RMSNorm gains are folded into the linear layers
after them (so every norm has weight 1), a LoRA trained on it for a toy task (a fixed token
mapping), and targets made from it by an orthogonal rotation Q of the residual stream
(SliceGPT-style: E Qᵀ, W_in Qᵀ, Q W_out, functionally the same model), the same rotation sliced
to fewer dimensions (the first rows of Q), a random unrelated LLaMA, and bases narrower and
wider than the source for `truncate` and `pad`.

Known answers: on the rotated target, `align` must give the rotated delta (input-side modules
ΔW Qᵀ, output-side ones Q ΔW); on the sliced one, the energy it reports must be the ideal's,
‖ΔW Q'ᵀ‖/‖ΔW‖; the task loss must survive the rotation; `truncate` and `pad` must crop and
zero-pad ΔW exactly.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from support import modelforge

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INPUT_SIDE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WIDTH, SLICED, VOCAB, RANK = 64, 48, 256, 8
# The toy task: position t must predict MAPPING[x_t], over the first TASK tokens.
TASK = 32


def config(hidden: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, head_dim=16, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-6,
                       max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.1)


def folded_llama(seed: int) -> dict[str, torch.Tensor]:
    """A tiny LLaMA with distinct norm gains, folded into the linear layers that follow them."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config(WIDTH))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    for name in list(state):
        if "norm" in name:
            gain = 1.0 + 0.3 * torch.randn(WIDTH, generator=g)
            state[name] = torch.ones(WIDTH)
            p = name.rsplit(".", 2)[0]
            following = {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                         "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"]}.get(name.split(".")[-2])
            targets = [f"{p}.{m}.weight" for m in following] if following else ["lm_head.weight"]
            for t in targets:
                state[t] = state[t] * gain
    return state


def rotated(state: dict[str, torch.Tensor], q: torch.Tensor) -> dict[str, torch.Tensor]:
    """The residual stream rotated by q (d' × d, orthonormal rows): slicing when d' < d."""
    out = {}
    for name, t in state.items():
        if "norm" in name:
            out[name] = torch.ones(q.shape[0])
        elif any(m in name for m in ("o_proj", "down_proj")):
            out[name] = q @ t
        else:  # embeddings, lm_head, and every module reading the residual stream
            out[name] = t @ q.T
    return out


def save(path: Path, state: dict[str, torch.Tensor], hidden: int) -> Path:
    model = LlamaForCausalLM(config(hidden))
    model.load_state_dict(state)
    model.save_pretrained(path)
    return path


def batch(seed: int, n: int = 64, length: int = 8) -> torch.Tensor:
    return torch.randint(3, 3 + TASK, (n, length), generator=torch.Generator().manual_seed(seed))


MAPPING = torch.arange(VOCAB)
MAPPING[3:3 + TASK] = 3 + torch.randperm(TASK, generator=torch.Generator().manual_seed(11))


def task_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), MAPPING[ids].reshape(-1)).item()


def build(ws: Path, name: str, base: str, dims: str, source: str = "source", extra: str = "") -> subprocess.CompletedProcess:
    (ws / f"{name}.toml").write_text(
        f'[base]\npath = "{base}"\n[[adapter]]\npath = "lora"\nsource = "{source}"\n{extra}'
        f'[adapter.map]\ndims = "{dims}"\n[output]\npath = "out-{name}"\n')
    return modelforge("build", ws / f"{name}.toml", "--cache", ws / "cache", check=False)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("dims")
    source = folded_llama(0)
    save(ws / "source", source, WIDTH)
    q = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=torch.Generator().manual_seed(5)))[0]
    save(ws / "rotated", rotated(source, q), WIDTH)
    save(ws / "sliced", rotated(source, q[:SLICED]), SLICED)
    save(ws / "unrelated", folded_llama(1), WIDTH)
    with torch.no_grad():
        ids = batch(0)
        a = LlamaForCausalLM.from_pretrained(ws / "source").eval()(ids).logits
        b = LlamaForCausalLM.from_pretrained(ws / "rotated").eval()(ids).logits
        assert (a - b).abs().max() < 1e-4, "the rotated target is the same model"

    torch.manual_seed(0)
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(ws / "source"),
                          LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=SEVEN))
    opt = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    for step in range(150):
        ids = batch(100 + step, n=32)
        loss = torch.nn.functional.cross_entropy(peft(input_ids=ids).logits.reshape(-1, VOCAB),
                                                 MAPPING[ids].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft.save_pretrained(ws / "lora")
    with torch.no_grad():
        ws_losses = {"source+adapter": task_loss(peft.eval(), batch(1)),
                     "source": task_loss(LlamaForCausalLM.from_pretrained(ws / "source").eval(), batch(1))}
    (ws / "losses.json").write_text(json.dumps(ws_losses))
    return ws, q


def deltas(ws: Path) -> dict[str, torch.Tensor]:
    """The adapter's ΔW per target weight, in f32."""
    lora = load_file(ws / "lora" / "adapter_model.safetensors")
    scaling = json.loads((ws / "lora" / "adapter_config.json").read_text())["lora_alpha"] / RANK
    out = {}
    for name, a in lora.items():
        if "lora_A" in name:
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[f"{module}.weight"] = scaling * lora[name.replace("lora_A", "lora_B")].float() @ a.float()
    return out


def fused_deltas(ws: Path, out: str, base: str) -> dict[str, torch.Tensor]:
    fused, original = load_file(ws / out / "model.safetensors"), load_file(ws / base / "model.safetensors")
    return {k: fused[k].float() - original[k].float() for k in fused}


def ideal(name: str, delta: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return delta @ q.T if any(m in name for m in INPUT_SIDE) else q @ delta


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.flatten() @ b.flatten() / (a.norm() * b.norm())).item()


def report(ws: Path, out: str) -> dict[str, dict]:
    return {r["module"]: r for r in json.loads((ws / out / "transfer.json").read_text())["modules"]}


def test_align_recovers_a_rotation(ws):
    ws, q = ws
    run = build(ws, "rotated", "rotated", "align")
    assert run.returncode == 0, run.stderr
    assert "`lora`: close to the source (transfer 1.00: energy kept 1.000" in run.stderr, run.stderr
    got = fused_deltas(ws, "out-rotated", "rotated")
    cosines = {name: cosine(got[name], ideal(name, d, q)) for name, d in deltas(ws).items()}
    print("rotation cosines: min", min(cosines.values()))
    assert min(cosines.values()) >= 0.99, cosines
    figures = report(ws, "out-rotated")
    assert all(r["dims"].startswith("align rank 8: 256 shared tokens matched by id") for r in figures.values()), figures
    assert all(r["overlap"] > 0.99 and abs(r["energy"] - 1) < 1e-3 and r["residual_fit"] < 1e-3 for r in figures.values()), figures


def test_align_to_a_sliced_base_keeps_the_ideal_energy(ws):
    ws, q = ws
    run = build(ws, "sliced", "sliced", "align")
    assert run.returncode == 0, run.stderr
    figures = report(ws, "out-sliced")
    got = fused_deltas(ws, "out-sliced", "sliced")
    worst = 0.0
    for name, d in deltas(ws).items():
        want = ideal(name, d, q[:SLICED])
        energy = figures[name.removesuffix(".weight")]["energy"]
        ideal_energy = (want.norm() / d.norm()).item()
        assert abs(energy - ideal_energy) <= 0.05 * ideal_energy, (name, energy, ideal_energy)
        assert cosine(got[name], want) >= 0.99, name
        worst = max(worst, abs(energy - ideal_energy) / ideal_energy)
    print("sliced energies", {k.split("layers.")[1]: round(r["energy"], 4) for k, r in figures.items()},
          "largest relative difference from the ideal", worst)


def test_the_task_survives_the_transfer(ws):
    ws, _ = ws
    losses = json.loads((ws / "losses.json").read_text())
    for name, base, dims in (("task-rotated", "rotated", "align"), ("task-sliced", "sliced", "align"),
                             ("task-truncated", "sliced", "truncate")):
        run = build(ws, name, base, dims)
        assert run.returncode == 0, run.stderr
        with torch.no_grad():
            losses[name] = task_loss(LlamaForCausalLM.from_pretrained(ws / f"out-{name}").eval(), batch(1))
            losses[base] = task_loss(LlamaForCausalLM.from_pretrained(ws / base).eval(), batch(1))
    print("task losses", {k: round(v, 4) for k, v in losses.items()})
    assert losses["source+adapter"] < 0.5 * losses["source"], "the adapter learned the task"
    assert abs(losses["task-rotated"] - losses["source+adapter"]) <= 0.05 * losses["source+adapter"], losses
    assert losses["task-truncated"] > 1.2 * losses["task-sliced"], losses


def test_unrelated_bases_score_low(ws):
    ws, _ = ws
    run = build(ws, "unrelated", "unrelated", "align")
    assert run.returncode == 0, run.stderr
    figures = report(ws, "out-unrelated").values()
    overlaps = [r["overlap"] for r in figures]
    print("unrelated overlaps", min(overlaps), max(overlaps), "fit", next(iter(figures))["residual_fit"])
    assert max(overlaps) < 0.6, overlaps
    assert all(r["residual_fit"] > 0.5 for r in figures)


def test_a_second_adapter_on_the_same_bases_reuses_the_maps(ws):
    ws, _ = ws
    assert build(ws, "again", "rotated", "align").returncode == 0
    count = lambda kind: sum(1 for _ in (ws / "cache" / "v1" / kind).rglob("*") if _.is_file())
    before = count("actions"), count("objects")
    # Another weight: every fused tensor is new, no map or aligned delta is; the new tensors'
    # one object is the output's shard.
    run = build(ws, "weighted", "rotated", "align", extra="weight = 0.5\n")
    assert run.returncode == 0, run.stderr
    assert (count("actions") - before[0], count("objects") - before[1]) == (14, 1)


def test_truncate_and_pad_crop_and_zero_pad_the_delta(ws):
    ws, _ = ws
    torch.manual_seed(3)
    save(ws / "wide", LlamaForCausalLM(config(80)).state_dict(), 80)
    for name, base in (("truncated", "sliced"), ("padded", "wide")):
        run = build(ws, name, base, "truncate" if name == "truncated" else "pad")
        assert run.returncode == 0, run.stderr
        got = fused_deltas(ws, f"out-{name}", base)
        figures = report(ws, f"out-{name}")
        for tensor, d in deltas(ws).items():
            want = torch.zeros_like(got[tensor])
            rows, cols = min(d.shape[0], want.shape[0]), min(d.shape[1], want.shape[1])
            want[:rows, :cols] = d[:rows, :cols]
            assert (got[tensor] - want).abs().max() <= 1e-6 * d.abs().max() + 1e-7, tensor
            energy = figures[tensor.removesuffix(".weight")]["energy"]
            assert abs(energy - (want.norm() / d.norm()).item()) < 1e-5, (tensor, energy)
    refused = build(ws, "too-wide", "wide", "truncate")
    assert refused.returncode != 0 and "cannot widen" in " ".join(refused.stderr.replace("│", " ").split()), refused.stderr


def test_tokens_are_matched_by_string(ws):
    """A rotated target whose vocabulary numbers the same tokens differently: with both
    tokenizer.json files, the residual map comes from the tokens' strings, not their ids."""
    ws, q = ws
    import shutil
    order = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(9))
    state = load_file(ws / "rotated" / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        permuted = torch.empty_like(state[name])
        permuted[order] = state[name]
        state[name] = permuted
    shutil.copytree(ws / "source", ws / "source-tok")
    save(ws / "renumbered", state, WIDTH)
    vocab = lambda ids: json.dumps({"model": {"type": "BPE", "vocab": {f"t{i}": int(ids[i]) for i in range(VOCAB)}}})
    (ws / "source-tok" / "tokenizer.json").write_text(vocab(range(VOCAB)))
    (ws / "renumbered" / "tokenizer.json").write_text(vocab(order))
    run = build(ws, "renumbered", "renumbered", "align", source="source-tok")
    assert run.returncode == 0, run.stderr
    figures = report(ws, "out-renumbered")
    assert all("256 shared tokens matched by string" in r["dims"] for r in figures.values()), figures
    got = fused_deltas(ws, "out-renumbered", "renumbered")
    assert min(cosine(got[n], ideal(n, d, q)) for n, d in deltas(ws).items()) >= 0.99


def test_tokens_are_matched_through_a_sentencepiece_model(ws):
    """A rotated target that has no tokenizer.json but a SentencePiece model, as ChatGLM-6B
    ships it (`ice_text.model`), numbering the tokens differently and after 16 reserved rows
    (`num_image_tokens` in tokenizer_config.json): the model file is written by the
    sentencepiece package's own protobuf classes, and the residual map must still pair each
    token's rows."""
    ws, q = ws
    import shutil
    from sentencepiece import sentencepiece_model_pb2 as sp_model
    reserved = 16
    order = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(10))
    state = load_file(ws / "rotated" / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        moved = torch.randn(VOCAB + reserved, WIDTH, generator=torch.Generator().manual_seed(12))
        moved[reserved + order] = state[name]
        state[name] = moved
    target = ws / "sentencepiece"
    shutil.copytree(ws / "rotated", target)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    model = sp_model.ModelProto()
    for token in order.argsort().tolist():  # piece j is the token that `order` sends to j
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = f"t{token}", -float(token), 1
    (target / "ice_text.model").write_bytes(model.SerializeToString())
    (target / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": reserved}))
    if not (ws / "source-tok").exists():
        shutil.copytree(ws / "source", ws / "source-tok")
    vocab = {"model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(VOCAB)}}}
    (ws / "source-tok" / "tokenizer.json").write_text(json.dumps(vocab))
    run = build(ws, "sentencepiece", "sentencepiece", "align", source="source-tok")
    assert run.returncode == 0, run.stderr
    figures = report(ws, "out-sentencepiece")
    assert all("256 shared tokens matched by string (tokenizer.json, ice_text.model)" in r["dims"]
               for r in figures.values()), figures
    assert all(r["residual_fit"] < 1e-3 for r in figures.values()), figures
    got = fused_deltas(ws, "out-sentencepiece", "sentencepiece")
    assert min(cosine(got[n], ideal(n, d, q)) for n, d in deltas(ws).items()) >= 0.99


def test_alignment_is_deterministic(ws):
    """The same inputs give the same bytes, from an empty cache too."""
    ws, _ = ws
    assert build(ws, "twice", "sliced", "align").returncode == 0
    (ws / "twice.toml").write_text((ws / "twice.toml").read_text().replace("out-twice", "out-twice2"))
    modelforge("build", ws / "twice.toml", "--cache", ws / "fresh-cache")
    for file in ("model.safetensors", "transfer.json"):
        assert (ws / "out-twice" / file).read_bytes() == (ws / "out-twice2" / file).read_bytes(), file


def test_an_adapter_alone_for_the_target(ws):
    """`[output] adapter` without `path`: the transferred delta as a PEFT adapter of the target,
    which peft loads onto the target base to give the fused model's logits and the task."""
    ws, _ = ws
    from peft import PeftModel

    (ws / "adapter-only.toml").write_text(
        '[base]\npath = "rotated"\n[[adapter]]\npath = "lora"\nsource = "source"\n'
        '[adapter.map]\ndims = "align"\n[output]\nadapter = "lora-rotated"\n')
    run = modelforge("build", ws / "adapter-only.toml", "--cache", ws / "cache", "--json")
    summary = json.loads(run.stdout)
    written = sorted(p.name for p in (ws / "lora-rotated").iterdir())
    assert written == ["adapter_config.json", "adapter_model.safetensors", "refactor.json",
                       "transfer.json", "transfer.txt"], written
    assert summary["nodes"]["computed"] == 14, summary["nodes"]  # the re-factored deltas only
    assert build(ws, "task-rotated", "rotated", "align").returncode == 0
    with torch.no_grad():
        ids = batch(1)
        fused = LlamaForCausalLM.from_pretrained(ws / "out-task-rotated").eval()(ids).logits
        loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(ws / "rotated"),
                                           ws / "lora-rotated").eval()
        assert (loaded(ids).logits - fused).abs().max() < 1e-4
        losses = json.loads((ws / "losses.json").read_text())
        loss = task_loss(loaded, ids)
    assert abs(loss - losses["source+adapter"]) <= 0.05 * losses["source+adapter"], (loss, losses)
    # The build is recorded like any other: a second one does nothing.
    again = modelforge("build", ws / "adapter-only.toml", "--cache", ws / "cache", "--json")
    assert json.loads(again.stdout)["up_to_date"] is True
