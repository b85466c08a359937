"""Training-step throughput of moecpt on one device, through the trainer a user's run uses.

A `TrainConfig` is built for the chosen shape (the model preset, micro-batch = global batch, no accumulation)
over a shard of random tokens, `Trainer` builds the model, optimizer and loader as `moecpt train` does, and
`Trainer.train_step` (load, forward with the chunked LM-head loss, backward, clip, AdamW) is timed over warm
steps. Reported: tokens/s, model TFLOP/s (`model_flops_per_token`), their share of a matmul peak measured in
this process (bf16 on a GPU; fp32 on a CPU), and peak memory. `--compare-hf` times transformers' Mixtral at the
same shape in the same process (the rows of ../shared/reference/hf_mixtral_baseline.py: bf16 weights, AdamW,
SDPA) and prints ratios.

    python bench/train_step.py                          # CUDA: bench-1b, 8 x 2048 tokens, bf16 autocast
    python bench/train_step.py --compare-hf --compile   # + transformers eager, grouped_mm, grouped_mm+compile
    python bench/train_step.py --triton off             # PyTorch's own ops instead of the Triton kernels
    python bench/train_step.py --shape tiny             # CPU default: tiny, 2 x 128 tokens, fp32

Ends with one JSON line holding every figure (with `--compare-hf`, a line marked "partial" also precedes
each transformers row). CPU figures only show that the script runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moecpt.config import (
    CheckpointSection,
    DataSection,
    KernelsSection,
    LoggingSection,
    ModelSection,
    ParallelSection,
    ScheduleSection,
    TrainConfig,
    TrainingSection,
)
from moecpt.data.indexed import ShardWriter, dtype_for_vocab
from moecpt.kernels.attention import SDPA_CHOICES
from moecpt.model.config import MixtralConfig
from moecpt.train.metrics import gpu_peak_tflops, model_flops_per_token
from moecpt.train.trainer import Trainer

HF_CASES = ("eager", "grouped_mm", "grouped_mm+compile")


def build_parser(description: str) -> argparse.ArgumentParser:
    """The shape, kernel and model flags (bench/step_breakdown.py adds its own to the same parser)."""
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shape", default="bench-1b" if cuda else "tiny", help="model preset (moecpt.model.config)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--micro-batch", type=int, default=8 if cuda else 2, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=2048 if cuda else 128)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    p.add_argument("--steps", type=int, default=10 if cuda else 3, help="timed steps")
    p.add_argument("--compile", action="store_true", help="parallel.compile: torch.compile each decoder block")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--ce-chunk", type=int, default=KernelsSection.loss_chunk_tokens,
                   help="kernels.loss_chunk_tokens: tokens per LM-head/loss chunk")
    p.add_argument("--sdpa", default="auto", choices=SDPA_CHOICES,
                   help="kernels.sdpa_backend: attention kernel preferred on CUDA (auto: PyTorch's choice)")
    p.add_argument("--triton", default="auto", choices=("auto", "on", "off"),
                   help="kernels.triton: fused RMSNorm/RoPE/SwiGLU/cross-entropy (auto: on a GPU)")
    p.add_argument("--tokenizer", default="", help="data.tokenizer ('' = the Mixtral one if installed)")
    return p


def parse_args() -> argparse.Namespace:
    p = build_parser(__doc__.split("\n")[0])
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' Mixtral in this process")
    p.add_argument("--hf-cases", default=",".join(HF_CASES), help="comma-separated transformers rows")
    return p.parse_args()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """TFLOP/s of a square matmul (8192 on a GPU, 512 on a CPU) in `dtype`, the yardstick for the peak share."""
    n = 8192 if device.startswith("cuda") else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    reps = 20 if device.startswith("cuda") else 5
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 / ((time.perf_counter() - t0) / reps) / 1e12


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float:
    """Peak CUDA memory allocated since the last reset; on a CPU the process's peak RSS (all of its life)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def time_steps(step: Callable[[], float], warmup: int, steps: int, device: str) -> dict[str, Any]:
    """Seconds per step (mean over `steps` after `warmup`), the warm-up time, and the last loss."""
    t0 = time.perf_counter()
    loss = float("nan")
    for _ in range(warmup):
        loss = step()
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    return {"step_s": (time.perf_counter() - t0) / steps, "warmup_s": warm_s, "loss": loss}


