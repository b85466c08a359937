"""The training loop: continual pre-training of an MoE on a weighted data mixture.

One optimizer step consumes `training.global_batch` sequences: `micro_batch` per forward pass on each rank,
accumulated over `global_batch / (micro_batch x world_size)` passes. The loss is the mean cross-entropy over
all target tokens of the global batch (each micro-batch's summed loss is weighted by 1 / the global token
count, so the result does not depend on how the batch is split), plus the load-balancing and z losses, which
are computed per micro-batch as transformers and Megatron do and averaged over the micro-batches.

Three ways to start, never confused: `init_from` loads weights only (continual pre-training: fresh optimizer,
schedule and data position); `resume` restores everything from a checkpoint of this run; `init_from` with
`schedule.decay_only` branches a cooldown off another run's checkpoint (its weights, optimizer state, step count
and data position; the LR decays from the one its last step had).

The components live beside the loop: `setup` (runtime, data, model), `checkpoint` (Checkpointer),
`validate` (Validator), `metrics` (RunLogger) and `export`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moecpt.config import TrainConfig, to_toml
from moecpt.data.loader import MixtureLoader
from moecpt.data.mixture import MixtureDataset, resolve_mixture, stage_datasets
from moecpt.data.tokenizer import Tokenizer
from moecpt.errors import UserError
from moecpt.model import CausalLM
from moecpt.model.families import family_of
from moecpt.model.moe import update_router_bias
from moecpt.parallel import dist as pdist
from moecpt.parallel import parallelize as par
from moecpt.train import checkpoint as ckpt_lib
from moecpt.train.export import export_sharded
from moecpt.train.metrics import (
    MetricsLogger,
    RunLogger,
    SpikeDetector,
    console,
    gpu_peak_tflops,
    model_flops_per_token,
)
from moecpt.train.optim import build_optimizer
from moecpt.train.schedule import Branch, lr_at, phases
from moecpt.train.setup import (
    Runtime,
    build_training_model,
    check_positions,
    check_token_ids,
    model_config,
    prepare_data,
    setup_runtime,
    shape_changes,
)
from moecpt.train.validate import Validator, model_inputs, to_device


@dataclass
class StepSums:
    """What one step accumulates on the device; read back only on logging steps."""

    corpus_loss: torch.Tensor  # [C] summed CE per corpus
    corpus_tokens: torch.Tensor  # [C] targets per corpus
    expert_counts: torch.Tensor | int  # [MoE layers, E] (0 until the first micro-batch adds to it)
    counts_global: bool = False  # expert_counts already summed over the ranks (for the router bias)


class Trainer:
    """The loop and its state. `Trainer.from_config(cfg)` runs the steps before it (runtime, data, model,
    resume or init_from); the constructor itself does no tokenization and no weight I/O."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, tokenizer: Tokenizer, dataset: MixtureDataset,
                 model: CausalLM, optimizer: torch.optim.Optimizer,
                 later_stages: list[tuple[int, MixtureDataset]] = ()):
        """`dataset` is the first data stage's; `later_stages` the (first global sample, dataset) of the
        others (`data.stages`)."""
        t = cfg.training
        self.cfg, self.rt, self.tokenizer, self.dataset = cfg, rt, tokenizer, dataset
        self.model, self.optimizer, self.model_config = model, optimizer, model.config
        self.run_dir = Path(cfg.run_dir)
        self.accum = t.global_batch // (t.micro_batch * rt.world)
        # Every sample is a window of seq_len targets: the global token count is known without a collective.
        self.tokens_per_step = t.global_batch * cfg.data.seq_len
        self.loader = MixtureLoader(dataset, t.micro_batch, rt.rank, rt.world, later_stages)
        self.checkpointer = ckpt_lib.Checkpointer(self.run_dir, cfg.checkpoint)
        self.validator = Validator(validation_corpora(dataset, later_stages), tokenizer, rt, t.micro_batch,
                                   cfg.logging.val_batches * t.micro_batch, cfg.data.seq_len,
                                   cfg.model.intra_doc_attention)
        self.spikes = SpikeDetector(t.spike_factor)
        self.step, self.nonfinite_total, self.nonfinite_in_a_row = 0, 0, 0
        # Finite steps still needed after a non-finite one before a checkpoint is written again; the first
        # step of the current (or last) streak.
        self.recovering, self.streak_start = 0, 0
        self.lock = ckpt_lib.RunLock(self.run_dir)  # taken by from_config, released when train() ends
        self.start_mode = f"random initialisation of preset {cfg.model.preset!r} (seed {t.seed})"
        self._stop_signal: int | None = None  # set by this process's signal handler
        self._agreed_stop: int | None = None  # the signal every rank has seen (read in one collective)
        self.step_sums: StepSums | None = None  # the last step's device-side sums
        self.final_validation: dict[str, float] | None = None  # a finished run's, kept in its last checkpoint
        self.branch: Branch | None = None  # set when this run is a cooldown branch (schedule.decay_only)
        self.last_lr: float | None = None  # the LR of the last update (a cooldown branch starts from it)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Trainer:
        rt = setup_runtime(cfg)
        lock = ckpt_lib.RunLock(Path(cfg.run_dir))
        notes = [lock.acquire_on_rank0(rt.device)]  # one training per run_dir
        try:
            config = model_config(cfg)
            check_positions(cfg, config)  # the quick refusals before the (possibly long) tokenization
            cfg.data.check_corpora_listed()
            target, note = ckpt_lib.start_target(Path(cfg.run_dir), cfg.checkpoint, cfg.resume, cfg.optimizer.lr)
            tokenizer, dataset = prepare_data(cfg, rt)
            later = prepare_stages(cfg, rt, tokenizer, dataset)
            for _, ds in later:
                check_token_ids(tokenizer, ds, config.vocab_size)
            check_token_ids(tokenizer, dataset, config.vocab_size)
            scratch = target is None and not cfg.init_from
            model = build_training_model(cfg, rt, config, seed=cfg.training.seed if scratch else None)
            trainer = cls(cfg, rt, tokenizer, dataset, model, build_optimizer(model, cfg.optimizer, rt.device), later)
            trainer.lock = lock
            for line in [*notes, note] if rt.is_main else ():
                if line:
                    console(line)
            if target is not None:
                trainer.resume(target)
            elif cfg.init_from and cfg.schedule.decay_only:
                trainer.branch_from(Path(cfg.init_from))
            elif cfg.init_from:
                trainer.init_from(Path(cfg.init_from))
        except BaseException:
            lock.release()
            raise
        return trainer

    # ---- start: resume or init_from -----------------------------------------------------------------------
    def resume(self, target: Path) -> None:
        """Everything from a checkpoint of this run: weights, optimizer, data position, counters, RNG."""
        saved = ckpt_lib.read_trainer_state(target)
        diffs = shape_changes(ckpt_lib.saved_model_config(target), self.model_config)
        if diffs:
            raise UserError(f"cannot resume from {target}: its model has another shape ({'; '.join(diffs)}). "
                            "Resume with the run's model settings, or start a new run_dir with init_from pointing "
                            "at the checkpoint")
        if self.rt.is_main:  # resuming before the latest checkpoint abandons the later ones: move them aside
            for d in ckpt_lib.set_aside_later(self.checkpointer.root, saved["step"]):
                console(f"moved {d.name} to {d.parent}: it follows the checkpoint this run resumes from")
            for d in self.checkpointer.prune():  # retention again, in case a run died between save and prune
                console(f"deleted {d.name}: beyond checkpoint.keep_last / keep_every")
        pdist.barrier()
        state = ckpt_lib.load_checkpoint(target, self.model, self.optimizer)
        self.loader.load_state_dict(state["data"], new_stage=self.cfg.data.new_stage)
        self.step, self.nonfinite_total = state["step"], state.get("nonfinite_total", 0)
        self.nonfinite_in_a_row, self.recovering = state.get("nonfinite_in_a_row", 0), state.get("recovering", 0)
        self.streak_start = state.get("streak_start", 0)
        self.spikes.load_state_dict(state)
        self.final_validation = state.get("validation")
        self.last_lr = state.get("lr")
        self._resume_branch(target, state)
        self.start_mode = f"resumed from {target} at step {self.step}"

    def _resume_branch(self, target: Path, state: dict[str, Any]) -> None:
        """A cooldown branch resumes as one; a run that is none is not turned into one."""
        if state.get("branch"):
            if not self.cfg.schedule.decay_only:
                raise UserError(f"{target} belongs to a cooldown branch (of {state['branch']['source']}); resume "
                                "it with schedule.decay_only = true, as it was started")
            self.branch = Branch(**state["branch"])
        elif self.cfg.schedule.decay_only:
            raise UserError(f"schedule.decay_only: run_dir {self.run_dir} holds checkpoints of a run that is no "
                            f"cooldown branch ({target}); a branch goes into a run_dir of its own, e.g. "
                            f"--run_dir={self.run_dir}-cooldown with --init_from={target}")

    def _saved_lr(self, state: dict[str, Any]) -> float:
        """The LR of a checkpoint's last update: recorded in its trainer state, else its optimizer's groups."""
        lr = state.get("lr")
        return float(lr if lr is not None else self.optimizer.param_groups[0]["lr"])

    def branch_from(self, src: Path) -> None:
        """A cooldown branch (schedule.decay_only): weights, optimizer state (AdamW moments and step counts), step
        count and data position of another run's checkpoint; the LR decays from its last step's to min_lr."""
        if ckpt_lib.is_hf_dir(src):
            raise UserError(f"schedule.decay_only: init_from = {src} is a Hugging Face directory, which holds no "
                            "optimizer state to continue. Branch from a moecpt checkpoint (RUN/checkpoints/step_N), "
                            "or drop schedule.decay_only to start afresh from these weights")
        ckpt = ckpt_lib.find_checkpoint(src)
        if ckpt is None:
            raise UserError(f"schedule.decay_only: init_from = {src} is not a moecpt checkpoint; name one, e.g. "
                            "RUN/checkpoints/step_00002000")
        saved = ckpt_lib.read_trainer_state(ckpt)
        if saved["step"] >= self.cfg.training.steps:
            raise UserError(f"schedule.decay_only: {ckpt} is at step {saved['step']}, so training.steps "
                            f"({self.cfg.training.steps}) leaves no step to decay over; the branch runs steps "
                            f"{saved['step'] + 1}..training.steps, e.g. --training.steps="
                            f"{saved['step'] + max(1, saved['step'] // 5)}")
        state = ckpt_lib.load_checkpoint(ckpt, self.model, self.optimizer)
        self.loader.load_state_dict(state["data"], new_stage=self.cfg.data.new_stage)
        self.step = state["step"]
        self.branch = Branch(self.step, self._saved_lr(state), str(ckpt))
        self.last_lr = self.branch.lr
        o = self.cfg.optimizer
        self.start_mode = (f"cooldown branch of {ckpt} at step {self.step}: its weights, optimizer state and data "
                           f"position; LR {self.branch.lr:.3g} -> {o.min_lr:.3g} ({self.cfg.schedule.decay}) over "
                           f"steps {self.step + 1}..{self.cfg.training.steps}")

    def init_from(self, src: Path) -> None:
        """Weights only (continual pre-training): from a Hugging Face directory or a moecpt checkpoint. Every
        rank reads only the parts of each tensor its shards hold, one tensor at a time: no rank holds the
        whole model, and nothing is broadcast."""
        ckpt_lib.load_model_weights(src, self.model)
        self.start_mode = f"initialised from {src} (weights only: fresh optimizer, schedule and data)"

    # ---- one optimizer step -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """Forward/backward over the accumulated micro-batches, clip, and (if all is finite) step. One host
        read-back per step (loss, gradient norm, stop signal); the rest of the record only on logging steps."""
        cfg = self.cfg
        batches = [to_device(self.loader.next_batch(), self.rt.device) for _ in range(self.accum)]
        n_corpora, dev = len(self.loader.dataset.corpora), self.rt.device  # the stage these batches are of
        sums = StepSums(torch.zeros(n_corpora, device=dev), torch.zeros(n_corpora, device=dev), 0)
        losses = torch.zeros(4, device=dev)  # summed CE (nats), summed lb loss, summed z loss, summed MTP CE
        mtp = False  # whether the model trains a multi-token prediction loss (DeepSeek-V3 with mtp_loss_coef > 0)
        ce_weight = self.rt.world / self.tokens_per_step  # gradients are averaged over the ranks
        self.model.train()
        for i, b in enumerate(batches):
            if cfg.parallel.accumulate_unsharded:
                par.set_accumulating(self.model, i < len(batches) - 1)
            with self.rt.compute():
                out = self.model(**model_inputs(b, cfg.model.intra_doc_attention))
                out.objective(ce_weight, 1.0 / self.accum).backward()
            with torch.no_grad():
                mtp = out.mtp_loss is not None
                mtp_sum = out.mtp_loss if mtp else out.z_loss.new_zeros(())
                losses += torch.stack([out.token_loss.sum(), out.aux_loss, out.z_loss, mtp_sum]).detach()
                per_seq = out.token_loss.detach().sum(dim=1)
                sums.corpus_loss.index_add_(0, b["corpus"], per_seq)
                sums.corpus_tokens.index_add_(0, b["corpus"], torch.full_like(per_seq, out.token_loss.shape[1]))
                sums.expert_counts += out.expert_counts.detach()
        grad_norm = par.clip_grad_norm_(self.model.parameters(), cfg.optimizer.grad_clip or float("inf"))
        stop = pdist.all_reduce(torch.tensor([float(self._stop_signal or 0)], device=dev), op="max")
        ce_sum, lb, z, mtp_ce, gnorm, signum = torch.cat([pdist.all_reduce(losses), grad_norm.reshape(1), stop]).tolist()
        ce = ce_sum / self.tokens_per_step
        lr = lr_at(self.step, cfg.training.steps, cfg.optimizer, cfg.schedule, self.branch)
        finite = math.isfinite(ce) and math.isfinite(gnorm)
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.last_lr = lr
            self._update_router_bias(sums)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._count_nonfinite(finite)
        self.step_sums = sums
        # Every rank leaves the loop on the value all of them read in the same collective: a signal that
        # lands on one rank after it is read is acted on at the next step, by all ranks together.
        self._agreed_stop = int(signum) or None
        per_pass = self.accum * self.rt.world
        record = {"step": self.step, "loss": ce, "lb_loss": lb / per_pass, "z_loss": z / per_pass, "lr": lr,
                  "grad_norm": gnorm, "tokens": self.tokens_per_step, "skipped": not finite,
                  "samples_consumed": self.loader.state.samples_consumed, "spike": self.spikes(ce)}
        if mtp:  # the MTP cross-entropy (mean over the extra depths) per target token, before mtp_loss_coef
            record["mtp_loss"] = mtp_ce / self.tokens_per_step
        return record

    def _count_nonfinite(self, finite: bool) -> None:
        """The streak counters; a streak's first step protects the newest checkpoint before it from pruning."""
        if finite:
            self.nonfinite_in_a_row, self.recovering = 0, max(self.recovering - 1, 0)
            return
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        self.recovering = self.cfg.checkpoint.recovery_steps
        if self.nonfinite_in_a_row == 1:
            self.streak_start = self.step
            self.checkpointer.protect_before(self.step)

    def _update_router_bias(self, sums: StepSums) -> None:
        """Aux-loss-free balancing: move each router's selection bias by the step's global expert load."""
        rate = self.model_config.router_bias_update_rate
        if rate > 0:
            pdist.all_reduce(sums.expert_counts)
            sums.counts_global = True
            update_router_bias(self.model, sums.expert_counts, rate)

    def expert_record(self, sums: StepSums) -> dict[str, Any]:
        """The logging step's per-corpus losses and expert load, summed over ranks (one read-back)."""
        for t in (sums.corpus_loss, sums.corpus_tokens) + (() if sums.counts_global else (sums.expert_counts,)):
            pdist.all_reduce(t)
        record = self.stage_record()
        for name, loss, n in zip([c.name for c in self.loader.dataset.corpora], sums.corpus_loss.tolist(),
                                 sums.corpus_tokens.tolist(), strict=True):
            if n > 0:
                record[f"loss/{name}"] = loss / n
        counts = sums.expert_counts
        load = counts / counts.sum(dim=1, keepdim=True).clamp_min(1) * counts.shape[1]
        record["expert_load_max"] = load.max(dim=1).values.tolist()  # per layer: busiest expert / mean
        record["expert_idle"] = (counts == 0).sum(dim=1).tolist()  # per layer: experts with no token
        record["expert_counts"] = counts.tolist()
        biases = [b for n, b in self.model.named_buffers() if n.endswith("e_score_correction_bias")]
        if biases:
            record["router_bias_norm"] = torch.stack([b.norm() for b in biases]).tolist()  # per MoE layer
        return record

    def stage_record(self) -> dict[str, Any]:
        """With data stages: the current stage and the realised share of each corpus in it so far."""
        if len(self.loader.stages) == 1:
            return {}
        in_stage = self.loader.state.samples_consumed - self.loader.state.stage_start
        counts = self.loader.dataset.corpus_counts(in_stage)
        record: dict[str, Any] = {"data_stage": self.loader.stage}
        for c, n in zip(self.loader.dataset.corpora, counts.tolist(), strict=True):
            record[f"stage_share/{c.name}"] = n / max(1, in_stage)
        return record

    def mixture_report(self) -> list[dict[str, Any]]:
        """Per data stage: its steps and each corpus's weight, realised share and passes over the whole run."""
        g, total = self.cfg.training.global_batch, self.cfg.training.steps
        out = []
        for k, stage in enumerate(self.loader.stage_report(total * g)):
            mixture = self.cfg.data.mixture if k == 0 else self.cfg.data.stages[k - 1].mixture
            out.append({"stage": k, "start_step": stage["start_sample"] // g, "end_step": stage["end_sample"] // g,
                        "mixture": mixture, "rows": stage["rows"]})
        return out

    def schedule_record(self) -> dict[str, Any]:
        """The planned LR schedule (at most ~1000 points), its phases and the branch, for plots and reports."""
        cfg, total = self.cfg, self.cfg.training.steps
        first = self.branch.step if self.branch else 0
        stride = max(1, (total - first) // 1000)
        points = sorted({*range(first, total, stride), total - 1, *(p[1] for p in phases(total, cfg.schedule,
                                                                                         self.branch))})
        return {"kind": "cooldown branch" if self.branch else cfg.schedule.kind, "decay": cfg.schedule.decay,
                "steps": total, "phases": phases(total, cfg.schedule, self.branch),
                "branch": dataclasses.asdict(self.branch) if self.branch else None,
                "planned": [[s + 1, lr_at(s, total, cfg.optimizer, cfg.schedule, self.branch)] for s in points
                            if first <= s < total]}

    # ---- the loop -----------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        steps = self.cfg.training.steps
        log = self._open_log()
        reason, last = "finished", {}
        with self._signals():
            try:
                while self.step < steps:
                    record = self.train_step()
                    is_last = self.step == steps
                    log.step(self.step, record["loss"], record["tokens"], self._messages(record))
                    val = self.validator(self.model) if self._validation_due(is_last) else {}
                    if log.is_log_step(self.step):
                        record |= self.expert_record(self.step_sums) | val
                        log.log(record, self.rt.world, self._peak_memory())
                    elif val:
                        log.metrics.log({"step": self.step, **val})
                    last = record
                    if stop := self._stop_reason():
                        reason = stop
                        break
                    if self.checkpointer.due(self.step, is_last) and self._may_save():
                        self.save()
                result = self._finish(reason, last, log)
                self.checkpointer.wait()  # an asynchronous checkpoint is complete before the run ends
                return result
            finally:
                log.close()
                self.lock.release()

    def _stop_reason(self) -> str:
        if self.nonfinite_in_a_row >= self.cfg.training.max_nonfinite_in_a_row:
            return f"{self.nonfinite_in_a_row} non-finite steps in a row"
        if self._agreed_stop is not None:
            return f"signal {signal.Signals(self._agreed_stop).name}"
        return ""

    def _may_save(self) -> bool:
        """No checkpoint during a non-finite streak, nor until checkpoint.recovery_steps finite steps follow
        it: a checkpoint written then may hold diverged weights and push a good one out of the retention."""
        if self.nonfinite_in_a_row == 0 and self.recovering == 0:
            return True
        if self.rt.is_main:
            why = (f"in a non-finite streak since step {self.streak_start}" if self.nonfinite_in_a_row
                   else f"{self.recovering} more finite step(s) needed after the non-finite streak of step "
                        f"{self.streak_start}")
            console(f"step {self.step}: no checkpoint written ({why})")
        return False

    def _validation_due(self, is_last: bool) -> bool:
        interval = self.cfg.logging.val_interval
        return bool(interval) and self.step % interval == 0 and not is_last

    def _messages(self, record: dict[str, Any]) -> list[str]:
        out = []
        if record["skipped"]:
            out.append(f"step {self.step}: non-finite loss or gradient; step skipped "
                       f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in all)")
        if record["spike"]:
            out.append(f"step {self.step}: loss spike {record['loss']:.3f} (recent median {self.spikes.baseline:.3f})")
        return out

    def _peak_memory(self) -> float | None:
        if self.rt.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.rt.device) / 2**30

    def _open_log(self) -> RunLogger:
        cfg = self.cfg
        if self.rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(cfg))
            write_json(self.run_dir / SCHEDULE_FILE, self.schedule_record())
            write_json(self.run_dir / DATA_STAGES_FILE, {"global_batch": cfg.training.global_batch,
                                                         "stages": self.mixture_report()})
            ckpt_lib.clear_stop_record(self.run_dir)  # this run starts as its start message said
            for line in self._header():
                console(line)
        metrics = MetricsLogger(self.run_dir, self.rt.is_main, resume_step=self.step,
                                tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
                                config=dataclasses.asdict(cfg))
        peak = gpu_peak_tflops(torch.cuda.get_device_name(self.rt.device)) if self.rt.device.type == "cuda" else None
        return RunLogger(self.run_dir, self.rt.is_main, self.step, cfg.training.steps, cfg.logging.interval, metrics,
                         model_flops_per_token(self.model_config, cfg.data.seq_len), peak, cfg.logging.progress)

    def _header(self) -> list[str]:
        cfg, rt, m = self.cfg, self.rt, self.model
        lines = [f"moecpt train: {self.start_mode}", f"config ({self.run_dir / 'config.toml'}):\n" + to_toml(cfg),
                 f"model: {m.num_params() / 1e6:.1f}M parameters ({m.num_params(active=True) / 1e6:.1f}M active), "
                 f"device {rt.device}, {'bf16 autocast' if rt.amp_dtype else 'fp32'}, world size {rt.world}"
                 f"{f' (FSDP x expert parallel {cfg.parallel.expert_parallel})' if rt.world > 1 else ''}, "
                 f"{self.accum} micro-batch(es) of {cfg.training.micro_batch} per step, "
                 f"{'Triton' if rt.fused_kernels else 'PyTorch'} kernels"]
        stages = self.mixture_report()
        for stage in stages:
            if len(stages) > 1:
                lines.append(f"data stage {stage['stage']}: steps {stage['start_step'] + 1}..{stage['end_step']}, "
                             f"mixture {stage['mixture']!r}")
            for row in stage["rows"]:
                lines.append(f"data: {row['name']:>12s} weight {row['weight']:.3f} realised share {row['share']:.3f} "
                             f"({row['train_tokens']:,} training tokens, {row['epochs']:.2f} epochs planned)")
        return lines

    @contextlib.contextmanager
    def _signals(self):
        """SIGTERM and SIGINT end the loop at the next step boundary (on every rank) with a checkpoint."""
        def on_signal(signum, frame):
            self._stop_signal = signum

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ---- the end ------------------------------------------------------------------------------------------
    def _finish(self, reason: str, last: dict[str, Any], log: RunLogger) -> dict[str, Any]:
        # A run restarted after it had finished has its last checkpoint, with the final validation in it.
        path = self.checkpointer.existing(self.step)
        if reason == "finished" and self.nonfinite_in_a_row:  # its last weights are those of a diverged run
            reason = f"ended with {self.nonfinite_in_a_row} non-finite steps in a row"
        if reason != "finished":
            return self._stop_early(reason, last, path)
        val = self.final_validation if path is not None and self.final_validation is not None else None
        if val is None:
            val = self.validator(self.model)
            log.metrics.log({"step": self.step, **val}) if val else None
        if path is None:
            self.final_validation = val
            path = self.save()
        if val and self.rt.is_main:
            console("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        result = {"reason": reason, "step": self.step, "checkpoint": str(path), "last": last, "validation": val}
        if self.cfg.checkpoint.export_at_end:
            exported = export_sharded(self.model, self.rt.world, self.tokenizer.path, self.run_dir / "hf")
            if exported is not None:
                result["export"] = str(exported)
                console(f"exported a Hugging Face model to {result['export']}")
        return result

    def _stop_early(self, reason: str, last: dict[str, Any], path: Path | None) -> dict[str, Any]:
        """A signal: a checkpoint (unless the weights may have diverged), then resume with the same command. A
        non-finite stop: no checkpoint, and a record of it that the next run reads (`start_target`)."""
        healthy = self.nonfinite_in_a_row == 0 and self.recovering == 0
        if path is None and healthy:
            path = self.save()
        result = {"reason": reason, "step": self.step, "checkpoint": str(path) if path else None, "last": last}
        if healthy:
            console(f"stopped at step {self.step} ({reason}); checkpoint saved to {path}; "
                    "run the same command again to resume") if self.rt.is_main else None
            return result
        good = ckpt_lib.newest_valid_checkpoint(self.checkpointer.root)
        good = good if good is not None and int(good.name.split("_")[1]) < self.streak_start else None
        if "non-finite steps in a row" in reason and self.rt.is_main:
            stop = ckpt_lib.StopRecord(self.step, self.streak_start, self.nonfinite_in_a_row,
                                       str(good or ""), self.cfg.optimizer.lr)
            ckpt_lib.write_stop_record(self.run_dir, stop)
            console(f"stopped at step {self.step} ({reason}): {stop.describe()}. {stop.way_back()}")
        elif self.rt.is_main:
            console(f"stopped at step {self.step} ({reason}) without a checkpoint: the run is in or just after a "
                    f"non-finite streak (step {self.streak_start}); the latest good checkpoint is {good}")
        result["checkpoint"] = str(good) if good else None
        return result

    def save(self) -> Path:
        state = {"data": self.loader.state_dict(), "nonfinite_total": self.nonfinite_total,
                 "nonfinite_in_a_row": self.nonfinite_in_a_row, "recovering": self.recovering,
                 "streak_start": self.streak_start, **self.spikes.state_dict(), "world_size": self.rt.world,
                 "tokenizer": self.tokenizer.path, "model_type": family_of(self.model_config).model_type,
                 "model_config": dataclasses.asdict(self.model_config), "validation": self.final_validation,
                 "lr": self.last_lr, "branch": dataclasses.asdict(self.branch) if self.branch else None}
        return self.checkpointer.save(self.step, self.model, self.optimizer, state)


SCHEDULE_FILE = "schedule.json"  # RUN_DIR/schedule.json: the planned LR schedule (Trainer.schedule_record)
DATA_STAGES_FILE = "data_stages.json"  # RUN_DIR/data_stages.json: the data stages' realised shares


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))


