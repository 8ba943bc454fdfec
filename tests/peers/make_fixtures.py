#!/usr/bin/env python3
"""Deterministic fixtures for modelforge's peer tests.

Writes, under OUT (default <repo>/target/peers), one folder per case:

    <case>/models/<base-name>/        tiny HF model (config.json + safetensors, sharded for one case)
    <case>/adapters/<adapter-name>/   PEFT LoRA adapter(s), really trained for a few optimizer steps
    <case>/recipe.toml                the modelforge recipe (output -> <case>/out)
    <case>/ref/                       reference merged model: PEFT merge_and_unload() + save_pretrained
                                      (the "rules" case, which PEFT cannot express, is computed by hand)
    <case>/ref32.safetensors          exact f32 reference: W.float() + sum_i w_i * delta_i, never rounded
                                      (every checkpoint tensor, keyed like the checkpoint)
    cases.json                        what the tests need to know about every case

Every model is built from a config in code; nothing is fetched from a hub.
Run:  .venv/bin/python tests/peers/make_fixtures.py [OUT]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Two cores shared with cargo: OpenMP spin-waiting on a busy machine makes tiny models ~100x slower.
torch.set_num_threads(1)

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import ModulesToSaveWrapper  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "target" / "peers"
FORMAT_VERSION = 1  # bump when the layout of cases.json changes

VOCAB = 256
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------------
# models


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Norm gains are ones and biases zeros at init; make them distinct so any mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)


def tiny_llama(seed: int, layers: int = 2, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: k/v are 64 -> 32
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    m = LlamaForCausalLM(cfg)
    _perturb(m, seed + 1000)
    return m.eval()


def tiny_qwen2(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=True,  # like the small Qwen2 checkpoints
        bos_token_id=1,
        eos_token_id=2,
    )
    m = Qwen2ForCausalLM(cfg)
    _perturb(m, seed + 1000)  # gives q/k/v their (otherwise zero) biases
    return m.eval()


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    m = GPT2LMHeadModel(cfg)
    _perturb(m, seed + 1000)
    return m.eval()


def write_tokenizer(dest: Path) -> None:
    """A small word-level tokenizer (tokenizer.json + tokenizer_config.json), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(dest))


def save_model(model, dest: Path, dtype: str, shard: str | None = None, tokenizer: bool = False) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    m = copy.deepcopy(model).to(DTYPES[dtype])
    kw = {"max_shard_size": shard} if shard else {}
    m.save_pretrained(str(dest), **kw)
    if tokenizer:
        write_tokenizer(dest)


# --------------------------------------------------------------------------------------------
# adapters


def _batches(seed: int, steps: int, batch: int = 8, seq: int = 24):
    """A learnable stream: x[t+1] = (a*x[t] + c) mod V, a and c fixed per seed, random starts."""
    g = torch.Generator().manual_seed(seed)
    a = int(torch.randint(2, 9, (1,), generator=g)) * 2 + 1
    c = int(torch.randint(1, VOCAB, (1,), generator=g))
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (batch, 1), generator=g)
        cols = [x]
        for _ in range(seq - 1):
            cols.append((cols[-1] * a + c) % VOCAB)
        yield torch.cat(cols, dim=1)


