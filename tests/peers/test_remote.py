"""The shared remote cache (`build --remote URL [--push]`), against a real S3 server on loopback
(s3s-fs, installed into target/s3s by scripts/test.sh) and a shared folder (`file://`): two
caches stand for two machines sharing one remote."""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import blake3
import pytest

from support import BIN, REPO

S3S = Path(os.environ.get("MODELFORGE_S3S", REPO / "target" / "s3s" / "bin" / "s3s-fs"))
KEY, SECRET = "modelforge-test", "s3cr3t-never-printed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """s3s-fs serving `root` on a loopback port; buckets are its folders."""

    def __init__(self, root: Path):
        if not S3S.exists():
            pytest.fail(f"s3s-fs not found at {S3S}: scripts/test.sh installs it")
        self.root = root
        self.port = free_port()
        (root / "bucket").mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(S3S), "--host", "127.0.0.1", "--port", str(self.port),
             "--access-key", KEY, "--secret-key", SECRET, str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail("s3s-fs did not start")

    def env(self, key: str = KEY, secret: str = SECRET) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
                "AWS_ALLOW_HTTP": "true"}

    def stop(self):
        self.process.kill()
        self.process.wait()


@pytest.fixture
def s3(tmp_path):
    server = S3Server(tmp_path / "s3")
    yield server
    server.stop()


@pytest.fixture(params=["file", "s3"])
def remote(request, tmp_path):
    """(URL, environment, the folder holding the remote's objects) for each kind of remote."""
    if request.param == "file":
        folder = tmp_path / "shared"
        yield f"file://{folder}", {}, folder
    else:
        server = S3Server(tmp_path / "s3")
        yield "s3://bucket/team", server.env(), server.root / "bucket" / "team"
        server.stop()


def workspace(root: Path, weight: float = 1.0) -> Path:
    """The shipped example, its recipe writing `out/`."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("tiny-llama", "tiny-llama-lora"):
        if not (root / name).exists():
            shutil.copytree(REPO / "examples" / name, root / name)
    (root / "recipe.toml").write_text(
        f'[base]\npath = "tiny-llama"\n[[adapter]]\npath = "tiny-llama-lora"\nweight = {weight}\n'
        '[output]\npath = "out"\n')
    return root


def build(ws: Path, cache: Path, *args: str, env: dict[str, str] | None = None,
          check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [str(BIN), "build", str(ws / "recipe.toml"), "--json", "--cache", str(cache), *args]
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "MODELFORGE_REMOTE": "", **(env or {})})
    if check and run.returncode != 0:
        pytest.fail(f"`{' '.join(command)}` exited with {run.returncode}:\n{run.stderr}")
    return run


def said(text: str) -> str:
    """A diagnostic's words, without the line wrapping and the frame miette draws."""
    return " ".join(text.replace("│", " ").split())


def summary(run: subprocess.CompletedProcess) -> dict:
    return json.loads(run.stdout)


def outputs(ws: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((ws / "out").iterdir()) if p.is_file()}


def remote_objects(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "modelforge" / "v1" / "cas").rglob("*") if p.is_file())


def test_a_second_machine_pulls_instead_of_computing(tmp_path, remote):
    url, env, folder = remote
    first = workspace(tmp_path / "a")
    pushed = summary(build(first, tmp_path / "cache-a", "--remote", url, "--push", env=env))
    computed = pushed["nodes"]["computed"]
    assert computed > 0
    # Each computed tensor, and each output file (for machines without the inputs).
    assert pushed["pushed"]["objects"] == computed + len(outputs(first))
    assert len(remote_objects(folder)) == pushed["pushed"]["objects"]

    second = workspace(tmp_path / "b")
    pulled = summary(build(second, tmp_path / "cache-b", "--remote", url, env=env))
    assert pulled["nodes"]["computed"] == 0, pulled
    assert pulled["pulled"]["objects"] == computed
    assert "pushed" not in pulled, "a build without --push never writes to the remote"
    assert outputs(first) == outputs(second)
    # The pulled objects are in the second cache for good: no remote needed any more.
    third = summary(build(second, tmp_path / "cache-b"))
    assert third["up_to_date"] or third["nodes"]["computed"] == 0


def test_a_changed_adapter_pulls_the_rest_and_computes_only_its_tensors(tmp_path, remote):
    url, env, _ = remote
    base_run = summary(build(workspace(tmp_path / "a"), tmp_path / "cache-a",
                             "--remote", url, "--push", env=env))
    # The same recipe but for one adapter's weight in one module: its tensors change, the others
    # are the remote's.
    ws = workspace(tmp_path / "b")
    text = (ws / "recipe.toml").read_text().replace(
        "weight = 1.0", 'weight = [ { value = 1.0 }, { value = 0.5, modules = ["q_proj"] } ]')
    (ws / "recipe.toml").write_text(text)
    run = summary(build(ws, tmp_path / "cache-b", "--remote", url, env=env))
    total = base_run["nodes"]["computed"]
    assert 0 < run["nodes"]["computed"] < total, run
    assert run["pulled"]["objects"] == total - run["nodes"]["computed"], run
    # Identical to a build from nothing.
    fresh = workspace(tmp_path / "c")
    (fresh / "recipe.toml").write_text(text)
    build(fresh, tmp_path / "cache-c")
    assert outputs(ws) == outputs(fresh)


