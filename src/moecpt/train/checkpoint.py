"""Sharded, atomic, resumable checkpoints with `torch.distributed.checkpoint` (DCP).

A checkpoint is a directory `RUN_DIR/checkpoints/step_00001000/` holding the DCP files of the model and the
optimizer (keyed by parameter name, so it loads at another world size), `trainer_state.json` (step, data
loader state, counters), one `rng_rank{r}.pt` per rank and, written last, the marker `COMPLETE`. It is written
under `step_XXXXXXXX.tmp` and renamed when complete, so a crash while saving leaves the previous checkpoint
as the latest one and never a directory that looks valid.

Validity is checked, not assumed: `MANIFEST.json` (written just before the marker) records every file's size
and a sampled CRC-32 (its first and last 64 KiB), and `verify_checkpoint` compares them, so a truncated or
missing shard, `.metadata` or `trainer_state.json` is found before anything is loaded. Resuming, `export` and
`eval` skip such a checkpoint for the newest valid one, with a warning that names what is wrong.

Pruning is atomic (a checkpoint is renamed to `step_XXXXXXXX.deleting` before its files are deleted) and
never deletes the checkpoints `protected.json` names: the newest one before a non-finite streak began.
A non-finite stop writes `RUN_DIR/nonfinite_stop.json` (see `StopRecord`), and `RunLock` keeps a second
training off a run directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import socket
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
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
from moecpt.model.auto import load_hf_sharded
from moecpt.model.families import family
from moecpt.parallel.dist import all_reduce, barrier, is_initialized, new_group, rank

COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
MANIFEST = "MANIFEST.json"
PROTECTED = "protected.json"
STOP_RECORD = "nonfinite_stop.json"
LOCK_FILE = "train.lock"
_SAMPLE = 64 * 1024  # bytes read from each end of a file for its sampled CRC-32
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
    """Write the checkpoint of `step` atomically (every rank calls this) and return its directory. A full disk
    is reported as such (the device and the path), with the partial `.tmp` removed."""
    return finish_save(start_save(ckpt_root, step, model, optimizer, trainer_state))


@dataclass
class PendingSave:
    """A checkpoint being written under its `.tmp` name; `future` is DCP's background write (None: written)."""

    root: Path
    step: int
    tmp: Path
    trainer_state: dict[str, Any]
    future: Any = None

    @property
    def final(self) -> Path:
        return step_dir(self.root, self.step)


def start_save(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               trainer_state: dict[str, Any], asynchronous: bool = False, group: Any = None) -> PendingSave:
    """Every rank writes its shards of `step`'s state under `step_XXXXXXXX.tmp`: at once, or `asynchronous`ly
    in the background once DCP has copied the state to host memory, with the collectives of that write on
    `group` (a process group of its own, so that they never interleave with training's)."""
    tmp = step_dir(ckpt_root, step).with_name(f"step_{step:08d}.tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    pending = PendingSave(Path(ckpt_root), step, tmp, trainer_state)
    with _no_space_reported(tmp):
        torch.save(_rng_state(), tmp / f"rng_rank{rank()}.pt")
        with _single_process_ok():
            if not asynchronous:
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
            else:  # the background thread warns outside any catch_warnings: silence that one message for good
                warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")
                response = dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp),
                                          process_group=group, no_dist=not is_initialized())
                pending.future = getattr(response, "upload_completion", response)
    return pending


def finish_save(pending: PendingSave) -> Path:
    """Wait for the shards (every rank calls this), then rank 0 writes the trainer state, the file records and
    the COMPLETE marker and renames the `.tmp` into place: a checkpoint is valid only once all of it is on disk."""
    tmp, final = pending.tmp, pending.final
    with _no_space_reported(tmp):
        if pending.future is not None:
            pending.future.result()
    barrier()
    if rank() == 0:
        with _no_space_reported(tmp):
            _write_json(tmp / STATE_FILE, {"step": pending.step, **pending.trainer_state})
            _write_json(tmp / MANIFEST, {"files": file_records(tmp)})
            (tmp / COMPLETE).write_text(f"step {pending.step}\n")
            _fsync_dir(tmp)
        if final.exists():
            _delete_atomically(final)
        os.replace(tmp, final)
        _fsync_dir(pending.root)
    barrier()
    return final


