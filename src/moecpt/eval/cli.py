"""`moecpt eval`: run the benchmark suite on a model directory and write results.json and results.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` command."""
    from moecpt.eval.tasks import ALL_TASKS, DEFAULT_PROTOCOL, PROTOCOLS

    p = subparsers.add_parser(
        "eval", help="evaluate a model on the Swallow-MX benchmark suite and held-out loss",
        description="Evaluate a model directory on the Japanese suite of the Swallow-MX report (llm-jp-eval v1.0 "
                    "+ JP LM Evaluation Harness tasks), GSM8K, and held-out bits per byte. Predictions are "
                    "written as they are made; rerunning the same command continues an interrupted run.")
    p.add_argument("--model", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--suite", choices=("ja", "en", "all"), default="ja", help="task suite (default: ja)")
    p.add_argument("--tasks", help=f"comma-separated tasks instead of a suite: {','.join(ALL_TASKS)}")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="evaluation data directory in the official formats (default: ../shared/data/eval)")
    p.add_argument("--output", type=Path, required=True, help="output directory (results, predictions)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: 8)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file or directory (default: the model directory's, else Mixtral's)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default=DEFAULT_PROTOCOL,
                   help=f"evaluation protocol preset (default: {DEFAULT_PROTOCOL})")
    p.add_argument("--max-length", type=int, default=None,
                   help="context length in tokens, prompt + generation (default: min(4096, the model's))")
    p.add_argument("--heldout", default="auto",
                   help="held-out corpora for bits per byte: auto (Japanese Wikipedia dev / WikiText-2 valid for "
                        "the evaluated languages), none, or NAME=FILE.jsonl[,...]")
    p.add_argument("--compare", type=Path, default=None,
                   help="results.json of another model (e.g. the base model) to show beside this one")
    p.add_argument("--name", default=None, help="model name in the table (default: the directory name)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: bfloat16 on GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moecpt.eval.runner import evaluate_model

    results = evaluate_model(
        args.model, args.output, data_dir=args.data_dir, suite=args.suite, tasks=args.tasks, limit=args.limit,
        batch_size=args.batch_size, max_length=args.max_length, heldout=args.heldout, compare=args.compare,
        name=args.name, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, protocol=args.protocol,
        progress=not args.no_progress)
    print((args.output / "results.md").read_text(encoding="utf-8"), end="")
    print(f"wrote {args.output / 'results.json'} and {args.output / 'results.md'}", file=sys.stderr)
    return 1 if results["skipped"] else 0
