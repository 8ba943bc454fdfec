#!/usr/bin/env python3
"""Benchmark: modelforge against the floor (cp -r), PEFT and mergekit on a TinyLlama-shaped model.

Generates once, into DIR (default <repo>/target/bench/<shape>; reused while its stamp matches):
    model/    LLaMA-shaped bf16 model, TinyLlama-1.1B's shape: hidden 2048, intermediate 5632,
              22 layers, 32 heads (4 kv heads), vocab 32000, untied: 1.1B parameters, 2.2 GB in
              4 shards + index (about a third of the weights each; written one at a time)
    lora_a/   r=16, alpha=32 on all seven projections (random non-zero A and B, f32)
    lora_b/   r=8, alpha=16 on q_proj and v_proj
    a.toml    base + A                 ab.toml   base + A + B (B's weight rewritten per run)
    abi.toml  ab.toml with shard_by = "inputs"
then measures, RUNS times each, with a warm page cache (median, min, max wall time; peak RSS):
    1 cp -r && sync          copying the model folder: the floor for any tool writing a new model
    2 modelforge cold        `build a.toml` with a new, empty cache (inputs hashed, all computed);
                             also pinned to 1 core and to 2 (`taskset`), for the scaling
    3 modelforge no-op       the same build again: nothing changed
    4 modelforge B changed   `build ab.toml` after changing B's weight (to a value never built):
                             only the tensors B touches are recomputed
   4b the same, by inputs    `abi.toml`, the same recipe with `shard_by = "inputs"`: the output's
                             shards that B does not reach are kept, not written again
    5 PEFT                   load (bf16), PeftModel.from_pretrained(A), merge_and_unload, save_pretrained
    6 mergekit               mergekit-yaml passthrough of `model+lora_a`, a new --lora-merge-cache
and checks that the outputs agree: every cold build gives the same bytes, the incremental A+B
build equals a build of the same recipe from an empty cache, and modelforge's tensors equal
PEFT's and mergekit's bit for bit.

Every step is timed until `sync` returns, so that bytes left in the page cache count (the
page cache is synced before each step, untimed). Each command runs under a one-child wrapper
(a small Python) that times it and reads getrusage(RUSAGE_CHILDREN): the peak RSS of the
largest process in the command's tree that was waited for (modelforge's engine included), the
user and system CPU time of them all, which vary less than wall time on a virtual machine
whose page-cache writes swing in speed; and, from the disk's own counters, the bytes written
to it from the first sync to the last (where the disk is the bottleneck that count sets the
pace; anything else running on the machine shows in it). modelforge's own `--json` summary adds
its per-process peaks and per-phase times. Outputs agree "to bf16 rounding" when no element differs
by more than one ulp: a rank-16 product summed in another order can land on the other side of a
rounding boundary (measured: one element of 1.1B, where PEFT's full-matrix product and
modelforge's block product differ by 2e-10).
Prints markdown tables. Not part of the test suite.

    .venv/bin/python bench/bench_fuse.py [--runs 3] [--small | --layers N] [--skip-peft] [--skip-mergekit]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    # TinyLlama-1.1B's shape.
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    # For developing this script: a few MB, seconds.
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=4000),
}
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name: (rank, alpha, target modules)
    "lora_a": (16, 32, SEVEN),
    "lora_b": (8, 16, ["q_proj", "v_proj"]),
}
STAMP_VERSION = "3"


# --------------------------------------------------------------------------------------------
# generation


def generate(d: Path, shape: dict, device: str = "cpu", shard_bytes: int | None = None) -> None:
    """The model and adapters in `d`, drawn on `device` (a GPU draws a 7B model in seconds) in
    shards of at most `shard_bytes` (default: about a third of the model each)."""
    stamp = d / "generated.json"
    want = {"version": STAMP_VERSION, "shape": shape,
            "adapters": {k: [r, a, m] for k, (r, a, m) in ADAPTERS.items()}}
    if device != "cpu" or shard_bytes:
        want.update(device=device, shard_bytes=shard_bytes)
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        print(f"reusing {d}", file=sys.stderr)
        return
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig

    t0 = time.time()
    stamp.unlink(missing_ok=True)
    for sub in ["model", *ADAPTERS]:
        shutil.rmtree(d / sub, ignore_errors=True)
    model_dir = d / "model"
    model_dir.mkdir(parents=True)

    cfg = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    cfg.dtype = "bfloat16"
    cfg.architectures = ["LlamaForCausalLM"]  # mergekit picks its architecture by this
    # The exact checkpoint names and shapes, from the real class built on the meta device.
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    cfg.save_pretrained(str(model_dir))
    g = torch.Generator(device=device).manual_seed(0)

    def randn(shape):
        return torch.randn(shape, generator=g, device=device)

    def tensor(name, shape):
        if name.endswith("norm.weight"):
            t = 1.0 + 0.05 * randn(shape)
        else:
            t = 0.02 * randn(shape)
        return t.to(torch.bfloat16).cpu()

    # Shards in state-dict order.
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    shard_bytes = shard_bytes or total // 3 + 1
    groups, cur, cur_bytes = [], [], 0
    for name, shape_ in shapes.items():
        nbytes = 2 * int(torch.Size(shape_).numel())
        if cur and cur_bytes + nbytes > shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += nbytes
    groups.append(cur)
    weight_map = {}
    for i, names in enumerate(groups):
        fn = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: tensor(n, shapes[n]) for n in names}
        save_file(tensors, str(model_dir / fn), metadata={"format": "pt"})
        weight_map.update((n, fn) for n in names)
        del tensors
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    for sub, (rank, alpha, targets) in ADAPTERS.items():
        out = d / sub
        lcfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                          base_model_name_or_path=str(model_dir))
        lcfg.save_pretrained(str(out))
        acfg = json.loads((out / "adapter_config.json").read_text())
        acfg["target_modules"] = sorted(acfg["target_modules"])
        (out / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True))
        lora = {}
        for name, (out_f, *rest) in shapes.items():
            if not any(f".{m}." in name for m in targets):
                continue
            in_f = rest[0]
            stem = "base_model.model." + name[: -len(".weight")]
            lora[f"{stem}.lora_A.weight"] = (randn((rank, in_f)) / in_f ** 0.5).cpu()
            lora[f"{stem}.lora_B.weight"] = (0.01 * randn((out_f, rank))).cpu()
        save_file(lora, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})

    stamp.write_text(json.dumps(want))
    print(f"generated {model_dir} ({total / 1e9:.2f} GB, {len(groups)} shards) and "
          f"{', '.join(ADAPTERS)} in {time.time() - t0:.0f}s", file=sys.stderr)


def write_recipes(d: Path, weight_b: float = 1.0) -> None:
    tail = '[output]\npath = "{}"\ndtype = "base"\n{}\n[build]\ndevice = "cpu"\n'
    (d / "a.toml").write_text(
        '[base]\npath = "model"\n\n[[adapter]]\npath = "lora_a"\n\n' + tail.format("out-a", ""))
    for name, out, extra in (("ab", "out-ab", ""), ("abi", "out-abi", 'shard_by = "inputs"\n')):
        (d / f"{name}.toml").write_text(
            '[base]\npath = "model"\n\n[[adapter]]\npath = "lora_a"\n\n'
            f'[[adapter]]\npath = "lora_b"\nweight = {weight_b}\n\n' + tail.format(out, extra))


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

# mergekit 0.1.5 writes `path+lora_path` as a model reference (ModelReference.validate_string);
# the LoRA is merged by PEFT into --lora-merge-cache (keyed by path, so a new cache each run),
# then the passthrough method copies that merged model's tensors into the output.
MERGEKIT_CONFIG = """\
merge_method: passthrough
dtype: bfloat16
models:
  - model: {model}+{lora}