def is_no_space(e: BaseException, path: Path | None = None) -> bool:
    """Whether an exception (or one it was raised from) is a full disk: ENOSPC or its message; or, since
    torch.save's C++ writer reports a full disk as a bare `RuntimeError: [enforce fail at ...]`, an OSError
    or RuntimeError while under 16 MiB are free where `path` is."""
    if path is not None and isinstance(e, OSError | RuntimeError):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(_existing_parent(path)).free < 16 * 2**20:
                return True
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _existing_parent(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def device_of(path: Path) -> str:
    """The device (and mount point) holding `path`, as /proc/mounts names it; the mount point alone elsewhere."""
    mount = _existing_parent(path)
    while not os.path.ismount(mount):
        mount = mount.parent
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, point = line.split()[:2]
            if point == str(mount):
                return f"{dev} (mounted at {mount})"
    except OSError:
        pass
    return f"the device mounted at {mount}"


@contextlib.contextmanager
def _no_space_reported(tmp: Path):
    """Turn a full disk while writing `tmp` into a UserError that says so, after removing `tmp`."""
    try:
        yield
    except Exception as e:
        if not is_no_space(e, tmp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"no space left on {device_of(tmp)} while writing {tmp} (removed); free space there or "
                        "point run_dir elsewhere, then run the same command again: it resumes from the latest "
                        "checkpoint") from e


def _sampled_crc(path: Path, size: int) -> int:
    with path.open("rb") as f:
        if size <= 2 * _SAMPLE:
            return zlib.crc32(f.read())
        crc = zlib.crc32(f.read(_SAMPLE))
        f.seek(size - _SAMPLE)
        return zlib.crc32(f.read(_SAMPLE), crc)


def file_records(ckpt: Path) -> dict[str, dict[str, int]]:
    """Size and sampled CRC-32 of every file of a checkpoint directory (but the manifest and the marker)."""
    out = {}
    for p in sorted(ckpt.rglob("*")):
        rel = p.relative_to(ckpt).as_posix()
        if p.is_file() and rel not in (MANIFEST, COMPLETE):
            size = p.stat().st_size
            out[rel] = {"size": size, "crc32": _sampled_crc(p, size)}
    return out


def verify_checkpoint(ckpt: Path) -> list[str]:
    """What is wrong with a checkpoint directory (empty: nothing found). Checks the marker, the trainer state,
    DCP's `.metadata` and, when the checkpoint has a manifest, every file's size and sampled CRC-32."""
    ckpt = Path(ckpt)
    if not (ckpt / COMPLETE).is_file():
        return [f"no {COMPLETE} marker"]
    problems = []
    for name in (STATE_FILE, ".metadata"):
        if not (ckpt / name).is_file():
            problems.append(f"{name} is missing")
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        manifest = {}  # written before manifests existed: the checks above are all there is
    except (ValueError, KeyError) as e:
        return problems + [f"{MANIFEST} is unreadable ({e})"]
    for rel, want in manifest.items():
        p = ckpt / rel
        if not p.is_file():
            if f"{rel} is missing" not in problems:
                problems.append(f"{rel} is missing")
            continue
        size = p.stat().st_size
        if size != want["size"]:
            problems.append(f"{rel} has {size} bytes, {want['size']} when written")
        elif _sampled_crc(p, size) != want["crc32"]:
            problems.append(f"{rel} differs from what was written (CRC-32)")
    if not problems:
        try:
            json.loads((ckpt / STATE_FILE).read_text())
        except ValueError as e:
            problems.append(f"{STATE_FILE} is not valid JSON ({e})")
    return problems


def check_checkpoint(ckpt: Path) -> None:
    """Raise a UserError naming what is wrong with `ckpt`, if anything."""
    problems = verify_checkpoint(ckpt)
    if problems:
        raise UserError(f"{ckpt} is not a valid moecpt checkpoint: {'; '.join(problems)}. Use an earlier "
                        f"checkpoint (they are in {Path(ckpt).parent})")


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
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError):
        check_checkpoint(ckpt)
        raise


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG states; returns the trainer state."""
    check_checkpoint(ckpt)
    state = read_trainer_state(ckpt)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    rng = ckpt / f"rng_rank{rank()}.pt"
    if rng.is_file():  # absent when resuming on more ranks than saved: those ranks keep their seeded state
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


def newest_valid_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint that passes `verify_checkpoint`; each newer one that does not is named
    in a warning, with what is wrong with it."""
    for _, d in reversed(list_checkpoints(ckpt_root)):
        problems = verify_checkpoint(d)
        if not problems:
            return d
        if rank() == 0:
            warnings.warn(f"skipping the damaged checkpoint {d}: {'; '.join(problems)}", stacklevel=2)
    return None


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint `path` names: itself when complete (a UserError if it is damaged), or a run directory's
    newest valid one (None: neither)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        check_checkpoint(path)
        return path
    return newest_valid_checkpoint(path / "checkpoints")