def train_adapter(model, config: LoraConfig, seed: int, dest: Path, steps: int = 12, lr: float = 5e-3,
                  save_kwargs: dict | None = None) -> dict:
    """Trains a LoRA on a copy of `model` (f32) for a few AdamW steps and saves it with PEFT."""
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model).float().train(), config)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for ids in _batches(seed, steps):
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(out.loss.item(), 4))
    if dest.exists():
        shutil.rmtree(dest)
    pm.save_pretrained(str(dest), **(save_kwargs or {}))
    # PEFT writes target_modules from a set, in hash order (varies with PYTHONHASHSEED): sort it.
    acfg = json.loads((dest / "adapter_config.json").read_text())
    if isinstance(acfg.get("target_modules"), list):
        acfg["target_modules"] = sorted(acfg["target_modules"])
    (dest / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    # B starts at zero (A for embeddings); make sure training really moved it.
    with safe_open(str(dest / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        bs = [k for k in keys if "lora_B" in k or "lora_embedding_A" in k]
        assert bs and all(f.get_tensor(k).abs().max() > 0 for k in bs), f"untrained adapter at {dest}"
    return {"loss_first": losses[0], "loss_last": losses[-1], "tensors": len(keys)}


# --------------------------------------------------------------------------------------------
# references


def checkpoint_keys(model_dir: Path) -> list[str]:
    idx = model_dir / "model.safetensors.index.json"
    if idx.exists():
        return sorted(json.loads(idx.read_text())["weight_map"])
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def load_base(model_dir: Path, dtype: str):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype]).eval()


def exact_reference(base_dir: Path, base_dtype: str, adapters: list[Path], weight_fns) -> dict[str, torch.Tensor]:
    """W.float() + sum_i w_i(module) * delta_i in f32 with no rounding, for every checkpoint key.

    delta_i is PEFT's own get_delta_weight() of each LoRA layer (so scaling, rsLoRA, rank/alpha
    patterns, fan_in_fan_out and the embedding transpose are PEFT's), computed on f32 factors.
    modules_to_save copies replace the base tensor.  weight_fns[i](module_name) -> float.
    """
    base = load_base(base_dir, base_dtype)
    keys = checkpoint_keys(base_dir)
    sd = base.state_dict()
    ref = {k: sd[k].detach().float().clone() for k in keys}
    names = [f"a{i}" for i in range(len(adapters))]
    pm = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name=names[0])
    for n, d in zip(names[1:], adapters[1:]):
        pm.load_adapter(str(d), adapter_name=n)
    with torch.no_grad():
        for mname, mod in pm.named_modules():
            short = mname[len(PEFT_PREFIX):] if mname.startswith(PEFT_PREFIX) else mname
            if isinstance(mod, LoraLayer):
                key = short + ".weight"
                for i, n in enumerate(names):
                    if n in mod.lora_A or n in mod.lora_embedding_A:
                        delta = mod.get_delta_weight(n).float()
                        assert delta.dtype == torch.float32
                        ref[key] += weight_fns[i](short) * delta
            elif isinstance(mod, ModulesToSaveWrapper):
                for n in names:
                    if n in mod.modules_to_save:
                        for pname, p in mod.modules_to_save[n].named_parameters():
                            ref[f"{short}.{pname}"] = p.detach().float().clone()
    return ref


def peft_reference(base_dir: Path, base_dtype: str, adapters: list[Path], weights: list[float] | None,
                   dest: Path, merge_dtype: str | None = None, out_dtype: str | None = None) -> None:
    """PEFT's merged model.  One adapter with no weight: PeftModel + merge_and_unload().
    Otherwise add_weighted_adapter(..., combination_type="cat") (exact: concatenates w_i*s_i*A_i and B_i)
    then merge_and_unload().  The base is loaded in merge_dtype (default: its own) and the merged model
    cast to out_dtype (default: merge_dtype) before saving."""
    merge_dtype = merge_dtype or base_dtype
    base = load_base(base_dir, merge_dtype)
    names = [f"a{i}" for i in range(len(adapters))]
    pm = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name=names[0])
    for n, d in zip(names[1:], adapters[1:]):
        pm.load_adapter(str(d), adapter_name=n)
    if weights is not None:
        pm.add_weighted_adapter(names, weights, "stack", combination_type="cat")
        pm.set_adapter("stack")
    merged = pm.merge_and_unload()
    if out_dtype and out_dtype != merge_dtype:
        merged = merged.to(DTYPES[out_dtype])
    if dest.exists():
        shutil.rmtree(dest)
    merged.save_pretrained(str(dest))


