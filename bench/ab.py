"""Side-by-side training-step throughput of two moecpt source trees (a change against its base), in one run.

Each round runs `bench/train_step.py` once from each tree (its own script and its own `src/`), alternating
which goes first, and the medians of tokens/s are compared: interleaving spreads whatever else the machine
does over both. The baseline tree is any checkout, e.g. `git worktree add /tmp/base <commit>`.

    python bench/ab.py --baseline /tmp/base --rounds 5 -- --shape mini --seq-len 128 --micro-batch 4

Prints one line per run and a final JSON line with both medians and the ratio (this tree / baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def run_once(tree: Path, bench_args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    out = subprocess.run([sys.executable, str(tree / "bench" / "train_step.py"), *bench_args], env=env,
                         capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"bench/ab.py: {tree}/bench/train_step.py failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, required=True, help="the other source tree (a checkout)")
    p.add_argument("--rounds", type=int, default=5, help="runs of each tree, interleaved")
    p.add_argument("bench_args", nargs="*", help="arguments for bench/train_step.py (after --)")
    args = p.parse_args(argv)
    trees = {"this": HERE, "baseline": args.baseline.resolve()}
    tps: dict[str, list[float]] = {k: [] for k in trees}
    losses: dict[str, list[float]] = {k: [] for k in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            res = run_once(trees[name], args.bench_args)
            tps[name].append(res["tokens_per_s"])
            losses[name].append(res["loss"])
            print(f"round {r + 1} {name:8s} {res['tokens_per_s']:10.1f} tok/s  loss {res['loss']}", flush=True)
    med = {k: statistics.median(v) for k, v in tps.items()}
    print(json.dumps({"bench": "ab", "args": args.bench_args, "rounds": args.rounds, "tokens_per_s": tps,
                      "median": med, "ratio_this_vs_baseline": round(med["this"] / med["baseline"], 4),
                      "same_loss": losses["this"] == losses["baseline"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
