"""The shared remote cache (`build --remote URL [--push]`), against real S3 servers on loopback
(s3s-fs, installed into target/s3s by scripts/test.sh; Garage, a production store with per-key
permissions, installed by the same script) and a shared folder (`file://`): two caches stand for
two machines sharing one remote. The tests read, list and damage the remote's objects as another
client would: through the S3 API (curl's SigV4), or as the folder's files."""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import blake3
import pytest

from support import BIN, REPO

S3S = Path(os.environ.get("MODELFORGE_S3S", REPO / "target" / "s3s" / "bin" / "s3s-fs"))
GARAGE = Path(os.environ.get("MODELFORGE_GARAGE", Path.home() / ".cache" / "modelforge-tools"
                             / "garage" / "bin" / "garage"))
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


class Garage:
    """A single-node Garage on loopback with one bucket and two keys: `writer` may read and
    write it, `reader` may only read it."""

    # Garage's key format: "GK" and 24 hex digits; the secret, 64 hex digits.
    WRITER = ("GK" + "1" * 24, "a" * 64)
    READER = ("GK" + "2" * 24, "b" * 64)

    def __init__(self, root: Path):
        if not GARAGE.exists():
            pytest.fail(f"garage not found at {GARAGE}: scripts/test.sh installs it")
        root.mkdir(parents=True, exist_ok=True)
        self.port, rpc, admin = free_port(), free_port(), free_port()
        self.config = root / "garage.toml"
        self.config.write_text(f"""metadata_dir = "{root / 'meta'}"
data_dir = "{root / 'data'}"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{'0' * 63}1"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{self.port}"
[admin]
api_bind_addr = "127.0.0.1:{admin}"
""")
        self.log = open(root / "garage.log", "wb")
        self.process = subprocess.Popen([str(GARAGE), "-c", str(self.config), "server"],
                                        stdout=self.log, stderr=self.log)
        try:
            deadline = time.time() + 30
            while self.cli("status", check=False).returncode != 0:
                if time.time() > deadline or self.process.poll() is not None:
                    pytest.fail("garage did not start: " + (root / "garage.log").read_text()[-2000:])
                time.sleep(0.1)
            node = self.cli("node", "id", "-q").stdout.strip().split("@")[0]
            self.cli("layout", "assign", "-z", "dc1", "-c", "1G", node)
            self.cli("layout", "apply", "--version", "1")
            # The new layout takes effect in the background: until it has, a bucket cannot be
            # made ("layout not ready"), so the first try may fail.
            while (made := self.cli("bucket", "create", "bucket", check=False)).returncode != 0:
                if time.time() > deadline:
                    pytest.fail(f"garage bucket create: {made.stderr}")
                time.sleep(0.2)
            for (key, secret), name, rights in ((self.WRITER, "writer", ["--read", "--write"]),
                                                (self.READER, "reader", ["--read"])):
                self.cli("key", "import", "--yes", "-n", name, key, secret)
                self.cli("bucket", "allow", *rights, "bucket", "--key", name)
        except BaseException:
            self.stop()
            raise

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        run = subprocess.run([str(GARAGE), "-c", str(self.config), *args],
                             capture_output=True, text=True, timeout=30)
        if check and run.returncode != 0:
            pytest.fail(f"garage {' '.join(args)}: {run.stderr}")
        return run

    def env(self, key: tuple[str, str]) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": key[0], "AWS_SECRET_ACCESS_KEY": key[1],
                "AWS_REGION": "garage", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
                "AWS_ALLOW_HTTP": "true"}

    def stop(self):
        self.process.kill()
        self.process.wait()
        self.log.close()


