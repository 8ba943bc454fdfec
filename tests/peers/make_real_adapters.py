#!/usr/bin/env python3
"""Fixtures for the adapters users really bring (issue 14): tied embeddings, DoRA, trainable tokens,
resized vocabularies, MoE experts targeted through `target_parameters`.

Writes, under OUT (default <repo>/target/peers-real), one folder per case:

    <case>/models/<base>/            tiny HF model (config.json + model.safetensors), built from a config in code
    <case>/adapters/<name>/          PEFT adapter(s): made with get_peft_model, then every adapter tensor filled with
                                     seeded random values (no training), saved with save_pretrained
    <case>/recipe.toml               the modelforge recipe (output -> <case>/out)
    <case>/ref/                      PEFT's merged model: merge_and_unload() + save_pretrained, base in its own dtype
                                     (for the one class PEFT cannot express, see `dora_weight_f32`, PEFT with the
                                     adapter's scaling multiplied by the recipe weight, checked against a hand formula)
    <case>/exact.safetensors         the same merge done by PEFT on the base upcast to float64 (adapter tensors are
                                     f32, so this is the merge with no rounding to speak of), keyed like the
                                     transformers state_dict (in-memory names; tied lm_head included)
    <case>/logits.safetensors        logits of the base, of ref/ and of the exact weights, on a fixed input
    cases.json                       what the tests need to know about every case (incl. PEFT facts measured)

A refusal case (`tt_overlap_refused`) has no ref/: PEFT refuses the merge, and cases.json holds PEFT's message.

Every self-check below is a fact about PEFT 0.21.2 / transformers 5.23 that the tests rely on; they are asserted
while generating, so a library change that breaks one fails here rather than in a confusing test.

Run:  .venv/bin/python tests/peers/make_real_adapters.py [OUT] [--force]
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # two cores shared with cargo; see make_fixtures.py

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (tiny_llama, tiny_gpt2, write_tokenizer, toml_str)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging  # noqa: E402
from peft import LoraConfig, PeftModel, TrainableTokensConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore")  # PEFT's tied-embedding warnings are expected here; the facts are asserted instead

REPO = mf.REPO
DEFAULT_OUT = REPO / "target" / "peers-real"
FORMAT_VERSION = 1
VOCAB = mf.VOCAB  # 256
ADDED = 8  # tokens added by the resized-vocabulary cases
RESIZE_SEED = 31
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
PREFIX = "base_model.model."
SEVEN = mf.SEVEN


# --------------------------------------------------------------------------------------------
# models


def tiny_mixtral(seed: int) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=VOCAB, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    m = MixtralForCausalLM(cfg)
    mf._perturb(m, seed + 1000)
    return m.eval()


def write_added_tokenizer(dest: Path) -> None:
    """The base's word-level tokenizer plus ADDED new tokens (ids VOCAB..VOCAB+ADDED-1), as a trainer saves it."""
    tmp = dest / "_tok"
    mf.write_tokenizer(tmp)
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp))
    n = tok.add_tokens([f"<extra_{i}>" for i in range(ADDED)])
    assert n == ADDED and len(tok) == VOCAB + ADDED
    tok.save_pretrained(str(dest))
    shutil.rmtree(tmp)


