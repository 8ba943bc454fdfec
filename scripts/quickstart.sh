#!/usr/bin/env bash
# Sets up (scripts/setup.sh), builds modelforge and runs the shipped example:
# examples/tiny-llama with examples/tiny-llama-lora fused in, written to build/quickstart.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --release --quiet
./target/release/modelforge build recipes/quickstart.toml
./target/release/modelforge inspect build/quickstart
