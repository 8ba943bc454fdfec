#!/usr/bin/env python3
"""The benchmark's cold build at 7B scale, on the machine it runs on: end-to-end GB/s of
`modelforge build` (CUDA, and the CPU) against that machine's own `cp -r && sync`.

Meant for a GPU machine with PyTorch 2.11, transformers and peft, and no Rust toolchain or
network: it runs from the folder bench/prepare_gpu_check.sh makes (the release binaries in
`bin/`), after gpu_check.sh has pointed LD_LIBRARY_PATH at that PyTorch's libraries.

    python3 gpu_bench.py WORK [--shape 7b|small] [--devices cuda,cpu] [--bin bin]

Generates into WORK a LLaMA-2-7B-shaped bf16 model (hidden 4096, intermediate 11008, 32
layers, 32 heads, vocab 32000: 6.7B parameters, 13.5 GB in shards of at most 5 GB) with random
weights drawn on the GPU when there is one, and a LoRA of rank 16 on all seven projections.
Then times, each from an empty page cache's dirty state (synced first, untimed) until `sync`
returns: `cp -r` of the model, and `modelforge build` from an empty cache on each device.
Prints a markdown table and writes WORK/gpu_bench.json. Checks that every device gave a model
whose tensors agree to bf16 rounding (at most one ulp) on the tensors it compares.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=4000),
}
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD = 5_000_000_000


def generate(work: Path, shape: dict) -> tuple[int, float]:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = work / "model"
    shutil.rmtree(model, ignore_errors=True)
    shutil.rmtree(work / "lora", ignore_errors=True)
    model.mkdir(parents=True)
    t0 = time.perf_counter()
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    cfg.dtype = "bfloat16"
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    cfg.save_pretrained(str(model))
    g = torch.Generator(device=device).manual_seed(0)

    def tensor(name, s):
        t = torch.randn(s, generator=g, device=device, dtype=torch.float32)
        t = 1.0 + 0.05 * t if name.endswith("norm.weight") else 0.02 * t
        return t.to(torch.bfloat16).cpu()

    groups, cur, size = [], [], 0
    for name, s in shapes.items():
        n = 2 * int(torch.Size(s).numel())
        if cur and size + n > SHARD:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += n
    groups.append(cur)
    total, weight_map = 0, {}
    for i, names in enumerate(groups):
        fn = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: tensor(n, shapes[n]) for n in names}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(model / fn), metadata={"format": "pt"})
        weight_map.update((n, fn) for n in names)
        del tensors
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    lora_dir = work / "lora"
    LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=SEVEN,
               base_model_name_or_path=str(model)).save_pretrained(str(lora_dir))
    lora = {}
    for name, (out_f, *rest) in shapes.items():
        if not any(f".{m}." in name for m in SEVEN):
            continue
        in_f = rest[0]
        stem = "base_model.model." + name[: -len(".weight")]
        lora[f"{stem}.lora_A.weight"] = (torch.randn((16, in_f), generator=g, device=device)
                                         / in_f ** 0.5).cpu()
        lora[f"{stem}.lora_B.weight"] = (0.01 * torch.randn((out_f, 16), generator=g,
                                                            device=device)).cpu()
    save_file(lora, str(lora_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    os.sync()
    return total, time.perf_counter() - t0


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    """Wall seconds from the command's start until `sync` returns after it, and its stdout."""
    os.sync()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.sync()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return wall, p.stdout


def compare(a: Path, b: Path, names: list[str]) -> tuple[bool, str]:
    """Whether the tensors `names` of two outputs agree to one bf16 ulp."""
    import torch
    from safetensors import safe_open

    def load(d: Path, name: str):
        index = d / "model.safetensors.index.json"
        file = (json.loads(index.read_text())["weight_map"][name] if index.exists()
                else "model.safetensors")
        with safe_open(str(d / file), "pt") as f:
            return f.get_tensor(name)

    worst = 0
    for name in names:
        x, y = load(a, name), load(b, name)
        ulps = (x.view(torch.int16).to(torch.int32) - y.view(torch.int16).to(torch.int32)).abs()
        worst = max(worst, int(ulps.max()))
    return worst <= 1, f"{len(names)} tensors, largest difference {worst} ulp"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--shape", choices=SHAPES, default="7b")
    ap.add_argument("--devices", default="cuda,cpu")
    ap.add_argument("--bin", type=Path, default=Path(__file__).resolve().parent / "bin")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    mf = str((args.bin / "modelforge").resolve())

    size, gen_s = generate(work, SHAPES[args.shape])
    print(f"generated {size / 1e9:.2f} GB in {gen_s:.0f} s", file=sys.stderr, flush=True)
    rows, results = [], {"shape": args.shape, "bytes": size, "cpus": os.cpu_count()}

    shutil.rmtree(work / "out-cp", ignore_errors=True)
    wall, _ = timed(["cp", "-r", "model", "out-cp"], work)
    shutil.rmtree(work / "out-cp")
    results["cp"] = wall
    rows.append(("cp -r && sync", wall, "", ""))
    print(f"cp -r && sync: {wall:.2f} s", file=sys.stderr, flush=True)

    outputs = []
    for device in args.devices.split(","):
        recipe = work / f"{device}.toml"
        recipe.write_text(f'[base]\npath = "model"\n\n[[adapter]]\npath = "lora"\n\n'
                          f'[output]\npath = "out-{device}"\ndtype = "base"\n\n'
                          f'[build]\ndevice = "{device}"\n')
        for old in (f"out-{device}", f"cache-{device}", f"{device}.lock"):
            p = work / old
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        wall, out = timed([mf, "build", recipe.name, "--json", "--quiet", "--cache",
                           f"cache-{device}"], work)
        summary = json.loads(out)
        results[device] = {"seconds": wall, "summary": summary}
        rows.append((f"modelforge cold, {device}", wall, summary.get("device", ""),
                     f"engine {summary['phases'].get('engine', 0):.1f} s, "
                     f"{summary['nodes']['computed']} computed, peak RSS engine "
                     f"{(summary['peak_rss'].get('engine') or 0) / 2**20:.0f} MiB"))
        print(f"{device}: {wall:.2f} s", file=sys.stderr, flush=True)
        outputs.append(work / f"out-{device}")
        if len(outputs) > 2:
            shutil.rmtree(outputs.pop(0))

    print(f"\n{args.shape}-shaped bf16 model, {size / 1e9:.2f} GB, LoRA r=16 on all seven "
          f"projections; {os.cpu_count()} CPUs. Each step timed until `sync` returns.\n")
    print("| step | seconds | GB/s | × cp -r && sync | ran on | notes |")
    print("|---|---:|---:|---:|---|---|")
    for label, wall, ran, notes in rows:
        print(f"| {label} | {wall:.2f} | {size / 1e9 / wall:.2f} | {wall / results['cp']:.2f} "
              f"| {ran} | {notes} |")
    status = 0
    if len(outputs) == 2:
        import torch  # noqa: F401
        names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 f"model.layers.{SHAPES[args.shape]['num_hidden_layers'] - 1}.mlp.up_proj.weight"]
        ok, what = compare(outputs[0], outputs[1], names)
        results["agree"] = {"ok": ok, "what": what}
        print(f"\n{'ok' if ok else 'FAILED'}: {outputs[0].name} and {outputs[1].name} agree to "
              f"bf16 rounding ({what})")
        status = 0 if ok else 1
    (work / "gpu_bench.json").write_text(json.dumps(results, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
