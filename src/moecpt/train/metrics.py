"""What a run reports: model FLOPs, the console line, the JSON Lines metrics file, optional TensorBoard/W&B,
throughput, loss spikes, and the run logger that puts them together on logging steps."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from moecpt.errors import UserError

METRICS_FILE = "metrics.jsonl"

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity), for MFU.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def model_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul parameters (attention projections, the top-k of each MoE
    layer's experts, shared experts, dense MLPs, routers, LM head; not the embedding lookup, norms or biases)
    + 6 x layers x seq_len x attention width (causal attention's two matmuls, forward and backward, halved by
    the causal mask)."""
    from moecpt.model import param_shapes

    c, active = config, 0.0
    for name, shape in param_shapes(c).items():
        if len(shape) < 2 or (name == "embed_tokens.weight" and not c.tie_word_embeddings):
            continue
        n = math.prod(shape)
        active += n * c.top_k / shape[0] if ".experts." in name else n
    width = c.num_attention_heads * c.attn_head_dim
    return float(6 * active + 6 * c.num_hidden_layers * seq_len * width)


def gpu_peak_tflops(device_name: str) -> float | None:
    for key, peak in GPU_PEAK_TFLOPS.items():
        if key in device_name:
            return peak
    return None


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl. A torn last line (a crash mid-write) is dropped with a warning;
    an unreadable line before the last is an error that names it."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    records = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw.decode("utf-8")))
        except ValueError as e:
            if any(rest.strip() for rest in lines[lineno:]):
                raise UserError(f"{path}:{lineno}: not a JSON record ({e}); the file is damaged before its last "
                                "line: delete that line (the step it held is lost from the metrics)") from None
            warnings.warn(f"{path}:{lineno}: dropped a torn last line (a crash while it was written)",
                          stacklevel=2)
    return records


class MetricsLogger:
    """Appends one JSON object per record to RUN_DIR/metrics.jsonl (rank 0 only) and mirrors scalars to the
    optional TensorBoard / W&B sinks. On resume, records past the resumed step are dropped first, so the file
    reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None, tensorboard: bool = False,
                 wandb_project: str = "", config: dict[str, Any] | None = None):
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self._tb = self._wandb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [r for r in read_metrics(run_dir) if resume_step is not None and r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("logging.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.wandb_project needs the wandb package: pip install wandb") from None
            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        step = record.get("step", 0)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()


class Throughput:
    """Tokens/s over the steps since the last report, and the ETA at that pace."""

    def __init__(self, start_step: int):
        self.t0 = time.perf_counter()
        self.last_t, self.last_step, self.last_tokens = self.t0, start_step, 0

    def report(self, step: int, tokens_since_last: int, total_steps: int) -> tuple[float, float]:
        now = time.perf_counter()
        dt = max(now - self.last_t, 1e-9)
        tps = tokens_since_last / dt
        step_time = dt / max(step - self.last_step, 1)
        self.last_t, self.last_step = now, step
        return tps, step_time * (total_steps - step)


def console(line: str) -> None:
    """Print a line without breaking a tqdm progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
    except ImportError:  # pragma: no cover
        print(line, flush=True)


class SpikeDetector:
    """Flags a step whose loss exceeds `factor` x a robust recent baseline: the median of the last `window`
    finite losses. Flagged losses enter the window too, so after a lasting level shift the median moves to
    the new level within window / 2 steps and the flags stop, while a lone spike hardly moves it. The first
    `min_history` steps are never flagged (no baseline yet)."""

    def __init__(self, factor: float, window: int = 64, min_history: int = 4):
        self.factor, self.window, self.min_history = factor, window, min_history
        self.recent: list[float] = []
        self.count = 0

    @property
    def baseline(self) -> float | None:
        return statistics.median(self.recent) if self.recent else None

    def __call__(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        spike = len(self.recent) >= self.min_history and loss > self.factor * self.baseline
        self.count += spike
        self.recent = [*self.recent, loss][-self.window:]
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {"spikes": self.count, "loss_window": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """From a checkpoint's trainer state (one written before the window was kept has its EMA instead)."""
        self.count = state.get("spikes", 0)
        window = state.get("loss_window")
        if window is None and state.get("loss_ema") is not None:
            window = [state["loss_ema"]] * self.min_history
        self.recent = list(window or [])[-self.window:]


class RunLogger:
    """Per step: the progress bar and the non-finite and spike messages. On logging steps: throughput, model
    TFLOP/s, MFU and memory added to the step's record, which goes to metrics.jsonl (and TensorBoard / W&B)
    and, on rank 0, to the console line."""

    def __init__(self, run_dir: Path, is_main: bool, step: int, total_steps: int, interval: int,
                 metrics: MetricsLogger, flops_per_token: float, peak_tflops: float | None, progress: bool):
        self.is_main, self.total, self.interval, self.metrics = is_main, total_steps, interval, metrics
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.pace, self.tokens_since = Throughput(step), 0
        self.bar = None
        if is_main and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def is_log_step(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.total

    def step(self, step: int, loss: float, tokens: int, messages: list[str]) -> None:
        self.tokens_since += tokens
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}")
        for m in messages if self.is_main else ():
            console(m)

    def log(self, record: dict[str, Any], world: int, peak_memory_gib: float | None) -> None:
        """Complete a logging step's record with throughput and write it everywhere."""
        tps, eta = self.pace.report(record["step"], self.tokens_since, self.total)
        self.tokens_since = 0
        record["tokens_per_s"] = tps
        record["model_tflops"] = tps * self.flops_per_token / 1e12
        if self.peak_tflops:
            record["mfu"] = record["model_tflops"] / (self.peak_tflops * world)
        if peak_memory_gib is not None:
            record["peak_memory_gib"] = peak_memory_gib
        self.metrics.log(record)
        if self.is_main:
            console(console_line(record, self.total, eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()


def console_line(r: dict[str, Any], total: int, eta: float) -> str:
    parts = [f"step {r['step']}/{total}", f"loss {r['loss']:.4f}", f"lb {r['lb_loss']:.4f}", f"z {r['z_loss']:.3f}",
             *([f"mtp {r['mtp_loss']:.4f}"] if "mtp_loss" in r else []),
             f"lr {r['lr']:.3g}", f"gnorm {r['grad_norm']:.3f}", f"{r['tokens_per_s']:,.0f} tok/s",
             f"{r['model_tflops']:.2f} TFLOP/s"]
    if "mfu" in r:
        parts.append(f"MFU {r['mfu']:.1%}")
    if "peak_memory_gib" in r:
        parts.append(f"mem {r['peak_memory_gib']:.1f} GiB")
    parts.append(f"experts max/mean {max(r['expert_load_max']):.2f} idle {sum(r['expert_idle'])}")
    parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)
