#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU and PyTorch 2.11.0 (CUDA 13) under Python, with
# no Rust toolchain and no network. Runs in the folder bench/prepare_gpu_check.sh made (the
# release binaries, a small model, two adapters, cpu.toml and cuda.toml): points the binaries at
# that PyTorch's libtorch, builds the same recipe on the CPU and on CUDA, each from an empty
# cache and then again from another (CUDA's start-up shows in the first), and prints both
# timings and the largest absolute difference between the two outputs.
#
#   bash gpu_check.sh [PYTHON]        # default python3; its torch must be 2.11.x
#   BENCH_7B=DIR bash gpu_check.sh    # then the cold build of a 7B-shaped model generated in DIR
#                                     # (about 45 GB of disk), on CUDA and on the CPU, against
#                                     # this machine's own `cp -r && sync` (gpu_bench.py)
set -euo pipefail
dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${1:-${PYTHON:-python3}}
cd "$dir"

torch_lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
version=$("$py" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count())')
echo "python: $("$py" -c 'import sys; print(sys.version.split()[0])'); torch, CUDA, available, devices: $version"
case "$version" in
  2.11.*) ;;
  *) echo "warning: modelforge-engine was built against libtorch 2.11.0; this is $version" >&2 ;;
esac
# libtorch_cpu.so links the CUDA runtime that the wheel keeps in site-packages/nvidia/*/lib.
libs=$torch_lib
for d in "$torch_lib"/../../nvidia/*/lib; do
  [ -d "$d" ] && libs=$libs:$(cd "$d" && pwd)
done
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export MODELFORGE_ENGINE=$dir/bin/modelforge-engine
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

status=0
for device in cpu cuda; do
  for run in 1 2; do
    rm -rf "out-$device" "$device.lock" "cache-$device-$run"
    start=$EPOCHREALTIME
    if bin/modelforge build "$device.toml" --json --quiet --cache "cache-$device-$run" > "summary-$device-$run.json" 2> "stderr-$device-$run.txt"; then
      wall=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
      echo "$device run $run: $wall s wall; $("$py" gpu_check.py summary "summary-$device-$run.json")"
    else
      echo "$device run $run: FAILED"
      cat "stderr-$device-$run.txt"
      status=1
    fi
  done
done
# The engine names the device it ran on; a CUDA build that silently ran on the CPU would be no check.
grep -q '"device": "cuda' summary-cuda-1.json 2>/dev/null || { echo "the cuda build did not run on CUDA" >&2; status=1; }

if [ -d out-cpu ] && [ -d out-cuda ]; then
  "$py" gpu_check.py compare out-cpu out-cuda model lora_a lora_b || status=1
fi
if [ -n "${BENCH_7B:-}" ]; then
  "$py" gpu_bench.py "$BENCH_7B" --bin "$dir/bin" --scaling 1,2,4,8,16 || status=1
fi
exit $status
