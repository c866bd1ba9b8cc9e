#!/usr/bin/env bash
# One command on a fresh machine: set up, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/setup.sh | tail -n 1)
"$bin/python" -m pytest -q "$@"