class Cutoff:
    """A TCP proxy in front of `server` that, once `budget` bytes have passed through it either
    way, kills the server and drops every connection: a server that stops mid-build."""

    def __init__(self, server: S3Server, budget: int):
        self.server, self.budget, self.passed = server, budget, 0
        self.lock = threading.Lock()
        self.cut_off = threading.Event()
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def env(self) -> dict[str, str]:
        return {**self.server.env(), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.server.port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    def pipe(self, src: socket.socket, dst: socket.socket):
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.passed += len(data)
                    over = self.passed > self.budget
                if over:
                    self.cut()
                    return
                dst.sendall(data)
        except OSError:
            pass

    def cut(self):
        with self.lock:
            if self.cut_off.is_set():
                return
            self.cut_off.set()
        self.server.stop()
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


class Folder:
    """A remote's objects as the files of a shared folder (`file://`). Keys are relative to the
    layout's root, `modelforge/v1/`."""

    def __init__(self, root: Path):
        self.root = root / "modelforge" / "v1"

    def keys(self, space: str) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in (self.root / space).rglob("*")
                      if p.is_file())

    def read(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def write(self, key: str, data: bytes) -> None:
        (self.root / key).write_bytes(data)


class Bucket:
    """A remote's objects through the S3 API (curl's SigV4), as another client sees them."""

    def __init__(self, env: dict[str, str], prefix: str = "team"):
        self.endpoint = f"{env['AWS_ENDPOINT_URL']}/bucket"
        self.root = f"{prefix}/modelforge/v1/"
        self.sigv4 = ["--silent", "--show-error", "--aws-sigv4", f"aws:amz:{env['AWS_REGION']}:s3",
                      "--user", f"{env['AWS_ACCESS_KEY_ID']}:{env['AWS_SECRET_ACCESS_KEY']}",
                      "--header", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]

    def curl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["curl", *self.sigv4, *args], capture_output=True, timeout=60)

    def keys(self, space: str) -> list[str]:
        import urllib.parse
        import xml.etree.ElementTree as ET
        keys: list[str] = []
        token = None
        while True:
            query = {"list-type": "2", "prefix": self.root + space + "/"}
            if token:
                query["continuation-token"] = token
            listing = self.curl("--fail", f"{self.endpoint}?{urllib.parse.urlencode(query)}")
            assert listing.returncode == 0, listing.stderr
            root = ET.fromstring(listing.stdout)
            ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            keys += [c.find(f"{ns}Key").text[len(self.root):] for c in root.iter(f"{ns}Contents")]
            if root.findtext(f"{ns}IsTruncated") != "true":
                return sorted(keys)
            token = root.findtext(f"{ns}NextContinuationToken")

    def read(self, key: str) -> bytes | None:
        got = self.curl("--write-out", "%{http_code}", "--output", "-", f"{self.endpoint}/{self.root}{key}")
        status = got.stdout[-3:]
        assert status in (b"200", b"404"), got.stderr
        return got.stdout[:-3] if status == b"200" else None

    def write(self, key: str, data: bytes) -> None:
        put = subprocess.run(["curl", *self.sigv4, "--fail", "-X", "PUT", "--data-binary", "@-",
                              f"{self.endpoint}/{self.root}{key}"], input=data,
                             capture_output=True, timeout=60)
        assert put.returncode == 0, put.stderr


def cas(digest: str) -> str:
    """The key of the object with this blake3 digest."""
    return f"cas/{digest[:2]}/{digest}"


def damage(objects, key: str, where: int) -> None:
    """Flips one byte of the object `key`, keeping its name: a damaged remote object."""
    data = bytearray(objects.read(key))
    data[where] ^= 0xFF
    objects.write(key, bytes(data))


@pytest.fixture
def garage(tmp_path):
    server = Garage(tmp_path / "garage")
    yield server
    server.stop()


@pytest.fixture
def s3(tmp_path):
    server = S3Server(tmp_path / "s3")
    yield server
    server.stop()


@pytest.fixture(params=["file", "s3s", "garage"])
def remote(request, tmp_path):
    """(URL, environment, its objects as another client sees them) for each kind of remote: a
    shared folder, s3s-fs, and Garage (with a key that may write)."""
    if request.param == "file":
        folder = tmp_path / "shared"
        yield f"file://{folder}", {}, Folder(folder)
        return
    server = S3Server(tmp_path / "s3") if request.param == "s3s" else Garage(tmp_path / "garage")
    env = server.env() if request.param == "s3s" else server.env(server.WRITER)
    try:
        yield "s3://bucket/team", env, Bucket(env)
    finally:
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


def test_a_second_machine_pulls_instead_of_computing(tmp_path, remote):
    url, env, objects = remote
    first = workspace(tmp_path / "a")
    pushed = summary(build(first, tmp_path / "cache-a", "--remote", url, "--push", env=env))
    computed = pushed["nodes"]["computed"]
    assert computed > 0
    # Each computed tensor, and each output file (for machines without the inputs).
    assert pushed["pushed"]["objects"] == computed + len(outputs(first))
    assert len(objects.keys("cas")) == pushed["pushed"]["objects"]

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
    url, env, objects = remote
    first = workspace(tmp_path / "a")
    build(first, tmp_path / "cache-a", "--remote", url, "--push", env=env)
    # The object one node's entry names, its bytes changed under its name.
    entry = objects.keys("ac")[0]
    digest = json.loads(objects.read(entry))["tensor"]
    damage(objects, cas(digest), len(objects.read(cas(digest))) // 2)

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
    url, env, objects = remote
    spaces = [workspace(tmp_path / name) for name in ("a", "b", "c")]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(
            lambda ws: build(ws, ws / "cache", "--remote", url, "--push", env=env), spaces))
    assert all(r.returncode == 0 for r in runs)
    # Every entry names an object that is there, with the bytes its name says.
    assert consistent(objects) > 0
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
    url, env, objects = remote
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
    damage(objects, cas(digest), -1)
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


