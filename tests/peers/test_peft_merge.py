"""Peer tests: modelforge's fused models against PEFT's merge_and_unload() and transformers.

Fixtures come from make_fixtures.py (tiny models, adapters trained for a few steps, PEFT's merged
models and exact f32 references), generated once into $MODELFORGE_PEERS_DIR (default
<repo>/target/peers) and reused while make_fixtures.py and the library versions are unchanged.
Each case's recipe is then built once per session with the binary at $MODELFORGE_BIN (default
<repo>/target/debug/modelforge).

    .venv/bin/python -m pytest tests/peers -q
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)  # see make_fixtures.py: OpenMP on two busy cores is ~100x slower

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
from support import modelforge  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

REPO = mf.REPO
PEERS_DIR = Path(os.environ.get("MODELFORGE_PEERS_DIR", mf.DEFAULT_OUT)).resolve()

# Kept in step with make_fixtures.build() by test_fixture_cases_match.
CASES = [
    "llama_gqa_f32", "llama_gqa_bf16", "llama_gqa_f16", "llama_bf16_to_f32", "llama_f32_to_bf16",
    "llama_weight_f32", "qwen2_bias_f32", "gpt2_conv1d_f32", "llama_rslora_f32", "llama_patterns_f32",
    "llama_layers_f32", "llama_embed_f32", "llama_embed_nocopy_f32", "llama_lmhead_f32", "stack_cat_f32", "stack_cat_bf16",
    "stack_rules_f32",
]
TORCH_DTYPE = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
CONFIG_DTYPE = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
# Files a base folder may carry that the output must hold byte for byte.
PASSTHROUGH = ["generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja"]


# --------------------------------------------------------------------------------------------
# session fixtures


@pytest.fixture(scope="session")
def cases() -> dict[str, dict]:
    return {c["name"]: c for c in mf.ensure(PEERS_DIR)}


class Builds:
    """Runs `modelforge build` once per recipe, lazily, from a working directory unrelated to the
    recipe (so relative paths must resolve against the recipe's folder)."""

    def __init__(self):
        self.results: dict[tuple[str, str], dict] = {}
        self.cwd = tempfile.mkdtemp(prefix="modelforge-peers-cwd-")

    def run(self, recipe: Path, out: Path, *flags: str) -> dict:
        key = (str(recipe), " ".join(flags))
        if key not in self.results:
            if out.exists():
                shutil.rmtree(out)  # a fresh build every session, never a stale output
            t0 = time.time()
            p = modelforge("build", recipe, *flags, cwd=self.cwd, check=False, timeout=300)
            self.results[key] = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr,
                                 "seconds": time.time() - t0, "out": out}
        return self.results[key]


@pytest.fixture(scope="session")
def builds():
    b = Builds()
    yield b
    shutil.rmtree(b.cwd, ignore_errors=True)


@pytest.fixture
def case(request, cases, builds):
    """The case's metadata plus a successful build of its recipe (fails the test otherwise)."""
    name = request.param
    c = dict(cases[name])
    c["dir"] = PEERS_DIR / name
    c["out"] = c["dir"] / "out"
    r = builds.run(c["dir"] / "recipe.toml", c["out"], "--quiet")
    assert r["rc"] == 0, f"modelforge build {name} exited {r['rc']}\nstdout:\n{r['stdout']}\nstderr:\n{r['stderr']}"
    c["build"] = r
    return c


def per_case(fn):
    return pytest.mark.parametrize("case", CASES, indirect=True)(fn)


# --------------------------------------------------------------------------------------------
# helpers