def is_hf_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file() and not (Path(path) / COMPLETE).is_file()


def saved_model_config(ckpt: Path):
    """The model config a checkpoint was trained with."""
    state = read_trainer_state(ckpt)
    return family(state.get("model_type"), str(ckpt / STATE_FILE)).config_cls(**state["model_config"])


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_source(path: str | Path) -> Path:
    """What `load_model` reads for `path`: a Hugging Face directory itself, or the complete checkpoint it names
    (a run directory: its newest valid one); a UserError naming what was expected otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; expected a Hugging Face model directory (config.json + "
                        "*.safetensors), a moecpt checkpoint or a training run directory")
    if is_hf_dir(path):
        return path
    ckpt = find_checkpoint(path)
    if ckpt is None:
        what = "a run directory without a complete checkpoint under checkpoints/" if (path / "checkpoints").is_dir() \
            else "no config.json and no checkpoint there"
        raise UserError(f"{path}: {what}; expected a Hugging Face model directory (as `moecpt export` writes), "
                        "a moecpt checkpoint or a training run directory")
    return ckpt


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
    src = model_source(path)
    if is_hf_dir(src):
        return from_pretrained(src, dtype=dtype, device=device).eval()
    model = build_model(saved_model_config(src), device="cpu")
    load_model_weights(src, model)
    return model.to(device=device, dtype=dtype).eval()


def load_model_weights(src: Path, model: torch.nn.Module) -> None:
    """Only the model weights (for init_from and export) of a Hugging Face directory or a moecpt checkpoint,
    into a model on one device, FSDP-sharded or expert-parallel (every rank calls it). Nothing is gathered:
    each rank reads only the parts of each tensor that its shards hold (DCP's plan from the placements), one
    tensor at a time: memory-mapped slices of the safetensors files, or the DCP checkpoint's chunks."""
    src = Path(src)
    if is_hf_dir(src):
        load_hf_sharded(model, src)
        return
    if not (src / COMPLETE).is_file():
        raise UserError(f"{src} is not a complete moecpt checkpoint (no {COMPLETE} marker)")
    check_checkpoint(src)
    model_sd = get_model_state_dict(model, options=StateDictOptions())  # the local shards, not a gathered copy
    with _single_process_ok():
        dcp.load({"model": model_sd}, checkpoint_id=str(src))
    set_model_state_dict(model, model_sd)


class _OnceReadMetadata(FileSystemReader):
    """A DCP reader that reads `.metadata` once, for many one-tensor loads."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self._metadata = None

    def read_metadata(self, *args: Any, **kwargs: Any):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


def checkpoint_tensors(ckpt: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The full model tensors `names` of a checkpoint saved at any world size and EP layout, read one at a
    time in this process (each from its saved chunks alone): never the whole model."""
    check_checkpoint(ckpt)
    reader = _OnceReadMetadata(ckpt)
    stored = reader.read_metadata().state_dict_metadata
    for name in names:
        meta = stored.get(f"model.{name}")
        if meta is None:
            raise UserError(f"{ckpt}: the checkpoint has no tensor {name}; it was written by another model")
        t = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        with _single_process_ok():
            dcp.load({"model": {name: t}}, storage_reader=reader, no_dist=True)
        yield name, t
        del t  # released before the next tensor is allocated


def set_aside_later(ckpt_root: Path, step: int) -> list[Path]:
    """Move complete checkpoints after `step` into `ckpt_root/abandoned/` (not deleted: they are the user's),
    so that a run resumed from an earlier checkpoint is not later resumed from the run it abandoned; damaged
    ones (see `verify_checkpoint`) into `ckpt_root/damaged/`."""
    moved = []
    for s, d in list_checkpoints(ckpt_root):
        if s > step:
            dest = ckpt_root / ("damaged" if verify_checkpoint(d) else "abandoned") / d.name
            dest.parent.mkdir(exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(d, dest)
            moved.append(dest)
    return moved


class Checkpointer:
    """The checkpoints of one run: where to resume, saving (and then pruning) at a step."""

    def __init__(self, run_dir: Path, cfg: CheckpointSection):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.cfg = cfg
        self.pending: PendingSave | None = None  # an asynchronous save not finished yet
        self._async_group: Any = None

    def resume_target(self, mode: str) -> Path | None:
        """`resume` resolved: never (refused while checkpoints exist: they would be overwritten), auto (the newest
        valid checkpoint, if any) or a checkpoint path (which must be valid)."""
        if mode == "never":
            found = list_checkpoints(self.root)
            if found:
                names = ", ".join(d.name for _, d in found)
                raise UserError(f"resume = 'never' but {self.root} holds checkpoints ({names}): a new run there "
                                "would overwrite them and the metrics. Use another run_dir for a new run, "
                                "resume = 'auto' to continue this one, or move the checkpoints away yourself")
            return None
        if mode == "auto":
            return newest_valid_checkpoint(self.root)
        if not (Path(mode) / COMPLETE).is_file():
            raise UserError(f"resume = {mode!r} is not a complete checkpoint directory")
        check_checkpoint(Path(mode))
        return Path(mode)

    def due(self, step: int, is_last: bool) -> bool:
        return bool(self.cfg.interval) and step % self.cfg.interval == 0 and not is_last

    def existing(self, step: int) -> Path | None:
        path = step_dir(self.root, step)
        return path if (path / COMPLETE).is_file() else None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             state: dict[str, Any]) -> Path:
        """Save `step` and prune. With `checkpoint.async_save` the shards are written in the background and
        the returned directory becomes a valid checkpoint at `wait()` (the next save calls it first)."""
        self.wait()
        if not self.cfg.async_save:
            path = save_checkpoint(self.root, step, model, optimizer, state)
            self.prune()
            return path
        if self._async_group is None and is_initialized():
            self._async_group = new_group()  # gloo, for the background write's collectives alone
        self.pending = start_save(self.root, step, model, optimizer, state, asynchronous=True,
                                  group=self._async_group)
        return self.pending.final

    def wait(self) -> Path | None:
        """Finish an asynchronous save (every rank calls this): records, marker, rename, then pruning."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        path = finish_save(pending)
        self.prune()
        return path

    def prune(self) -> list[Path]:
        """Apply the retention rules (keep_last, keep_every, protected.json); rank 0 deletes."""
        return prune_checkpoints(self.root, self.cfg.keep_last, self.cfg.keep_every)

    def protect_before(self, streak_start: int) -> list[Path]:
        """A non-finite streak began at `streak_start`: keep the newest checkpoint before it from pruning (and
        the one before that too when it was written at the very step before the streak, whose update may
        already have diverged). Replaces the protection of an earlier streak; rank 0 writes it."""
        before = [d for s, d in list_checkpoints(self.root) if s < streak_start]
        keep = before[-1:]
        if keep and int(_STEP_DIR.match(keep[0].name).group(1)) == streak_start - 1:
            keep = before[-2:]
        if rank() == 0 and keep:
            _write_json(self.root / PROTECTED, {"streak_start": streak_start, "keep": [d.name for d in keep]})
        return keep


def protected_names(ckpt_root: Path) -> set[str]:
    try:
        return set(json.loads((ckpt_root / PROTECTED).read_text())["keep"])
    except (OSError, ValueError, KeyError):
        return set()


def _delete_atomically(d: Path) -> None:
    """Rename first (the checkpoint stops being one at once), then delete its files."""
    doomed = d.with_name(d.name + ".deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(d, doomed)
    _fsync_dir(d.parent)
    shutil.rmtree(doomed)


def prune_checkpoints(ckpt_root: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, except every `keep_every`-th step and those
    protected.json names. Each is renamed aside before its files go, so a kill mid-prune never leaves a
    checkpoint with its marker and only some files; leftovers of such a kill are removed here."""
    if rank() != 0:
        return []
    for doomed in ckpt_root.glob("step_*.deleting") if ckpt_root.is_dir() else ():
        shutil.rmtree(doomed, ignore_errors=True)
    found, protected = list_checkpoints(ckpt_root), protected_names(ckpt_root)
    removed = []
    for step, d in found[:-keep_last] if keep_last else found:
        if (keep_every and step % keep_every == 0) or d.name in protected:
            continue
        _delete_atomically(d)
        removed.append(d)
    return removed


# ---- a run that stopped on non-finite steps --------------------------------------------------------------
@dataclass
class StopRecord:
    """Why and where a run stopped on non-finite steps; RUN_DIR/nonfinite_stop.json."""

    step: int  # the step it stopped at
    streak_start: int  # the first non-finite step of the streak
    in_a_row: int
    last_good: str  # the checkpoint to go back to ("" when there is none)
    lr: float  # optimizer.lr of that run

    def describe(self) -> str:
        back = (f"the last good checkpoint is {self.last_good}" if self.last_good
                else "no checkpoint precedes the streak")
        return (f"this run_dir's last run stopped at step {self.step} after {self.in_a_row} non-finite steps in "
                f"a row (from step {self.streak_start}, with optimizer.lr = {self.lr:g}); no checkpoint was "
                f"written during the streak and {back}")

    def way_back(self) -> str:
        lower = f"--optimizer.lr={self.lr / 10:g}"
        if not self.last_good:
            return (f"Rerunning the same command would diverge again. Start again with a lower learning rate, "
                    f"e.g. {lower} (this run_dir starts afresh when optimizer.lr differs)")
        return (f"Rerunning the same command would diverge again. To go back, resume from {self.last_good} with "
                f"a lower learning rate, e.g. {lower} (this run_dir resumes from it when optimizer.lr differs), "
                f"or retry it as it is with --resume={self.last_good}")


def write_stop_record(run_dir: Path, record: StopRecord) -> Path:
    path = Path(run_dir) / STOP_RECORD
    _write_json(path, asdict(record))
    return path


def read_stop_record(run_dir: Path) -> StopRecord | None:
    path = Path(run_dir) / STOP_RECORD
    try:
        return StopRecord(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} is unreadable ({e}); delete it to resume from the latest checkpoint") from None


def clear_stop_record(run_dir: Path) -> None:
    (Path(run_dir) / STOP_RECORD).unlink(missing_ok=True)


def start_target(run_dir: Path, cfg: CheckpointSection, resume: str, lr: float) -> tuple[Path | None, str]:
    """Where a run starts (a checkpoint or None) and what to say about it. After a non-finite stop, `auto`
    with the same learning rate is refused with the way back; another learning rate resumes from the last
    good checkpoint, and an explicit `resume` path is taken as it is."""
    ckpt = Checkpointer(run_dir, cfg)
    stop = read_stop_record(run_dir)
    if stop is None or resume == "never":
        return ckpt.resume_target(resume), ""
    if resume != "auto":
        return ckpt.resume_target(resume), f"{stop.describe()}; resuming from {resume} as asked"
    if lr == stop.lr:
        raise UserError(f"{stop.describe()}. {stop.way_back()}")
    target = Path(stop.last_good) if stop.last_good else None
    if target is not None:
        check_checkpoint(target)
    where = f"from {target}" if target else "from scratch (no checkpoint precedes the streak)"
    return target, f"{stop.describe()}; resuming {where} with optimizer.lr {stop.lr:g} -> {lr:g}"


# ---- one training per run directory ----------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """RUN_DIR/train.lock, created exclusively by the process that trains there (rank 0): it holds the host,
    pid and start time. A lock whose process is gone (same host) is stale and taken over, with a note; a lock
    of a live process, or of another host, stops the run with a message that says how to proceed."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> str:
        """Take the lock; returns a note when a stale one was replaced ("" otherwise)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = ""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                note = self._stale_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
            self.held = True
            return note
        raise UserError(f"{self.path}: could not take the run directory's lock (another process took it first)")

    def _stale_or_refuse(self) -> str:
        try:
            owner = json.loads(self.path.read_text())
            host, pid = owner["host"], int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            owner, host, pid = {}, "", -1
        if owner and host == socket.gethostname() and (pid == os.getpid() or not _pid_alive(pid)):
            self.path.unlink(missing_ok=True)
            return "" if pid == os.getpid() else f"removed the stale lock {self.path} of process {pid}, which is gone"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0))) if owner else "?"
        who = f"process {pid} on {host} (since {since})" if owner else "an unreadable lock file"
        raise UserError(f"another training is using {self.path.parent}: {who} holds {self.path}. Wait for it to "
                        "end, or use another run_dir; if that process is gone (e.g. its node died), delete the "
                        "lock file and run again")

    def acquire_on_rank0(self, device: torch.device) -> str:
        """Rank 0 takes the lock; every rank raises when it could not (rank 0 with the reason)."""
        error, note = None, ""
        if rank() == 0:
            try:
                note = self.acquire()
            except UserError as e:
                error = e
        failed = all_reduce(torch.tensor([float(error is not None)], device=device), op="max").item()
        if error is not None:
            raise error
        if failed:
            raise UserError(f"rank 0 could not take the lock {self.path}; its message says why")
        return note

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
