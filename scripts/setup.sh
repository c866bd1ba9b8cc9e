#!/usr/bin/env bash
# Set up a machine for sift_lightning: offline data (Debian, when root) and a virtualenv with the
# package installed editable. Idempotent and cached: the venv is keyed by pyproject.toml, so a
# change of dependencies builds a fresh one and an unchanged one is reused.
# Prints the venv's bin directory on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >&2 \
      || echo "setup: could not install Debian's dataset-fashion-mnist; the quickstart needs it (or data.init_args.download: true)" >&2
  else
    echo "setup: run 'sudo apt-get install dataset-fashion-mnist' for the offline Fashion-MNIST quickstart" >&2
  fi
fi

key=$( (cat pyproject.toml; python3 --version) | sha256sum | cut -c1-12)
venv=${SIFT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sift-lightning/venv-$key}
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, lightning, timm" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -e ".[test,plots]" >&2
else
  "$venv/bin/pip" install -q --no-deps -e . >&2   # this checkout, in case it moved
fi
echo "$venv/bin"