def read_dir(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, through its index when there is one."""
    idx = model_dir / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        out = {}
        for fn in sorted(set(wm.values())):
            with safe_open(str(model_dir / fn), "pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
        return out
    return load_file(str(model_dir / "model.safetensors"))


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Maps a 16-bit float tensor onto integers that count representable values in order, so the
    difference of two such maps is the distance in ulps (+0 and -0 both map to 0)."""
    i = t.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def logits(model_dir: Path, dtype: torch.dtype, ids: torch.Tensor) -> torch.Tensor:
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    with torch.no_grad():
        return m(input_ids=ids).logits.float()


IDS = torch.Generator().manual_seed(7)
INPUT_IDS = torch.randint(0, mf.VOCAB, (2, 16), generator=IDS)


# --------------------------------------------------------------------------------------------
# tests


def test_fixture_cases_match(cases):
    assert sorted(cases) == sorted(CASES)


@per_case
def test_tensor_set_shapes_dtypes(case):
    ours = read_dir(case["out"])
    ref = read_dir(case["dir"] / "ref")
    assert sorted(ours) == sorted(ref), {"missing": sorted(set(ref) - set(ours)),
                                         "extra": sorted(set(ours) - set(ref))}
    want = TORCH_DTYPE[case["out_dtype"]]
    bad = {k: (tuple(v.shape), str(v.dtype)) for k, v in ours.items()
           if v.shape != ref[k].shape or v.dtype != want}
    assert not bad, f"shape/dtype mismatches (want {want}): {bad}"


@per_case
def test_values_against_peft(case):
    ours = read_dir(case["out"])
    ref = read_dir(case["dir"] / "ref")
    base = read_dir(case["dir"] / case["base"])
    ref32 = load_file(str(case["dir"] / "ref32.safetensors"))
    changed = set(case["changed"])
    failures = []
    for k in sorted(ref):
        o, r = ours[k], ref[k]
        assert o.shape == r.shape and o.dtype == r.dtype, k
        if k not in changed:
            # Not touched by any adapter (and no dtype change): copied bit for bit.
            if not torch.equal(o, r):
                failures.append(f"{k}: untouched tensor differs, max {(o.float() - r.float()).abs().max().item():.3g}")
            continue
        if case["out_dtype"] == "f32":
            tol = 1e-6 * r.abs().max().item()
            d = (o - r).abs().max().item()
            if not d <= tol:  # also catches NaN
                failures.append(f"{k}: max|ours-peft| {d:.3g} > {tol:.3g} (max|W'| {r.abs().max().item():.3g})")
            continue
        # 16-bit outputs. (1) Within one ulp of PEFT's value, element by element.
        ulps = (ordered_bits(o) - ordered_bits(r)).abs()
        if int(ulps.max()) > 1 or not torch.isfinite(o).all():
            failures.append(f"{k}: {int((ulps > 1).sum())} elements more than one ulp from PEFT "
                            f"(worst {int(ulps.max())} ulps)")
        # (2) At least as close to the exact f32 result as PEFT is, element by element, up to a
        # slack of 2^-16 of the operands' size. Why not strictly elementwise: the exact reference
        # and any f32 implementation (PEFT's included) sum B·A in some order, and an element whose
        # exact value lies within a few f32 ulps of a rounding midpoint may round either way.
        # Measured: PEFT's own concatenated ("cat") merge of stack_cat_bf16 rounds 3 of its 147456
        # fused elements away from round(ref32) for exactly this reason (cases.json records it as
        # peft_not_correctly_rounded; 10 with larger deltas in an earlier version of the fixtures). The slack is 2^7 (bf16) or 2^4
        # (f16) times smaller than half an output ulp of W, so rounding twice, rounding the delta
        # to 16 bits first, or truncating instead of rounding still fail here on many elements.
        # (3) Sum-wise, ours must not be worse than PEFT by more than 1e-4 relative.
        e = ref32[k]
        b = base[k].float()
        err_o = (o.float() - e).abs()
        err_r = (r.float() - e).abs()
        slack = 2.0 ** -16 * (b.abs() + (e - b).abs().max())
        worse = err_o > err_r + slack
        if worse.any():
            i = int(torch.argmax((err_o - err_r).flatten()))
            failures.append(f"{k}: {int(worse.sum())} elements farther from the exact f32 result than PEFT "
                            f"(e.g. flat[{i}]: exact {e.flatten()[i].item():.9g}, ours {o.flatten()[i].item():.9g}, "
                            f"peft {r.flatten()[i].item():.9g})")
        so, sr = err_o.double().sum().item(), err_r.double().sum().item()
        if not so <= sr * (1 + 1e-4) + 1e-30:
            failures.append(f"{k}: total |ours-exact| {so:.6g} > PEFT's {sr:.6g}")
    assert not failures, f"{len(failures)} tensors fail:\n" + "\n".join(failures[:20])


@per_case
def test_values_against_exact_f32(case):
    """Directly against W + sum w*s*BA in f32 (the contract), independent of PEFT's merge path."""
    ours = read_dir(case["out"])
    ref32 = load_file(str(case["dir"] / "ref32.safetensors"))
    failures = []
    for k in case["changed"]:
        o, e = ours[k], ref32[k]
        if case["out_dtype"] == "f32":
            tol = 1e-6 * e.abs().max().item()
            d = (o - e).abs().max().item()
            if not d <= tol:
                failures.append(f"{k}: max|ours-exact| {d:.3g} > {tol:.3g}")
        else:
            # correctly rounded to within one ulp (one ulp allowed for midpoint cases, see above)
            ulps = (ordered_bits(o) - ordered_bits(e.to(o.dtype))).abs()
            if int(ulps.max()) > 1:
                failures.append(f"{k}: {int((ulps > 1).sum())} elements more than one ulp from round(exact)")
    assert not failures, "\n".join(failures[:20])


@per_case
def test_loads_in_transformers_and_logits(case):
    want = TORCH_DTYPE[case["out_dtype"]]
    model, info = AutoModelForCausalLM.from_pretrained(str(case["out"]), dtype=want, output_loading_info=True)
    problems = {k: sorted(v) if isinstance(v, (set, list)) else v for k, v in info.items() if v}
    assert not problems, f"loading the output: {problems}"
    assert model.config.model_type == json.loads((case["dir"] / case["base"] / "config.json").read_text())["model_type"]
    if case["out_dtype"] != "f32":
        return  # 16-bit outputs are compared tensor by tensor above
    with torch.no_grad():
        ours = model.eval()(input_ids=INPUT_IDS).logits.float()
    ref = logits(case["dir"] / "ref", torch.float32, INPUT_IDS)
    base = logits(case["dir"] / case["base"], torch.float32, INPUT_IDS)
    # guard: the adapters must move the logits, or this comparison could not fail
    assert (ref - base).abs().max().item() > 1e-4, "fixture adapters do not change the logits"
    d = (ours - ref).abs().max().item()
    assert d <= 1e-5, f"logits differ from PEFT's merged model by {d:.3g} (base vs PEFT: {(ref - base).abs().max().item():.3g})"


@per_case
def test_output_files(case):
    out, base_dir = case["out"], case["dir"] / case["base"]
    readme = out / "README.md"
    assert readme.is_file(), "no README.md model card"
    text = readme.read_text()
    assert case["base_name"] in text, f"model card does not name the base {case['base_name']!r}"
    for a in case["adapters"]:
        assert a["folder"] in text, f"model card does not name adapter {a['folder']!r}"
    cfg = json.loads((out / "config.json").read_text())
    base_cfg = json.loads((base_dir / "config.json").read_text())
    assert cfg["model_type"] == base_cfg["model_type"]
    assert cfg.get("architectures") == base_cfg.get("architectures")
    manifest = json.loads((out / "modelforge.json").read_text())
    assert isinstance(manifest, dict) and manifest, "modelforge.json is not a JSON object"
    for fn in PASSTHROUGH:
        if (base_dir / fn).exists():
            assert (out / fn).is_file(), f"{fn} not copied from the base"
            assert (out / fn).read_bytes() == (base_dir / fn).read_bytes(), f"{fn} differs from the base's"


@per_case
def test_quiet_build_prints_nothing(case):
    assert case["build"]["stdout"] == "", f"--quiet printed on stdout: {case['build']['stdout'][:500]!r}"


@per_case
def test_config_dtype_matches_tensors(case):
    """transformers loads with dtype from config.json by default: it must name the written dtype."""
    cfg = json.loads((case["out"] / "config.json").read_text())
    got = cfg.get("dtype", cfg.get("torch_dtype"))
    assert got == CONFIG_DTYPE[case["out_dtype"]], f"config.json dtype {got!r}, tensors are {case['out_dtype']}"


@per_case
def test_safetensors_layout(case):
    out = case["out"]
    files = sorted(p.name for p in out.glob("*.safetensors"))
    idx = out / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        assert sorted(set(wm.values())) == files, "index names other files than the shards present"
        seen = {}
        for fn in files:
            with safe_open(str(out / fn), "pt") as f:
                for k in f.keys():
                    assert k not in seen, f"{k} in both {seen.get(k)} and {fn}"
                    seen[k] = fn
        assert seen == wm, "weight_map does not match the shards' contents"
    else:
        assert files == ["model.safetensors"], f"no index but files {files}"
    for fn in files:  # every file is a readable safetensors file with metadata format pt
        with safe_open(str(out / fn), "pt") as f:
            meta = f.metadata() or {}
            assert meta.get("format", "pt") == "pt"


def _extra_recipe(case_dir: Path, name: str, body: str) -> Path:
    p = case_dir / f"recipe_{name}.toml"
    p.write_text(body)
    return p


def test_no_adapter_copies_base(cases, builds):
    """Zero adapters: the output holds the base's tensors bit for bit."""
    d = PEERS_DIR / "llama_gqa_f32"
    c = cases["llama_gqa_f32"]
    out = d / "out_noadapter"
    recipe = _extra_recipe(d, "noadapter", f'[base]\npath = "{c["base"]}"\n\n[output]\npath = "out_noadapter"\n')
    r = builds.run(recipe, out, "--quiet")
    assert r["rc"] == 0, r["stderr"]
    ours, base = read_dir(out), read_dir(d / c["base"])
    assert sorted(ours) == sorted(base)
    assert all(torch.equal(ours[k], base[k]) for k in base)


def test_json_summary_and_determinism(cases, builds):
    """--json prints JSON on stdout; a second build of the same recipe gives identical tensors."""
    d = PEERS_DIR / "stack_cat_bf16"
    first = builds.run(d / "recipe.toml", d / "out", "--quiet")
    assert first["rc"] == 0, first["stderr"]
    a = read_dir(d / "out")
    body = (d / "recipe.toml").read_text().replace('path = "out"', 'path = "out_json"')
    recipe = _extra_recipe(d, "json", body)
    r = builds.run(recipe, d / "out_json", "--json")
    assert r["rc"] == 0, r["stderr"]
    text = r["stdout"].strip()
    try:
        summary = json.loads(text)
    except json.JSONDecodeError:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert lines, "--json printed nothing on stdout"
        summary = json.loads(lines[-1])  # JSON lines: the last one is the summary
    assert isinstance(summary, (dict, list)) and summary
    b = read_dir(d / "out_json")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), "rebuild differs"


