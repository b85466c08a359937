"""Where a training step's time goes: each piece of moecpt's model timed alone (forward + backward), next to
the whole `Trainer.train_step` measured in the same process.

The model, kernels and autocast are the ones `bench/train_step.py` builds through the trainer (same flags);
pieces run eagerly on random activations of the step's shape:

- attention: input RMSNorm + q/k/v projections + RoPE + SDPA + output projection, per layer
- moe block: post-attention RMSNorm + router + permutation + experts + unpermutation, per layer
- experts: the two grouped GEMMs and SwiGLU alone on the block's routed rows, per layer
  (router + permutation = moe block - experts - RMSNorm, reported as its own line)
- lm head + loss: final RMSNorm + chunked LM head and cross-entropy
- optimizer: gradient clipping + AdamW over all parameters

Shares are of the measured step; "rest" is what the pieces do not cover (embedding, residual adds, the
loss bookkeeping, launch gaps). `--profile DIR` also writes a PyTorch profiler trace of two steps there and
prints the most expensive kernels. Ends with one JSON line.

    python bench/step_breakdown.py                    # GPU: bench-1b, 8 x 2048 tokens, bf16 autocast
    python bench/step_breakdown.py --triton off --profile /tmp/prof
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from moecpt.kernels.attention import sdpa_backend
from moecpt.kernels.cross_entropy import linear_cross_entropy
from moecpt.model.rope import rope_tables
from moecpt.parallel import parallelize as par
from moecpt.train.trainer import Trainer
from train_step import build_parser, moecpt_config, sig, sync, time_steps


def piece_timers(trainer: Trainer, batch: int, seq: int) -> dict[str, Any]:
    """name -> (callable running one forward + backward, how many times a step runs it)."""
    model, dev = trainer.model, trainer.rt.device
    c = trainer.model_config
    H, L, K = c.hidden_size, c.num_hidden_layers, c.num_experts_per_tok
    layer = model.layers[0]
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, seq, H, device=dev, generator=g).requires_grad_()
    dy = torch.randn(batch, seq, H, device=dev, generator=g)
    cos, sin = rope_tables(torch.arange(seq, device=dev).expand(batch, seq), c.attn_head_dim, c.rope_theta)
    targets = torch.randint(0, c.vocab_size, (batch * seq,), device=dev, generator=g)
    amp = dict(device_type=dev.type, dtype=trainer.rt.amp_dtype or torch.float32, enabled=trainer.rt.amp_dtype is not None)

    # The experts' own inputs: the block's routed rows, sorted by expert, with its offsets.
    with torch.no_grad(), torch.autocast(**amp):
        x_TH = layer.post_attention_layernorm(x).reshape(-1, H)
        _, _, _, experts_TK = layer.moe.gate(x_TH)
        flat = experts_TK.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=c.num_local_experts)
        offs = counts.cumsum(0).to(torch.int32)
        rows = x_TH[order // K].clone()
    rows.requires_grad_()
    dy_rows = torch.randn(rows.shape, device=dev, dtype=rows.dtype, generator=g)

    def attention() -> None:
        with torch.autocast(**amp):
            out = layer.self_attn(layer.input_layernorm(x), cos, sin, None)
        out.backward(dy.to(out.dtype))

    def moe_block() -> None:
        with torch.autocast(**amp):
            out, _ = layer.moe(layer.post_attention_layernorm(x))
        out.backward(dy.to(out.dtype))

    def experts() -> None:
        with torch.autocast(**amp):
            out = layer.moe.experts(rows, offs)
        out.backward(dy_rows.to(out.dtype))

    def norm() -> None:
        with torch.autocast(**amp):
            out = layer.post_attention_layernorm(x)
        out.backward(dy.to(out.dtype))

    def lm_head_loss() -> None:
        with torch.autocast(**amp):
            h = model.norm(x).reshape(-1, H)
            loss = linear_cross_entropy(h, model.lm_head.weight, targets, model.loss_fn.chunk_tokens,
                                        fused=model.loss_fn.fused)
        loss.sum().backward()

    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)

    def optimizer() -> None:
        par.clip_grad_norm_(model.parameters(), trainer.cfg.optimizer.grad_clip or float("inf"))
        trainer.optimizer.step()

    return {"attention": (attention, L), "moe block": (moe_block, L), "experts": (experts, L),
            "rmsnorm": (norm, L), "lm head + loss": (lm_head_loss, 1), "optimizer": (optimizer, 1)}


def main() -> None:
    p = build_parser(__doc__.split("\n")[0])
    p.add_argument("--profile", default="", metavar="DIR", help="also write a profiler trace of two steps to DIR")
    args = p.parse_args()
    tokens = args.micro_batch * args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer.from_config(moecpt_config(args, Path(tmp)))
        with sdpa_backend(args.sdpa, args.device):
            step = time_steps(lambda: trainer.train_step()["loss"], args.warmup, args.steps, args.device)
            pieces = {}
            for name, (fn, per_step) in piece_timers(trainer, args.micro_batch, args.seq_len).items():
                r = time_steps(lambda fn=fn: fn() or 0.0, args.warmup, args.steps, args.device)
                pieces[name] = (r["step_s"], per_step)
            if args.profile:
                profile(trainer, Path(args.profile), args.device)
    step_s = step["step_s"]
    ms = {name: s * n * 1e3 for name, (s, n) in pieces.items()}
    ms["router + permutation"] = ms["moe block"] - ms["experts"] - ms["rmsnorm"]
    shown = ["attention", "experts", "router + permutation", "rmsnorm", "lm head + loss", "optimizer"]
    # "rmsnorm" stands for the post-attention norm of each layer; the input norm is inside "attention".
    ms["rest"] = step_s * 1e3 - sum(ms[k] for k in shown)
    print(f"{trainer.model_config.num_hidden_layers} layers, {tokens} tokens a step, "
          f"{'Triton' if trainer.rt.fused_kernels else 'PyTorch'} kernels, step {step_s * 1e3:.1f} ms", flush=True)
    for k in [*shown, "rest"]:
        print(f"  {k:22s} {ms[k]:9.2f} ms  {ms[k] / (step_s * 1e3):6.1%}", flush=True)
    result = {"bench": "step_breakdown", "shape": args.shape, "tokens_per_step": tokens,
              "triton_kernels": trainer.rt.fused_kernels, "sdpa": args.sdpa, "step_ms": sig(step_s * 1e3),
              "pieces_ms": {k: sig(ms[k]) for k in [*shown, "rest"]},
              "shares": {k: sig(ms[k] / (step_s * 1e3), 3) for k in [*shown, "rest"]}}
    print(json.dumps(result))


def profile(trainer: Trainer, out: Path, device: str) -> None:
    """A profiler trace of two steps in `out` (open in Perfetto / chrome://tracing) and the top kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=acts, record_shapes=False) as prof:
        for _ in range(2):
            trainer.train_step()
        sync(device)
    prof.export_chrome_trace(str(out / "train_step_trace.json"))
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    (out / "top_ops.txt").write_text(table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
