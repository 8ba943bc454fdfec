#!/usr/bin/env bash
# Sets up everything the tests need (scripts/setup.sh: all of scripts/requirements.txt) and runs
# the whole test suite: the Rust tests, then the peer tests that compare modelforge with PEFT,
# transformers and llama.cpp (tests/peers/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# llama.cpp itself, for the GGUF tests: node-llama-cpp's prebuilt binaries (node 20 is on the machine).
if [ ! -d target/node/node_modules/node-llama-cpp ]; then
  echo "test: installing node-llama-cpp 3.21.1 into target/node (llama.cpp for the GGUF tests)" >&2
  npm install --prefix target/node --no-audit --no-fund --loglevel=error node-llama-cpp@3.21.1
fi
# A real S3 server for the remote-cache tests: s3s-fs, built once into target/s3s (about 4 min on
# two cores; kept between runs).
if [ ! -x target/s3s/bin/s3s-fs ]; then
  echo "test: building s3s-fs 0.14.1 into target/s3s (an S3 server for the remote-cache tests)" >&2
  cargo install --quiet --locked s3s-fs --version 0.14.1 --features binary --root target/s3s
fi
# Garage 2.5.0, a production S3 store with per-key permissions, for the read-only-key test:
# about 22 min to compile on two cores, so it is installed once per machine, outside the clone.
TOOLS="${MODELFORGE_TOOLS:-$HOME/.cache/modelforge-tools}"
if [ ! -x "$TOOLS/garage/bin/garage" ]; then
  echo "test: building garage 2.5.0 into $TOOLS/garage (about 22 min on two cores; once per machine)" >&2
  cargo install --quiet --locked garage --version 2.5.0 --root "$TOOLS/garage"
fi
export MODELFORGE_GARAGE="$TOOLS/garage/bin/garage"
cargo build --quiet
cargo test --quiet
MODELFORGE_BIN="$PWD/target/debug/modelforge" HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/peers -q
