"""Data pipeline throughput on the shared corpora.

1. Tokenization: `tokenize_corpus` (read JSON Lines, encode, write the shard and its sidecar) with 1 and 2
   workers, next to the raw SentencePiece batch encode of the same texts with 1 and 2 threads. The ratio is the
   pipeline's overhead (goal: under 20%).
2. Loading: tokens per second served by `MixtureLoader` (mixing + packing, seq_len 2048) in one process
   (goal: at least 10^6).

Usage: python bench/data.py [--data ../shared/data] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from moecpt.data.loader import MixtureLoader
from moecpt.data.mixture import MixtureDataset
from moecpt.data.preprocess import expand_inputs, tokenize_corpus
from moecpt.data.tokenizer import load_tokenizer

GROUPS = {"ja": ["corpus/ja"], "en": ["corpus/en"], "code": ["corpus/code", "corpus/math"]}
WEIGHTS = {"ja": 0.644, "en": 0.256, "code": 0.1}


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=200, help="loader micro-batches of 8 x 2049 tokens")
    args = ap.parse_args()
    # The loader below cycles the small shared corpora many times; one warning per new epoch would drown the output.
    logging.getLogger("moecpt.data.mixture").setLevel(logging.ERROR)
    data = Path(args.data)
    files = expand_inputs([data / p for ps in GROUPS.values() for p in ps])
    texts = [json.loads(line)["text"] for f in files for line in f.open(encoding="utf-8") if line.strip()]
    nbytes = sum(f.stat().st_size for f in files)
    tok = load_tokenizer()
    sp = tok._sp  # the raw SentencePiece processor: the baseline
    n_tokens = sum(len(ids) for ids in sp.encode(texts, num_threads=1)) + len(texts)  # + one EOS per document

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"text: {len(files)} files, {len(texts):,} documents, {nbytes / 1e6:.1f} MB, {n_tokens:,} tokens")
    print(f"{'tokenization':<44}{'tokens/s':>12}{'MB/s':>8}{'time/raw':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            raw = best_of(args.repeats, lambda n=n: sp.encode(texts, num_threads=n))
            raw_np = best_of(args.repeats, lambda n=n: sp.encode_as_numpy(texts, num_threads=n))
            pipe = best_of(
                args.repeats, lambda n=n: tokenize_corpus(files, f"{tmp}/all", workers=n, progress=False)
            )
            rows = (
                (f"raw SentencePiece encode, {n} thread(s)", raw),
                (f"raw SentencePiece encode_as_numpy, {n} thr.", raw_np),
                (f"moecpt data tokenize, {n} worker(s)", pipe),
            )
            for label, t in rows:
                print(f"{label:<44}{n_tokens / t:>12,.0f}{nbytes / 1e6 / t:>8.1f}{t / raw:>10.2f}")
            print(f"  pipeline overhead over encode_as_numpy: {pipe / raw_np - 1:+.1%}")

        prefixes = {}
        for name, parts in GROUPS.items():
            prefixes[name] = f"{tmp}/{name}"
            tokenize_corpus([data / p for p in parts], prefixes[name], progress=False)
        mixture = " ".join(f"{w} {name}={prefixes[name]}" for name, w in WEIGHTS.items())
        ds = MixtureDataset(mixture, seq_len=2048, seed=0)
        loader = MixtureLoader(ds, micro_batch=8)

        def serve():
            for _ in range(args.batches):
                loader.next_batch()

        serve()  # build the epoch tables once
        t = best_of(args.repeats, serve)
        served = args.batches * 8 * 2049
        print(f"loader (mix + pack, seq 2048, micro-batch 8): {served / t:,.0f} tokens/s per process")
        resume = MixtureLoader(MixtureDataset(mixture, seq_len=2048, seed=0), micro_batch=8)
        state = {**loader.state_dict(), "samples_consumed": 10**9}
        t0 = time.perf_counter()
        resume.load_state_dict(state)
        resume.next_batch()
        print(f"resume at sample 10^9 and serve one batch: {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
