#!/usr/bin/env python3
"""Benchmark: fusing one LoRA into a ~1.3 GB bf16 LLaMA-shaped model.

Generates once, into DIR (default <repo>/target/bench):
    DIR/model/     LLaMA-shaped bf16 model: hidden 2048, intermediate 5632, 12 layers, 32 heads
                   (4 kv heads), vocab 32000, untied: 661M parameters, 1.32 GB in 3 shards + index.
                   Written tensor by tensor with safetensors (one shard in memory at a time).
    DIR/lora/      r=16, alpha=32 adapter on all seven projections, random non-zero A and B (f32)
    DIR/recipe.toml, DIR/peft_merge.py
then measures, RUNS times each (median reported), with a warm page cache:
    cp -r            copying the model folder (the floor for any tool that writes a new model)
    modelforge       `modelforge build DIR/recipe.toml --quiet`
    PEFT             load base (bf16) + PeftModel.from_pretrained + merge_and_unload + save_pretrained
Wall time is measured around the child process; peak RSS from `/usr/bin/time -v` when present,
else from resource.getrusage(RUSAGE_CHILDREN) in a one-child wrapper process.
Prints a markdown table.  Not part of the test suite.

    .venv/bin/python bench/bench_fuse.py [DIR] [--runs 3] [--bin PATH] [--skip-peft]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / "target" / "bench"
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
SHARD_BYTES = 500 * 1000 * 1000
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
STAMP_VERSION = "1"


# --------------------------------------------------------------------------------------------
# generation


def generate(d: Path) -> None:
    stamp = d / "generated.json"
    want = {"version": STAMP_VERSION, "shape": SHAPE, "rank": RANK, "alpha": ALPHA}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        print(f"reusing {d}", file=sys.stderr)
        return
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    for sub in ("model", "lora"):
        shutil.rmtree(d / sub, ignore_errors=True)
    model_dir, lora_dir = d / "model", d / "lora"
    model_dir.mkdir(parents=True)

    cfg = LlamaConfig(**SHAPE, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.dtype = "bfloat16"
    # The exact checkpoint names and shapes, from the real class built on the meta device.
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    cfg.save_pretrained(str(model_dir))

    g = torch.Generator().manual_seed(0)

    def tensor(name, shape):
        if name.endswith("norm.weight"):
            t = 1.0 + 0.05 * torch.randn(shape, generator=g)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        return t.to(torch.bfloat16)

    # group into shards of at most SHARD_BYTES, in state-dict order
    groups, cur, cur_bytes = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if cur and cur_bytes + nbytes > SHARD_BYTES:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += nbytes
    groups.append(cur)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        fn = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: tensor(n, shapes[n]) for n in names}
        save_file(tensors, str(model_dir / fn), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fn
            total += t.numel() * 2
        del tensors
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    # adapter
    lcfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=SEVEN,
                      base_model_name_or_path=str(model_dir))
    lcfg.save_pretrained(str(lora_dir))
    acfg = json.loads((lora_dir / "adapter_config.json").read_text())
    acfg["target_modules"] = sorted(acfg["target_modules"])
    (lora_dir / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True))
    lora = {}
    for name, shape in shapes.items():
        if not any(f".{m}." in name for m in SEVEN):
            continue
        out_f, in_f = shape
        stem = "base_model.model." + name[: -len(".weight")]
        lora[f"{stem}.lora_A.weight"] = torch.randn((RANK, in_f), generator=g) / in_f ** 0.5
        lora[f"{stem}.lora_B.weight"] = 0.01 * torch.randn((out_f, RANK), generator=g)
    save_file(lora, str(lora_dir / "adapter_model.safetensors"), metadata={"format": "pt"})

    (d / "recipe.toml").write_text(
        '[base]\npath = "model"\n\n[[adapter]]\npath = "lora"\n\n'
        '[output]\npath = "out-modelforge"\ndtype = "base"\n\n[build]\ndevice = "cpu"\n')
    stamp.write_text(json.dumps(want))
    size = sum(p.stat().st_size for p in model_dir.iterdir())
    print(f"generated {model_dir} ({size / 1e9:.2f} GB, {len(groups)} shards) and {lora_dir} "
          f"in {time.time() - t0:.0f}s", file=sys.stderr)


PEFT_SCRIPT = """\
import os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, lora, out = sys.argv[1:4]
m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, lora).merge_and_unload()
m.save_pretrained(out)
"""


# --------------------------------------------------------------------------------------------
# measurement

TIME_V = Path("/usr/bin/time")
RUSAGE_WRAPPER = ("import resource, subprocess, sys\n"
                  "rc = subprocess.run(sys.argv[1:]).returncode\n"
                  "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
                  "sys.exit(rc)\n")


def measure(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one run of cmd."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        if TIME_V.exists():
            full = [str(TIME_V), "-v", "-o", tf.name, *cmd]
        else:
            full = [sys.executable, "-c", RUSAGE_WRAPPER, *cmd]
        t0 = time.perf_counter()
        p = subprocess.run(full, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
        if TIME_V.exists():
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", Path(tf.name).read_text())
            kb = int(m.group(1))
        else:
            kb = int(p.stderr.strip().splitlines()[-1])
    return wall, kb / 1024.0


def warm(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def compare_outputs(a: Path, b: Path, names: list[str]) -> str:
    """Bitwise agreement of a few fused tensors between two outputs."""
    import torch
    from safetensors import safe_open

    def get(d: Path, n: str):
        idx = d / "model.safetensors.index.json"
        fn = json.loads(idx.read_text())["weight_map"][n] if idx.exists() else "model.safetensors"
        with safe_open(str(d / fn), "pt") as f:
            return f.get_tensor(n)

    same = tot = 0
    worst = 0
    for n in names:
        x, y = get(a, n), get(b, n)
        same += int((x == y).sum())
        tot += x.numel()
        xi, yi = x.view(torch.int16).int(), y.view(torch.int16).int()
        xi = torch.where(xi < 0, -(xi & 0x7FFF), xi)
        yi = torch.where(yi < 0, -(yi & 0x7FFF), yi)
        worst = max(worst, int((xi - yi).abs().max()))
    return f"{same}/{tot} elements bit-identical, worst {worst} ulp ({len(names)} fused tensors compared)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", nargs="?", default=str(DEFAULT_DIR))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bin", default=os.environ.get("MODELFORGE_BIN", str(REPO / "target" / "debug" / "modelforge")))
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--keep-outputs", action="store_true", help="leave the last run's outputs in DIR")
    args = ap.parse_args(argv)
    d = Path(args.dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    generate(d)
    (d / "peft_merge.py").write_text(PEFT_SCRIPT)

    model = d / "model"
    size_gb = sum(p.stat().st_size for p in model.iterdir()) / 1e9
    # Each step: label, command, and what to remove before each run (so that every run does
    # the whole job). The cold modelforge build also starts from an empty cache and no lock file;
    # the no-op build runs on what the cold build left.
    steps = [("cp -r", ["cp", "-r", "model", "out-cp"], [d / "out-cp"])]
    if Path(args.bin).exists():
        build = [args.bin, "build", "recipe.toml", "--quiet", "--cache", "bench-cache"]
        steps.append(("modelforge build (cold cache)", build, [d / "out-modelforge", d / "bench-cache", d / "recipe.lock"]))
        steps.append(("modelforge build (no-op)", build, []))
    else:
        print(f"note: no modelforge binary at {args.bin}; skipping it", file=sys.stderr)
    if not args.skip_peft:
        env_py = sys.executable
        steps.append(("PEFT merge_and_unload + save", [env_py, "peft_merge.py", "model", "lora", "out-peft"],
                      [d / "out-peft"]))

    warm(model)
    warm(d / "lora")
    results = {}
    for label, cmd, stale in steps:
        walls, rss = [], []
        for i in range(args.runs):
            for path in stale:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            w, r = measure(cmd, d)
            walls.append(w)
            rss.append(r)
            print(f"  {label} run {i + 1}: {w:.2f}s, {r:.0f} MiB", file=sys.stderr, flush=True)
        results[label] = (statistics.median(walls), statistics.median(rss), walls)

    agreement = ""
    mf_out, peft_out = d / "out-modelforge", d / "out-peft"
    if mf_out.exists() and peft_out.exists():
        names = [f"model.layers.{i}.{m}.weight" for i in (0, 11)
                 for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]
        agreement = compare_outputs(mf_out, peft_out, names)

    cpu = os.cpu_count()
    print(f"\nFusing an r={RANK} LoRA (7 projections) into a {size_gb:.2f} GB bf16 LLaMA-shaped model "
          f"(12 layers, hidden 2048); {cpu} CPUs, warm page cache, median of {args.runs} runs.\n")
    print("| step | wall time (s) | peak RSS (MiB) | runs (s) |")
    print("|---|---:|---:|---|")
    for label, (w, r, walls) in results.items():
        print(f"| {label} | {w:.2f} | {r:.0f} | {', '.join(f'{x:.2f}' for x in walls)} |")
    if agreement:
        print(f"\nmodelforge vs PEFT: {agreement}")
    if not args.keep_outputs:
        for _, _, stale in steps:
            for path in stale:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