"""


# --------------------------------------------------------------------------------------------
# measurement


class Failed(Exception):
    pass


# The one-child wrapper every measured command runs under. On Linux a process's peak RSS
# (ru_maxrss) survives execve, so a child forked straight from this script, which has loaded
# torch, would start at this script's peak; the wrapper execs a small Python first, and its
# RUSAGE_CHILDREN then covers only the command and the children it waited for (modelforge's
# engine included). It times the command itself, leaving out its own start.
WRAPPER = """\
import os, resource, sys, time
dev = os.stat(".").st_dev
stat = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat"
def sectors_written():
    try:
        return int(open(stat).read().split()[6])
    except (OSError, IndexError, ValueError):
        return -1
os.sync()  # what earlier steps left dirty is not this step's to write
before = sectors_written()
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[3], sys.argv[3:], os.environ)
_, status = os.waitpid(pid, 0)
if sys.argv[2] == "sync" and status == 0:
    os.sync()
wall = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
rss = usage.ru_maxrss * 1024
after = sectors_written()
disk = (after - before) * 512 if before >= 0 and after >= 0 and sys.argv[2] == "sync" else -1
open(sys.argv[1], "w").write(f"{wall} {rss} {usage.ru_utime} {usage.ru_stime} {usage.ru_oublock * 512} {disk}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(cmd: list[str], cwd: Path, env: dict | None = None, sync: bool = False
        ) -> tuple[float, int, str, float, float, int]:
    """(wall seconds, peak RSS in bytes of the command and its waited-for children, stdout,
    user and system CPU seconds of the same processes, and the bytes they wrote to storage:
    what the disk holding `cwd` counted written between the sync before the command and the
    one after it (everything on the machine, so other work there shows), or, without `sync`,
    ru_oublock, counted when a page is dirtied or a direct write submitted, even for a file
    deleted before it reached the disk). The page cache is synced before the command, untimed;
    with `sync`, after it too, and that is timed: the bytes are on the disk when the clock
    stops."""
    cmd = [str(c) for c in cmd]
    exe = shutil.which(cmd[0], path=(env or os.environ).get("PATH")) if "/" not in cmd[0] else cmd[0]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rusage") as result:
        p = subprocess.run([sys.executable, "-S", "-c", WRAPPER, result.name,
                            "sync" if sync else "-", exe, *cmd[1:]],
                           cwd=cwd, stdout=out, stderr=err, env=env)
        out.seek(0)
        err.seek(0)
        if p.returncode != 0:
            raise Failed(f"failed ({p.returncode}): {' '.join(cmd)}\n"
                         f"{err.read().decode(errors='replace')[-3000:]}")
        wall, rss, user, system, dirtied, disk = result.read().split()
        return (float(wall), int(rss), out.read().decode(errors="replace"), float(user), float(system),
                int(disk) if int(disk) >= 0 else int(dirtied))


