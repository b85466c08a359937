"""Peak host memory of streamed, sharded loading and export at the `bench-1b` scale (about 1.2B parameters).

1. Writes a Hugging Face directory of the preset with random weights (bf16, hub layout, 1 GB shards), once,
   tensor by tensor (`--dir`, default a temp dir).
2. `init_from` it (`load_model_weights`) in one process, and on N gloo ranks (FSDP + EP) launched with
   torchrun: each process reports its peak RSS (`ru_maxrss`, which counts the memory-mapped file pages it
   touched). The one-process `from_pretrained` (the whole model read at once) is measured too.
3. Saves the loaded N-rank model as a DCP checkpoint (N ranks, EP) and the one-process model as another, then
   `moecpt export`s both in separate processes: their peak RSS against the model's fp32 size, and whether
   the two exports are the same bytes.

    python bench/streamed_load.py --ranks 4 --ep 2

Prints one line per measurement and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]
GB = 1e9


def peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB


def write_source(d: Path, preset: str) -> None:
    from moecpt.model import hf
    from moecpt.model.families import family_of, preset_config

    config = preset_config(preset)
    shapes = family_of(config).adapter_cls(config).hf_shapes("hub")
    gen = torch.Generator().manual_seed(0)
    hf.save_streamed(shapes, lambda n: torch.randn(shapes[n], generator=gen) * 0.02, config, d, "1GB",
                     torch.bfloat16)


def child(args: argparse.Namespace) -> None:
    """One process (or one rank under torchrun): load, report, optionally save a checkpoint."""
    import torch.distributed as dist

    from moecpt.config import ParallelSection
    from moecpt.model import build_model, from_pretrained, load_config
    from moecpt.parallel.parallelize import parallelize
    from moecpt.train import checkpoint as ckpt_lib

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    before = peak_rss()
    if args.child == "from_pretrained":
        from_pretrained(args.dir)
        model = None
    else:
        config = load_config(args.dir)
        model = build_model(config)
        if world > 1:
            parallelize(model, ParallelSection(expert_parallel=args.ep), torch.device("cpu"), world, None)
        model.to_empty(device="cpu")
        model.init_buffers()
        ckpt_lib.load_model_weights(args.dir, model)
    record = {"what": args.child, "rank": dist.get_rank() if world > 1 else 0, "world": world,
              "rss_before_gb": round(before, 3), "peak_rss_gb": round(peak_rss(), 3)}
    print(json.dumps(record), flush=True)
    if args.save and model is not None:  # the weights as a model-only checkpoint (no optimizer state)
        save_weights(Path(args.save) / "checkpoints" / "step_00000001", model)
    if world > 1:
        dist.destroy_process_group()


def save_weights(d: Path, model) -> None:
    """A checkpoint of the weights alone, as every rank holds them (DCP, keyed by name, global shapes)."""
    import dataclasses

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from moecpt.model.families import family_of
    from moecpt.parallel.dist import barrier, rank
    from moecpt.train import checkpoint as ckpt_lib

    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(d))
    barrier()
    if rank() == 0:
        state = {"step": 1, "model_type": family_of(model.config).model_type,
                 "model_config": dataclasses.asdict(model.config)}
        (d / ckpt_lib.STATE_FILE).write_text(json.dumps(state))
        (d / ckpt_lib.COMPLETE).write_text("step 1\n")


def run(cmd: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE / "src")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        err = [ln for ln in out.stderr.splitlines() if "Error" in ln or "error:" in ln]
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stdout[-3000:]}" + "\n".join(err[-40:]))
    return [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]


def export_peak(ckpt: Path, out: Path) -> float:
    code = ("import resource, sys; from moecpt.cli import main; rc = main(['export', sys.argv[1], sys.argv[2], "
            "'--max-shard-size=1GB']); print('{\"peak_rss_gb\": %.3f}' % "
            "(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)); sys.exit(rc)")
    return run([sys.executable, "-c", code, str(ckpt), str(out)])[-1]["peak_rss_gb"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench-1b")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--dir", type=Path, default=None, help="work directory (default: a new temp dir)")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    work = args.dir or Path(tempfile.mkdtemp(prefix="moecpt-streamed-load-"))
    src = work / "hf"
    if not (src / "config.json").is_file():
        write_source(src, args.preset)
    from moecpt.model import param_shapes
    from moecpt.model.families import preset_config

    n_params = sum(torch.Size(s).numel() for s in param_shapes(preset_config(args.preset)).values())
    me = [sys.executable, str(Path(__file__).resolve())]
    results = {"params": n_params, "fp32_gb": round(n_params * 4 / GB, 3)}
    save = [] if args.no_export else ["--save", str(work / "ckpt1")]
    results["one_process"] = run([*me, "--child", "streamed", "--dir", str(src), *save])[0]
    results["from_pretrained"] = run([*me, "--child", "from_pretrained", "--dir", str(src)])[0]
    save = [] if args.no_export else ["--save", str(work / f"ckpt{args.ranks}")]
    ranks = run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
                 me[1], "--child", "streamed", "--dir", str(src), "--ep", str(args.ep), *save])
    results["ranks"] = sorted(ranks, key=lambda r: r["rank"])
    for r in [results["one_process"], results["from_pretrained"], *results["ranks"]]:
        print(f"{r['what']:>15s} world {r['world']} rank {r['rank']}: peak RSS {r['peak_rss_gb']:.2f} GB "
              f"(after imports {r['rss_before_gb']:.2f} GB)")
    worst = max(r["peak_rss_gb"] for r in results["ranks"])
    results["worst_rank_over_one_process"] = round(worst / results["one_process"]["peak_rss_gb"], 3)
    print(f"worst rank / one process: {results['worst_rank_over_one_process']:.1%}")
    if not args.no_export:
        step = "checkpoints/step_00000001"
        results["export_peak_rss_gb"] = {n: export_peak(work / f"ckpt{n}" / step, work / f"export{n}")
                                         for n in (1, args.ranks)}
        files = sorted(p.name for p in (work / "export1").glob("*.safetensors"))
        results["exports_equal"] = files == sorted(p.name for p in (work / f"export{args.ranks}").glob(
            "*.safetensors")) and all((work / "export1" / f).read_bytes() == (work / f"export{args.ranks}" / f)
                                      .read_bytes() for f in files)
        print(f"export peak RSS {results['export_peak_rss_gb']} GB (model fp32 {results['fp32_gb']} GB); "
              f"1-rank and {args.ranks}-rank exports byte-equal: {results['exports_equal']}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
