#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite: the Rust tests, then the peer tests
# that compare modelforge with PEFT, transformers and llama.cpp (tests/peers/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# llama.cpp itself, for the GGUF tests: node-llama-cpp's prebuilt binaries (node 20 is on the machine).
if [ ! -d target/node/node_modules/node-llama-cpp ]; then
  echo "test: installing node-llama-cpp 3.21.1 into target/node (llama.cpp for the GGUF tests)" >&2
  npm install --prefix target/node --no-audit --no-fund --loglevel=error node-llama-cpp@3.21.1
fi
cargo build --quiet
cargo test --quiet
MODELFORGE_BIN="$PWD/target/debug/modelforge" HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/peers -q
