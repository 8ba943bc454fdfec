#!/usr/bin/env bash
# Sets up what building needs (scripts/setup.sh --build: torch 2.11.0 without the test stack,
# and without its CUDA libraries unless the machine has an NVIDIA GPU or --cuda is given),
# builds modelforge and runs the shipped example: examples/tiny-llama with
# examples/tiny-llama-lora fused in, written to build/quickstart.
#   bash scripts/quickstart.sh [--cuda | --no-cuda]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh --build "$@"
cargo build --release --quiet
./target/release/modelforge build recipes/quickstart.toml
./target/release/modelforge inspect build/quickstart