def test_shipped_example_matches_peft(builds, tmp_path):
    """examples/tiny-llama + examples/tiny-llama-lora (as in recipes/quickstart.toml) fuse to PEFT's result."""
    ex = REPO / "examples"
    base, lora = ex / "tiny-llama", ex / "tiny-llama-lora"
    if not (base / "config.json").exists():
        pytest.fail("examples/tiny-llama is missing: run examples/make_example.py")
    size = sum(p.stat().st_size for d in (base, lora) for p in d.iterdir())
    assert size < 1_000_000, f"example files are {size} bytes"
    recipe = tmp_path / "quickstart.toml"
    recipe.write_text(f'[base]\npath = "{base}"\n\n[[adapter]]\npath = "{lora}"\nweight = 1.0\n\n'
                      '[output]\npath = "out"\ndtype = "base"\n\n[build]\ndevice = "cpu"\n')
    r = builds.run(recipe, tmp_path / "out", "--quiet")
    assert r["rc"] == 0, r["stderr"]
    mf.peft_reference(base, "f32", [lora], None, tmp_path / "ref")
    ours, ref, orig = read_dir(tmp_path / "out"), read_dir(tmp_path / "ref"), read_dir(base)
    assert sorted(ours) == sorted(ref)
    fused = [k for k in ref if not torch.equal(ref[k], orig[k])]
    assert len(fused) == 14, fused  # 7 projections x 2 layers
    for k in ref:
        tol = 1e-6 * ref[k].abs().max().item()
        assert (ours[k] - ref[k]).abs().max().item() <= tol, k