def prepare_stages(cfg: TrainConfig, rt: Runtime, tokenizer: Tokenizer,
                   first: MixtureDataset) -> list[tuple[int, MixtureDataset]]:
    """The datasets of data.stages, each from its first global sample (rank 0 tokenizes new sources first)."""
    if not cfg.data.stages:
        return []
    if not rt.is_main:
        pdist.barrier()
    mixtures = [(s.start_step * cfg.training.global_batch,
                 resolve_mixture(s.mixture, cfg.data.cache_dir, tokenizer=tokenizer.path, sources=cfg.data.corpora))
                for s in cfg.data.stages]
    if rt.is_main:
        pdist.barrier()
    return stage_datasets(first, mixtures)[1:]


def validation_corpora(first: MixtureDataset, later: list[tuple[int, MixtureDataset]]) -> MixtureDataset:
    """A dataset holding every corpus of every stage once, for validation (the held-out documents of a corpus
    depend only on its shards, not on the mixture)."""
    if not later:
        return first
    entries, seen = [], set()
    for ds in [first, *(d for _, d in later)]:
        for e in ds.entries:
            if e.name not in seen:
                seen.add(e.name)
                entries.append((e.name, 1.0, e.prefixes))
    return MixtureDataset(entries, first.seq_len, first.seed, first.allow_repeat, first.valid_fraction,
                          first.valid_max_documents, first.block_size)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as `cfg` says; under torchrun every rank calls this (the process group is set up and torn down)."""
    trainer = Trainer.from_config(cfg)
    try:
        return trainer.train()
    finally:
        if trainer.rt.owns_process_group:
            pdist.destroy_distributed()
