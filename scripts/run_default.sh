#!/usr/bin/env bash
# Install moecpt into its own virtual environment, .venv (see scripts/env.sh: python3 >= 3.10 or uv; torch
# 2.13.0 unless the Python that makes .venv already has a torch), and run the embedded default study:
# a small Mixtral pre-trained on English + code, continually pre-trained on ja:en:math+code = 64.4:25.6:10,
# evaluated before and after. Everything lands in runs/mini (report.md, figures/, summary.json, hf/).
# Extra arguments go to `moecpt run` (e.g. --run-dir DIR). Rerunning continues an interrupted run and
# reuses .venv without installing anything.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
moecpt_env eval
trap moecpt_env_hint EXIT
moecpt run "$@"
