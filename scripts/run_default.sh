#!/usr/bin/env bash
# Install moecpt (torch 2.13.0 CPU unless a torch is already installed) and run the embedded default study:
# a small Mixtral pre-trained on English + code, continually pre-trained on ja:en:math+code = 64.4:25.6:10,
# evaluated before and after. Everything lands in runs/mini (report.md, figures/, summary.json, hf/).
# Extra arguments go to `moecpt run` (e.g. --run-dir DIR). Rerunning continues an interrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[eval]"
moecpt run "$@"
