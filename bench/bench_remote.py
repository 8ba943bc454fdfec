#!/usr/bin/env python3
"""Benchmark: the remote cache against plain S3 transfers of the same objects, on loopback.

Uses bench_fuse.py's TinyLlama-shaped model (2.2 GB bf16, generated once into
target/bench/tinyllama) and its recipe `a.toml` (the model and a rank-16 LoRA on all seven
projections), and an S3 server on loopback (s3s-fs from target/s3s, as scripts/test.sh builds
it). Measures, RUNS times each (median, min, max):

    push         `modelforge push a.toml` into an empty bucket: the build's computed tensors and
                 its output files, each checked as it is read, multipart above 16 MiB
    plain PUT    the same objects uploaded by curl (SigV4), 8 at a time
    pull         `modelforge build a.toml --locked --remote` in a folder holding only the recipe
                 and its lock: the 2.2 GB output fetched and checked against the lock
    plain GET    the same output objects downloaded by curl, 8 at a time

Targets (issue 16): pull ≤ 1.3× plain GET, push ≤ 1.3× plain PUT. Not part of the test suite.

    .venv/bin/python bench/bench_remote.py [--runs 3] [--small]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fuse  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
S3S = REPO / "target" / "s3s" / "bin" / "s3s-fs"
KEY, SECRET = "bench", "bench-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed:\n{done.stderr}")
    return elapsed


def curl_all(jobs: list[list[str]], env: dict) -> float:
    """Runs one curl per job, 8 at a time; the wall time of them all."""
    started = time.perf_counter()
    running: list[subprocess.Popen] = []
    failed = 0
    for job in jobs:
        while len(running) >= 8:
            failed += running.pop(0).wait() != 0
        running.append(subprocess.Popen(job, env=env))
    for p in running:
        failed += p.wait() != 0
    elapsed = time.perf_counter() - started
    if failed:
        sys.exit(f"{failed} of {len(jobs)} curl transfers failed")
    return elapsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--bin", default=str(REPO / "target/release/modelforge"))
    args = ap.parse_args(argv)
    if not S3S.exists():
        sys.exit(f"{S3S} is missing: scripts/test.sh builds it")
    name = "small" if args.small else "tinyllama"
    d = (REPO / "target" / "bench" / name).resolve()
    d.mkdir(parents=True, exist_ok=True)
    bench_fuse.generate(d, bench_fuse.SHAPES[name])
    bench_fuse.write_recipes(d)
    mf = str(Path(args.bin).resolve())

    root = d / "s3"
    shutil.rmtree(root, ignore_errors=True)
    (root / "bucket").mkdir(parents=True)
    port = free_port()
    server = subprocess.Popen([str(S3S), "--host", "127.0.0.1", "--port", str(port),
                               "--access-key", KEY, "--secret-key", SECRET, str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET,
               AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true",
               MODELFORGE_REMOTE="")
    sigv4 = ["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", f"{KEY}:{SECRET}", "-sSf",
             "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]
    try:
        cache = d / "remote-cache"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(d / "out-a", ignore_errors=True)
        subprocess.run([mf, "build", "a.toml", "--quiet", "--cache", str(cache)], cwd=d, env=env,
                       check=True)
        lock = d / "a.lock"
        outputs = bench_fuse.lock_outputs(lock)
        size = sum((d / p).stat().st_size for p in outputs)
        results: dict[str, list[float]] = {k: [] for k in ("push", "put", "pull", "get")}
        for i in range(args.runs):
            # push into an empty prefix
            prefix = f"run{i}"
            url = f"s3://bucket/{prefix}"
            results["push"].append(timed([mf, "push", "a.toml", "--cache", str(cache),
                                          "--remote", url], d, env))
            objects = sorted(p for p in (root / "bucket" / prefix).rglob("*")
                             if p.is_file() and "/cas/" in str(p))
            # the same objects, uploaded plainly under another prefix
            plain = f"plain{i}"
            jobs = [["curl", *sigv4, "-T", str(p),
                     f"{endpoint}/bucket/{plain}/{p.relative_to(root / 'bucket' / prefix)}"]
                    for p in objects]
            results["put"].append(curl_all(jobs, env))
            # pull the model from recipe + lock alone
            bare = d / f"bare{i}"
            shutil.rmtree(bare, ignore_errors=True)
            bare.mkdir()
            shutil.copy(d / "a.toml", bare / "a.toml")
            shutil.copy(lock, bare / "a.lock")
            results["pull"].append(timed([mf, "build", "a.toml", "--quiet", "--locked",
                                          "--remote", url, "--cache", str(bare / "cache")],
                                         bare, env))
            got = bench_fuse.lock_outputs(bare / "a.lock")
            assert all((bare / p).exists() for p in got), "the pulled outputs are there"
            # the same output objects, downloaded plainly
            into = d / f"plain-get{i}"
            shutil.rmtree(into, ignore_errors=True)
            into.mkdir()
            digests = json.loads(json.dumps(outputs))
            jobs = [["curl", *sigv4, "-o", str(into / h),
                     f"{endpoint}/bucket/{prefix}/modelforge/v1/cas/{h[:2]}/{h}"]
                    for h in digests.values()]
            results["get"].append(curl_all(jobs, env))
            shutil.rmtree(into, ignore_errors=True)
            shutil.rmtree(bare, ignore_errors=True)
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{size / 1e9:.2f} GB model, {args.runs} runs, s3s-fs on loopback\n")
    print("| step | median s | min | max | GB/s |")
    print("|---|---|---|---|---|")
    labels = {"push": "modelforge push", "put": "plain PUT (curl ×8)",
              "pull": "modelforge pull (recipe + lock alone)", "get": "plain GET (curl ×8)"}
    for k, label in labels.items():
        v = results[k]
        print(f"| {label} | {med[k]:.2f} | {min(v):.2f} | {max(v):.2f} | {size / 1e9 / med[k]:.2f} |")
    print(f"\npull / plain GET = {med['pull'] / med['get']:.2f} (target ≤ 1.3); "
          f"push / plain PUT = {med['push'] / med['put']:.2f} (target ≤ 1.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
