"""Forward + backward throughput of one MoE block: moecpt against transformers' block of the same family
(`--family mixtral`: MixtralSparseMoeBlock; `--family qwen3_moe`: Qwen3MoeSparseMoeBlock, fine-grained experts).

All implementations get the same weights and the same inputs in one process; the script checks that their
outputs agree, then times warm steps and prints tokens/s and the ratio of moecpt to each transformers
experts implementation (`eager`: a Python loop over experts; `grouped_mm`: transformers 5's grouped GEMM).

    python bench/moe_layer.py                     # Mixtral; CPU: a small shape in fp32; CUDA: bench-1b in bf16
    python bench/moe_layer.py --family qwen3_moe  # 64 experts, top-8 on a CPU; CUDA: the Qwen3-30B-A3B block
    python bench/moe_layer.py --tokens 8192 --hidden 1024 --ffn 3584

Ends with one JSON line holding every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from moecpt.model.moe import SparseMoeBlock

# Default shapes per family and device: tokens, hidden, expert ffn, experts, top-k, renormalised top-k.
SHAPES = {
    ("mixtral", "cpu"): (2048, 256, 512, 8, 2, True),
    ("mixtral", "cuda"): (16384, 1024, 3584, 8, 2, True),  # bench-1b
    ("qwen3_moe", "cpu"): (2048, 256, 128, 64, 8, True),
    ("qwen3_moe", "cuda"): (16384, 2048, 768, 128, 8, True),  # Qwen3-30B-A3B
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="mixtral", choices=["mixtral", "qwen3_moe"])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokens", type=int, help="default: the family's shape (SHAPES)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--ffn", type=int, help="per expert (Qwen3-MoE: moe_intermediate_size)")
    p.add_argument("--experts", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--no-norm-topk", dest="norm_topk", action="store_false", default=None,
                   help="keep the top-k router probabilities as they are (Qwen3-MoE: norm_topk_prob false)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20 if cuda else 9, help="timed rounds")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    shape = SHAPES[(args.family, "cuda" if args.device.startswith("cuda") else "cpu")]
    for name, value in zip(("tokens", "hidden", "ffn", "experts", "top_k", "norm_topk"), shape, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.family == "mixtral" and not args.norm_topk:
        p.error("Mixtral always renormalises its top-k probabilities")
    return args


def hf_block(args, impl: str):
    """transformers' MoE block of the family, with the experts implementation `impl`."""
    if args.family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.ffn, num_experts=args.experts,
                             num_experts_per_tok=args.top_k, norm_topk_prob=args.norm_topk)
        cfg._experts_implementation = impl
        return Qwen3MoeSparseMoeBlock(cfg)
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_local_experts=args.experts,
                        num_experts_per_tok=args.top_k)
    cfg._experts_implementation = impl
    return MixtralSparseMoeBlock(cfg)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_cases(cases: dict, x, grad, args) -> dict[str, float]:
    """Median seconds per forward + backward of each case. The cases take turns, one step each per round,
    so that a slow spell of the machine falls on all of them alike."""
    for fn in cases.values():
        for _ in range(args.warmup):
            fn(x).backward(grad)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.steps):
        for name, fn in cases.items():
            sync(args.device)
            t0 = time.perf_counter()
            fn(x).backward(grad)
            sync(args.device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    ours = SparseMoeBlock(args.hidden, args.ffn, args.experts, args.top_k, router={"norm_topk": args.norm_topk})
    with torch.no_grad():
        ours.gate.weight.normal_(0, 0.02)
        ours.experts.gate_up_proj.normal_(0, 0.02)
        ours.experts.down_proj.normal_(0, 0.02)
    ours = ours.to(args.device, dtype)
    x = torch.randn(1, args.tokens, args.hidden, device=args.device, dtype=dtype).requires_grad_()
    grad = torch.randn_like(x)

    cases = {"moecpt": lambda inp: ours(inp)[0]}
    try:
        for impl in ("eager", "grouped_mm"):
            block = hf_block(args, impl)
            block.gate.weight.data.copy_(ours.gate.weight.float())
            block.experts.gate_up_proj.data.copy_(ours.experts.gate_up_proj.float())
            block.experts.down_proj.data.copy_(ours.experts.down_proj.float())
            block = block.to(args.device, dtype)
            cases[f"transformers_{impl}"] = block
    except ImportError:
        print("transformers is not installed: timing moecpt alone")

    # Same weights, same inputs: the outputs must agree before any timing means anything.
    with torch.no_grad():
        ref = cases["moecpt"](x).float()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        for name, fn in cases.items():
            diff = (fn(x).float() - ref).abs().max().item()
            assert diff <= tol * max(1.0, ref.abs().max().item()), f"{name} disagrees with moecpt by {diff}"

    result = {
        "bench": "moe_layer", "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "family": args.family, "dtype": args.dtype, "tokens": args.tokens,
        "hidden": args.hidden, "ffn": args.ffn, "experts": args.experts, "top_k": args.top_k,
        "norm_topk": args.norm_topk,
    }
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        pass
    for name, dt in time_cases(cases, x, grad, args).items():
        result[f"{name}_tokens_per_s"] = round(args.tokens / dt)
        print(f"{name:28s} {dt * 1e3:9.2f} ms/step {args.tokens / dt:12,.0f} tokens/s")
    for name in cases:
        if name != "moecpt":
            ratio = result["moecpt_tokens_per_s"] / result[f"{name}_tokens_per_s"]
            result[f"ratio_vs_{name}"] = round(ratio, 2)
            print(f"moecpt / {name}: {ratio:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
