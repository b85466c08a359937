#!/usr/bin/env bash
# Install moecpt with its test extra (torch 2.13.0 CPU unless a torch is already installed), lint, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
python -m ruff check src tests bench
python -m pytest -q "$@"
