"""Merging models of one family: a uniform or weighted average of checkpoints, and task arithmetic (a "chat
vector", arXiv 2310.04799: BASE + s * (A - B), e.g. a continually pre-trained model + Instruct - its base).

Inputs are anything `moecpt.train.checkpoint.load_model` reads (Hugging Face directories, moecpt checkpoints,
run directories). The arithmetic is generic over the state dict (every parameter and persistent buffer, tied
ones once), so it holds for every family the model layer has. It runs in float64, one input model in memory
besides the first (or base) one and the float64 sums, and is rounded once to float32: the result is the
correctly rounded value of the formula, in a fixed order (average: w_1 X_1 + w_2 X_2 + ...; task vector:
(A - B) * s + BASE).

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moecpt.errors import UserError
from moecpt.model.base import CausalLM
from moecpt.tools.common import copy_tokenizer_files
from moecpt.train.checkpoint import load_model

EMBEDDING_RULES = ("merge", "shared_rows", "skip")
METADATA = "merge.json"


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


def vocab_tensors(model: CausalLM) -> set[str]:
    """The names of the embedding and the LM head (one name when they are tied)."""
    vocab = (model.embed_tokens.weight, model.lm_head.weight)
    return {n for n, p in model.named_parameters() if any(p is v for v in vocab)}


class Merger:
    """The float64 sums of a merge, built one input model at a time against the first (or base) model."""

    def __init__(self, first: CausalLM, first_path: str, embeddings: str):
        self.first, self.first_path, self.embeddings = first, first_path, embeddings
        self.names = model_tensors(first)
        self.vocab = vocab_tensors(first)
        self.acc: dict[str, torch.Tensor] = {}

    def check(self, model: CausalLM, path: str) -> dict[str, torch.Tensor]:
        """The tensors of `model`, refused unless they match the first model's names and shapes."""
        if model.config.model_type != self.first.config.model_type:
            raise UserError(f"merge: {path} is a {model.config.model_type} model and {self.first_path} a "
                            f"{self.first.config.model_type} one; only models of one family merge")
        tensors = model_tensors(model)
        missing, extra = sorted(set(self.names) - set(tensors)), sorted(set(tensors) - set(self.names))
        if missing or extra:
            lines = [f"merge: {path} and {self.first_path} do not hold the same tensors"]
            for title, items, where in (("only in", missing, self.first_path), ("only in", extra, path)):
                if items:
                    lines.append(f"  {title} {where} ({len(items)}): " + ", ".join(items[:12])
                                 + (f", ... and {len(items) - 12} more" if len(items) > 12 else ""))
            raise UserError("\n".join(lines))
        misshaped = [f"{name} {tuple(t.shape)} (first {tuple(self.names[name].shape)})"
                     for name, t in tensors.items() if not self._shape_ok(name, t.shape)]
        if misshaped:
            vocab = any(n.split(" ")[0] in self.vocab for n in misshaped)
            hint = ("; for the vocabulary-sized tensors, --embeddings shared_rows merges the rows every input has "
                    "and skip takes the first model's") if vocab else ""
            raise UserError(f"merge: tensors of {path} differ in shape from {self.first_path}'s "
                            f"({len(misshaped)}): " + ", ".join(misshaped[:12])
                            + (f", ... and {len(misshaped) - 12} more" if len(misshaped) > 12 else "") + hint)
        _warn_config_differences(model, path, self.first, self.first_path)
        return tensors

    def _shape_ok(self, name: str, shape: torch.Size) -> bool:
        mine = self.names[name].shape
        if name in self.vocab and self.embeddings == "skip":
            return True
        if name in self.vocab and self.embeddings == "shared_rows":
            return shape[1:] == mine[1:]  # only the number of rows (the vocabulary) may differ
        return shape == mine

    def add(self, model: CausalLM, path: str, coef: float) -> None:
        """acc += coef * model (acc = coef * model for the first term)."""
        for name, t in self.check(model, path).items():
            if name in self.vocab and self.embeddings == "skip":
                continue
            x = t.detach().double()
            term = x if coef == 1.0 else coef * x
            prev = self.acc.get(name)
            if prev is None:
                self.acc[name] = term
            else:
                rows = min(prev.shape[0], term.shape[0]) if prev.dim() else None
                self.acc[name] = prev[:rows] + term[:rows] if rows is not None else prev + term

    def scale(self, s: float) -> None:
        for name in self.acc:
            self.acc[name] = self.acc[name] * s

    @torch.no_grad()
    def write_into_first(self) -> dict[str, int]:
        """Round the sums to each tensor's dtype into the first model; returns the rows merged per
        vocabulary-sized tensor."""
        rows = {}
        for name, t in self.names.items():
            if name not in self.acc:
                continue
            merged = self.acc[name].to(t.dtype)
            if name in self.vocab:
                rows[name] = merged.shape[0]
            t[: merged.shape[0]].copy_(merged) if t.dim() else t.copy_(merged)
        return rows


def _warn_config_differences(model: CausalLM, path: str, first: CausalLM, first_path: str) -> None:
    a, b = vars(model.config), vars(first.config)
    diff = [f"{k} {a[k]!r} (first {b[k]!r})" for k in sorted(a) if k != "vocab_size" and a.get(k) != b.get(k)]
    if diff:
        warnings.warn(f"merge: {path} differs from {first_path} in config {', '.join(diff)}; the output has "
                      f"{first_path}'s config", stacklevel=3)


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


def _load(path: str | Path) -> CausalLM:
    return load_model(path, dtype=torch.float32)


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
    if average is not None:
        coefs = _weights(average, weights)
        first_path, terms, scale = str(average[0]), list(zip(map(str, average), coefs, strict=True)), None
    else:
        tv = task_vector if isinstance(task_vector, TaskVector) else TaskVector(*task_vector)
        if not math.isfinite(float(tv.scale)):
            raise UserError(f"merge: task vector scale must be finite, got {tv.scale}")
        first_path, scale = str(tv.base), float(tv.scale)
        terms = [(str(tv.plus), 1.0), (str(tv.minus), -1.0)]
    first = _load(first_path)
    merger = Merger(first, first_path, embeddings)
    for path, coef in terms:
        same = Path(path).resolve() == Path(first_path).resolve()
        merger.add(first if same else _load(path), path, coef)
    if scale is not None:
        merger.scale(scale)
        merger.add(first, first_path, 1.0)
    rows = merger.write_into_first()
    out_dir = Path(out_dir)
    first.save_pretrained(out_dir, dtype=dtype)
    copied = copy_tokenizer_files(first_path, out_dir)
    info = {"kind": "average" if scale is None else "task_vector", "first": first_path,
            "terms": [{"model": p, "coefficient": c} for p, c in terms], "scale": scale,
            "embeddings": embeddings, "vocab_rows_merged": rows, "tokenizer_files": copied}
    (out_dir / METADATA).write_text(json.dumps(info, indent=1) + "\n")
    return out_dir