def test_shards_by_inputs_load_in_transformers(cases, builds):
    """`shard_by = "inputs"`: one shard per set of adapters; transformers loads the index, and the
    tensors are those of the default layout bit for bit, so the logits are PEFT's."""
    d = PEERS_DIR / "stack_cat_f32"
    first = builds.run(d / "recipe.toml", d / "out", "--quiet")
    assert first["rc"] == 0, first["stderr"]
    body = (d / "recipe.toml").read_text().replace('path = "out"', 'path = "out_inputs"\nshard_by = "inputs"')
    assert "shard_by" in body
    r = builds.run(_extra_recipe(d, "inputs", body), d / "out_inputs", "--quiet")
    assert r["rc"] == 0, r["stderr"]
    weight_map = json.loads((d / "out_inputs" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 2, weight_map
    ours, default = read_dir(d / "out_inputs"), read_dir(d / "out")
    assert sorted(ours) == sorted(default) and all(torch.equal(ours[k], default[k]) for k in ours)
    model, info = AutoModelForCausalLM.from_pretrained(str(d / "out_inputs"), dtype=torch.float32,
                                                       output_loading_info=True)
    assert not {k: v for k, v in info.items() if v}, info
    with torch.no_grad():
        got = model.eval()(input_ids=INPUT_IDS).logits.float()
    ref = logits(d / "ref", torch.float32, INPUT_IDS)
    assert (got - ref).abs().max().item() <= 1e-5