def hand_reference(base_dir: Path, ref32: dict[str, torch.Tensor], dest: Path, out_dtype: str) -> None:
    """A reference model folder from an exact f32 state dict (for what PEFT cannot express)."""
    model = load_base(base_dir, "f32")
    missing, unexpected = model.load_state_dict(ref32, strict=False)
    assert not unexpected, unexpected
    model = model.to(DTYPES[out_dtype])
    if dest.exists():
        shutil.rmtree(dest)
    model.save_pretrained(str(dest))


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    files = sorted(model_dir.glob("*.safetensors"))
    for fn in files:
        with safe_open(str(fn), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


# --------------------------------------------------------------------------------------------
# recipes


def toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid TOML basic string


def toml_weight(w) -> str:
    if isinstance(w, (int, float)):
        return repr(float(w))
    items = []
    for rule in w:
        parts = []
        if "modules" in rule:
            parts.append("modules = [" + ", ".join(toml_str(m) for m in rule["modules"]) + "]")
        if "layers" in rule:
            parts.append(f"layers = {toml_str(rule['layers'])}")
        parts.append(f"value = {float(rule['value'])!r}")
        items.append("{ " + ", ".join(parts) + " }")
    return "[ " + ", ".join(items) + " ]"


def write_recipe(path: Path, base: str, adapters: list[tuple[str, object]], out_dtype: str | None) -> None:
    lines = ["# generated by tests/peers/make_fixtures.py", "[base]", f"path = {toml_str(base)}", ""]
    for apath, w in adapters:
        lines += ["[[adapter]]", f"path = {toml_str(apath)}"]
        if w is not None:
            lines.append(f"weight = {toml_weight(w)}")
        lines.append("")
    lines += ["[output]", 'path = "out"']
    if out_dtype is not None:
        lines.append(f"dtype = {toml_str(out_dtype)}")
    lines += ["", "[build]", 'device = "cpu"', ""]
    path.write_text("\n".join(lines))


def rule_weight_fn(w):
    """Python model of the recipe's weight rules: last matching rule wins; layers half-open."""
    if w is None:
        return lambda name: 1.0
    if isinstance(w, (int, float)):
        return lambda name: float(w)

    def parse(r):
        lo, hi = r.split("..")
        return int(lo) if lo else 0, int(hi) if hi else 1 << 30

    def layer_of(name):
        parts = name.split(".")
        for i, p in enumerate(parts[:-1]):
            if p in ("layers", "h") and parts[i + 1].isdigit():
                return int(parts[i + 1])
        return None

    def fn(name):
        val = 1.0
        leaf = name.split(".")[-1]
        layer = layer_of(name)
        for rule in w:
            if "modules" in rule and leaf not in rule["modules"]:
                continue
            if "layers" in rule:
                lo, hi = parse(rule["layers"])
                if layer is None or not (lo <= layer < hi):
                    continue
            val = float(rule["value"])
        return val

    return fn


# --------------------------------------------------------------------------------------------
# cases


class Builder:
    def __init__(self, out: Path):
        self.out = out
        self.cases: list[dict] = []
        self.models: dict[str, object] = {}
        self.adapter_cache: dict[str, tuple[Path, dict]] = {}

    def adapter(self, key: str, model, config: LoraConfig, seed: int, steps: int = 12,
                save_kwargs: dict | None = None) -> tuple[Path, dict]:
        """Train once per key (into OUT/_adapters/<key>) and copy into every case that uses it."""
        if key not in self.adapter_cache:
            dest = self.out / "_adapters" / key
            info = train_adapter(model, config, seed, dest, steps=steps, save_kwargs=save_kwargs)
            self.adapter_cache[key] = (dest, info)
        return self.adapter_cache[key]

    def case(self, name: str, *, model, model_name: str, base_dtype: str, adapters: list[tuple[str, str, object]],
             out_dtype: str | None = None, shard: str | None = None, tokenizer: bool = False,
             ref_kind: str = "peft", note: str = "") -> None:
        """adapters: [(adapter-key, folder-name, weight)] -- weight None (omitted), a float, or rules."""
        t0 = time.time()
        cdir = self.out / name
        if cdir.exists():
            shutil.rmtree(cdir)
        (cdir / "models").mkdir(parents=True)
        (cdir / "adapters").mkdir()
        base_dir = cdir / "models" / model_name
        save_model(model, base_dir, base_dtype, shard=shard, tokenizer=tokenizer)
        adirs, ainfo = [], []
        for key, folder, _ in adapters:
            src, info = self.adapter_cache[key]
            shutil.copytree(src, cdir / "adapters" / folder)
            adirs.append(cdir / "adapters" / folder)
            ainfo.append({"folder": folder, **info})
        write_recipe(cdir / "recipe.toml", f"models/{model_name}",
                     [(f"adapters/{folder}", w) for _, folder, w in adapters], out_dtype)

        eff_out = out_dtype if out_dtype not in (None, "base") else base_dtype
        weights = [w for _, _, w in adapters]
        ref32 = exact_reference(base_dir, base_dtype, adirs, [rule_weight_fn(w) for w in weights])
        save_file({k: v.contiguous() for k, v in ref32.items()}, str(cdir / "ref32.safetensors"))

        if ref_kind == "peft":
            plain = len(adirs) == 1 and weights[0] is None
            assert all(w is None or isinstance(w, float) for w in weights), "PEFT takes scalar weights only"
            pw = None if plain else [1.0 if w is None else w for w in weights]
            # f32 -> narrower output: merge in f32 and round once at the end (what modelforge promises).
            merge_dtype = base_dtype
            if eff_out == "f32" or base_dtype == "f32":
                merge_dtype = "f32"
            if pw is not None and base_dtype != "f32":
                # add_weighted_adapter injects the combined adapter in the base's dtype (no autocast,
                # unlike PeftModel.from_pretrained), so on a bf16 base it rounds w*s*A to bf16 before
                # merging (measured: 58942 of 147456 adapted elements of stack_cat_bf16 then differ from the
                # correctly rounded W + delta).  Merge on the losslessly upcast base instead and round
                # once: that is PEFT's single-adapter behaviour (f32 delta, one rounding).
                merge_dtype = "f32"
            peft_reference(base_dir, base_dtype, adirs, pw, cdir / "ref", merge_dtype=merge_dtype, out_dtype=eff_out)
        else:
            hand_reference(base_dir, ref32, cdir / "ref", eff_out)

        # Self-checks of the references (these are facts about PEFT the tests rely on).
        base_t = read_tensors(base_dir)
        ref_t = read_tensors(cdir / "ref")
        assert sorted(ref_t) == sorted(base_t) == sorted(ref32), (name, set(ref_t) ^ set(base_t))
        changed, stats = [], {}
        for k in sorted(ref_t):
            if not torch.equal(ref_t[k].float(), base_t[k].float()):
                changed.append(k)
            r, e = ref_t[k], ref32[k]
            if eff_out == "f32":
                tol = 1e-6 * e.abs().max().item()
                d = (r.float() - e).abs().max().item()
                assert d <= tol, f"{name}/{k}: PEFT vs exact f32 reference differ by {d} > {tol}"
            else:
                nround = int((r != e.to(r.dtype)).sum())
                if nround:
                    stats[k] = nround
        assert changed, f"{name}: the reference equals the base; the case would test nothing"
        meta = {
            "name": name,
            "note": note,
            "base": f"models/{model_name}",
            "base_name": model_name,
            "adapters": ainfo,
            "weights": weights,
            "base_dtype": base_dtype,
            "out_dtype": eff_out,
            "recipe_dtype": out_dtype,
            "ref_kind": ref_kind,
            "sharded_base": (base_dir / "model.safetensors.index.json").exists(),
            "tied": bool(getattr(model.config, "tie_word_embeddings", False)),
            "changed": changed,
            "peft_not_correctly_rounded": stats,
            "seconds": round(time.time() - t0, 2),
        }
        self.cases.append(meta)
        print(f"  {name:24s} {len(changed):3d} tensors changed  {meta['seconds']:.1f}s"
              + (f"  (PEFT != round(ref32) at {sum(stats.values())} elements)" if stats else ""), flush=True)


def all7(**kw) -> LoraConfig:
    return LoraConfig(target_modules=SEVEN, lora_dropout=0.0, **kw)


def build(out: Path) -> list[dict]:
    b = Builder(out)

    llama = tiny_llama(seed=11, layers=2)
    llama4 = tiny_llama(seed=12, layers=4)
    qwen = tiny_qwen2(seed=13)
    gpt2 = tiny_gpt2(seed=14)

    print("training adapters", flush=True)
    b.adapter("llama-all7", llama, all7(r=8, lora_alpha=16), seed=101)
    b.adapter("qwen2-qkvo", qwen, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), seed=102)
    b.adapter("gpt2-conv1d", gpt2, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=True,
                                              target_modules=["c_attn", "c_proj", "c_fc"]), seed=103)
    b.adapter("llama-rslora", llama, all7(r=16, lora_alpha=8, use_rslora=True), seed=104)
    b.adapter("llama-patterns", llama, all7(
        r=8, lora_alpha=16,
        # PEFT matches these as regex suffixes on the module path: (.*\.)?(key)$ ; first match wins
        rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 2},
        alpha_pattern={"v_proj": 32, "layers.0.self_attn.o_proj": 3}), seed=105)
    b.adapter("llama4-layers", llama4, all7(r=4, lora_alpha=8, layers_to_transform=[1, 3]), seed=106)
    b.adapter("llama-embed", llama, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                               target_modules=["embed_tokens", "q_proj", "v_proj"]), seed=107)
    # PEFT's default save_embedding_layers="auto" also stores the full embedding as
    # "...embed_tokens.base_layer.weight" (and loads it back over the base's); this one does not.
    b.adapter("llama-embed-nocopy", llama, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=["embed_tokens", "q_proj", "v_proj"]),
              seed=107, save_kwargs={"save_embedding_layers": False})
    b.adapter("llama-lmhead", llama, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"]),
              seed=108)
    b.adapter("llama4-attn", llama4, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), seed=109)
    b.adapter("llama4-mlpv", llama4, LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0,
                                                target_modules=["v_proj", "gate_proj", "up_proj", "down_proj"]),
              seed=110)
    b.adapter("llama4-rs", llama4, all7(r=16, lora_alpha=4, use_rslora=True), seed=111)

    print("cases", flush=True)
    one = lambda key, folder, w=None: [(key, folder, w)]  # noqa: E731
    b.case("llama_gqa_f32", model=llama, model_name="tiny-llama-gqa", base_dtype="f32",
           adapters=one("llama-all7", "lora-all7"), shard="60KB", tokenizer=True,
           note="GQA LLaMA, LoRA on all seven projections, sharded base with index, tokenizer files")
    b.case("llama_gqa_bf16", model=llama, model_name="tiny-llama-gqa-bf16", base_dtype="bf16",
           adapters=one("llama-all7", "lora-all7"), note="same adapter on the bf16 base")
    b.case("llama_gqa_f16", model=llama, model_name="tiny-llama-gqa-f16", base_dtype="f16",
           adapters=one("llama-all7", "lora-all7"), note="same adapter on the f16 base")
    b.case("llama_bf16_to_f32", model=llama, model_name="tiny-llama-gqa-bf16", base_dtype="bf16",
           adapters=one("llama-all7", "lora-all7"), out_dtype="f32",
           note="bf16 base written as f32: W.float() + delta, never rounded")
    b.case("llama_f32_to_bf16", model=llama, model_name="tiny-llama-gqa", base_dtype="f32",
           adapters=one("llama-all7", "lora-all7"), out_dtype="bf16",
           note="f32 base written as bf16: merged in f32, rounded once")
    b.case("llama_weight_f32", model=llama, model_name="tiny-llama-gqa", base_dtype="f32",
           adapters=one("llama-all7", "lora-all7", 0.8), out_dtype="base",
           note="single adapter, weight 0.8 (PEFT: add_weighted_adapter cat with one adapter)")
    b.case("qwen2_bias_f32", model=qwen, model_name="tiny-qwen2", base_dtype="f32",
           adapters=one("qwen2-qkvo", "lora-qkvo"), note="Qwen2, q/k/v biases, tied embeddings")
    b.case("gpt2_conv1d_f32", model=gpt2, model_name="tiny-gpt2", base_dtype="f32",
           adapters=one("gpt2-conv1d", "lora-conv1d"), note="GPT-2 Conv1D, fan_in_fan_out=True, tied embeddings")
    b.case("llama_rslora_f32", model=llama, model_name="tiny-llama-gqa", base_dtype="f32",
           adapters=one("llama-rslora", "lora-rslora"), note="use_rslora: scale alpha/sqrt(r)")
    b.case("llama_patterns_f32", model=llama, model_name="tiny-llama-gqa", base_dtype="f32",
           adapters=one("llama-patterns", "lora-patterns"), note="rank_pattern and alpha_pattern")
    b.case("llama_layers_f32", model=llama4, model_name="tiny-llama4", base_dtype="f32",
           adapters=one("llama4-layers", "lora-layers13"), note="layers_to_transform=[1,3] on 4 layers")
    b.case("llama_embed_f32", model=llama, model_name="tiny-llama-gqa", base_dtype="f32",
           adapters=one("llama-embed", "lora-embed"),
           note="LoRA on embed_tokens (lora_embedding_A/B) + q,v; PEFT also saved embed_tokens.base_layer.weight")
    b.case("llama_embed_nocopy_f32", model=llama, model_name="tiny-llama-gqa", base_dtype="f32",
           adapters=one("llama-embed-nocopy", "lora-embed-nocopy"),
           note="the same adapter saved with save_embedding_layers=False: only lora_embedding_A/B")
    b.case("llama_lmhead_f32", model=llama, model_name="tiny-llama-gqa", base_dtype="f32",
           adapters=one("llama-lmhead", "lora-lmhead"), note="modules_to_save=['lm_head'] on an untied model")
    b.case("stack_cat_f32", model=llama4, model_name="tiny-llama4", base_dtype="f32",
           adapters=[("llama4-attn", "lora-attn", 0.7), ("llama4-mlpv", "lora-mlpv", 0.4)],
           note="two adapters, weights 0.7/0.4, different ranks and overlapping targets; PEFT cat")
    b.case("stack_cat_bf16", model=llama4, model_name="tiny-llama4-bf16", base_dtype="bf16",
           adapters=[("llama4-attn", "lora-attn", 0.7), ("llama4-mlpv", "lora-mlpv", 0.4),
                     ("llama4-rs", "lora-rs", 0.5)],
           note="three adapters incl. an rsLoRA one (not first: PEFT cat copies the first one's use_rslora)")
    b.case("stack_rules_f32", model=llama4, model_name="tiny-llama4", base_dtype="f32",
           adapters=[("llama4-attn", "lora-attn",
                      [{"value": 1.0}, {"layers": "2..", "value": 0.5},
                       {"modules": ["q_proj", "v_proj"], "layers": "0..1", "value": 0.0}]),
                     ("llama4-mlpv", "lora-mlpv",
                      [{"value": 0.4}, {"modules": ["down_proj"], "value": -0.3},
                       {"modules": ["v_proj"], "layers": "1..3", "value": 1.5}])],
           ref_kind="hand", note="per-layer/module weight rules; reference W + sum w*s*BA by hand in f32")

    shutil.rmtree(out / "_adapters", ignore_errors=True)
    return b.cases


