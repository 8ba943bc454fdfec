#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite: the Rust tests, then the peer tests
# that compare modelforge with PEFT and transformers (tests/peers/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --quiet
cargo test --quiet
MODELFORGE_BIN="$PWD/target/debug/modelforge" HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/peers -q
