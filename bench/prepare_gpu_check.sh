#!/usr/bin/env bash
# Prepares the GPU check: the release binaries (stripped) and a small generated model with two
# adapters, in one folder of at most 64 MiB that bench/gpu_check.sh then runs on a machine with
# an NVIDIA GPU, Python and PyTorch 2.11.0, and no Rust toolchain or network.
#
#   bash bench/prepare_gpu_check.sh [DIR]     # default target/gpu-check
#
# Then copy DIR to that machine and run `bash DIR/gpu_check.sh` there.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=$(realpath -m "${1:-$root/target/gpu-check}")
cd "$root"

cargo build --release --quiet --bin modelforge --bin modelforge-engine
rm -rf "$dir"
mkdir -p "$dir/bin"
for b in modelforge modelforge-engine; do
  strip -o "$dir/bin/$b" "target/release/$b"
done

# A LLaMA-shaped bf16 model (hidden 512, 4 layers, vocab 8000: 39 MB) with adapter A (r=16 on
# all seven projections) and B (r=8 on q/v), generated as the benchmark generates its own.
.venv/bin/python - "$dir" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
import bench_fuse
shape = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, vocab_size=8000)
bench_fuse.generate(Path(sys.argv[1]), shape)
PY
rm -f "$dir/generated.json"
for device in cpu cuda; do
  cat > "$dir/$device.toml" <<TOML
# The same build on the $device.
[base]
path = "model"

[[adapter]]
path = "lora_a"

[[adapter]]
path = "lora_b"
weight = 0.5

[output]
path = "out-$device"

[build]
device = "$device"
TOML
done
cp bench/gpu_check.sh bench/gpu_check.py bench/gpu_bench.py bench/bench_fuse.py "$dir/"
size=$(du -sb "$dir" | cut -f1)
echo "prepared $dir ($((size / 1024 / 1024)) MiB); run it there with: bash $(basename "$dir")/gpu_check.sh" >&2
if [ "$size" -gt $((64 << 20)) ]; then
  echo "error: $dir is over 64 MiB" >&2
  exit 1
fi
