#!/usr/bin/env bash
# Installs what modelforge needs, into this checkout only:
#   .venv/            a Python 3.11 env holding torch 2.11.0, whose libtorch is what tch links
#   .venv/libtorch    a link to that env's torch folder, named by .cargo/config.toml as LIBTORCH
#
#   bash scripts/setup.sh            everything the tests need (scripts/test.sh, .ci/run):
#                                    scripts/requirements.txt with all dependencies, torch's
#                                    CUDA libraries included (about 5.3 GB in .venv)
#   bash scripts/setup.sh --build    only what building and running modelforge needs
#                                    (scripts/quickstart.sh): scripts/requirements-build.txt,
#                                    installed with --no-deps (about 1.3 GB in .venv). On a
#                                    machine with an NVIDIA GPU (/dev/nvidia0, or nvidia-smi
#                                    lists one) torch's dependencies come too, so that
#                                    device = "cuda" works; --cuda asks for them anywhere,
#                                    --no-cuda leaves them out anywhere.
#
# Going from --build to the full set installs the rest into the same .venv; after the full set,
# --build has nothing to do. Idempotent: a second run with the same requirements does nothing
# and takes well under a second.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

mode=full cuda=auto
for arg in "$@"; do
  case $arg in
    --build) mode=build ;;
    --cuda) cuda=yes ;;
    --no-cuda) cuda=no ;;
    *) echo "usage: bash scripts/setup.sh [--build [--cuda | --no-cuda]]" >&2; exit 2 ;;
  esac
done

build_req=scripts/requirements-build.txt
full_req=scripts/requirements.txt
full_stamp=.venv/.requirements.sha256
build_stamp=.venv/.build.sha256
full_want=$(cat "$full_req" "$build_req" | sha256sum | cut -d' ' -f1)

stamped() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }

if [ "$mode" = full ]; then
  if ! stamped "$full_stamp" "$full_want"; then
    echo "setup: installing Python packages into .venv (torch 2.11.0 with its CUDA libraries, transformers, peft, mergekit, ...: about 5.3 GB, several minutes the first time)" >&2
    python3 -m venv .venv
    pip install --quiet -r "$full_req"
    echo "$full_want" > "$full_stamp"
  fi
elif ! stamped "$full_stamp" "$full_want"; then
  # The full set holds everything --build would install; otherwise --build's own stamp decides.
  if [ "$cuda" = auto ]; then
    cuda=no
    if [ -e /dev/nvidia0 ] || { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
      cuda=yes
    fi
  fi
  build_want=$( (cat "$build_req"; echo "cuda=$cuda") | sha256sum | cut -d' ' -f1)
  if ! stamped "$build_stamp" "$build_want"; then
    python3 -m venv .venv
    if [ "$cuda" = yes ]; then
      echo "setup: installing torch 2.11.0 and its dependencies, CUDA libraries included, into .venv (about 4.5 GB, a few minutes the first time)" >&2
      pip install --quiet -r "$build_req"
    else
      echo "setup: installing torch 2.11.0 for building, without its CUDA libraries, into .venv (a 545 MB download, about 1.3 GB installed; a GPU needs --cuda)" >&2
      pip install --quiet --no-deps -r "$build_req"
    fi
    echo "$build_want" > "$build_stamp"
  fi
fi

site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn "$site/torch" .venv/libtorch
