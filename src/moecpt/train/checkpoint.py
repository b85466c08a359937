"""Sharded, atomic, resumable checkpoints with `torch.distributed.checkpoint` (DCP).

A checkpoint is a directory `RUN_DIR/checkpoints/step_00001000/` holding the DCP files of the model and the
optimizer (keyed by parameter name, so it loads at another world size), `trainer_state.json` (step, data
loader state, counters), one `rng_rank{r}.pt` per rank and, written last, the marker `COMPLETE`. It is written
under `step_XXXXXXXX.tmp` and renamed when complete, so a crash while saving leaves the previous checkpoint
as the latest one and never a directory that looks valid.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from moecpt.config import CheckpointSection
from moecpt.errors import UserError
from moecpt.model import CausalLM, build_model, from_pretrained
from moecpt.model.families import family
from moecpt.parallel.dist import barrier, rank

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns that it assumes one process when torch.distributed is not initialised: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def step_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f"step_{step:08d}"


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for d in ckpt_root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / COMPLETE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any]) -> Path:
    """Write the checkpoint of `step` atomically (every rank calls this) and return its directory."""
    final = step_dir(ckpt_root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{rank()}.pt")
    barrier()
    if rank() == 0:
        _write_json(tmp / STATE_FILE, {"step": step, **trainer_state})
        (tmp / COMPLETE).write_text(f"step {step}\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    barrier()
    return final


def _write_json(path: Path, obj: Any) -> None:
    with path.open("w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    if not (ckpt / COMPLETE).is_file():
        raise UserError(f"{ckpt} is not a complete moecpt checkpoint (no {COMPLETE} marker)")
    return json.loads((ckpt / STATE_FILE).read_text())


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG states; returns the trainer state."""
    state = read_trainer_state(ckpt)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    rng = ckpt / f"rng_rank{rank()}.pt"
    if rng.is_file():  # absent when resuming on more ranks than saved: those ranks keep their seeded state
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint `path` names: itself when complete, or a run directory's latest one (None: neither)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    return latest_checkpoint(path / "checkpoints")


def is_hf_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file() and not (Path(path) / COMPLETE).is_file()


def saved_model_config(ckpt: Path):
    """The model config a checkpoint was trained with."""
    state = read_trainer_state(ckpt)
    return family(state.get("model_type"), str(ckpt / STATE_FILE)).config_cls(**state["model_config"])


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str | Path, dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu") -> CausalLM:
    """The one model loader: a Hugging Face directory, a moecpt checkpoint, or a run directory (its latest
    checkpoint). `dtype`: a torch dtype or its name, "auto" (bf16 on a GPU, else fp32) or None (as stored:
    fp32 for checkpoints); `device` "auto": a GPU when there is one. The model comes in eval mode."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise UserError(f"dtype {dtype!r}: choose float32, bfloat16, float16 or auto")
        dtype = _DTYPES[dtype]
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; expected a Hugging Face model directory (config.json + "
                        "*.safetensors), a moecpt checkpoint or a training run directory")
    if is_hf_dir(path):
        return from_pretrained(path, dtype=dtype, device=device).eval()
    ckpt = find_checkpoint(path)
    if ckpt is None:
        what = "a run directory without a complete checkpoint under checkpoints/" if (path / "checkpoints").is_dir() \
            else "no config.json and no checkpoint there"
        raise UserError(f"{path}: {what}; expected a Hugging Face model directory (as `moecpt export` writes), "
                        "a moecpt checkpoint or a training run directory")
    model = build_model(saved_model_config(ckpt), device="cpu")
    load_model_weights(ckpt, model)
    return model.to(device=device, dtype=dtype).eval()


def load_model_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Only the model weights of a checkpoint (for init_from and export)."""
    if not (ckpt / COMPLETE).is_file():
        raise UserError(f"{ckpt} is not a complete moecpt checkpoint (no {COMPLETE} marker)")
    model_sd = get_model_state_dict(model, options=StateDictOptions())
    with _single_process_ok():
        dcp.load({"model": model_sd}, checkpoint_id=str(ckpt))
    set_model_state_dict(model, model_sd)  # plain or sharded (FSDP / expert-parallel) model alike


def set_aside_later(ckpt_root: Path, step: int) -> list[Path]:
    """Move complete checkpoints after `step` into `ckpt_root/abandoned/` (not deleted: they are the user's),
    so that a run resumed from an earlier checkpoint is not later resumed from the run it abandoned."""
    moved = []
    for s, d in list_checkpoints(ckpt_root):
        if s > step:
            dest = ckpt_root / "abandoned" / d.name
            dest.parent.mkdir(exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(d, dest)
            moved.append(dest)
    return moved


class Checkpointer:
    """The checkpoints of one run: where to resume, saving (and then pruning) at a step."""

    def __init__(self, run_dir: Path, cfg: CheckpointSection):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg

    def resume_target(self, mode: str) -> Path | None:
        """`resume` resolved: never, auto (the latest complete checkpoint, if any), or a checkpoint path."""
        if mode == "never":
            return None
        if mode == "auto":
            return latest_checkpoint(self.root)
        if not (Path(mode) / COMPLETE).is_file():
            raise UserError(f"resume = {mode!r} is not a complete checkpoint directory")
        return Path(mode)

    def due(self, step: int, is_last: bool) -> bool:
        return bool(self.cfg.interval) and step % self.cfg.interval == 0 and not is_last

    def existing(self, step: int) -> Path | None:
        path = step_dir(self.root, step)
        return path if (path / COMPLETE).is_file() else None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> Path:
        path = save_checkpoint(self.root, step, model, optimizer, state)
        prune_checkpoints(self.root, self.cfg.keep_last, self.cfg.keep_every)
        return path


def prune_checkpoints(ckpt_root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, except every `keep_every`-th step."""
    if rank() != 0:
        return []
    found = list_checkpoints(ckpt_root)
    removed = []
    for step, d in found[:-keep_last] if keep_last else found:
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(d)
        removed.append(d)
    return removed
