"""The training loop: continual pre-training of a Mixtral MoE on a weighted data mixture.

One optimizer step consumes `training.global_batch` sequences: `micro_batch` per forward pass on each rank,
accumulated over `global_batch / (micro_batch x world_size)` passes. The loss is the mean cross-entropy over
all target tokens of the global batch (each micro-batch's summed loss is divided by the global token count,
so the result does not depend on how the batch is split), plus the load-balancing and z losses, which are
computed per micro-batch as transformers and Megatron do and averaged over the micro-batches.

Two ways to start, never confused: `init_from` loads weights only (continual pre-training: fresh optimizer,
schedule and data position); `resume` restores everything from a checkpoint of this run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moecpt.config import TrainConfig, to_toml
from moecpt.data.loader import MixtureLoader, validation_batches
from moecpt.data.mixture import MixtureDataset, parse_mixture, resolve_mixture
from moecpt.data.tokenizer import Tokenizer, load_tokenizer
from moecpt.errors import UserError
from moecpt.kernels._triton import triton_installed, triton_usable, why_not_triton
from moecpt.kernels.attention import sdpa_backend
from moecpt.model.config import MixtralConfig
from moecpt.model.hf import from_pretrained, load_config
from moecpt.model.mixtral import MixtralForCausalLM
from moecpt.parallel import dist as pdist
from moecpt.parallel import parallelize as par
from moecpt.train import checkpoint as ckpt_lib
from moecpt.train.metrics import (
    MetricsLogger,
    Throughput,
    console,
    format_duration,
    gpu_peak_tflops,
    model_flops_per_token,
    read_metrics,
)
from moecpt.train.optim import build_optimizer, lr_at

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---- building blocks -------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"training.device = {name!r} but no CUDA GPU is visible; use cpu or auto")
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (fp32 master weights) on GPU by default, plain fp32 on CPU."""
    if cfg.training.dtype == "bfloat16" or (cfg.training.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def use_triton(cfg: TrainConfig, device: torch.device) -> bool:
    """kernels.triton resolved: auto = on a GPU with Triton installed; on = wherever Triton can run, else an
    error that says why."""
    choice = cfg.kernels.triton
    if choice == "auto":
        return device.type == "cuda" and triton_installed()
    if choice == "on" and not triton_usable(device):
        raise UserError(f"config: kernels.triton = 'on' but {why_not_triton(device)}; "
                        "set kernels.triton = 'auto' or 'off'")
    return choice == "on"


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / ckpt_lib.COMPLETE).is_file()


# The fields that change a model's parameters (the others, such as loss coefficients, may change between runs).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_local_experts", "tie_word_embeddings")