def save_base(model, dest: Path, dtype: str, layout: str = "hf", tokenizer: str | None = None) -> None:
    """layout "hf": transformers' save_pretrained (a tied model omits lm_head.weight; Mixtral experts are written
    per expert, block_sparse_moe.experts.{e}.w1/w2/w3).  "stale_lm_head": the same plus a duplicate lm_head.weight
    equal to the embedding, config still tied.  "fused": the in-memory state_dict as is (Mixtral's 3-D
    mlp.experts.gate_up_proj / down_proj)."""
    if dest.exists():
        shutil.rmtree(dest)
    m = copy.deepcopy(model).to(DTYPES[dtype])
    m.save_pretrained(str(dest))
    if layout == "stale_lm_head":
        t = load_file(str(dest / "model.safetensors"))
        assert "lm_head.weight" not in t and m.config.tie_word_embeddings
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        save_file(t, str(dest / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "fused":
        sd = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
        save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer == "base":
        mf.write_tokenizer(dest)
    elif tokenizer == "added":
        write_added_tokenizer(dest)


def load(model_dir: Path, dtype) -> torch.nn.Module:
    dt = DTYPES.get(dtype, dtype)
    kw = {}
    if dt == torch.float64 and json.loads((model_dir / "config.json").read_text())["model_type"] == "mixtral":
        kw["experts_implementation"] = "eager"  # grouped_mm has no float64 kernel
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dt, **kw).eval()


def file_keys(model_dir: Path) -> list[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


# --------------------------------------------------------------------------------------------
# adapters


def fill_adapter(pm, seed: int) -> None:
    """Non-trivial adapter values without training: every adapter tensor gets seeded random values.
    A ~ N(0, 0.05^2), B ~ N(0, 0.02^2); DoRA magnitudes scaled by 1 + N(0, 0.1^2) (so m != ||W + s B A||);
    modules_to_save copies moved by N(0, 0.02^2); trainable-token rows replaced by N(0, 0.02^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters(), key=lambda kv: kv[0]):
            rnd = lambda s: torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * s  # noqa: E731
            if "lora_A" in name or "lora_embedding_A" in name:
                p.copy_(rnd(0.05))
            elif "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(rnd(0.02))
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + rnd(0.1))
            elif ".modules_to_save." in name:
                p.add_(rnd(0.02))
            elif "trainable_tokens_delta" in name:
                p.copy_(rnd(0.02))


def make_adapter(base_dir: Path, config, seed: int, dest: Path, resize_to: int | None = None,
                 tokenizer: str | None = None) -> dict:
    """get_peft_model on the f32 base loaded from disk (so base_model_name_or_path is a real folder, which PEFT's
    resized-vocabulary detection needs), fill, save; then make adapter_config.json deterministic."""
    model = load(base_dir, "f32")
    if resize_to is not None:
        torch.manual_seed(RESIZE_SEED)  # the same new rows as the resized base on disk
        model.resize_token_embeddings(resize_to)
    pm = get_peft_model(model, config)
    fill_adapter(pm, seed)
    if dest.exists():
        shutil.rmtree(dest)
    pm.save_pretrained(str(dest))
    acfg = json.loads((dest / "adapter_config.json").read_text())
    for k in ("target_modules", "modules_to_save", "target_parameters"):
        if isinstance(acfg.get(k), list):
            acfg[k] = sorted(acfg[k])
    acfg["base_model_name_or_path"] = "tiny/" + base_dir.name
    (dest / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    if tokenizer == "added":
        write_added_tokenizer(dest)
    with safe_open(str(dest / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in sorted(f.keys())}
    return {"tensors": shapes, "config": {k: acfg.get(k) for k in (
        "peft_type", "r", "lora_alpha", "use_dora", "use_rslora", "fan_in_fan_out", "target_modules",
        "target_parameters", "modules_to_save", "trainable_token_indices", "token_indices", "ensure_weight_tying")
        if k in acfg}}


# --------------------------------------------------------------------------------------------
# references


def peft_merge(base_dir: Path, dtype, adapters: list[Path], mode: str = "joint",
               scales: list[float] | None = None):
    """PEFT's merged model.
    joint:      every adapter loaded into one PeftModel, all active, merge_and_unload(adapter_names=all), i.e.
                merged one after the other by each layer's merge(); a DoRA norm is taken on the weight with the
                previously merged adapters taken out (PEFT's `_unmerged_base_weight`), as forward() sees it.
    sequential: merge_and_unload() the first adapter, wrap the merged model with the next one, merge, ...
                (a DoRA norm is then taken on W + the earlier adapters' deltas).
    scales:     multiply each adapter's LoRA scaling by this before merging (PEFT has no public per-adapter merge
                weight for DoRA; for DoRA this gives W' = m / ||W + w s B A|| * (W + w s B A), magnitude untouched)."""
    base = load(base_dir, dtype)
    names = [f"a{i}" for i in range(len(adapters))]

    def rescale(pm, name, f):
        for mod in pm.modules():
            if isinstance(mod, LoraLayer) and name in mod.scaling:
                mod.scaling[name] *= f

    if mode == "sequential":
        model = base
        for i, (n, d) in enumerate(zip(names, adapters)):
            pm = PeftModel.from_pretrained(model, str(d), adapter_name=n)
            if scales:
                rescale(pm, n, scales[i])
            model = pm.merge_and_unload()
        return model.eval()
    pm = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name=names[0])
    for n, d in zip(names[1:], adapters[1:]):
        pm.load_adapter(str(d), adapter_name=n)
    if scales:
        for n, f in zip(names, scales):
            rescale(pm, n, f)
    # No set_adapter(names): TrainableTokensWrapper refuses more than one active adapter ("Only one adapter can be
    # set at a time"), while every layer's merge() takes the listed adapters whether active or not.
    return pm.merge_and_unload(adapter_names=names).eval()


def rounded_copies(adir: Path, dest: Path, dtype: str) -> Path:
    """A copy of an adapter whose full-weight copies (`*.base_layer.weight`) are rounded to the base's dtype."""
    shutil.copytree(adir, dest)
    t = load_file(str(adir / "adapter_model.safetensors"))
    t = {k: v.to(DTYPES[dtype]).to(v.dtype) if k.endswith(".base_layer.weight") else v for k, v in t.items()}
    save_file(t, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dest


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def tied_in_memory(model) -> bool:
    return model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


def input_ids(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    ids[:, 1::4] = torch.tensor([1, 3, 5, 7, 9, 100, 200, 3]).reshape(2, 4)  # the trainable-token rows
    if vocab > VOCAB:  # make the new tokens appear
        ids[:, ::4] = torch.arange(VOCAB, VOCAB + 8).reshape(2, 4) % vocab
    return ids


def logits_of(model, ids) -> torch.Tensor:
    """Logits computed in the model's own dtype, returned as f32 (callers load bf16 weights as f32)."""
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


# ---- hand formulas (self-checks of the math the report describes) ----------------------------


def hand_dora(W: torch.Tensor, A, B, m, scale: float, fan_in_fan_out: bool) -> torch.Tensor:
    """W' = (m / ||W + scale*B@A||_row) * (W + scale*B@A), rows = output features; in f64.
    Conv1D (fan_in_fan_out) stores W as [in, out]: the delta is transposed and the norm runs down each column."""
    W, A, B, m = (t.double() for t in (W, A, B, m))
    if fan_in_fan_out:
        V = W + scale * (B @ A).T
        return V * (m / V.norm(dim=0))[None, :]
    V = W + scale * (B @ A)
    return V * (m / V.norm(dim=1))[:, None]


def hand_experts_delta(A: torch.Tensor, B: torch.Tensor, E: int, scale: float) -> torch.Tensor:
    """ParamWrapper on a 3-D [E, out, in] parameter (Mixtral, not `is_transposed`): A is [E*r, in], B is [out, E*r].
    Expert e uses rows e*r..(e+1)*r-1 of A (blocks) and columns e, e+E, e+2E, ... of B (interleaved)."""
    A, B = A.double(), B.double()
    r = A.shape[0] // E
    return torch.stack([scale * (B[:, e::E] @ A[e * r:(e + 1) * r]) for e in range(E)])


# --------------------------------------------------------------------------------------------
# recipes


def write_recipe(path: Path, base: str, adapters: list[tuple[str, float | None]]) -> None:
    lines = ["# generated by tests/peers/make_real_adapters.py", "[base]", f"path = {mf.toml_str(base)}", ""]
    for apath, w in adapters:
        lines += ["[[adapter]]", f"path = {mf.toml_str(apath)}"]
        if w is not None:
            lines.append(f"weight = {float(w)!r}")
        lines.append("")
    lines += ["[output]", 'path = "out"', "", "[build]", 'device = "cpu"', ""]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------
# cases


class Gen:
    def __init__(self, out: Path):
        self.out = out
        self.cases: list[dict] = []
        self.bases: dict[str, Path] = {}
        self.dtypes: dict[str, str] = {}
        self.adapters: dict[str, tuple[Path, dict]] = {}

    # shared, generated once under _work and copied into each case
    def base(self, key: str, folder: str, model, dtype: str, layout: str = "hf",
             tokenizer: str | None = None) -> Path:
        d = self.out / "_work" / "models" / folder
        save_base(model, d, dtype, layout, tokenizer)
        self.bases[key] = d
        self.dtypes[key] = dtype
        return d

    def adapter(self, key: str, base_key: str, config, seed: int, **kw) -> tuple[Path, dict]:
        if key not in self.adapters:
            d = self.out / "_work" / "adapters" / key
            self.adapters[key] = (d, make_adapter(self.bases[base_key], config, seed, d, **kw))
        return self.adapters[key]

    def case(self, name: str, *, base: str, adapters: list[tuple[str, float | None]], note: str,
             mode: str = "joint", ref_base: str | None = None, hand=None, refuse: dict | None = None,
             tokenizer_from: str | None = None, alt_modes: tuple[str, ...] = ()) -> None:
        """base / ref_base: keys of self.bases (ref_base: the base PEFT merges onto when it cannot take the
        recipe's base, e.g. the resized one).  adapters: [(adapter key, recipe weight or None)]."""
        t0 = time.time()
        cdir = self.out / name
        if cdir.exists():
            shutil.rmtree(cdir)
        (cdir / "models").mkdir(parents=True)
        (cdir / "adapters").mkdir()
        bsrc = self.bases[base]
        bdir = cdir / "models" / bsrc.name
        shutil.copytree(bsrc, bdir)
        adirs, ainfo = [], []
        for key, w in adapters:
            src, info = self.adapters[key]
            shutil.copytree(src, cdir / "adapters" / key)
            adirs.append(cdir / "adapters" / key)
            ainfo.append({"folder": key, "weight": w, **info})
        write_recipe(cdir / "recipe.toml", f"models/{bsrc.name}", [(f"adapters/{k}", w) for k, w in adapters])
        base_dtype = self.dtypes[base]
        meta = {"name": name, "note": note, "base": f"models/{bsrc.name}", "base_dtype": base_dtype,
                "adapters": ainfo, "mode": mode}

        if refuse is not None:
            try:
                peft_merge(bdir, base_dtype, adirs, mode)
            except Exception as e:  # noqa: BLE001
                meta.update({"refuse": True, "peft_error": f"{type(e).__name__}: {e}", **refuse})
            else:
                raise AssertionError(f"{name}: PEFT merged a case expected to be refused")
            self.cases.append(meta)
            print(f"  {name:28s} refused by PEFT: {meta['peft_error'][:90]}", flush=True)
            return

        pbase = self.bases[ref_base] if ref_base else bdir
        scales = [1.0 if w is None else w for _, w in adapters]
        scales = None if all(s == 1.0 for s in scales) else scales
        ref = peft_merge(pbase, base_dtype, adirs, mode, scales)
        ref.save_pretrained(str(cdir / "ref"))
        # PEFT loads an adapter's saved `<embedding>.base_layer.weight` copy (save_embedding_layers) over the base's
        # weight.  On a bf16 base it is rounded to bf16 on the way in; the float64 merge must see the same value.
        eadirs = adirs if base_dtype == "f32" else [rounded_copies(d, cdir / "_exact" / d.name, base_dtype)
                                                      for d in adirs]
        exact_model = peft_merge(pbase, torch.float64, eadirs, mode, scales)
        exact = state(exact_model)
        ref_sd = state(load(cdir / "ref", base_dtype))
        base_sd = state(load(bdir, base_dtype))
        assert sorted(exact) == sorted(ref_sd), name
        save_file(exact, str(cdir / "exact.safetensors"))

        # The saved reference reloads to the in-memory merged model (tie and all).
        mem = state(ref)
        for k in mem:
            assert torch.equal(mem[k], ref_sd[k]), f"{name}/{k}: PEFT's saved merge reloads differently"
        tied = tied_in_memory(ref)
        ref_cfg = json.loads((cdir / "ref" / "config.json").read_text())
        assert bool(ref_cfg.get("tie_word_embeddings", False)) == tied, (name, ref_cfg.get("tie_word_embeddings"), tied)
        assert tied_in_memory(exact_model) == tied

        kinds, stats = {}, {}
        for k in sorted(ref_sd):
            r, e, b = ref_sd[k], exact[k], base_sd.get(k)
            if b is not None and b.shape == r.shape and torch.equal(r, b):
                kinds[k] = "untouched"
            elif torch.equal(e.to(r.dtype).double(), e) and torch.equal(r, e.to(r.dtype)):
                kinds[k] = "copied"  # pure copies (modules_to_save, trainable-token rows): bit-exact expected
            else:
                kinds[k] = "arith"
                if base_dtype == "f32":
                    d = (r.double() - e).abs().max().item()
                    rel = d / e.abs().max().item()
                    assert rel <= 1e-6, f"{name}/{k}: PEFT f32 vs exact differ by {rel:.3g} of max"
                    stats[k] = f"max|peft-exact|/max = {rel:.2g}"
                else:
                    once = e.to(torch.float32).to(r.dtype)
                    n = int((r != once).sum())
                    if n:
                        stats[k] = f"{n}/{r.numel()} elements not the correctly rounded value"
        assert any(v != "untouched" for v in kinds.values()), f"{name}: the merge changes nothing"

        if hand is not None:  # hand formula vs PEFT's f64 merge: the math the report describes
            err = hand(self, bdir, adirs, exact)
            assert err <= 1e-9, f"{name}: hand formula differs from PEFT (f64) by {err:.3g}"
            meta["hand_check_max_err"] = err

        # Alternative semantics measured for the report (e.g. DoRA stacks: joint vs sequential norms).
        alts = {}
        for alt in alt_modes:
            other = state(peft_merge(pbase, torch.float64, eadirs, alt, scales))
            save_file(other, str(cdir / f"exact_{alt}.safetensors"))
            alts[alt] = max((other[k] - exact[k]).abs().max().item() for k in exact)
        shutil.rmtree(cdir / "_exact", ignore_errors=True)
        vocab = ref.config.vocab_size
        ids = input_ids(vocab)
        lg = {"ids": ids, "base": logits_of(load(bdir, "f32"), input_ids(VOCAB)),
              "ref": logits_of(load(cdir / "ref", "f32"), ids),
              "exact": logits_of(exact_model, ids)}  # f64 arithmetic on the exact weights
        save_file({k: v.contiguous() for k, v in lg.items()}, str(cdir / "logits.safetensors"))
        if vocab == VOCAB:
            assert (lg["ref"] - lg["base"]).abs().max().item() > 1e-3, f"{name}: merge does not move the logits"

        meta.update({
            "refuse": False,
            "ref_base": ref_base and f"(PEFT merged onto {ref_base})",
            "tied": tied,
            "vocab_size": vocab,
            "kinds": kinds,
            "ref_file_keys": file_keys(cdir / "ref"),
            "base_file_keys": file_keys(bdir),
            "peft_vs_exact": stats,
            "alt_modes_max_diff": alts,
            "tokenizer_from": tokenizer_from,
            # the output keeps the base's checkpoint layout; PEFT's save_pretrained writes transformers' layout,
            # which is the same except for a base written in the fused MoE layout
            "expect_file_keys": "base" if base == "mixfused" else "ref",
            "logit_diff_ref_exact": (lg["ref"] - lg["exact"]).abs().max().item(),
            "logit_diff_ref_base": (lg["ref"][:, :, :VOCAB] - lg["base"]).abs().max().item()
            if vocab == VOCAB else None,
            "seconds": round(time.time() - t0, 2),
        })
        self.cases.append(meta)
        changed = sum(v != "untouched" for v in kinds.values())
        print(f"  {name:28s} {changed:3d} tensors changed, tied={tied!s:5s} {meta['seconds']:.1f}s"
              + (f"  PEFT not round-once on {len(stats)} tensors" if stats and base_dtype == "bf16" else ""),
              flush=True)


# ---- hand checks -------------------------------------------------------------------------------


def _adapter_tensors(adir: Path) -> tuple[dict, dict]:
    return load_file(str(adir / "adapter_model.safetensors")), json.loads((adir / "adapter_config.json").read_text())


def hand_dora_check(g: Gen, bdir: Path, adirs: list[Path], exact: dict, weights=(1.0,)) -> float:
    """Every DoRA module of the (last) adapter: hand_dora on the base weight (plus, for a stack, the earlier
    plain-LoRA deltas, which sit outside the norm in PEFT's joint merge)."""
    base = state(load(bdir, torch.float64))
    t, cfg = _adapter_tensors(adirs[-1])
    s = cfg["lora_alpha"] / cfg["r"] * weights[-1]
    extra = {}
    for ad in adirs[:-1]:
        t0, c0 = _adapter_tensors(ad)
        for k in t0:
            if k.endswith("lora_A.weight"):
                mod = k[len(PREFIX):-len(".lora_A.weight")]
                B0, A0 = t0[k.replace("lora_A", "lora_B")].double(), t0[k].double()
                extra[mod] = (c0["lora_alpha"] / c0["r"]) * (B0 @ A0)
    err = 0.0
    for k in t:
        if not k.endswith("lora_magnitude_vector"):
            continue
        mod = k[len(PREFIX):-len(".lora_magnitude_vector")]
        m = t[k]
        if f"{PREFIX}{mod}.lora_embedding_A" in t:
            # Embedding [V, H]: A [r, V], B [H, r], dW = s (B A)^T; m has H entries, norm down each column (over
            # the vocabulary): the Conv1D form
            A, B, fifo = t[f"{PREFIX}{mod}.lora_embedding_A"], t[f"{PREFIX}{mod}.lora_embedding_B"], True
        else:
            A, B = t[f"{PREFIX}{mod}.lora_A.weight"], t[f"{PREFIX}{mod}.lora_B.weight"]
            fifo = cfg.get("fan_in_fan_out", False)
        W = base[mod + ".weight"]
        want = hand_dora(W, A, B, m, s, fifo)
        if mod in extra:  # joint: m / ||W + dD|| * (W + dL + dD)
            V = W + s * (B.double() @ A.double())
            want = (V + extra[mod]) * (m.double() / V.norm(dim=1))[:, None]
        err = max(err, (want - exact[mod + ".weight"]).abs().max().item())
    return err


def hand_moe_check(g: Gen, bdir: Path, adirs: list[Path], exact: dict) -> float:
    """gate_up_proj is the inner ParamWrapper (`mlp.experts.base_layer.lora_*`), down_proj the outer
    (`mlp.experts.lora_*`); per-expert delta from hand_experts_delta.  Also checks the on-disk mapping
    gate_up_proj[e] = cat(w1_e, w3_e) and down_proj[e] = w2_e of the per-expert checkpoint."""
    base = state(load(bdir, torch.float64))
    t, cfg = _adapter_tensors(adirs[0])
    s = cfg["lora_alpha"] / cfg["r"]
    err = 0.0
    for layer in range(2):
        p = f"{PREFIX}model.layers.{layer}.mlp.experts."
        for param, inner in (("gate_up_proj", "base_layer."), ("down_proj", "")):
            key = f"model.layers.{layer}.mlp.experts.{param}"
            W = base[key]
            d = hand_experts_delta(t[f"{p}{inner}lora_A.weight"], t[f"{p}{inner}lora_B.weight"], W.shape[0], s)
            err = max(err, (W + d - exact[key]).abs().max().item())
    if (bdir / "model.safetensors").exists():
        disk = load_file(str(bdir / "model.safetensors"))
        if "model.layers.0.block_sparse_moe.experts.0.w1.weight" in disk:
            for e in range(4):
                gu = torch.cat([disk[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"],
                                disk[f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight"]])
                assert torch.equal(gu.double(), base["model.layers.0.mlp.experts.gate_up_proj"][e])
                assert torch.equal(disk[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"].double(),
                                   base["model.layers.0.mlp.experts.down_proj"][e])
    return err


def hand_tt_check(g: Gen, bdir: Path, adirs: list[Path], exact: dict) -> float:
    """Trainable tokens: rows token_indices of the embedding (and, for a tied model, of the shared lm_head) are
    replaced by trainable_tokens_delta; nothing is added."""
    err = 0.0
    for adir in adirs:
        t, cfg = _adapter_tensors(adir)
        idx = cfg.get("trainable_token_indices") or cfg.get("token_indices")
        if isinstance(idx, list):
            idx = {"embed_tokens": idx}
        for mod, rows in idx.items():
            full = "model.embed_tokens" if mod.endswith("embed_tokens") else "lm_head"
            key = next(k for k in t if k.startswith(PREFIX + full + ".") and k.endswith("trainable_tokens_delta"))
            err = max(err, (exact[full + ".weight"][rows] - t[key].double()).abs().max().item())
    return err


# --------------------------------------------------------------------------------------------


def build(out: Path) -> list[dict]:
    g = Gen(out)
    llama_tied = mf.tiny_llama(seed=21, tie=True)
    llama = mf.tiny_llama(seed=22, tie=False)
    gpt2 = mf.tiny_gpt2(seed=23)
    mix = tiny_mixtral(seed=24)

    for dt in ("f32", "bf16"):
        sfx = "" if dt == "f32" else "-bf16"
        g.base(f"tied{dt}", "tiny-llama-tied" + sfx, llama_tied, dt)
        g.base(f"stale{dt}", "tiny-llama-tied-stale" + sfx, llama_tied, dt, layout="stale_lm_head")
        g.base(f"llama{dt}", "tiny-llama" + sfx, llama, dt, tokenizer="base")
        g.base(f"gpt2{dt}", "tiny-gpt2" + sfx, gpt2, dt)
        g.base(f"mix{dt}", "tiny-mixtral" + sfx, mix, dt)
    g.base("mixfused", "tiny-mixtral-fused", mix, "f32", layout="fused")

    # The resized base: resize_token_embeddings(VOCAB+ADDED) on the loaded f32 base, seeded (new rows are sampled
    # from the old rows' mean/covariance), saved with the extended tokenizer, as a user who saved it would have.
    resized = load(g.bases["llamaf32"], "f32")
    torch.manual_seed(RESIZE_SEED)
    resized.resize_token_embeddings(VOCAB + ADDED)
    for dt in ("f32", "bf16"):
        g.base(f"resized{dt}", "tiny-llama-resized" + ("" if dt == "f32" else "-bf16"), resized, dt,
               tokenizer="added")

    print("adapters", flush=True)
    qv = ["q_proj", "v_proj"]
    L = lambda **kw: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **kw)  # noqa: E731
    g.adapter("lora-embed", "tiedf32", L(target_modules=["embed_tokens"] + qv), 201)
    g.adapter("lora-lmhead", "tiedf32", L(target_modules=["lm_head"] + qv), 202)
    g.adapter("mts-embed", "tiedf32", L(target_modules=qv, modules_to_save=["embed_tokens"]), 203)
    g.adapter("mts-lmhead", "tiedf32", L(target_modules=qv, modules_to_save=["lm_head"]), 204)
    g.adapter("mts-both", "tiedf32", L(target_modules=qv, modules_to_save=["embed_tokens", "lm_head"]), 205)
    g.adapter("dora-qv", "llamaf32", L(target_modules=qv, use_dora=True), 211)
    g.adapter("dora-all", "llamaf32", L(target_modules="all-linear", use_dora=True), 212)
    g.adapter("dora-gpt2", "gpt2f32", L(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                                         use_dora=True), 213)
    g.adapter("dora-embed", "llamaf32", L(target_modules=["embed_tokens", "q_proj"], use_dora=True), 216)
    g.adapter("lora-attn", "llamaf32", L(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), 214)
    g.adapter("dora-qvmlp", "llamaf32", L(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                                          use_dora=True), 215)
    g.adapter("tt-lora", "llamaf32", L(target_modules=qv, trainable_token_indices=[3, 5, 200]), 221)
    g.adapter("tt-only", "llamaf32", TrainableTokensConfig(token_indices=[1, 7, 100], init_weights=True), 222)
    g.adapter("tt-dict", "llamaf32", L(target_modules=qv, trainable_token_indices={"embed_tokens": [3, 5],
                                                                                     "lm_head": [9, 200]}), 223)
    g.adapter("tt-tied", "tiedf32", L(target_modules=qv, trainable_token_indices=[3, 5, 200]), 224)
    g.adapter("tt-tied-dict", "tiedf32", L(target_modules=qv, trainable_token_indices={"embed_tokens": [3, 5],
                                                                                         "lm_head": [9, 200]}), 225)
    g.adapter("tt-a", "llamaf32", L(target_modules=["q_proj"], trainable_token_indices=[3, 7]), 226)
    g.adapter("tt-b", "llamaf32", L(target_modules=["v_proj"], trainable_token_indices=[7, 9]), 227)
    g.adapter("tt-c", "llamaf32", L(target_modules=["v_proj"], trainable_token_indices=[9, 11]), 228)
    g.adapter("resized-mts", "llamaf32", L(target_modules=qv, modules_to_save=["embed_tokens", "lm_head"]), 231,
              resize_to=VOCAB + ADDED, tokenizer="added")
    g.adapter("moe-experts", "mixf32", L(target_modules=["q_proj"],
                                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), 241)
    g.adapter("param-2d", "llamaf32", L(target_modules=[], target_parameters=["self_attn.q_proj.weight",
                                                                             "mlp.down_proj.weight"]), 242)

    # The same LoRA-on-embed_tokens adapter, but its saved embedding copy (embed_tokens.base_layer.weight, written
    # by save_embedding_layers) differs from the recipe's base: PEFT loads the copy over the base's embedding.
    src, info = g.adapters["lora-embed"]
    d = out / "_work" / "adapters" / "lora-embed-othercopy"
    shutil.copytree(src, d)
    t = load_file(str(d / "adapter_model.safetensors"))
    k = PREFIX + "model.embed_tokens.base_layer.weight"
    t[k] = t[k] + 0.01 * torch.randn(t[k].shape, generator=torch.Generator().manual_seed(251))
    save_file(t, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    g.adapters["lora-embed-othercopy"] = (d, info)

    print("cases", flush=True)
    for dt in ("f32", "bf16"):
        g.case(f"tied_lora_embed_{dt}", base=f"tied{dt}", adapters=[("lora-embed", None)],
               note="tied LLaMA (no lm_head.weight on disk), LoRA on embed_tokens + q,v; PEFT's merge changes the "
                    "shared tensor, so lm_head gets the embedding delta too and the model stays tied")
        g.case(f"tied_lora_lmhead_{dt}", base=f"tied{dt}", adapters=[("lora-lmhead", None)],
               note="tied LLaMA, LoRA on lm_head + q,v; the shared tensor changes, embed_tokens too; stays tied")
        g.case(f"tied_mts_embed_{dt}", base=f"tied{dt}", adapters=[("mts-embed", None)],
               note="tied LLaMA, modules_to_save=[embed_tokens]: new embedding, lm_head keeps the base embedding; "
                    "PEFT unties (tie_word_embeddings=False, lm_head.weight written)")
        g.case(f"tied_mts_lmhead_{dt}", base=f"tied{dt}", adapters=[("mts-lmhead", None)],
               note="tied LLaMA, modules_to_save=[lm_head]: new lm_head, embedding unchanged; untied")
        g.case(f"tied_mts_both_{dt}", base=f"tied{dt}", adapters=[("mts-both", None)],
               note="tied LLaMA, modules_to_save=[embed_tokens, lm_head]: two different copies; untied")
        g.case(f"tied_stale_lmhead_{dt}", base=f"stale{dt}", adapters=[("lora-embed", None)],
               note="tied LLaMA whose checkpoint also holds lm_head.weight (equal to the embedding), LoRA on "
                    "embed_tokens: the stale copy must not survive as a different tensor (tied output)")
        g.case(f"dora_qv_{dt}", base=f"llama{dt}", adapters=[("dora-qv", None)], hand=hand_dora_check,
               note="DoRA on q,v of LLaMA: W' = m/||W + sBA||_row * (W + sBA)")
        g.case(f"dora_all_{dt}", base=f"llama{dt}", adapters=[("dora-all", None)], hand=hand_dora_check,
               note="DoRA on target_modules='all-linear' (the seven projections, lm_head excluded)")
        g.case(f"dora_gpt2_{dt}", base=f"gpt2{dt}", adapters=[("dora-gpt2", None)], hand=hand_dora_check,
               note="DoRA on GPT-2 Conv1D (fan_in_fan_out): W stored [in,out], norm per column")
        g.case(f"dora_embed_{dt}", base=f"llama{dt}", adapters=[("dora-embed", None)], hand=hand_dora_check,
               note="DoRA on embed_tokens (+ q_proj), untied: m has hidden-size entries, the norm runs over the "
                    "vocabulary (each column of [V,H]); the adapter also holds embed_tokens.base_layer.weight")
        g.case(f"dora_stack_{dt}", base=f"llama{dt}", adapters=[("lora-attn", None), ("dora-qvmlp", None)],
               hand=hand_dora_check, alt_modes=("sequential",),
               note="LoRA (q,k,v,o) then DoRA (q,v,gate,down): PEFT joint merge, DoRA norm on W + dDoRA only: "
                    "W' = m/||W + dD|| * (W + dL + dD) where both adapt a module")
        g.case(f"tt_lora_{dt}", base=f"llama{dt}", adapters=[("tt-lora", None)], hand=hand_tt_check,
               note="untied LLaMA, LoRA q,v + trainable_token_indices=[3,5,200]: embedding rows replaced; lm_head kept")
        g.case(f"tt_tied_{dt}", base=f"tied{dt}", adapters=[("tt-tied", None)], hand=hand_tt_check,
               note="tied LLaMA, trainable_token_indices=[3,5,200]: the shared tensor's rows replaced (lm_head too)")
        g.case(f"resized_base_{dt}", base=f"resized{dt}", adapters=[("resized-mts", None)], tokenizer_from="adapter",
               note="base = the resized (264-token) base on disk; adapter modules_to_save=[embed_tokens, lm_head] "
                    "saved after resize (holds .weight, .modules_to_save.weight, .original_module.weight)")
        g.case(f"resized_orig_{dt}", base=f"llama{dt}", ref_base=f"resized{dt}", adapters=[("resized-mts", None)],
               tokenizer_from="adapter",
               note="base = the original 256-token base; the adapter's full 264-row copies replace both matrices; "
                    "expected = PEFT's merge on the resized base (PEFT itself refuses this base: size mismatch); "
                    "vocab_size 264 and the adapter folder's tokenizer")
        g.case(f"moe_{dt}", base=f"mix{dt}", adapters=[("moe-experts", None)], hand=hand_moe_check,
               note="Mixtral (per-expert w1/w2/w3 on disk, as transformers 5.23 saves it), target_parameters on "
                    "mlp.experts.gate_up_proj/down_proj + q_proj; PEFT rounds the delta to bf16 before adding")
    g.case("tt_only_f32", base="llamaf32", adapters=[("tt-only", None)], hand=hand_tt_check,
           note="TrainableTokensConfig alone (peft_type TRAINABLE_TOKENS): key embed_tokens.trainable_tokens_delta")
    g.case("tt_dict_f32", base="llamaf32", adapters=[("tt-dict", None)], hand=hand_tt_check,
           note="untied, trainable_token_indices={embed_tokens:[3,5], lm_head:[9,200]}: rows of each matrix")
    g.case("tt_tied_dict_f32", base="tiedf32", adapters=[("tt-tied-dict", None)],
           note="tied, different indices for embed_tokens and lm_head: PEFT wraps both separately; merged into the "
                "one shared tensor, both sets of rows land in it and the model stays tied")
    g.case("tt_stack_f32", base="llamaf32", adapters=[("tt-a", None), ("tt-c", None)], hand=hand_tt_check,
           note="two adapters with disjoint trainable tokens ([3,7] and [9,11]) + LoRA on q / v: both sets of rows")
    g.case("tt_overlap_refused", base="llamaf32", adapters=[("tt-a", None), ("tt-b", None)],
           refuse={"stderr_patterns": [r"(?i)token", r"\b7\b"]},
           note="two adapters whose trainable tokens overlap (row 7): PEFT refuses the merge; modelforge must too")
    g.case("dora_weight_f32", base="llamaf32", adapters=[("dora-qv", 0.5)],
           hand=lambda g_, b, a, e: hand_dora_check(g_, b, a, e, weights=(0.5,)),
           note="recipe weight 0.5 on a DoRA adapter: W' = m/||W + 0.5 sBA|| * (W + 0.5 sBA), magnitude absolute; "
                "PEFT cannot take a merge weight: ref = PEFT with the adapter's scaling halved, checked by hand")
    g.case("moe_fused_f32", base="mixfused", adapters=[("moe-experts", None)], hand=hand_moe_check,
           note="the same MoE adapter on a base whose checkpoint holds the fused 3-D mlp.experts.gate_up_proj "
                "[E,2I,H] / down_proj [E,H,I] (transformers 5.23 loads it as is)")
    g.case("embed_copy_differs_f32", base="tiedf32", adapters=[("lora-embed-othercopy", None)],
           note="LoRA on embed_tokens whose saved copy embed_tokens.base_layer.weight differs from the base's "
                "embedding: PEFT's merge starts from the adapter's copy (W_copy + dW), not from the base")
    g.case("param2d_f32", base="llamaf32", adapters=[("param-2d", None)],
           note="target_parameters on plain 2-D Linear weights (self_attn.q_proj.weight, mlp.down_proj.weight), "
                "target_modules=[]: keys like an ordinary LoRA (q_proj.lora_A.weight)")

    shutil.rmtree(out / "_work", ignore_errors=True)
    return g.cases


def fingerprint() -> str:
    import peft
    import safetensors
    import transformers

    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(Path(mf.__file__).read_bytes())
    h.update(f"{FORMAT_VERSION} {torch.__version__} {transformers.__version__} {peft.__version__} "
             f"{safetensors.__version__}".encode())
    return h.hexdigest()


def ensure(out: Path, force: bool = False) -> list[dict]:
    """Generate into `out` unless it already holds fixtures with the same fingerprint."""
    return mf.ensure(out, force, build_fn=build, fingerprint_fn=fingerprint, label="real-adapter fixtures")


def main(argv=None) -> int:
    return mf.main(argv, ensure_fn=ensure, default_out=DEFAULT_OUT, doc=__doc__)


if __name__ == "__main__":
    sys.exit(main())
