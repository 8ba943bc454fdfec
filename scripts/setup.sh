#!/usr/bin/env bash
# Installs what modelforge needs to build and test, into this checkout only:
#   .venv/            Python 3.11 env with torch 2.11.0 (its libtorch is what tch links), transformers, peft
#   .venv/libtorch    a link to that env's torch folder, named by .cargo/config.toml as LIBTORCH
# Idempotent: a second run with the same requirements does nothing and takes well under a second.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

req=scripts/requirements.txt
stamp=.venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python packages into .venv (torch 2.11.0, transformers, peft; a few minutes the first time)" >&2
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
fi

site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn "$site/torch" .venv/libtorch
