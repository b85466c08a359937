"""`moecpt data ...`: tokenize corpora into shards, report what a mixture serves, inspect a shard."""

from __future__ import annotations

import argparse
import json
import logging


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command and its sub-commands."""
    parser = subparsers.add_parser("data", help="tokenize corpora into shards, inspect mixtures")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    _add_tokenize(sub)
    _add_mix_report(sub)
    _add_inspect(sub)


def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="JSON Lines (or .txt) files -> Megatron token shard PREFIX.bin/.idx",
        description="Tokenize documents into a Megatron indexed dataset (MMIDIDX v1): one sequence per document, "
        "its text without BOS followed by EOS. Inputs: files, globs or directories of .jsonl/.json/.txt, "
        "optionally .gz or .zst.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument(
        "--output", "-o", required=True, metavar="PREFIX", help="writes PREFIX.bin, .idx, .meta.json"
    )
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="SentencePiece .model, tokenizer.json or a directory "
        "(default: the Mixtral-8x7B tokenizer from mistral-common)",
    )
    p.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--encoding", default="utf-8", help="input text encoding, e.g. cp932 for Shift_JIS")
    p.add_argument("--append-bos", action="store_true", help="start each document with BOS")
    p.add_argument("--no-eos", action="store_true", help="do not end each document with EOS")
    p.add_argument("--skip-invalid-json", action="store_true", help="skip and count invalid JSON lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_tokenize)


def _add_mix_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mix-report",
        help="per-corpus shares, epochs and repeats of a mixture over N samples",
        description="Build the sample order of a mixture, read the first N samples and report the realised "
        "token share of each corpus next to its weight, and how many passes over each corpus they make.",
    )
    p.add_argument(
        "--mixture",
        required=True,
        help="'0.644 ja 0.256 en 0.1 code' (weight prefix pairs; a group of shards as name=prefix1,prefix2)",
    )
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument(
        "--samples", type=int, default=1000, help="number of global samples to read (default: 1000)"
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--valid-fraction", type=float, default=0.01, help="documents held out per corpus")
    p.add_argument(
        "--no-repeat", action="store_true", help="fail instead of starting a second epoch of a corpus"
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="let mixture sources be JSON Lines files, globs or directories: tokenize them into DIR on first use",
    )
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer for --cache-dir (default: Mixtral-8x7B)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_mix_report)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="header, counts and sidecar of a shard; decode its first documents")
    p.add_argument("prefix", metavar="PREFIX")
    p.add_argument(
        "--show", type=int, default=1, metavar="N", help="decode the first N documents (default: 1)"
    )
    p.add_argument(
        "--tokenizer", metavar="PATH", help="tokenizer for decoding (default: the one in the sidecar)"
    )
    p.set_defaults(func=_inspect)


def _tokenize(args: argparse.Namespace) -> int:
    from moecpt.data.preprocess import tokenize_corpus

    report = tokenize_corpus(
        args.inputs,
        args.output,
        tokenizer=args.tokenizer,
        text_key=args.text_key,
        workers=args.workers,
        encoding=args.encoding,
        append_bos=args.append_bos,
        append_eos=not args.no_eos,
        skip_invalid_json=args.skip_invalid_json,
        progress=False if args.no_progress else None,
    )
    print(report.summary())
    return 0


def _mix_report(args: argparse.Namespace) -> int:
    import numpy as np

    from moecpt.data.mixture import MixtureDataset, resolve_mixture

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    mixture = resolve_mixture(args.mixture, args.cache_dir, tokenizer=args.tokenizer)
    ds = MixtureDataset(
        mixture,
        args.seq_len,
        seed=args.seed,
        allow_repeat=not args.no_repeat,
        valid_fraction=args.valid_fraction,
    )
    tokens = np.zeros(len(ds.corpora), dtype=np.int64)
    for i in range(args.samples):
        sample = ds[i]
        tokens[sample["corpus"]] += sample["tokens"].size - 1  # targets per sample
    rows = ds.report(args.samples)
    for row, t in zip(rows, tokens, strict=True):
        row["realised_share"] = float(t / max(1, tokens.sum()))
    if args.json:
        print(json.dumps({"seq_len": args.seq_len, "samples": args.samples, "corpora": rows}, indent=2))
        return 0
    print(
        f"{args.samples:,} samples of seq_len {args.seq_len} (seed {args.seed}); one sample = {args.seq_len} targets"
    )
    print(
        f"{'corpus':<16}{'weight':>8}{'realised':>10}{'samples':>9}{'train docs':>12}{'valid docs':>12}"
        f"{'train tokens':>14}{'epoch size':>12}{'epochs':>8}"
    )
    for r in rows:
        print(
            f"{r['name']:<16}{r['weight']:>8.2%}{r['realised_share']:>10.2%}{r['samples']:>9,}"
            f"{r['train_documents']:>12,}{r['valid_documents']:>12,}{r['train_tokens']:>14,}"
            f"{r['samples_per_epoch']:>12,}{r['epochs']:>8.2f}"
        )
    repeated = [r["name"] for r in rows if r["epochs"] > 1]
    if repeated:
        print(f"repeats: {', '.join(repeated)} started a new (reshuffled) epoch within these samples")
    print(f"samples before any corpus repeats: {len(ds):,}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from moecpt.data.indexed import IndexedShard
    from moecpt.data.tokenizer import load_tokenizer

    shard = IndexedShard(args.prefix)
    print(
        f"{args.prefix}: {shard.num_documents:,} documents, {shard.num_tokens:,} tokens, dtype {shard.dtype.name}, "
        f"{shard.sequence_lengths.size:,} sequences"
    )
    if shard.meta:
        print(
            json.dumps({k: v for k, v in shard.meta.items() if k != "sources"}, indent=2, ensure_ascii=False)
        )
        print(f"sources: {len(shard.meta.get('sources', []))} files")
    if args.show > 0:
        path = args.tokenizer or shard.meta.get("tokenizer", {}).get("path")
        tok = load_tokenizer(path)
        for i in range(min(args.show, shard.num_documents)):
            ids = shard.document(i).tolist()
            print(f"--- document {i}: {len(ids)} tokens")
            print(tok.decode(ids))
    return 0