def remove(*paths: Path) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def warm(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


class Step:
    def __init__(self, label: str):
        self.label = label
        self.walls: list[float] = []
        self.rss: list[int] = []
        self.cpu: list[tuple[float, float]] = []  # user, system
        self.written: list[int] = []  # bytes written to storage
        self.summaries: list[dict] = []  # modelforge --json

    def add(self, wall: float, rss: int, stdout: str = "", user: float = 0.0,
            system: float = 0.0, written: int = 0) -> None:
        self.walls.append(wall)
        self.rss.append(rss)
        self.cpu.append((user, system))
        self.written.append(written)
        if stdout.strip().startswith("{"):
            self.summaries.append(json.loads(stdout))
        extra = ""
        if self.summaries and stdout:
            s = self.summaries[-1]
            extra = (f" (modelforge {s['peak_rss']['build'] / 2**20:.0f} MiB, engine "
                     f"{(s['peak_rss'].get('engine') or 0) / 2**20:.0f} MiB; "
                     f"{s['nodes']['computed']} computed)")
        print(f"  {self.label} run {len(self.walls)}: {wall:.3f}s (CPU user {user:.2f}s, system "
              f"{system:.2f}s), {rss / 2**20:.0f} MiB, {written / 1e9:.2f} GB written{extra}",
              file=sys.stderr, flush=True)

    @property
    def median(self) -> float:
        return statistics.median(self.walls)


def lock_outputs(lock: Path) -> dict:
    return tomllib.loads(lock.read_text())["outputs"]


def compare_models(a: Path, b: Path) -> tuple[bool, str]:
    """Every tensor of two model directories, bit for bit; equal "to bf16 rounding" when no
    element differs by more than one bf16 ulp (a product summed in another order can land on
    the other side of a rounding boundary)."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        idx = d / "model.safetensors.index.json"
        if idx.exists():
            return {n: d / f for n, f in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return {n: d / "model.safetensors" for n in f.keys()}

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        only = sorted(set(ia) ^ set(ib))
        return False, f"tensor names differ: {only[:5]}"
    by_file: dict[tuple[Path, Path], list[str]] = {}
    for n in ia:
        by_file.setdefault((ia[n], ib[n]), []).append(n)
    same_tensors, worst, differing, where = 0, 0, 0, []
    for (fa, fb), names in sorted(by_file.items()):
        with safe_open(str(fa), "pt") as ha, safe_open(str(fb), "pt") as hb:
            for n in sorted(names):
                x, y = ha.get_tensor(n), hb.get_tensor(n)
                if x.shape != y.shape or x.dtype != y.dtype:
                    return False, f"`{n}`: {x.dtype}{tuple(x.shape)} and {y.dtype}{tuple(y.shape)}"
                if torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)):
                    same_tensors += 1
                    continue
                ne = (x != y).nonzero()
                differing += len(ne)
                if len(where) < 3:
                    at = tuple(ne[0].tolist())
                    where.append(f"`{n}`{list(at)}: {x[at].item():.7g} vs {y[at].item():.7g}")
                if x.dtype in (torch.bfloat16, torch.float16):
                    xi, yi = x.view(torch.int16).int(), y.view(torch.int16).int()
                    xi = torch.where(xi < 0, -(xi & 0x7FFF), xi)
                    yi = torch.where(yi < 0, -(yi & 0x7FFF), yi)
                    worst = max(worst, int((xi - yi).abs().max()))
                else:
                    worst = max(worst, 1 << 30)
    total = len(ia)
    if same_tensors == total:
        return True, f"all {total} tensors bit-identical"
    return worst <= 1, (f"{same_tensors}/{total} tensors bit-identical; {differing} element(s) differ, "
                        f"worst by {worst} ulp: {'; '.join(where)}")


# --------------------------------------------------------------------------------------------


def fmt_mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="where to generate and work (default target/bench/<shape>)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="a tiny LLaMA shape, for trying the script")
    ap.add_argument("--layers", type=int, help="number of layers (default: the shape's)")
    ap.add_argument("--bin", default=os.environ.get("MODELFORGE_BIN", str(REPO / "target/release/modelforge")))
    ap.add_argument("--no-build", action="store_true", help="do not run `cargo build --release` first")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--generate-only", action="store_true", help="generate the inputs, measure nothing")
    ap.add_argument("--keep-outputs", action="store_true", help="leave the outputs and caches in DIR")
    args = ap.parse_args(argv)

    shape = dict(SHAPES["small" if args.small else "tinyllama"])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    name = ("small" if args.small else "tinyllama") + (f"-{args.layers}l" if args.layers else "")
    d = Path(args.dir or REPO / "target" / "bench" / name).resolve()
    d.mkdir(parents=True, exist_ok=True)
    if not args.no_build:
        print("cargo build --release", file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "modelforge",
                        "--bin", "modelforge-engine"], cwd=REPO, check=True)
    mf = str(Path(args.bin).resolve())
    generate(d, shape)
    if args.generate_only:
        return 0
    write_recipes(d)
    (d / "peft_merge.py").write_text(PEFT_SCRIPT)
    (d / "mergekit.yml").write_text(MERGEKIT_CONFIG.format(model=d / "model", lora=d / "lora_a"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    model = d / "model"
    size = sum(p.stat().st_size for p in model.iterdir())
    params = json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
    for p in [model, *(d / a for a in ADAPTERS)]:
        warm(p)
    steps: dict[str, Step] = {}
    checks: list[tuple[str, bool, str]] = []

    def measure(key: str, label: str, cmd: list[str], before=None, env_=None) -> Step:
        step = steps.setdefault(key, Step(label))
        for i in range(args.runs):
            if before:
                before(i)
            step.add(*run(cmd, d, env_, sync=True))
        return step

    def build(recipe: str, cache: str) -> list[str]:
        return [mf, "build", recipe, "--quiet", "--json", "--cache", cache]

    # 1. The floor.
    measure("cp", "cp -r && sync (floor)", ["cp", "-r", "model", "out-cp"], lambda i: remove(d / "out-cp"))
    remove(d / "out-cp")

    # 2. Cold: a new cache, no output, no lock; every run must give the same bytes.
    cold_outputs = []

    def cold(i):
        if i:
            cold_outputs.append(lock_outputs(d / "a.lock"))
        remove(d / "out-a", d / "cache-a", d / "a.lock")

    # Pinned to one core and to two: nothing in the pipeline may be serial by construction.
    taskset = shutil.which("taskset")
    if taskset:
        for n in (1, 2):
            if n <= (os.cpu_count() or 1):
                measure(f"cold{n}", f"modelforge, cold cache (A), {n} core{'s' * (n > 1)}",
                        [taskset, "-c", ",".join(map(str, range(n))), *build("a.toml", "cache-a")],
                        cold)
    measure("cold", "modelforge, cold cache (A)", build("a.toml", "cache-a"), cold)
    cold_outputs.append(lock_outputs(d / "a.lock"))
    same = all(o == cold_outputs[0] for o in cold_outputs)
    checks.append(("modelforge cold builds give identical outputs", same,
                   f"{len(cold_outputs)} builds, {len(cold_outputs[0])} files"))

    # 3. No-op.
    measure("noop", "modelforge, no-op rebuild", build("a.toml", "cache-a"))

    # 4. A+B built once (untimed); then each run changes B's weight to a value never built.
    remove(d / "out-ab", d / "ab.lock")
    run(build("ab.toml", "cache-a"), d)
    weights = [round(0.9 - 0.05 * i, 2) for i in range(args.runs)]
    measure("incr", "modelforge, B's weight changed (A+B)", build("ab.toml", "cache-a"),
            lambda i: write_recipes(d, weights[i]))
    incremental = lock_outputs(d / "ab.lock")
    remove(d / "out-ab", d / "ab.lock", d / "cache-ab")
    wall, rss, out, _, _, _ = run(build("ab.toml", "cache-ab"), d)
    print(f"  modelforge A+B from an empty cache: {wall:.2f}s, {rss / 2**20:.0f} MiB", file=sys.stderr)
    checks.append(("incremental A+B build equals a build from an empty cache",
                   incremental == lock_outputs(d / "ab.lock"),
                   f"weight {weights[-1]}, {len(incremental)} files compared by blake3"))

    # 4b. The same with `shard_by = "inputs"`: shards that B does not reach are kept as they are.
    remove(d / "out-abi", d / "abi.lock")
    write_recipes(d)
    run(build("abi.toml", "cache-a"), d)
    weights = [round(0.7 - 0.05 * i, 2) for i in range(args.runs)]  # none built in step 4
    measure("incr-inputs", "modelforge, B's weight changed (A+B, shard_by = \"inputs\")",
            build("abi.toml", "cache-a"), lambda i: write_recipes(d, weights[i]))
    incremental = lock_outputs(d / "abi.lock")
    remove(d / "out-abi", d / "abi.lock", d / "cache-abi")
    run(build("abi.toml", "cache-abi"), d)
    checks.append(("incremental A+B build by inputs equals a build from an empty cache",
                   incremental == lock_outputs(d / "abi.lock"),
                   f"weight {weights[-1]}, {len(incremental)} files compared by blake3"))
    run(build("ab.toml", "cache-a"), d)  # the default layout, at the same weight
    same, what = compare_models(d / "out-ab", d / "out-abi")
    checks.append(("shards by inputs hold the same tensors as shards by size",
                   same and what.startswith("all "), what))
    if not args.keep_outputs:
        remove(d / "out-ab", d / "cache-ab", d / "out-abi", d / "cache-abi")

    # 5. PEFT.
    if not args.skip_peft:
        measure("peft", "PEFT merge_and_unload + save_pretrained (A)",
                [sys.executable, "peft_merge.py", "model", "lora_a", "out-peft"],
                lambda i: remove(d / "out-peft"), env)
        ok, what = compare_models(d / "out-a", d / "out-peft")
        checks.append(("modelforge output equals PEFT's to bf16 rounding", ok, what))
        if not args.keep_outputs:
            remove(d / "out-peft")

    # 6. mergekit.
    if not args.skip_mergekit:
        kit = Path(sys.executable).parent / "mergekit-yaml"
        measure("mergekit", "mergekit base+lora (A)",
                [str(kit), "mergekit.yml", str(d / "out-mergekit"), "--lora-merge-cache",
                 str(d / "lora-merge-cache"), "--no-copy-tokenizer"],
                lambda i: remove(d / "out-mergekit", d / "lora-merge-cache"), env)
        ok, what = compare_models(d / "out-a", d / "out-mergekit")
        checks.append(("modelforge output equals mergekit's to bf16 rounding", ok, what))
        if not args.keep_outputs:
            remove(d / "out-mergekit", d / "lora-merge-cache")

    report(steps, checks, shape, size, params, args.runs)
    if not args.keep_outputs:
        remove(d / "out-a", d / "cache-a", d / "a.lock", d / "ab.lock", d / "abi.lock")
    return 0 if all(ok for _, ok, _ in checks) else 1


def report(steps: dict[str, Step], checks, shape: dict, size: int, params: int, runs: int) -> None:
    load = os.getloadavg()
    floor = steps["cp"].median
    peers = [(k, n) for k, n in (("cold", "modelforge cold"), ("peft", "PEFT"), ("mergekit", "mergekit"))
             if k in steps]
    print(f"\nLLaMA-shaped bf16 model ({params / 1e6:,.0f}M parameters, {size / 1e9:.2f} GB, "
          f"{shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}); adapter A r=16 on all "
          f"seven projections, B r=8 on q/v. {os.cpu_count()} CPUs, warm page cache, {runs} runs each; "
          f"load average at the end {load[0]:.1f}.\n")
    print("Every step is timed until `sync` returns (its bytes on the disk); the page cache is "
          "synced before each, untimed.\n")
    head = ("| step | median s | min s | max s | CPU user s | CPU system s | CPU s per GB | peak RSS MiB "
            "| written GB | written × size | × cp -r |" + "".join(f" × {n} |" for _, n in peers))
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(peers))
    for key, step in steps.items():
        user = statistics.median(u for u, _ in step.cpu)
        system = statistics.median(s for _, s in step.cpu)
        row = (f"| {step.label} | {step.median:.3f} | {min(step.walls):.3f} | {max(step.walls):.3f} "
               f"| {user:.2f} | {system:.2f} | {(user + system) / (size / 1e9):.2f} "
               f"| {fmt_mib(statistics.median(step.rss))} | {statistics.median(step.written) / 1e9:.2f} "
               f"| {statistics.median(step.written) / size:.2f} | {step.median / floor:.2f} |")
        for k, _ in peers:
            row += f" {step.median / steps[k].median:.2f} |"
        print(row)

    if "cold1" in steps and "cold2" in steps:
        print(f"\nScaling: the cold build on 2 cores is {steps['cold1'].median / steps['cold2'].median:.2f}× "
              f"as fast as on 1 core (target ≥ 1.8×).")
    if "incr-inputs" in steps:
        print(f"Incremental (B changed, shard_by = \"inputs\") / cold: "
              f"{steps['incr-inputs'].median / steps['cold'].median:.2f} (target ≤ 0.20); peak RSS / model: "
              f"{max(statistics.median(s.rss) for s in steps.values() if s.label.startswith('modelforge')) / size:.3f} "
              f"(target ≤ 0.15).")

    with_summary = [s for s in steps.values() if s.summaries and s.summaries[0].get("phases")]
    if with_summary:
        print("\nmodelforge's own account (medians; `build --json`): seconds per phase, peak RSS per process\n")
        print("| step | resolve | engine | assemble | waiting | commit | total | modelforge MiB | engine MiB | computed |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in with_summary:
            med = lambda f: statistics.median(f(x) for x in s.summaries)  # noqa: E731
            ph = {k: med(lambda x, k=k: x["phases"].get(k, 0.0))
                  for k in ("resolve", "engine", "assemble", "waiting", "commit")}
            print(f"| {s.label} | {ph['resolve']:.2f} | {ph['engine']:.2f} | {ph['assemble']:.2f} | "
                  f"{ph['waiting']:.2f} | "
                  f"{ph['commit']:.2f} | {med(lambda x: x['seconds']):.2f} | "
                  f"{fmt_mib(med(lambda x: x['peak_rss']['build']))} | "
                  f"{fmt_mib(med(lambda x: x['peak_rss'].get('engine') or 0))} | "
                  f"{s.summaries[0]['nodes']['computed']}/{s.summaries[0]['nodes']['total']} |")
        print("\n(resolve: recipe, inputs opened and hashed or found in the stat cache, node keys; "
              "engine: its whole run, which overlaps assemble: the output written and its bytes "
              "hashed while the engine computes; waiting: of assemble, blocked on the engine's next "
              "result; commit: the swap into place and cleanup.)")

    print("\nChecks:\n")
    for what, ok, detail in checks:
        print(f"- {'ok' if ok else 'FAILED'}: {what} ({detail})")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failed as e:
        print(e, file=sys.stderr)
        sys.exit(2)