def test_a_read_only_key_pulls_and_its_push_is_refused(tmp_path, garage):
    url = "s3://bucket/team"
    first = workspace(tmp_path / "a")
    pushed = summary(build(first, tmp_path / "cache-a", "--remote", url, "--push",
                           env=garage.env(garage.WRITER)))
    assert pushed["pushed"]["objects"] > 0

    # A laptop whose key may only read: everything it needs comes from the remote.
    reader = garage.env(garage.READER)
    second = workspace(tmp_path / "b")
    pulled = summary(build(second, tmp_path / "cache-b", "--remote", url, env=reader))
    assert pulled["nodes"]["computed"] == 0, pulled
    assert pulled["pulled"]["objects"] == pushed["nodes"]["computed"], pulled
    assert outputs(second) == outputs(first)

    # Pushing with it: the output is written all the same, the push is an error that names the
    # remote and says the key may not write, and the secret is never printed.
    third = workspace(tmp_path / "c", weight=0.5)
    refused = build(third, tmp_path / "cache-c", "--remote", url, "--push", env=reader,
                    check=False)
    assert refused.returncode != 0
    words = said(refused.stderr)
    assert url in words and "may not write" in words, refused.stderr
    assert garage.READER[1] not in refused.stdout + refused.stderr
    local = workspace(tmp_path / "d", weight=0.5)
    build(local, tmp_path / "cache-d")
    assert outputs(third) == outputs(local)
    # Nothing of it reached the remote: a writer building the same recipe computes it all.
    fourth = workspace(tmp_path / "e", weight=0.5)
    run = summary(build(fourth, tmp_path / "cache-e", "--remote", url,
                        env=garage.env(garage.WRITER)))
    assert run["nodes"]["computed"] == pulled["pulled"]["objects"], run


def consistent(objects) -> int:
    """Checks that every entry of the remote names an object holding the bytes its name says;
    the number of entries."""
    entries = objects.keys("ac")
    for entry in entries:
        digest = json.loads(objects.read(entry))["tensor"]
        data = objects.read(cas(digest))
        assert data is not None, f"{entry} names a missing object"
        assert blake3.blake3(data).hexdigest() == digest
    return len(entries)


def test_a_server_that_stops_mid_pull_costs_one_warning(tmp_path, s3):
    first = workspace(tmp_path / "a")
    pushed = summary(build(first, tmp_path / "cache-a", "--remote", "s3://bucket/team", "--push",
                           env=s3.env()))
    total = pushed["nodes"]["computed"]
    # How many bytes a whole pull takes; half of them through, the server is killed.
    counter = Cutoff(s3, 1 << 40)
    summary(build(workspace(tmp_path / "probe"), tmp_path / "cache-probe", "--remote",
                  "s3://bucket/team", env=counter.env()))
    proxy = Cutoff(s3, counter.passed // 2)
    second = workspace(tmp_path / "b")
    started = time.time()
    run = build(second, tmp_path / "cache-b", "--remote", "s3://bucket/team", env=proxy.env())
    assert time.time() - started < 30
    assert proxy.cut_off.is_set()
    s = summary(run)
    assert s["pulled"]["objects"] > 0 and s["nodes"]["computed"] > 0, s
    assert s["pulled"]["objects"] + s["nodes"]["computed"] == total, s
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "s3://bucket/team" in warnings[0], run.stderr
    assert outputs(second) == outputs(first)
    verify = subprocess.run([str(BIN), "cache", "verify", "--cache", str(tmp_path / "cache-b")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_server_that_stops_mid_push_leaves_a_consistent_remote(tmp_path, s3):
    # How many bytes the computed tensors of a push take (measured on a remote of its own);
    # three quarters of them through (eight go at once), the server is killed.
    probe_ws = workspace(tmp_path / "probe")
    probe = summary(build(probe_ws, tmp_path / "cache-probe", "--remote", "s3://bucket/probe",
                          "--push", env=s3.env()))
    files = sum(p.stat().st_size for p in (probe_ws / "out").iterdir() if p.is_file())
    proxy = Cutoff(s3, (probe["pushed"]["bytes"] - files) * 3 // 4)
    first = workspace(tmp_path / "a")
    run = build(first, tmp_path / "cache-a", "--remote", "s3://bucket/team", "--push",
                env=proxy.env(), check=False)
    assert proxy.cut_off.is_set()
    assert run.returncode != 0 and "s3://bucket/team" in said(run.stderr), run.stderr
    # The output is written all the same, as a build without the remote writes it.
    local = workspace(tmp_path / "local")
    build(local, tmp_path / "cache-local")
    assert outputs(first) == outputs(local)
    # The server back: what was pushed is consistent, and a second machine pulls it and
    # computes the rest.
    server = S3Server(s3.root)
    try:
        bucket = Bucket(server.env())
        entries = consistent(bucket)
        assert 0 < entries < probe["nodes"]["computed"], "the push was cut short"
        second = workspace(tmp_path / "b")
        s = summary(build(second, tmp_path / "cache-b", "--remote", "s3://bucket/team",
                          env=server.env()))
        assert s.get("pulled", {}).get("objects", 0) == entries, s
        assert s["nodes"]["computed"] == probe["nodes"]["computed"] - entries, s
        assert outputs(second) == outputs(local)
        # And pushing again completes it.
        build(first, tmp_path / "cache-a", "--remote", "s3://bucket/team", "--push",
              env=server.env())
        assert consistent(bucket) == probe["nodes"]["computed"]
    finally:
        server.stop()
