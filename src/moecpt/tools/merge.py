"""Merging models of one family: a uniform or weighted average of checkpoints, and task arithmetic (a "chat
vector", arXiv 2310.04799: BASE + s * (A - B), e.g. a continually pre-trained model + Instruct - its base).

Inputs are anything `moecpt.train.checkpoint.load_model` reads (Hugging Face directories, moecpt checkpoints,
run directories). The arithmetic is generic over the state dict (every parameter and persistent buffer, tied
ones once), so it holds for every family the model layer has. It streams: every input is checked first
(family, tensor names and shapes, from the config and file headers alone), then each tensor is read from each
input (one tensor per input in memory, never a whole model), merged in float64 and rounded once to float32,
converted to the Hugging Face names and written before the next is read. The result is the correctly rounded
value of the formula, in a fixed order (average: w_1 X_1 + w_2 X_2 + ...; task vector: (A - B) * s + BASE).

The embedding and the LM head (the vocabulary-sized tensors) follow `embeddings`:
- "merge": like every other tensor (shapes must match);
- "shared_rows": merged on the rows every input has (the shared vocabulary: ids below the smallest vocab
  size), the other rows taken from the first (or base) model, as after a vocabulary expansion;
- "skip": taken from the first (or base) model as they are.
Every other tensor must be present in every input with the same shape; the output has the first (or base)
model's config and tokenizer.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moecpt.errors import UserError
from moecpt.model import hf
from moecpt.model.auto import load_config
from moecpt.model.base import CausalLM
from moecpt.model.families import family_of
from moecpt.tools.common import copy_tokenizer_files
from moecpt.train.checkpoint import checkpoint_tensors, is_hf_dir, model_source, saved_model_config
from moecpt.train.export import hf_plan, streamed_writer

EMBEDDING_RULES = ("merge", "shared_rows", "skip")
METADATA = "merge.json"
VOCAB_NAMES = ("embed_tokens.weight", "lm_head.weight")
CHUNK = 1 << 24  # elements merged at a time (128 MiB per float64 copy)


@dataclass(frozen=True)
class TaskVector:
    """BASE + scale * (plus - minus)."""

    base: str | Path
    plus: str | Path
    minus: str | Path
    scale: float = 1.0


def model_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    """Every tensor a merge combines: parameters (tied ones once) and persistent buffers."""
    out = dict(model.named_parameters())
    persistent = set(model.state_dict())
    out |= {n: b for n, b in model.named_buffers() if n in persistent}
    return out


class ModelReader:
    """One merge input, read tensor by tensor in moecpt names (the names and order of `model_tensors`): its
    config and tensor shapes known without reading weights, each tensor read (in its stored dtype) only when
    the iterator of `tensors` comes to it."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.source = model_source(path)
        if is_hf_dir(self.source):
            self.config = load_config(self.source)
            self.adapter = family_of(self.config).adapter_cls(self.config)
            self.files = hf.SafetensorsDir(self.source)
            self.layout = self.adapter.detect_layout(self.files.names())
            hf.check_tensors(self.files, self.adapter.hf_shapes(self.layout), str(self.source),
                             optional=self.adapter.optional_hf_shapes())
        else:
            self.config = saved_model_config(self.source)
            self.adapter = family_of(self.config).adapter_cls(self.config)
            self.files = None
        self.shapes = self.adapter.state_shapes()

    def tensors(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for `names`, in that order, one at a time (the next is read only once the
        caller asks for it)."""
        if self.files is None:
            stored = checkpoint_tensors(self.source, names)
        else:
            stored = ((n, self.adapter.hf_tensor(n, self.files.get, self.layout)) for n in names)
        for name, t in stored:
            if self.files is not None:
                self.files.close()  # drop the memory maps: the pages read go with them
            if tuple(t.shape) != self.shapes[name]:
                raise UserError(f"merge: {self.source}: {name} is stored with shape {tuple(t.shape)}, its config "
                                f"says {self.shapes[name]}; the checkpoint was written by another model")
            yield name, t.detach()
            del t


def _listed(items: list[str]) -> str:
    return ", ".join(items[:12]) + (f", ... and {len(items) - 12} more" if len(items) > 12 else "")


class Merger:
    """The inputs of a merge, checked against the first (or base) one, and each merged tensor in turn."""

    def __init__(self, first: ModelReader, embeddings: str):
        self.first, self.first_path, self.embeddings = first, first.path, embeddings
        self.names = first.shapes
        self.vocab = {n for n in VOCAB_NAMES if n in self.names}  # one name when they are tied
        self.rows: dict[str, int] = {}  # the rows merged per vocabulary-sized tensor

    def check(self, model: ModelReader, path: str) -> None:
        """Refuse `model` (named `path`) unless its family, tensor names and shapes match the first model's."""
        first = self.first
        if model.config.model_type != first.config.model_type:
            raise UserError(f"merge: {path} is a {model.config.model_type} model and {self.first_path} a "
                            f"{first.config.model_type} one; only models of one family merge")
        shapes = model.shapes
        missing, extra = sorted(set(self.names) - set(shapes)), sorted(set(shapes) - set(self.names))
        if missing or extra:
            lines = [f"merge: {path} and {self.first_path} do not hold the same tensors"]
            for title, items, where in (("only in", missing, self.first_path), ("only in", extra, path)):
                if items:
                    lines.append(f"  {title} {where} ({len(items)}): " + _listed(items))
            raise UserError("\n".join(lines))
        misshaped = [f"{name} {shape} (first {self.names[name]})"
                     for name, shape in shapes.items() if not self._shape_ok(name, shape)]
        if misshaped:
            vocab = any(n.split(" ")[0] in self.vocab for n in misshaped)
            hint = ("; for the vocabulary-sized tensors, --embeddings shared_rows merges the rows every input has "
                    "and skip takes the first model's") if vocab else ""
            raise UserError(f"merge: tensors of {path} differ in shape from {self.first_path}'s "
                            f"({len(misshaped)}): " + _listed(misshaped) + hint)
        _warn_config_differences(model.config, path, first.config, self.first_path)

    def _shape_ok(self, name: str, shape: tuple[int, ...]) -> bool:
        mine = self.names[name]
        if name in self.vocab and self.embeddings == "skip":
            return True
        if name in self.vocab and self.embeddings == "shared_rows":
            return shape[1:] == mine[1:]  # only the number of rows (the vocabulary) may differ
        return shape == mine

    def merged(self, name: str, read: dict[str, torch.Tensor], terms: list[tuple[str, float]],
               scale: float | None, first_key: str) -> torch.Tensor:
        """The merged float32 tensor `name` from each input's tensor (`read`, by input key): the float64 sum
        of the terms (times `scale`, plus the base, for a task vector), rounded once, on the rows every input
        has (the first model's beyond them). Computed CHUNK elements at a time: elementwise, so the same
        values as the whole tensor at once, with little float64 memory."""
        base = read[first_key]
        out = base.to(torch.float32, copy=True)
        if name in self.vocab and self.embeddings == "skip":
            return out
        if not base.dim():
            out.copy_(_formula(read, terms, scale, first_key))
            return out
        rows = min(t.shape[0] for t in read.values())
        step = max(1, CHUNK // max(1, base[0].numel()))
        for r in range(0, rows, step):
            end = min(r + step, rows)
            out[r:end].copy_(_formula({k: t[r:end] for k, t in read.items()}, terms, scale, first_key))
        if name in self.vocab:
            self.rows[name] = rows
        return out


def _formula(read: dict[str, torch.Tensor], terms: list[tuple[str, float]], scale: float | None,
             first_key: str) -> torch.Tensor:
    """sum(coef * X) (average), or sum(coef * X) * scale + BASE (task vector), in float64, rounded once to
    float32."""
    acc = None
    for key, coef in terms:
        acc = _add(acc, read[key], coef)
    if scale is not None:
        acc = _add(acc.mul_(scale), read[first_key], 1.0)
    return acc.to(torch.float32)


def _add(acc: torch.Tensor | None, t: torch.Tensor, coef: float) -> torch.Tensor:
    """acc + coef * t in float64 (coef * t for the first term), t read as float32 first (as `load_model` gives
    it); in place, so that two float64 chunks are held at most."""
    exact = t.dtype.itemsize <= 4  # bf16, fp16 and fp32 widen exactly; a wider dtype is rounded to fp32 first
    term = t.to(torch.float64, copy=True) if exact else t.to(torch.float32).to(torch.float64)
    if coef != 1.0:
        term.mul_(coef)
    return term if acc is None else acc.add_(term)


def _warn_config_differences(config, path: str, first_config, first_path: str) -> None:
    a, b = vars(config), vars(first_config)
    diff = [f"{k} {a[k]!r} (first {b[k]!r})" for k in sorted(a) if k != "vocab_size" and a.get(k) != b.get(k)]
    if diff:
        warnings.warn(f"merge: {path} differs from {first_path} in config {', '.join(diff)}; the output has "
                      f"{first_path}'s config", stacklevel=5)


def _weights(paths: Sequence, weights: Sequence[float] | None) -> list[float]:
    if not paths:
        raise UserError("merge: --average needs at least one model")
    if weights is None:
        return [1.0 / len(paths)] * len(paths)
    weights = [float(w) for w in weights]
    if len(weights) != len(paths):
        raise UserError(f"merge: {len(weights)} weights for {len(paths)} models; give one weight per model")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"merge: average weights must be finite, >= 0 and not all 0, got {weights} (for "
                        "negative coefficients use --task-vector)")
    total = sum(weights)
    return [w / total for w in weights]


def _terms(average, weights, task_vector) -> tuple[str, list[tuple[str, float]], float | None]:
    """The first (or base) model, the (model, coefficient) terms and the task vector's scale (None: an
    average)."""
    if average is not None:
        coefs = _weights(average, weights)
        return str(average[0]), list(zip(map(str, average), coefs, strict=True)), None
    tv = task_vector if isinstance(task_vector, TaskVector) else TaskVector(*task_vector)
    if not math.isfinite(float(tv.scale)):
        raise UserError(f"merge: task vector scale must be finite, got {tv.scale}")
    return str(tv.base), [(str(tv.plus), 1.0), (str(tv.minus), -1.0)], float(tv.scale)


def _key(path: str | Path) -> str:
    return str(Path(path).resolve())


def open_inputs(first_path: str, paths: list[str], embeddings: str) -> tuple[Merger, dict[str, ModelReader]]:
    """A reader per distinct input (keyed by its resolved path; the same directory named twice is read once),
    each checked against the first in the order given, before any weight is read."""
    readers = {_key(first_path): ModelReader(first_path)}
    merger = Merger(readers[_key(first_path)], embeddings)
    for path in paths:
        if _key(path) not in readers:
            readers[_key(path)] = ModelReader(path)
        merger.check(readers[_key(path)], path)
    return merger, readers


def merge(out_dir: str | Path, average: Sequence[str | Path] | None = None, weights: Sequence[float] | None = None,
          task_vector: TaskVector | tuple | None = None, embeddings: str = "merge",
          dtype: torch.dtype | None = None) -> Path:
    """Write `out_dir` (a Hugging Face directory, in `dtype`, default float32): the weighted average of the
    models in `average` (`weights` normalised to sum to 1; None: uniform), or `task_vector` = (base, plus,
    minus, scale) as BASE + scale * (plus - minus). `embeddings`: see the module's docstring. The tokenizer
    files of the first (or base) model are copied, and `merge.json` records the inputs and coefficients."""
    if (average is None) == (task_vector is None):
        raise UserError("merge: give either average (models to average) or task_vector (base, plus, minus), "
                        "not both and not neither")
    if embeddings not in EMBEDDING_RULES:
        raise UserError(f"merge: embeddings {embeddings!r}: choose one of {', '.join(EMBEDDING_RULES)}")
    first_path, terms, scale = _terms(average, weights, task_vector)
    merger, readers = open_inputs(first_path, [p for p, _ in terms], embeddings)
    config = merger.first.config
    keys = {p: _key(p) for p in [first_path, *(p for p, _ in terms)]}
    names = list(merger.names)
    skipped = merger.vocab if embeddings == "skip" else set()
    streams = {k: r.tensors(names if k == keys[first_path] else [n for n in names if n not in skipped])
               for k, r in readers.items()}

    def merged_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            read = {k: next(s)[1] for k, s in streams.items() if k == keys[first_path] or name not in skipped}
            yield name, merger.merged(name, read, [(keys[p], c) for p, c in terms], scale, keys[first_path])
            del read

    out_dir = Path(out_dir)
    shapes, _ = hf_plan(config)
    hf.save_streamed(shapes, streamed_writer(config, merged_tensors()), config, out_dir, "5GB",
                     dtype or torch.float32)
    copied = copy_tokenizer_files(first_path, out_dir)
    info = {"kind": "average" if scale is None else "task_vector", "first": first_path,
            "terms": [{"model": p, "coefficient": c} for p, c in terms], "scale": scale,
            "embeddings": embeddings, "vocab_rows_merged": merger.rows, "tokenizer_files": copied}
    (out_dir / METADATA).write_text(json.dumps(info, indent=1) + "\n")
    return out_dir
