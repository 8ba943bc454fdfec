"""Inputs named by Hugging Face repository (`hf = "org/name"`, `revision`), found in a local
Hugging Face cache laid out as huggingface_hub writes it (blobs, snapshot symlinks, refs), which
huggingface_hub's own cache scanner must recognise."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from huggingface_hub import scan_cache_dir

from support import BIN, REPO


def cache_model(cache: Path, repo: str, source: Path, commit: str, refs: list[str]) -> Path:
    """Puts the files of `source` into `cache` as huggingface_hub does after a download of
    `repo` at `commit`: each file a blob named by its hash, linked from the snapshot."""
    org, name = repo.split("/")
    folder = cache / f"models--{org}--{name}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        if not file.is_file():
            continue
        data = file.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / file.name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return snapshot


def run(args, cwd: Path, cache: Path, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "MODELFORGE_REMOTE": ""}
    done = subprocess.run([str(BIN), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def says(text: str, words: str) -> bool:
    """Whether a diagnostic holds `words`, whatever miette's line wrapping and frame."""
    squeeze = lambda t: "".join(t.replace("│", "").split())
    return squeeze(words) in squeeze(text)


COMMIT_A, COMMIT_B, COMMIT_L = "a" * 40, "b" * 40, "c" * 40


def setup(tmp_path: Path) -> tuple[Path, Path]:
    hub = tmp_path / "hub"
    cache_model(hub, "tiny/llama", REPO / "examples" / "tiny-llama", COMMIT_A, ["main"])
    cache_model(hub, "tiny/llama-lora", REPO / "examples" / "tiny-llama-lora", COMMIT_L,
                ["main", "v1"])
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "recipe.toml").write_text(
        '[base]\nhf = "tiny/llama"\n[[adapter]]\nhf = "tiny/llama-lora"\nrevision = "v1"\n'
        '[output]\npath = "out"\n')
    return hub, ws


def test_models_in_the_hugging_face_cache_build_as_folders_do(tmp_path):
    hub, ws = setup(tmp_path)
    # The fixture is a cache huggingface_hub itself recognises.
    scanned = {r.repo_id: {rev.commit_hash for rev in r.revisions}
               for r in scan_cache_dir(hub).repos}
    assert scanned == {"tiny/llama": {COMMIT_A}, "tiny/llama-lora": {COMMIT_L}}

    run(["build", "recipe.toml", "--cache", tmp_path / "cache"], ws, hub)
    by_path = tmp_path / "by-path"
    by_path.mkdir()
    shutil.copytree(REPO / "examples" / "tiny-llama", by_path / "base")
    shutil.copytree(REPO / "examples" / "tiny-llama-lora", by_path / "lora")
    (by_path / "recipe.toml").write_text(
        '[base]\npath = "base"\n[[adapter]]\npath = "lora"\n[output]\npath = "out"\n')
    run(["build", "recipe.toml", "--cache", tmp_path / "cache2"], by_path, hub)
    assert ((ws / "out" / "model.safetensors").read_bytes()
            == (by_path / "out" / "model.safetensors").read_bytes())

    # The lock pins each repository's commit, by names that are the same on every machine.
    lock = (ws / "recipe.lock").read_text()
    assert f'"hf://tiny/llama@{COMMIT_A}/model.safetensors"' in lock, lock
    assert f'"hf://tiny/llama-lora@{COMMIT_L}/adapter_model.safetensors"' in lock, lock
    assert str(hub) not in lock
    run(["build", "recipe.toml", "--locked", "--cache", tmp_path / "cache"], ws, hub)


def test_a_moved_branch_is_caught_by_the_lock(tmp_path):
    hub, ws = setup(tmp_path)
    run(["build", "recipe.toml", "--cache", tmp_path / "cache"], ws, hub)
    # `main` now points at another commit, with other weights.
    changed = tmp_path / "changed"
    shutil.copytree(REPO / "examples" / "tiny-llama", changed)
    data = bytearray((changed / "model.safetensors").read_bytes())
    data[-2] ^= 0x01
    (changed / "model.safetensors").write_bytes(bytes(data))
    cache_model(hub, "tiny/llama", changed, COMMIT_B, ["main"])
    locked = run(["build", "recipe.toml", "--locked", "--cache", tmp_path / "cache"], ws, hub,
                 check=False)
    assert locked.returncode != 0
    assert says(locked.stderr, f"hf://tiny/llama@{COMMIT_B}/model.safetensors"), locked.stderr
    # Pinning the old commit builds what the lock says.
    text = (ws / "recipe.toml").read_text().replace(
        'hf = "tiny/llama"\n', f'hf = "tiny/llama"\nrevision = "{COMMIT_A}"\n')
    (ws / "recipe.toml").write_text(text)
    built = json.loads(run(["build", "recipe.toml", "--json", "--cache", tmp_path / "cache"],
                           ws, hub).stdout)
    assert built["nodes"]["computed"] == 0


def test_a_model_missing_from_the_cache_says_how_to_get_it(tmp_path):
    hub, ws = setup(tmp_path)
    (ws / "recipe.toml").write_text(
        '[base]\nhf = "tiny/other"\nrevision = "dev"\n[[adapter]]\nhf = "tiny/llama-lora"\n'
        '[output]\npath = "out"\n')
    failed = run(["build", "recipe.toml", "--cache", tmp_path / "cache"], ws, hub, check=False)
    assert failed.returncode != 0
    assert says(failed.stderr, "hf download tiny/other --revision dev"), failed.stderr
    assert says(failed.stderr, "models--tiny--other"), failed.stderr
    for bad, why in [('[base]\nhf = "../escape"\n', "is not a Hugging Face repository name"),
                     ('[base]\n', "neither a `path` nor an `hf`"),
                     ('[base]\npath = "x"\nhf = "tiny/llama"\n', "both a `path` and an `hf`")]:
        (ws / "recipe.toml").write_text(bad + '[output]\npath = "out"\n')
        failed = run(["build", "recipe.toml", "--cache", tmp_path / "cache"], ws, hub,
                     check=False)
        assert failed.returncode != 0 and says(failed.stderr, why), failed.stderr