def test_a_damaged_remote_object_is_never_used(tmp_path, remote):
    url, env, folder = remote
    first = workspace(tmp_path / "a")
    build(first, tmp_path / "cache-a", "--remote", url, "--push", env=env)
    # The object one node's entry names.
    entry = next(p for p in (folder / "modelforge" / "v1" / "ac").rglob("*") if p.is_file())
    digest = json.loads(entry.read_text())["tensor"]
    victim = folder / "modelforge" / "v1" / "cas" / digest[:2] / digest
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))

    second = workspace(tmp_path / "b")
    run = build(second, tmp_path / "cache-b", "--remote", url, env=env)
    s = summary(run)
    assert s["nodes"]["computed"] == 1, s
    assert "does not match its digest" in said(run.stderr), run.stderr
    assert "node " in run.stderr, run.stderr
    assert outputs(first) == outputs(second)
    # The damaged bytes are in no entry of the local cache.
    verify = subprocess.run([str(BIN), "cache", "verify", "--cache", str(tmp_path / "cache-b")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_remote_that_is_down_costs_one_warning(tmp_path, s3):
    env = s3.env()
    s3.stop()
    ws = workspace(tmp_path / "a")
    started = time.time()
    run = build(ws, tmp_path / "cache", "--remote", "s3://bucket/team", env=env)
    assert time.time() - started < 30
    assert summary(run)["nodes"]["computed"] > 0
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "s3://bucket/team" in warnings[0], run.stderr
    # Pushing to it is an error, not a silent success; the output is written all the same.
    run = build(workspace(tmp_path / "b"), tmp_path / "cache-b", "--remote", "s3://bucket/team",
                "--push", env=env, check=False)
    assert run.returncode != 0 and "s3://bucket/team" in said(run.stderr), run.stderr


def test_wrong_credentials_are_a_warning_and_never_printed(tmp_path, s3):
    ws = workspace(tmp_path / "a")
    env = s3.env(secret="not-" + SECRET)
    run = build(ws, tmp_path / "cache", "--remote", "s3://bucket/team", env=env)
    assert summary(run)["nodes"]["computed"] > 0
    assert "cannot be read" in run.stderr, run.stderr
    pushed = build(workspace(tmp_path / "b"), tmp_path / "cache-b", "--remote",
                   "s3://bucket/team", "--push", env=s3.env())
    for text in (run.stdout, run.stderr, pushed.stdout, pushed.stderr):
        assert SECRET not in text
    for path in [*(tmp_path / "a").rglob("*"), *(tmp_path / "b").rglob("*")]:
        if path.is_file() and path.suffix in (".lock", ".json", ".md", ".txt", ".toml"):
            assert SECRET not in path.read_text(errors="ignore"), path


def test_two_machines_pushing_at_once_leave_a_consistent_remote(tmp_path, remote):
    url, env, folder = remote
    spaces = [workspace(tmp_path / name) for name in ("a", "b", "c")]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(
            lambda ws: build(ws, ws / "cache", "--remote", url, "--push", env=env), spaces))
    assert all(r.returncode == 0 for r in runs)
    # Every entry names an object that is there, with the bytes its name says.
    entries = sorted(p for p in (folder / "modelforge" / "v1" / "ac").rglob("*") if p.is_file())
    assert entries
    for entry in entries:
        record = json.loads(entry.read_text())
        digest = record["tensor"]
        obj = folder / "modelforge" / "v1" / "cas" / digest[:2] / digest
        assert blake3.blake3(obj.read_bytes()).hexdigest() == digest
    # And a fourth machine builds the same model from it without computing.
    fourth = workspace(tmp_path / "d")
    run = summary(build(fourth, tmp_path / "cache-d", "--remote", url, env=env))
    assert run["nodes"]["computed"] == 0
    assert outputs(fourth) == outputs(spaces[0])


def test_a_bad_address_is_a_diagnostic(tmp_path):
    ws = workspace(tmp_path / "a")
    run = build(ws, tmp_path / "cache", "--remote", "ftp://somewhere", check=False)
    assert run.returncode != 0
    assert "s3://BUCKET/PREFIX" in said(run.stderr), run.stderr
    assert "file:///DIR" in said(run.stderr), run.stderr


def test_a_machine_with_the_recipe_and_lock_alone_fetches_the_outputs(tmp_path, remote):
    url, env, folder = remote
    first = workspace(tmp_path / "a")
    build(first, tmp_path / "cache-a", "--remote", url, "--push", env=env)
    # Only the recipe and its lock: no base, no adapter, an empty cache, and no engine to start.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("recipe.toml", "recipe.lock"):
        shutil.copy(first / name, bare / name)
    no_engine = {**env, "MODELFORGE_ENGINE": str(tmp_path / "no-engine")}
    run = summary(build(bare, tmp_path / "cache-b", "--locked", "--remote", url, env=no_engine))
    assert run["nodes"]["computed"] == 0, run
    assert run["pulled"]["objects"] == len(outputs(first)), run
    assert outputs(bare) == outputs(first)
    assert (bare / "recipe.lock").read_bytes() == (first / "recipe.lock").read_bytes()

    # A damaged object fails the build, naming the file, and leaves the output as it was.
    before = outputs(bare)
    lock = (first / "recipe.lock").read_text()
    digest = next(line.split('"')[3] for line in lock.splitlines()
                  if line.startswith('"out/model.safetensors"'))
    victim = folder / "modelforge" / "v1" / "cas" / digest[:2] / digest
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    failed = build(bare, tmp_path / "cache-c", "--locked", "--remote", url, env=no_engine,
                   check=False)
    assert failed.returncode != 0
    assert "model.safetensors" in said(failed.stderr), failed.stderr
    assert "does not match" in said(failed.stderr), failed.stderr
    assert outputs(bare) == before
    assert not [p for p in bare.rglob("*") if p.name.startswith(".")], "nothing half-written"

    # Without the remote there is nothing to build from: a clear error.
    gone = build(bare, tmp_path / "cache-d", "--locked", "--remote", f"file://{tmp_path}/empty",
                 env=no_engine, check=False)
    assert gone.returncode != 0 and "has no object" in said(gone.stderr), gone.stderr