def model_config(cfg: TrainConfig) -> MixtralConfig:
    """The model's shape: from init_from's config.json, or the preset with overrides."""
    overrides = dict(cfg.model.overrides)
    known = {f.name for f in dataclasses.fields(MixtralConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(f"config: unknown model.overrides key(s) {', '.join(unknown)}; "
                        f"use MixtralConfig fields such as num_hidden_layers, router_aux_loss_coef")
    if cfg.init_from:
        src = Path(cfg.init_from)
        if is_hf_dir(src):
            base = load_config(src)
        elif (src / ckpt_lib.COMPLETE).is_file():
            base = MixtralConfig(**ckpt_lib.read_trainer_state(src)["model_config"])
        else:
            raise UserError(f"init_from = {cfg.init_from!r} is neither a Hugging Face directory (config.json) nor "
                            "a complete moecpt checkpoint")
        bad = sorted(k for k in set(overrides) & set(SHAPE_FIELDS) if overrides[k] != getattr(base, k))
        if bad:
            raise UserError(f"config: model.overrides {', '.join(f'{k}={overrides[k]}' for k in bad)} would change "
                            f"the shape of the init_from model ({src}); remove them")
        return dataclasses.replace(base, **overrides)
    return MixtralConfig.from_preset(cfg.model.preset, **overrides)


def build_dataset(cfg: TrainConfig, tokenizer: Tokenizer) -> MixtureDataset:
    """The mixture, each name resolved through `data.corpora` (JSON Lines sources are tokenized into the cache
    on first use; shard prefixes are used as they are)."""
    spec = [(e.name, e.weight, [src for p in e.prefixes for src in cfg.data.corpora.get(p, [p])])
            for e in parse_mixture(cfg.data.mixture)]
    entries = resolve_mixture(spec, cfg.data.cache_dir, tokenizer=tokenizer.path)
    return MixtureDataset(entries, seq_len=cfg.data.seq_len, seed=cfg.data.seed, allow_repeat=cfg.data.allow_repeat,
                          valid_fraction=cfg.data.valid_fraction, valid_max_documents=cfg.data.valid_max_documents)


def export_hf(model: MixtralForCausalLM, tokenizer_path: str | None, out_dir: Path) -> Path:
    """A Hugging Face directory with the weights, config and the tokenizer files."""
    model.save_pretrained(out_dir)
    if tokenizer_path:
        src = Path(tokenizer_path)
        if src.suffix == ".json":
            shutil.copyfile(src, out_dir / "tokenizer.json")
        elif src.is_file():
            shutil.copyfile(src, out_dir / "tokenizer.model")
        tok_cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                   "model_max_length": model.config.max_position_embeddings, "legacy": True}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return out_dir


# ---- the trainer -----------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.training.device)
        # Under torchrun (WORLD_SIZE > 1) this creates the process group; `train()` tears it down.
        self.owns_process_group = pdist.init_distributed(self.device, cfg.parallel.backend, cfg.parallel.timeout_s)
        self.rank = pdist.rank()
        self.world = pdist.world_size()
        self.is_main = self.rank == 0
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.fused_kernels = use_triton(cfg, self.device)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        t = cfg.training
        per_pass = t.micro_batch * self.world
        if t.global_batch % per_pass:
            raise UserError(f"config: training.global_batch ({t.global_batch}) must be a multiple of "
                            f"training.micro_batch x world size ({t.micro_batch} x {self.world} = {per_pass})")
        self.accum = t.global_batch // per_pass
        self._stop_signal: int | None = None

        seed_everything(t.seed + self.rank)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer or None)
        # Rank 0 tokenizes any JSON Lines source into the shared cache first; the others then read it.
        if not self.is_main:
            self._barrier()
        self.dataset = build_dataset(cfg, self.tokenizer)
        if self.is_main:
            self._barrier()
        self.corpus_names = [c.name for c in self.dataset.corpora]
        self.model_config = model_config(cfg)
        if self.model_config.vocab_size < self.tokenizer.vocab_size:
            raise UserError(f"the tokenizer has {self.tokenizer.vocab_size} pieces but the model's vocab_size is "
                            f"{self.model_config.vocab_size}")
        self.model, self.meshes = self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device)
        self.loader = MixtureLoader(self.dataset, t.micro_batch, self.rank, self.world)
        self.flops_per_token = model_flops_per_token(self.model_config, cfg.data.seq_len)
        self.peak_tflops = (gpu_peak_tflops(torch.cuda.get_device_name(self.device))
                            if self.device.type == "cuda" else None)

        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self.spikes = 0
        self.loss_ema: float | None = None
        self._val_bytes: dict[tuple[int, int], int] = {}
        self.start_mode = self._start()

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def _build_model(self) -> tuple[MixtralForCausalLM, par.Meshes | None]:
        """The model, parallelised as `[parallel]` says. On several ranks it is built on the meta device and
        each rank materialises only its shards (the weights of the scratch initialisation are the same as on
        one process; with resume or init_from they are loaded in `_start`)."""
        p = self.cfg.parallel
        scratch = self._resume_target() is None and not self.cfg.init_from
        if self.world == 1:
            model = MixtralForCausalLM(self.model_config).to(self.device)
            meshes = par.parallelize(model, p, self.device, 1, None)
        else:
            with torch.device("meta"):
                model = MixtralForCausalLM(self.model_config)
            meshes = par.parallelize(model, p, self.device, self.world, self.amp_dtype)
            model.to_empty(device=self.device)
        if scratch:  # a function of training.seed alone, whatever the world size and layout
            par.init_weights(model, self.cfg.training.seed)
        model.use_kernels(self.fused_kernels, self.cfg.kernels.loss_chunk_tokens)
        return model, meshes

    # ---- start: resume, init_from or scratch --------------------------------------------------------------
    def _resume_target(self) -> Path | None:
        mode = self.cfg.resume
        if mode == "never":
            return None
        if mode == "auto":
            return ckpt_lib.latest_checkpoint(self.ckpt_root)
        path = Path(mode)
        if not (path / ckpt_lib.COMPLETE).is_file():
            raise UserError(f"resume = {mode!r} is not a complete checkpoint directory")
        return path

    def _start(self) -> str:
        target = self._resume_target()
        if target is not None:
            self._check_same_model(target)
            if self.is_main:  # resuming before the latest checkpoint abandons the later ones: move them aside
                for d in ckpt_lib.set_aside_later(self.ckpt_root, ckpt_lib.read_trainer_state(target)["step"]):
                    console(f"moved {d.name} to {d.parent}: it follows the checkpoint this run resumes from")
            if self.world > 1:
                dist.barrier()
            state = ckpt_lib.load_checkpoint(target, self.model, self.optimizer)
            self.loader.load_state_dict(state["data"], new_stage=self.cfg.data.new_stage)
            self.step = state["step"]
            self.nonfinite_total = state.get("nonfinite_total", 0)
            self.spikes = state.get("spikes", 0)
            self.loss_ema = state.get("loss_ema")
            return f"resumed from {target} at step {self.step}"
        if self.cfg.init_from:
            src = Path(self.cfg.init_from)
            if is_hf_dir(src) and self.world > 1:  # rank 0 reads the weights and broadcasts them
                full = from_pretrained(src, dtype=torch.float32).state_dict() if self.is_main else None
                par.load_full_state_dict(self.model, full)
            elif is_hf_dir(src):
                loaded = from_pretrained(src, dtype=torch.float32, device=self.device)
                self.model.load_state_dict(loaded.state_dict())
            else:
                ckpt_lib.load_model_weights(src, self.model)
            return f"initialised from {src} (weights only: fresh optimizer, schedule and data)"
        return f"random initialisation of preset {self.cfg.model.preset!r} (seed {self.cfg.training.seed})"

    def _check_same_model(self, ckpt: Path) -> None:
        saved = ckpt_lib.read_trainer_state(ckpt).get("model_config", {})
        diffs = [f"{k} {saved[k]} in the checkpoint, {getattr(self.model_config, k)} in the config"
                 for k in SHAPE_FIELDS if k in saved and saved[k] != getattr(self.model_config, k)]
        if diffs:
            raise UserError(f"cannot resume from {ckpt}: its model has another shape ({'; '.join(diffs)}). Resume with "
                            "the run's model settings, or start a new run_dir with init_from pointing at the "
                            "checkpoint")

    # ---- one optimizer step -------------------------------------------------------------------------------
    def _to_device(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in batch.items()}

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def train_step(self) -> dict[str, Any]:
        """Forward/backward over the accumulated micro-batches, clip, and (if all is finite) step."""
        cfg = self.cfg
        batches = [self._to_device(self.loader.next_batch()) for _ in range(self.accum)]
        # Targets in the whole global batch (packed samples have no padding, but count them anyway).
        n_local = sum(int(b["tokens"][:, 1:].numel()) for b in batches)
        n_global = self._all_reduce(torch.tensor(float(n_local), device=self.device)).item()
        c = self.model_config
        n_corpora = len(self.corpus_names)
        stats = torch.zeros(3, device=self.device)  # summed CE (nats), summed lb loss, summed z loss
        corpus_loss = torch.zeros(n_corpora, device=self.device)
        corpus_tokens = torch.zeros(n_corpora, device=self.device)
        expert_counts = torch.zeros(c.num_hidden_layers, c.num_local_experts, device=self.device)
        self.model.train()
        for i, b in enumerate(batches):
            if cfg.parallel.accumulate_unsharded:
                par.set_accumulating(self.model, i < len(batches) - 1)
            inputs, targets = b["tokens"][:, :-1], b["tokens"][:, 1:]
            with sdpa_backend(cfg.kernels.sdpa_backend, self.device):
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    # loss_only: the LM head and cross-entropy run in chunks, never [B, T, vocab] logits.
                    out = self.model(inputs, targets=targets, loss_only=True, **self._doc_kwargs(b))
                ce_sum = out.token_loss.sum()
                # Gradients are averaged over ranks by data parallelism: scale the CE sum so the average is
                # the global-batch mean; the auxiliary losses are already means.
                loss = ce_sum * (self.world / n_global) + (
                    c.router_aux_loss_coef * out.aux_loss + c.router_z_loss_coef * out.z_loss) / self.accum
                loss.backward()
            with torch.no_grad():
                stats += torch.stack([ce_sum.detach(), out.aux_loss.detach(), out.z_loss.detach()])
                per_seq = out.token_loss.detach().sum(dim=1)
                corpus_loss.index_add_(0, b["corpus"], per_seq)
                corpus_tokens.index_add_(0, b["corpus"], torch.full_like(per_seq, targets.shape[1]))
                expert_counts += out.expert_counts.detach()

        grad_norm = self._clip_grad_norm()
        for t in (stats, corpus_loss, corpus_tokens, expert_counts):
            self._all_reduce(t)
        ce = stats[0].item() / n_global
        lr = lr_at(self.step, cfg.training.steps, cfg.optimizer, cfg.schedule)
        finite = math.isfinite(ce) and math.isfinite(grad_norm)
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

        per_pass = self.accum * self.world
        record = {
            "step": self.step, "loss": ce, "lb_loss": stats[1].item() / per_pass, "z_loss": stats[2].item() / per_pass,
            "lr": lr, "grad_norm": grad_norm, "tokens": int(n_global), "skipped": not finite,
            "samples_consumed": self.loader.state.samples_consumed,
        }
        for i, name in enumerate(self.corpus_names):
            if corpus_tokens[i] > 0:
                record[f"loss/{name}"] = (corpus_loss[i] / corpus_tokens[i]).item()
        load = expert_counts / expert_counts.sum(dim=1, keepdim=True).clamp_min(1) * c.num_local_experts
        record["expert_load_max"] = load.max(dim=1).values.tolist()  # per layer: busiest expert / mean
        record["expert_idle"] = (expert_counts == 0).sum(dim=1).tolist()  # per layer: experts with no token
        record["expert_counts"] = expert_counts.tolist()
        self._flag_spike(record)
        return record

    def _clip_grad_norm(self) -> float:
        max_norm = self.cfg.optimizer.grad_clip or float("inf")
        return par.clip_grad_norm_(self.model.parameters(), max_norm)

    def _flag_spike(self, record: dict[str, Any]) -> None:
        loss = record["loss"]
        record["spike"] = bool(self.loss_ema is not None and math.isfinite(loss)
                               and loss > self.cfg.training.spike_factor * self.loss_ema)
        self.spikes += record["spike"]
        if math.isfinite(loss) and not record["spike"]:
            self.loss_ema = loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * loss

    def _doc_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """With intra-document attention, positions restart at each document; otherwise they run 0..T-1."""
        if self.cfg.model.intra_doc_attention:
            return {"position_ids": batch["position_ids"], "intra_doc_attention": True}
        return {}

    # ---- validation ---------------------------------------------------------------------------------------
    def _window_bytes(self, corpus: int, index: int, tokens: np.ndarray) -> int:
        """UTF-8 bytes of the text a validation window predicts (cached: the windows never change)."""
        key = (corpus, index)
        if key not in self._val_bytes:
            self._val_bytes[key] = len(self.tokenizer.decode(tokens[1:].tolist()).encode("utf-8"))
        return self._val_bytes[key]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss per corpus on its held-out documents, in nats/token and bits per UTF-8 byte."""
        self.model.eval()
        out: dict[str, float] = {}
        for c, name in enumerate(self.corpus_names):
            ds = self.dataset.validation_dataset(c)
            sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # nats, tokens, bytes
            # The first val_batches x micro_batch windows, split over the ranks: the same windows at any world size.
            first = _FirstWindows(ds, self.cfg.logging.val_batches * self.cfg.training.micro_batch)
            batches = list(validation_batches(first, self.cfg.training.micro_batch, self.rank, self.world))
            # Sharded and expert-parallel forwards are collective: every rank runs as many as the busiest one,
            # a rank with fewer windows on a dummy batch whose result it ignores.
            n_passes = torch.tensor(len(batches), device=self.device)
            if self.world > 1:
                dist.all_reduce(n_passes, op=dist.ReduceOp.MAX)
            for _ in range(len(batches), int(n_passes)):
                self._forward_dummy()
            for b in batches:
                t = self._to_device(b)
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    res = self.model(t["tokens"][:, :-1], targets=t["tokens"][:, 1:], **self._doc_kwargs(t))
                n_bytes = sum(self._window_bytes(c, int(i), row) for i, row in zip(b["index"], b["tokens"], strict=True))
                sums += torch.tensor([res.token_loss.sum().item(), res.token_loss.numel(), n_bytes],
                                     device=self.device, dtype=torch.float64)
            self._all_reduce(sums)
            if sums[1] > 0:
                out[f"val_loss/{name}"] = (sums[0] / sums[1]).item()
                out[f"val_bpb/{name}"] = (sums[0] / math.log(2) / sums[2].clamp_min(1)).item()
        self.model.train()
        return out

    def _forward_dummy(self) -> None:
        tokens = torch.zeros(1, self.cfg.data.seq_len, dtype=torch.long, device=self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            self.model(tokens)

    def export(self) -> Path | None:
        """Write RUN_DIR/hf (rank 0). With sharded weights every rank takes part in gathering them first."""
        out = self.run_dir / "hf"
        if self.world == 1:
            return export_hf(self.model, self.tokenizer.path, out)
        full = par.full_state_dict(self.model)
        if not self.is_main:
            return None
        with torch.device("meta"):
            plain = MixtralForCausalLM(self.model_config)
        plain.load_state_dict(full, assign=True)
        return export_hf(plain, self.tokenizer.path, out)

    # ---- checkpoints --------------------------------------------------------------------------------------
    def save(self) -> Path:
        state = {"data": self.loader.state_dict(), "nonfinite_total": self.nonfinite_total, "spikes": self.spikes,
                 "loss_ema": self.loss_ema, "world_size": self.world, "tokenizer": self.tokenizer.path,
                 "model_config": dataclasses.asdict(self.model_config)}
        path = ckpt_lib.save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, state)
        if self.is_main:
            ckpt_lib.prune_checkpoints(self.ckpt_root, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
        return path

    def _logged_validation(self) -> dict[str, float]:
        """The validation record of the current step in metrics.jsonl, if the run logged one."""
        for r in reversed(read_metrics(self.run_dir)):
            if r.get("step") == self.step and any(k.startswith("val_") for k in r):
                return {k: v for k, v in r.items() if k.startswith("val_")}
        return {}

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal: all ranks must leave the loop at the same step (one scalar
        all-reduce per step), or those still training would wait forever on the ones saving."""
        if self.world == 1:
            return self._stop_signal is not None
        flag = torch.tensor(float(self._stop_signal or 0), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self._stop_signal is None:
            self._stop_signal = int(flag.item())
        return bool(flag.item())

    # ---- the loop -----------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(cfg))
            console(f"moecpt train: {self.start_mode}")
            console(f"config ({self.run_dir / 'config.toml'}):\n" + to_toml(cfg))
            console(f"model: {self.model.num_params() / 1e6:.1f}M parameters "
                    f"({self.model.num_params(active=True) / 1e6:.1f}M active), device {self.device}, "
                    f"{'bf16 autocast' if self.amp_dtype else 'fp32'}, world size {self.world}"
                    f"{f' (FSDP x expert parallel {cfg.parallel.expert_parallel})' if self.world > 1 else ''}, "
                    f"{self.accum} micro-batch(es) of {cfg.training.micro_batch} per step, "
                    f"{'Triton' if self.fused_kernels else 'PyTorch'} kernels")
            for row in self.dataset.report(cfg.training.steps * cfg.training.global_batch):
                console(f"data: {row['name']:>12s} weight {row['weight']:.3f} realised share {row['share']:.3f} "
                        f"({row['train_tokens']:,} training tokens, {row['epochs']:.2f} epochs planned)")
        metrics = MetricsLogger(self.run_dir, self.is_main, resume_step=self.step, tensorboard=cfg.logging.tensorboard,
                                wandb_project=cfg.logging.wandb_project, config=dataclasses.asdict(cfg))
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = None
        if self.is_main and cfg.logging.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.training.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        pace = Throughput(self.step)
        first_step = self.step
        tokens_since = 0
        reason = "finished"
        last_record: dict[str, Any] = {}
        try:
            while self.step < cfg.training.steps:
                record = self.train_step()
                tokens_since += record["tokens"]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                if record["skipped"]:
                    console(f"step {self.step}: non-finite loss or gradient; step skipped "
                            f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in all)")
                if record["spike"]:
                    console(f"step {self.step}: loss spike {record['loss']:.3f} (running mean {self.loss_ema:.3f})")
                is_last = self.step == cfg.training.steps
                is_log = self.step % cfg.logging.interval == 0 or is_last
                if cfg.logging.val_interval and self.step % cfg.logging.val_interval == 0 and not is_last:
                    val = self.validate()
                    if is_log:
                        record.update(val)  # one record for the step
                    elif val:
                        metrics.log({"step": self.step, **val})
                if is_log:
                    tps, eta = pace.report(self.step, tokens_since, cfg.training.steps)
                    tokens_since = 0
                    record["tokens_per_s"] = tps
                    record["model_tflops"] = tps * self.flops_per_token / 1e12
                    if self.peak_tflops:
                        record["mfu"] = record["model_tflops"] / (self.peak_tflops * self.world)
                    if self.device.type == "cuda":
                        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    metrics.log(record)
                    if self.is_main:
                        console(self._line(record, eta))
                last_record = record
                if self.nonfinite_in_a_row >= cfg.training.max_nonfinite_in_a_row:
                    reason = f"{self.nonfinite_in_a_row} non-finite steps in a row"
                    break
                if self._stop_requested():
                    reason = f"signal {signal.Signals(self._stop_signal).name}"
                    break
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0 and not is_last:
                    self.save()
            existing = ckpt_lib.step_dir(self.ckpt_root, self.step)
            # A run resumed at its last step (already finished) has that checkpoint: do not write it again.
            path = existing if (existing / ckpt_lib.COMPLETE).is_file() else self.save()
            result = {"reason": reason, "step": self.step, "checkpoint": str(path), "last": last_record}
            if reason == "finished":
                # A run restarted after it had finished keeps the validation it logged then (one process only:
                # with several ranks every one must take part in validating, whatever files it sees).
                val = self._logged_validation() if self.step == first_step and self.world == 1 else {}
                if not val:
                    val = self.validate()
                    if val:
                        metrics.log({"step": self.step, **val})
                if val and self.is_main:
                    console("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
                result["validation"] = val
                if cfg.checkpoint.export_at_end:
                    exported = self.export()
                    if exported is not None:
                        result["export"] = str(exported)
                        console(f"exported a Hugging Face model to {result['export']}")
            elif self.is_main:
                console(f"stopped at step {self.step} ({reason}); checkpoint saved to {path}; "
                        "run the same command again to resume")
            return result
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)

    def _line(self, r: dict[str, Any], eta: float) -> str:
        total = self.cfg.training.steps
        parts = [f"step {r['step']}/{total}", f"loss {r['loss']:.4f}", f"lb {r['lb_loss']:.4f}", f"z {r['z_loss']:.3f}",
                 f"lr {r['lr']:.3g}", f"gnorm {r['grad_norm']:.3f}", f"{r['tokens_per_s']:,.0f} tok/s",
                 f"{r['model_tflops']:.2f} TFLOP/s"]
        if "mfu" in r:
            parts.append(f"MFU {r['mfu']:.1%}")
        if "peak_memory_gib" in r:
            parts.append(f"mem {r['peak_memory_gib']:.1f} GiB")
        parts.append(f"experts max/mean {max(r['expert_load_max']):.2f} idle {sum(r['expert_idle'])}")
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)


class _FirstWindows:
    """The first `n` windows of a validation set (a view with its `__len__` and `__getitem__`)."""

    def __init__(self, dataset, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.dataset[i]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as `cfg` says; under torchrun every rank calls this (the process group is set up and torn down)."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        if trainer.owns_process_group:
            pdist.destroy_distributed()
