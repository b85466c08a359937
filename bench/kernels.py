"""Each fused kernel against its PyTorch reference, forward + backward, on the same inputs in one process.

For every op: time of the reference and of the Triton kernel (median of repeated runs), their ratio, and the
error of each against the reference computed in fp32 (relative Frobenius norm, outputs and input
gradients): the fused kernel should be no less accurate than the plain computation in the same dtype.
Default shapes are those of one `bench-1b` step (16,384 tokens, hidden 1024, expert ffn 3584 on 32,768 routed
rows, 16 heads of 64, vocabulary 32,000) in bf16 on a GPU; on a CPU the kernels run in Triton's interpreter
(TRITON_INTERPRET=1) at tiny shapes, which only shows that they run and agree.

    python bench/kernels.py
    TRITON_INTERPRET=1 python bench/kernels.py        # CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from moecpt.kernels import support
from moecpt.kernels.cross_entropy import linear_cross_entropy
from moecpt.kernels.rmsnorm import rms_norm, rms_norm_reference
from moecpt.kernels.rope import apply_rope, rope_reference
from moecpt.kernels.swiglu import swiglu, swiglu_reference
from moecpt.model.rope import rope_tables


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--tokens", type=int, default=16384 if cuda else 64)
    p.add_argument("--hidden", type=int, default=1024 if cuda else 48)
    p.add_argument("--ffn", type=int, default=3584 if cuda else 40)
    p.add_argument("--heads", type=int, default=16 if cuda else 4)
    p.add_argument("--kv-heads", type=int, default=4 if cuda else 2)
    p.add_argument("--head-dim", type=int, default=64 if cuda else 8)
    p.add_argument("--vocab", type=int, default=32000 if cuda else 300)
    p.add_argument("--chunk", type=int, default=2048 if cuda else 24)
    p.add_argument("--reps", type=int, default=20 if cuda else 2)
    return p.parse_args()


def timed(fn: Callable[[], None], reps: int, device: str) -> float:
    """Median seconds of `fn` over `reps` runs after two warm-up runs."""
    cuda = device.startswith("cuda")
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def compare(name: str, make_inputs: Callable[[torch.dtype], list[torch.Tensor]], ref_fn, fused_fn,
            args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """Forward + backward of ref_fn and fused_fn on the same inputs; errors against ref_fn in fp32."""
    g = torch.Generator(device=args.device).manual_seed(0)
    inputs = make_inputs(dtype)
    upstream = None

    def run(fn, xs):
        nonlocal upstream
        xs = [x.detach().requires_grad_(x.is_floating_point()) for x in xs]
        out = fn(*xs)
        if upstream is None or upstream.shape != out.shape:
            upstream = torch.randn(out.shape, device=out.device, generator=g)
        out.backward(upstream.to(out.dtype))
        return out.detach(), [x.grad for x in xs if x.grad is not None]

    out32, grads32 = run(ref_fn, [x.float() if x.is_floating_point() else x for x in inputs])
    errs = {}
    for label, fn in (("reference", ref_fn), ("fused", fused_fn)):
        out, grads = run(fn, inputs)
        errs[label] = max([rel_err(out, out32)] + [rel_err(a, b) for a, b in zip(grads, grads32, strict=True)])
    t_ref = timed(lambda: run(ref_fn, inputs), args.reps, args.device)
    t_fused = timed(lambda: run(fused_fn, inputs), args.reps, args.device)
    row = {"op": name, "ref_ms": t_ref * 1e3, "fused_ms": t_fused * 1e3, "speedup": t_ref / t_fused,
           "err_reference": errs["reference"], "err_fused": errs["fused"]}
    print(f"{name:16s} reference {row['ref_ms']:8.3f} ms  fused {row['fused_ms']:8.3f} ms  "
          f"x{row['speedup']:5.2f}   rel. error vs fp32: reference {row['err_reference']:.2e}, "
          f"fused {row['err_fused']:.2e}", flush=True)
    return row


def main() -> int:
    args = parse_args()
    if not support.triton_usable(args.device):
        print(f"bench/kernels.py: cannot run Triton here: {support.why_not_triton(args.device)}", file=sys.stderr)
        return 2
    dev = args.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    N, H, F, V = args.tokens, args.hidden, args.ffn, args.vocab
    nh, nkv, D = args.heads, args.kv_heads, args.head_dim
    g = torch.Generator(device=dev).manual_seed(1)

    def randn(*shape, dt, scale=1.0):
        return torch.randn(*shape, device=dev, generator=g).mul_(scale).to(dt)

    B, T = max(1, N // 2048), min(N, 2048)
    cos, sin = rope_tables(torch.arange(T, device=dev).expand(B, T), D, 1e6)
    targets = torch.randint(0, V, (N,), device=dev, generator=g)
    rows = []
    rows.append(compare("rmsnorm", lambda dt: [randn(N, H, dt=torch.float32), 1 + randn(H, dt=torch.float32, scale=0.1)],
                        lambda x, w: rms_norm_reference(x, w, 1e-5), lambda x, w: rms_norm(x, w, 1e-5, fused=True),
                        args, dtype))
    rows.append(compare("rope (q)", lambda dt: [randn(B, T, nh, D, dt=dt)],
                        lambda x: rope_reference(x, cos, sin), lambda x: apply_rope(x, cos, sin, fused=True),
                        args, dtype))
    rows.append(compare("rope (k)", lambda dt: [randn(B, T, nkv, D, dt=dt)],
                        lambda x: rope_reference(x, cos, sin), lambda x: apply_rope(x, cos, sin, fused=True),
                        args, dtype))
    rows.append(compare("swiglu", lambda dt: [randn(2 * N, 2 * F, dt=dt)],
                        swiglu_reference, lambda h: swiglu(h, fused=True), args, dtype))
    rows.append(compare("lm head + loss", lambda dt: [randn(N, H, dt=dt), randn(V, H, dt=dt, scale=0.02)],
                        lambda h, w: linear_cross_entropy(h, w, targets, args.chunk, fused=False),
                        lambda h, w: linear_cross_entropy(h, w, targets, args.chunk, fused=True), args, dtype))
    # RMSNorm runs on the fp32 residual stream in training (autocast leaves the adds in fp32): timed in fp32.
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu (Triton interpreter)"
    print(json.dumps({"bench": "kernels", "device": name, "torch": torch.__version__,
                      "dtype": str(dtype).removeprefix("torch."), "tokens": N, "hidden": H, "ffn": F, "vocab": V,
                      "rows": [{k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()}
                               for r in rows]}))
    # 1e-5: room for fp32 rounding where the reference is exact against itself (fp32 inputs)
    worse = [r["op"] for r in rows if r["err_fused"] > 2 * r["err_reference"] + 1e-5]
    if worse:
        print(f"less accurate than the reference: {', '.join(worse)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
