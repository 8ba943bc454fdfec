#!/usr/bin/env python3
"""Benchmark: the remote cache against plain S3 transfers of the same objects, on loopback.

Uses bench_fuse.py's TinyLlama-shaped model (2.2 GB bf16, generated once into
target/bench/tinyllama) and its recipe `a.toml` (the model and a rank-16 LoRA on all seven
projections), and an S3 server on loopback (`--server s3s`: s3s-fs from target/s3s; `--server
garage`: Garage, a production store; both as scripts/test.sh builds them). Measures, RUNS times each (median, min, max):

    push         `modelforge push a.toml` into an empty bucket: the build's computed tensors and
                 its output files, each checked as it is read, multipart above 16 MiB
    plain PUT    the same objects (fetched beforehand, untimed) uploaded by curl (SigV4), 8 at a
                 time, each in one PUT
    pull         `modelforge build a.toml --locked --remote` in a folder holding only the recipe
                 and its lock: the 2.2 GB output fetched and checked against the lock
    plain GET    the same output objects downloaded by curl, 8 at a time

Targets (issue 16): pull ≤ 1.3× plain GET, push ≤ 1.3× plain PUT. Not part of the test suite.

    .venv/bin/python bench/bench_remote.py [--runs 3] [--small] [--server s3s|garage]
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
GARAGE = Path(os.environ.get("MODELFORGE_GARAGE", Path.home() / ".cache" / "modelforge-tools"
                             / "garage" / "bin" / "garage"))
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


class S3s:
    """s3s-fs serving a folder; buckets are its folders."""
    name = "s3s-fs 0.14.1"
    region = "us-east-1"
    key, secret = KEY, SECRET

    def __init__(self, root: Path):
        if not S3S.exists():
            sys.exit(f"{S3S} is missing: scripts/test.sh builds it")
        (root / "bucket").mkdir(parents=True)
        self.port = free_port()
        self.process = subprocess.Popen(
            [str(S3S), "--host", "127.0.0.1", "--port", str(self.port), "--access-key", KEY,
             "--secret-key", SECRET, str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self):
        self.process.kill()


class Garage:
    """A single-node Garage (lmdb) with one bucket and one key that may read and write it."""
    name = "Garage 2.5.0"
    region = "garage"
    key, secret = "GK" + "1" * 24, "a" * 64

    def __init__(self, root: Path):
        if not GARAGE.exists():
            sys.exit(f"{GARAGE} is missing: scripts/test.sh builds it")
        root.mkdir(parents=True)
        self.port, rpc = free_port(), free_port()
        self.config = root / "garage.toml"
        self.config.write_text(
            f'metadata_dir = "{root / "meta"}"\ndata_dir = "{root / "data"}"\n'
            f'db_engine = "lmdb"\nreplication_factor = 1\n'
            f'rpc_bind_addr = "127.0.0.1:{rpc}"\nrpc_public_addr = "127.0.0.1:{rpc}"\n'
            f'rpc_secret = "{"0" * 63}1"\n'
            f'[s3_api]\ns3_region = "garage"\napi_bind_addr = "127.0.0.1:{self.port}"\n')
        self.process = subprocess.Popen([str(GARAGE), "-c", str(self.config), "server"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while self.cli("status", check=False).returncode != 0:
            if time.time() > deadline:
                sys.exit("garage did not start")
            time.sleep(0.1)
        node = self.cli("node", "id", "-q").stdout.strip().split("@")[0]
        self.cli("layout", "assign", "-z", "dc1", "-c", "10G", node)
        self.cli("layout", "apply", "--version", "1")
        self.cli("bucket", "create", "bucket")
        self.cli("key", "import", "--yes", "-n", "bench", self.key, self.secret)
        self.cli("bucket", "allow", "--read", "--write", "bucket", "--key", "bench")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(GARAGE), "-c", str(self.config), *args],
                              capture_output=True, text=True, check=check)

    def stop(self):
        self.process.kill()


def list_objects(endpoint: str, prefix: str, sigv4: list[str], env: dict) -> list[str]:
    """The keys under `prefix` in `bucket` (ListObjectsV2, page by page)."""
    import urllib.parse
    import xml.etree.ElementTree as ET
    keys: list[str] = []
    token = None
    while True:
        query = {"list-type": "2", "prefix": prefix}
        if token:
            query["continuation-token"] = token
        url = f"{endpoint}/bucket?{urllib.parse.urlencode(query)}"
        body = subprocess.run(["curl", *sigv4, url], env=env, capture_output=True,
                              check=True).stdout
        root = ET.fromstring(body)
        ns = {"s3": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
        find = (lambda e, t: e.find(f"s3:{t}", ns)) if ns else (lambda e, t: e.find(t))
        findall = (lambda e, t: e.findall(f"s3:{t}", ns)) if ns else (lambda e, t: e.findall(t))
        keys += [find(c, "Key").text for c in findall(root, "Contents")]
        truncated = find(root, "IsTruncated")
        if truncated is None or truncated.text != "true":
            return keys
        token = find(root, "NextContinuationToken").text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--server", choices=["s3s", "garage"], default="s3s")
    ap.add_argument("--bin", default=str(REPO / "target/release/modelforge"))
    args = ap.parse_args(argv)
    name = "small" if args.small else "tinyllama"
    d = (REPO / "target" / "bench" / name).resolve()
    d.mkdir(parents=True, exist_ok=True)
    bench_fuse.generate(d, bench_fuse.SHAPES[name])
    bench_fuse.write_recipes(d)
    mf = str(Path(args.bin).resolve())

    root = d / "s3"
    shutil.rmtree(root, ignore_errors=True)
    server = (S3s if args.server == "s3s" else Garage)(root)
    endpoint = f"http://127.0.0.1:{server.port}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=server.key, AWS_SECRET_ACCESS_KEY=server.secret,
               AWS_REGION=server.region, AWS_ENDPOINT_URL=endpoint, AWS_ALLOW_HTTP="true",
               MODELFORGE_REMOTE="")
    sigv4 = ["--aws-sigv4", f"aws:amz:{server.region}:s3", "--user",
             f"{server.key}:{server.secret}", "-sSf", "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]
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
            # the same objects, fetched (untimed) and uploaded plainly under another prefix
            names = [k for k in list_objects(endpoint, f"{prefix}/", sigv4, env) if "/cas/" in k]
            staged = d / f"plain-put{i}"
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir()
            curl_all([["curl", *sigv4, "-o", str(staged / k.rsplit("/", 1)[1]),
                       f"{endpoint}/bucket/{k}"] for k in names], env)
            plain = f"plain{i}"
            jobs = [["curl", *sigv4, "-T", str(staged / k.rsplit("/", 1)[1]),
                     f"{endpoint}/bucket/{plain}/{k.split('/', 1)[1]}"]
                    for k in names]
            subprocess.run(["sync"], check=True)
            results["put"].append(curl_all(jobs, env))
            shutil.rmtree(staged, ignore_errors=True)
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
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{size / 1e9:.2f} GB model, {args.runs} runs, {server.name} on loopback\n")
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
