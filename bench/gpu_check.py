"""Compares the GPU check's outputs: the CPU build against the CUDA build (max abs difference,
elements and tensors that differ, worst difference in bf16 ulps), and each against W + ΔW
computed here in f64 and rounded once to bf16. Needs only torch (safetensors are read by hand).

    python gpu_check.py compare OUT_CPU OUT_CUDA MODEL LORA_A LORA_B
    python gpu_check.py summary SUMMARY_JSON     # one line from `modelforge build --json`
"""
import json
import struct
import sys
import tomllib
from pathlib import Path

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def read(path: Path) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        raw = bytearray(data[8 + n + start : 8 + n + end])
        out[name] = torch.frombuffer(raw, dtype=DTYPES[meta["dtype"]]).reshape(meta["shape"]) if raw else \
            torch.empty(meta["shape"], dtype=DTYPES[meta["dtype"]])
    return out


def model(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(read(f))
    return out


def ulps(x: torch.Tensor, y: torch.Tensor) -> int:
    xi, yi = x.view(torch.int16).int(), y.view(torch.int16).int()
    xi = torch.where(xi < 0, -(xi & 0x7FFF), xi)
    yi = torch.where(yi < 0, -(yi & 0x7FFF), yi)
    return int((xi - yi).abs().max()) if xi.numel() else 0


def compare(label: str, a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), f"{label}: tensor names differ"
    worst, worst_ulp, elements, tensors = 0.0, 0, 0, 0
    for name in sorted(a):
        x, y = a[name], b[name]
        d = (x.double() - y.double()).abs()
        if d.numel() and d.max() > 0:
            tensors += 1
            elements += int((d > 0).sum())
            worst = max(worst, float(d.max()))
            if x.dtype == torch.bfloat16:
                worst_ulp = max(worst_ulp, ulps(x, y))
    total = sum(t.numel() for t in a.values())
    print(f"{label}: max abs difference {worst:.3g}; {elements}/{total} elements in {tensors}/{len(a)} "
          f"tensors differ; worst {worst_ulp} bf16 ulp")
    return worst


def reference(model_dir: Path, adapters: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """W + Σ weight · (α/r) · B·A in f64, rounded once to W's dtype."""
    base = model(model_dir)
    acc = {k: v.double() for k, v in base.items()}
    for path, weight in adapters:
        cfg = json.loads((path / "adapter_config.json").read_text())
        scaling = cfg["lora_alpha"] / cfg["r"]
        lora = read(path / "adapter_model.safetensors")
        for key, a in lora.items():
            if ".lora_A." not in key:
                continue
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            acc[name] += weight * scaling * (b.double() @ a.double())
    return {k: acc[k].to(base[k].dtype) for k in base}


def summary(path: Path) -> None:
    s = json.loads(path.read_text())
    p = s.get("phases") or {}
    rss = s["peak_rss"]
    print(f"device {s['device']}, {s['nodes']['computed']} tensors computed in {s['seconds']:.2f} s "
          f"(engine {p.get('engine', 0):.2f} s, assemble {p.get('assemble', 0):.2f} s); peak RSS "
          f"modelforge {rss['build'] / 2**20:.0f} MiB, engine {(rss.get('engine') or 0) / 2**20:.0f} MiB")


def main() -> int:
    if sys.argv[1] == "summary":
        summary(Path(sys.argv[2]))
        return 0
    cpu_dir, cuda_dir, model_dir, lora_a, lora_b = map(Path, sys.argv[2:7])
    cpu, cuda = model(cpu_dir), model(cuda_dir)
    # The adapters' weights, from the recipe.
    recipe = tomllib.loads(Path("cpu.toml").read_text())
    weights = {a["path"]: a.get("weight", 1.0) for a in recipe["adapter"]}
    ref = reference(model_dir, [(lora_a, weights[lora_a.name]), (lora_b, weights[lora_b.name])])
    worst = compare("cpu vs cuda", cpu, cuda)
    compare("cpu vs f64 reference rounded once", cpu, ref)
    compare("cuda vs f64 reference rounded once", cuda, ref)
    same = all(cpu[k].dtype == cuda[k].dtype and torch.equal(
        cpu[k].contiguous().view(-1).view(torch.uint8), cuda[k].contiguous().view(-1).view(torch.uint8))
        for k in cpu)
    print("cpu and cuda outputs are bit-identical" if same else
          f"cpu and cuda outputs differ (max abs {worst:.3g}; a few bf16 ulps are expected from "
          "different matmul summation orders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
