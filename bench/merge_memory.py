"""Peak host memory of `moecpt merge` (streamed) at the `bench-1b` scale (about 1.2B parameters).

Writes three Hugging Face directories of the preset with random weights (bf16, hub layout, 1 GB shards; a
"base", "plus" and "minus", as a chat vector has), tensor by tensor (`--dir`, default a temp dir). Then, each in
a fresh process, reports the peak RSS (`ru_maxrss`, which counts the memory-mapped file pages touched) of:
- the baseline: `load_model` of one input in float32 (the old merge held two such models plus the float64 sums
  of every tensor: at least four times this);
- the chat vector BASE + 1.0 * (PLUS - MINUS) written in bf16, as the Mixtral-8x7B use does.

    python bench/merge_memory.py [--preset bench-1b] [--dir DIR]

Prints one line per measurement and a final JSON line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GB = 1e9


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB


def write_model(d: Path, preset: str, seed: int) -> None:
    from moecpt.model import hf
    from moecpt.model.families import family_of, preset_config

    config = preset_config(preset)
    shapes = family_of(config).adapter_cls(config).hf_shapes("hub")
    gen = torch.Generator().manual_seed(seed)
    hf.save_streamed(shapes, lambda n: torch.randn(shapes[n], generator=gen) * 0.02, config, d, "1GB",
                     torch.bfloat16)


def child(what: str, d: Path) -> None:
    before = peak_rss()
    start = time.perf_counter()
    if what == "load_model":
        from moecpt.train.checkpoint import load_model

        load_model(d / "base", dtype=torch.float32)
    else:
        from moecpt.tools.merge import TaskVector, merge

        merge(d / "merged", task_vector=TaskVector(d / "base", d / "plus", d / "minus", 1.0), dtype=torch.bfloat16)
    print(json.dumps({"what": what, "rss_before_gb": round(before, 3), "peak_rss_gb": round(peak_rss(), 3),
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)


def measure(what: str, d: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", what, "--dir", str(d)], check=True,
                         capture_output=True, text=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    print(record, flush=True)
    return record


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench-1b")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.dir))
        return
    from moecpt.model.families import family_of, preset_config

    config = preset_config(args.preset)
    params = sum(torch.Size(s).numel() for s in family_of(config).adapter_cls(config).state_shapes().values())
    tmp = None if args.dir else tempfile.TemporaryDirectory()
    d = Path(args.dir or tmp.name)
    for name, seed in (("base", 1), ("plus", 2), ("minus", 3)):
        if not (d / name / "config.json").is_file():
            write_model(d / name, args.preset, seed)
    print(f"{args.preset}: {params / 1e9:.3f}B parameters: {params * 2 / GB:.2f} GB per input in bf16, "
          f"{params * 4 / GB:.2f} GB in fp32", flush=True)
    base, merged = measure("load_model", d), measure("merge", d)
    print(json.dumps({"preset": args.preset, "params": params, "fp32_model_gb": round(params * 4 / GB, 2),
                      "load_model_peak_gb": base["peak_rss_gb"], "merge_peak_gb": merged["peak_rss_gb"],
                      "merge_over_fp32_model": round(merged["peak_rss_gb"] / (params * 4 / GB), 3),
                      "merge_over_load_model": round(merged["peak_rss_gb"] / base["peak_rss_gb"], 3)}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