def random_shard(prefix: Path, vocab: int, tokens: int, doc_len: int, seed: int = 0) -> None:
    """A token shard of uniformly random ids, documents of `doc_len` tokens (the loader packs them)."""
    rng = np.random.default_rng(seed)
    n_docs = max(1, -(-tokens // doc_len))
    w = ShardWriter(prefix, dtype_for_vocab(vocab))
    w.add_documents(rng.integers(3, vocab, n_docs * doc_len), np.full(n_docs, doc_len))
    w.finish()


def bench_tokenizer(path: str, tmp: Path) -> str:
    """The tokenizer for `data.tokenizer`: the one asked for, else the default Mixtral one, else (where
    mistral-common is not installed) a three-piece tokenizer.json; it only labels the random ids."""
    if path:
        return path
    from moecpt.data.tokenizer import default_tokenizer_path
    from moecpt.errors import UserError

    try:
        return str(default_tokenizer_path())
    except UserError:
        from tokenizers import Tokenizer, models

        tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
        out = tmp / "tokenizer.json"
        tok.save(str(out))
        return str(out)


def moecpt_config(args: argparse.Namespace, tmp: Path) -> TrainConfig:
    """The run a user would configure for this benchmark: the preset, one micro-batch per step, random data."""
    model_cfg = MixtralConfig.from_preset(args.shape)
    n_steps = args.warmup + args.steps
    prefix = tmp / "random"
    random_shard(prefix, model_cfg.vocab_size, 2 * n_steps * args.micro_batch * (args.seq_len + 1),
                 doc_len=4 * args.seq_len)
    cfg = TrainConfig(
        run_dir=str(tmp / "run"), resume="never",
        model=ModelSection(preset=args.shape),
        data=DataSection(mixture="1 random", corpora={"random": [str(prefix)]},
                         tokenizer=bench_tokenizer(args.tokenizer, tmp), cache_dir=str(tmp / "cache"),
                         seq_len=args.seq_len, valid_fraction=0.0, valid_max_documents=0),
        schedule=ScheduleSection(warmup_steps=1),
        training=TrainingSection(steps=n_steps, global_batch=args.micro_batch, micro_batch=args.micro_batch,
                                 device=args.device),
        checkpoint=CheckpointSection(interval=0, export_at_end=False),
        logging=LoggingSection(progress=False),
        parallel=ParallelSection(compile=args.compile, activation_checkpointing=args.activation_checkpointing),
        kernels=KernelsSection(triton=args.triton, sdpa_backend=args.sdpa, loss_chunk_tokens=args.ce_chunk),
    )
    cfg.validate()
    return cfg


def run_moecpt(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    trainer = Trainer.from_config(moecpt_config(args, tmp))
    reset_peak_memory(args.device)
    r = time_steps(lambda: trainer.train_step()["loss"], args.warmup, args.steps, args.device)
    r["triton_kernels"] = trainer.rt.fused_kernels
    r["peak_memory_gib"] = peak_memory_gib(args.device)
    r["params_M"] = trainer.model.num_params() / 1e6
    r["autocast"] = str(trainer.rt.amp_dtype).removeprefix("torch.") if trainer.rt.amp_dtype else "float32"
    return r  # the trainer, its model and optimizer go with this frame


def run_hf(case: str, c: MixtralConfig, args: argparse.Namespace) -> dict[str, Any]:
    """One row of the reference script: transformers' Mixtral in bf16 (fp32 on a CPU), AdamW, labels = ids."""
    from transformers import MixtralConfig as HFConfig
    from transformers import MixtralForCausalLM as HFMixtral

    impl, compiled = case.removesuffix("+compile"), case.endswith("+compile")
    torch.manual_seed(0)
    hf_cfg = HFConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, head_dim=c.attn_head_dim,
                      num_local_experts=c.num_local_experts, num_experts_per_tok=c.num_experts_per_tok,
                      max_position_embeddings=c.max_position_embeddings, rope_theta=c.rope_theta,
                      rms_norm_eps=c.rms_norm_eps, output_router_logits=True,
                      router_aux_loss_coef=c.router_aux_loss_coef)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    try:
        model = HFMixtral._from_config(hf_cfg, attn_implementation="sdpa", experts_implementation=impl, dtype=dtype)
    except TypeError:
        hf_cfg._experts_implementation = impl
        model = HFMixtral._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype)
    model.to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=args.device.startswith("cuda") or None)
    fwd = torch.compile(model) if compiled else model
    ids = torch.randint(0, c.vocab_size, (args.micro_batch, args.seq_len), device=args.device)

    def step() -> float:
        out = fwd(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach().item()

    reset_peak_memory(args.device)
    r = time_steps(step, args.warmup, args.steps, args.device)
    r["peak_memory_gib"] = peak_memory_gib(args.device)
    r["dtype"] = str(dtype).removeprefix("torch.")
    return r


def sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits (CPU figures are tiny; GPU ones large)."""
    return float(f"{x:.{digits}g}")


def main() -> None:
    args = parse_args()
    c = MixtralConfig.from_preset(args.shape)
    tokens = args.micro_batch * args.seq_len
    fpt = model_flops_per_token(c, args.seq_len)
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    # bf16 on a GPU (the dtype of its autocast); fp32 on a CPU, where the run computes in fp32.
    peak_dtype = torch.bfloat16 if cuda else torch.float32
    peak = matmul_peak(args.device, peak_dtype)
    print(f"{name}: {str(peak_dtype).removeprefix('torch.')} matmul peak {peak:.3g} TFLOP/s; shape {args.shape}, {args.micro_batch} x {args.seq_len} "
          f"tokens, {fpt / 1e9:.3f} GFLOP/token", flush=True)

    def row(label: str, r: dict[str, Any]) -> dict[str, Any]:
        tok_s = tokens / r["step_s"]
        out = {"tokens_per_s": sig(tok_s), "model_tflops": sig(tok_s * fpt / 1e12),
               "peak_fraction": sig(tok_s * fpt / 1e12 / peak, 3), "step_s": sig(r["step_s"]),
               "warmup_s": round(r["warmup_s"], 1), "loss": round(r["loss"], 4),
               "peak_memory_gib": round(r["peak_memory_gib"], 3)}
        print(f"{label:28s} {r['step_s'] * 1e3:9.1f} ms/step {tok_s:12,.0f} tok/s {out['model_tflops']:8.2f} "
              f"TFLOP/s ({out['peak_fraction']:.1%} of peak) {out['peak_memory_gib']:6.2f} GiB "
              f"loss {r['loss']:.3f}", flush=True)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        ours = run_moecpt(args, Path(tmp))
    result: dict[str, Any] = {
        "bench": "train_step", "device": name, "torch": torch.__version__, "shape": args.shape,
        "micro_batch": args.micro_batch, "seq_len": args.seq_len, "tokens_per_step": tokens,
        "flops_per_token": fpt, "compile": args.compile, "sdpa": args.sdpa,
        "activation_checkpointing": args.activation_checkpointing,
        "ce_chunk_tokens": args.ce_chunk, "triton_kernels": ours["triton_kernels"], "autocast": ours["autocast"], "params_M":
        round(ours["params_M"], 1), "matmul_peak_tflops": sig(peak),
        "peak_dtype": str(peak_dtype).removeprefix("torch."),
        "peak_memory_kind": "cuda_max_allocated" if cuda else "cpu_process_max_rss",
        **row("moecpt" + (" (compiled)" if args.compile else ""), ours),
    }
    sheet = gpu_peak_tflops(name) if cuda else None
    if sheet:
        result["mfu_datasheet"] = sig(result["model_tflops"] / sheet, 3)
    if args.compare_hf:
        import transformers

        result["transformers"] = transformers.__version__
        best = None
        for case in filter(None, args.hf_cases.split(",")):
            # The figures so far, in case a slow row (compilation) is cut off by a time limit.
            print(json.dumps({**result, "partial": True}), flush=True)
            gc.collect()
            try:
                hf = row(f"transformers {case}", run_hf(case, c, args))
            except Exception as e:  # a row that cannot run (e.g. no compiler for compile) is recorded, not fatal
                print(f"transformers {case}: failed: {e!r}"[:500], flush=True)
                result[f"hf_{case}_error"] = repr(e)[:300]
                continue
            for k in ("tokens_per_s", "model_tflops", "peak_fraction", "peak_memory_gib", "step_s"):
                result[f"hf_{case}_{k}"] = hf[k]
            if best is None or hf["tokens_per_s"] > best[1]["tokens_per_s"]:
                best = (case, hf)
        if best is not None:  # same shape and tokens: the tokens/s ratio is the TFLOP/s ratio
            result.update(best_hf=best[0], best_hf_tflops=best[1]["model_tflops"],
                          ratio_vs_best_hf=sig(result["tokens_per_s"] / best[1]["tokens_per_s"], 3))
            print(f"moecpt / best transformers ({best[0]}): {result['ratio_vs_best_hf']:.2f}x", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
