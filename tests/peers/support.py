"""What the peer tests share: the modelforge binary under test, and running it."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("MODELFORGE_BIN", REPO / "target" / "debug" / "modelforge"))


def modelforge(*args: str | Path, cwd: Path | str | None = None, check: bool = True,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`modelforge ARGS`, its output captured as text. With `check`, a failure fails the test with
    modelforge's own message rather than a bare exit status."""
    if not BIN.exists():
        pytest.fail(f"modelforge binary not found at {BIN}: `cargo build` or set MODELFORGE_BIN")
    command = [str(BIN), *map(str, args)]
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and run.returncode != 0:
        pytest.fail(f"`{' '.join(command)}` exited with {run.returncode}:\n{run.stderr}")
    return run
