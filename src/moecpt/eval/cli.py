"""`moecpt eval`: run the benchmark suite on a model directory and write results.json and results.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moecpt.errors import UserError


def default_data_dir() -> Path | None:
    """`../shared/data/eval` beside the working directory or the source checkout, when it exists."""
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *here.parents):
        candidate = base.parent / "shared" / "data" / "eval"
        if candidate.is_dir():
            return candidate
    return None


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
    from moecpt.eval import heldout, report, runner
    from moecpt.eval import tasks as T
    from moecpt.eval.lm import ModelLM, load_eval_tokenizer, load_model, model_identity

    data_dir = args.data_dir or default_data_dir()
    if data_dir is None:
        raise UserError("no evaluation data directory: pass --data-dir DIR (the layout of ../shared/data/eval)")
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: not a directory")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit {args.limit}: must be a positive number of items")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size {args.batch_size}: must be positive")
    selected = T.select_tasks(args.suite, args.tasks)
    compare = report.read_results(args.compare) if args.compare else None
    langs = {t.lang for t in selected}
    corpora = heldout.resolve_heldout(args.heldout, langs, data_dir.parent)

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = load_eval_tokenizer(args.model, args.tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                        f"has {model.config.vocab_size}; pass the model's tokenizer with --tokenizer")
    lm = ModelLM(model, tokenizer, max_length=args.max_length, batch_size=args.batch_size)
    name = args.name or Path(args.model).resolve().name
    identity = {"model": model_identity(args.model), "tokenizer": tokenizer.fingerprint}
    extra = {"name": name, "model": str(Path(args.model).resolve()), "data_dir": str(data_dir.resolve())}

    def write(out_dir: Path, results: dict) -> None:
        report.write(out_dir, results, compare)

    results = runner.evaluate(lm, selected, data_dir, args.output, identity, protocol=args.protocol,
                              limit=args.limit, progress=not args.no_progress, extra=extra, write=write)
    if corpora:
        results["heldout"] = {}
        for corpus, path in corpora.items():
            texts = heldout.read_texts(path, limit=args.limit)
            results["heldout"][corpus] = {**heldout.bits_per_byte(model, tokenizer, texts, lm.max_length,
                                                                   args.batch_size), "file": str(path)}
    results.setdefault("average", None)
    report.write(args.output, results, compare)
    print(report.markdown(results, compare), end="")
    print(f"wrote {args.output / 'results.json'} and {args.output / 'results.md'}", file=sys.stderr)
    return 1 if results["skipped"] else 0
