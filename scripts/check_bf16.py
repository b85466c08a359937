"""Does bf16 training track fp32? Two training runs on the shared corpora through the trainer's own step
(`Trainer.train_step`), identical except `training.dtype` (float32, then bfloat16 autocast with fp32 master
weights), compared step by step. No checkpoints are written: only the losses matter here.

The same seed gives both runs the same initial weights and the same batches, so the loss curves differ only
by arithmetic. The check passes when, after warm-up, the bf16 loss averaged over a window of steps stays
within `--tolerance` (relative) of the fp32 one at every step, and the final window means agree as well.
Per-step losses are noisy in either precision (a different rounding picks a slightly different path), so
windows, not single steps, are compared.

    python scripts/check_bf16.py                       # CPU: `mini` shape, 200 steps of 8 x 128 tokens
    python scripts/check_bf16.py --preset bench-1b --layers 4 --batch 8 --seq-len 2048   # on a GPU

Prints a table every 20 steps and one JSON line; exits 1 if the tolerance is exceeded. With `--triton on`
the bf16 run also uses the Triton kernels (the fp32 one never does: it is the reference).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "corpus"
CORPORA = {
    "ja": ["ja/wikipedia_train.jsonl", "ja/aozora_neko.jsonl"],
    "en": ["en/wikitext2_test.jsonl", "en/tinyshakespeare.jsonl"],
    "code": ["code/thealgorithms_python.jsonl", "math/gsm8k_train.jsonl"],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--preset", default="mini")
    p.add_argument("--layers", type=int, default=0, help="num_hidden_layers override (0: the preset's)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="auto")
    p.add_argument("--triton", default="off", choices=("auto", "on", "off"), help="kernels.triton of the bf16 run")
    p.add_argument("--window", type=int, default=10, help="steps per moving average")
    p.add_argument("--skip", type=int, default=20, help="first steps not checked (the loss falls steeply)")
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="largest relative gap between the windowed losses (default 2%%)")
    p.add_argument("--data", default=str(SHARED), help="the shared corpus directory")
    p.add_argument("--tokenizer", default="", help="data.tokenizer ('' = the Mixtral tokenizer of mistral-common)")
    p.add_argument("--out", default="", help="keep the two runs here (default: a temporary directory)")
    return p.parse_args()


def config(args: argparse.Namespace, run_dir: Path, cache: Path, dtype: str) -> Any:
    from moecpt.config import config_from_dict

    data = Path(args.data)
    missing = [str(data / f) for files in CORPORA.values() for f in files if not (data / f).is_file()]
    if missing:
        sys.exit(f"check_bf16: corpus files not found: {', '.join(missing)} (pass --data DIR)")
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    return config_from_dict({
        "run_dir": str(run_dir), "resume": "never",
        "model": {"preset": args.preset, "overrides": overrides},
        "data": {"mixture": "0.644 ja 0.256 en 0.1 code", "seq_len": args.seq_len, "cache_dir": str(cache),
                 "tokenizer": args.tokenizer,
                 "valid_fraction": 0.0, "valid_max_documents": 0,
                 "corpora": {k: [str(data / f) for f in v] for k, v in CORPORA.items()}},
        "optimizer": {"lr": args.lr, "min_lr": args.lr / 10},
        "schedule": {"warmup_steps": max(1, args.steps // 20)},
        "training": {"steps": args.steps, "global_batch": args.batch, "micro_batch": args.batch,
                     "device": args.device, "dtype": dtype, "seed": 1234},
        "checkpoint": {"interval": 0, "export_at_end": False},
        "logging": {"interval": 1, "progress": False},
        "kernels": {"triton": args.triton if dtype == "bfloat16" else "off"},
    }, "scripts/check_bf16.py")


def run(cfg: Any) -> list[float]:
    """The loss of every step of one run; its resolved config and losses are kept in its run directory."""
    import math

    from moecpt.config import to_toml
    from moecpt.train.trainer import Trainer

    trainer = Trainer.from_config(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    losses = []
    for _ in range(cfg.training.steps):
        record = trainer.train_step()
        if record["skipped"] or not math.isfinite(record["loss"]):
            sys.exit(f"check_bf16: the {cfg.training.dtype} run had a non-finite step at {record['step']}")
        losses.append(record["loss"])
        if record["step"] % 20 == 0 or record["step"] == cfg.training.steps:
            print(f"{cfg.training.dtype}: step {record['step']}/{cfg.training.steps} loss {record['loss']:.4f}",
                  flush=True)
    (run_dir / "losses.json").write_text(json.dumps(losses))
    return losses


def windowed(xs: list[float], w: int) -> list[float]:
    """Trailing means: entry i averages steps max(0, i - w + 1) .. i."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - w] if i >= w else 0.0)
        out.append(acc / min(i + 1, w))
    return out


def compare(fp32: list[float], bf16: list[float], window: int, skip: int) -> dict[str, Any]:
    a, b = windowed(fp32, window), windowed(bf16, window)
    gaps = [abs(y - x) / x for x, y in zip(a, b, strict=True)][skip:]
    worst = max(range(len(gaps)), key=gaps.__getitem__) + skip if gaps else None
    return {"max_rel_gap": max(gaps, default=0.0), "at_step": None if worst is None else worst + 1,
            "final_fp32": a[-1], "final_bf16": b[-1], "final_rel_gap": abs(b[-1] - a[-1]) / a[-1],
            "max_step_abs_diff": max(abs(x - y) for x, y in zip(fp32, bf16, strict=True))}


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        traces = {dtype: run(config(args, root / dtype, root / "cache", dtype)) for dtype in ("float32", "bfloat16")}
    fp32, bf16 = traces["float32"], traces["bfloat16"]
    r = compare(fp32, bf16, args.window, args.skip)
    a, b = windowed(fp32, args.window), windowed(bf16, args.window)
    print(f"{'step':>6} {'fp32':>9} {'bf16':>9} {'gap':>7}   ({args.window}-step means)")
    for i in range(args.window - 1, len(a), 20):
        print(f"{i + 1:6d} {a[i]:9.4f} {b[i]:9.4f} {abs(b[i] - a[i]) / a[i]:7.2%}")
    ok = r["max_rel_gap"] <= args.tolerance
    print(f"largest gap after step {args.skip}: {r['max_rel_gap']:.2%} at step {r['at_step']} "
          f"(tolerance {args.tolerance:.1%}): {'PASS' if ok else 'FAIL'}")
    print(json.dumps({"check": "bf16_vs_fp32", "steps": args.steps, "preset": args.preset, "layers": args.layers,
                      "batch": args.batch, "seq_len": args.seq_len, "triton": args.triton,
                      "window": args.window, "skip": args.skip, "tolerance": args.tolerance, "pass": ok,
                      **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