def fingerprint() -> str:
    """Identity of what the fixtures depend on: this file and the peer libraries' versions."""
    import peft
    import safetensors
    import transformers

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"{FORMAT_VERSION} {torch.__version__} {transformers.__version__} {peft.__version__} "
             f"{safetensors.__version__}".encode())
    return h.hexdigest()


def ensure(out: Path, force: bool = False, *, build_fn=None, fingerprint_fn=None,
           label: str = "fixtures") -> list[dict]:
    """Generate into `out` unless it already holds fixtures with the same fingerprint (the other
    fixture scripts pass their own `build_fn` and `fingerprint_fn`)."""
    build_fn, fingerprint_fn = build_fn or build, fingerprint_fn or fingerprint
    stamp = out / "cases.json"
    fp = fingerprint_fn()
    if not force and stamp.exists():
        data = json.loads(stamp.read_text())
        if data.get("fingerprint") == fp:
            return data["cases"]
    out.mkdir(parents=True, exist_ok=True)
    if stamp.exists():
        stamp.unlink()
    t0 = time.time()
    cases = build_fn(out)
    stamp.write_text(json.dumps({"fingerprint": fp, "cases": cases}, indent=1))
    print(f"{label}: {len(cases)} cases in {time.time() - t0:.1f}s -> {out}", flush=True)
    return cases


def main(argv=None, *, ensure_fn=None, default_out: Path = DEFAULT_OUT, doc: str = __doc__) -> int:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=str(default_out))
    ap.add_argument("--force", action="store_true", help="regenerate even if the fingerprint matches")
    args = ap.parse_args(argv)
    (ensure_fn or ensure)(Path(args.out).resolve(), force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
