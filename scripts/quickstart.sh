#!/usr/bin/env bash
# One command on a fresh machine: set up, then train Sparse-IFT on Fashion-MNIST (2 CPU cores,
# a few minutes, offline). Extra arguments go to sift-fit, e.g. --trainer.max_epochs 3.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/setup.sh | tail -n 1)
"$bin/sift-fit" fit --config configs/quickstart.yaml "$@"
echo "TensorBoard: $bin/tensorboard --logdir runs"
