"""The training stall per checkpoint, synchronous against asynchronous (`checkpoint.async_save`), side by side.

One process trains a preset model on random tokens (AdamW, so a checkpoint holds weights and two optimizer
moments) and saves through `Checkpointer` every `--interval` steps. The stall of a checkpoint is the time the
training loop spends in `Checkpointer.save` (for async: staging the state in host memory, plus any wait for
the previous write, which a long enough interval hides); `wait` at the end finishes the last write.

    python bench/checkpoint_stall.py --preset mini --steps 12 --interval 3

Prints one line per mode and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moecpt.config import CheckpointSection
from moecpt.model import build_model
from moecpt.model.families import preset_config
from moecpt.train.checkpoint import Checkpointer, verify_checkpoint


def run(mode: str, args: argparse.Namespace, root: Path) -> dict:
    torch.manual_seed(0)
    config = preset_config(args.preset)
    model = build_model(config, device="cpu", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ckpt = Checkpointer(root / mode, CheckpointSection(async_save=mode == "async", keep_last=2))
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))
    steps, stalls = [], []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - t0)
        if step % args.interval == 0:
            t0 = time.perf_counter()
            ckpt.save(step, model, optimizer, {"data": {}})
            stalls.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    last = ckpt.wait() or ckpt.root / f"step_{args.steps:08d}"
    final_wait = time.perf_counter() - t0
    assert verify_checkpoint(last) == [], last
    size = sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
    return {"mode": mode, "stall_s": [round(s, 3) for s in stalls], "median_stall_s": round(statistics.median(stalls), 3),
            "median_step_s": round(statistics.median(steps), 3), "final_wait_s": round(final_wait, 3),
            "checkpoint_gb": round(size / 1e9, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mini")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="moecpt-stall-"))
    results = [run(mode, args, root) for mode in ("sync", "async")]
    for r in results:
        print(f"{r['mode']:>5s}: stall per checkpoint {r['stall_s']} s (median {r['median_stall_s']} s), "
              f"step {r['median_step_s']} s, final wait {r['final_wait_s']} s, checkpoint {r['checkpoint_gb']} GB")
    print(json.dumps({"preset": args.preset, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
