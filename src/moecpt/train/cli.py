"""`moecpt train` and `moecpt export`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moecpt.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="continual pre-training of a Mixtral MoE",
        description="Train (or continue training) a Mixtral MoE. Settings come from --config, each "
                    "overridable as --section.key=value (e.g. --training.steps=100 --run_dir=runs/x).")
    p.add_argument("--config", help="TOML file (see configs/)")
    p.set_defaults(func=_train, accepts_overrides=True)

    e = subparsers.add_parser(
        "export", help="write a Hugging Face directory from a checkpoint",
        description="Write a Hugging Face Mixtral directory (weights, config, tokenizer) from a moecpt "
                    "checkpoint, or from the latest checkpoint of a run directory.")
    e.add_argument("checkpoint", help="checkpoint directory (RUN_DIR/checkpoints/step_...) or run directory")
    e.add_argument("out_dir")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written weights (default: as trained, float32)")
    e.add_argument("--max-shard-size", default="5GB")
    e.set_defaults(func=_export)


def _train(args: argparse.Namespace) -> int:
    from moecpt.config import load_config
    from moecpt.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    return 0 if result["reason"] in ("finished",) or result["reason"].startswith("signal") else 1


def _export(args: argparse.Namespace) -> int:
    import torch

    from moecpt.train.checkpoint import find_checkpoint, read_trainer_state
    from moecpt.train.export import export_checkpoint

    ckpt = find_checkpoint(Path(args.checkpoint))
    if ckpt is None:
        raise UserError(f"{args.checkpoint}: neither a complete checkpoint nor a run directory with checkpoints/")
    state = read_trainer_state(ckpt)
    tok = state.get("tokenizer")
    if tok and not Path(tok).exists():
        print(f"warning: the tokenizer the run used ({tok}) is gone; the export has no tokenizer files")
        tok = None
    # Tensor by tensor from the sharded checkpoint (any world size and EP layout): never the whole model.
    out = export_checkpoint(ckpt, Path(args.out_dir), tok, getattr(torch, args.dtype) if args.dtype else None,
                            args.max_shard_size)
    print(json.dumps({"checkpoint": str(ckpt), "step": state["step"], "exported": str(out)}))
    return 0
