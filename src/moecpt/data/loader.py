"""Rank-aware batches from a `MixtureDataset`, with a resumable state of (samples consumed, fingerprint).

Step s of training consumes global samples [s * G, (s + 1) * G), G = micro_batch * world_size; rank r takes
the r-th run of `micro_batch` of them. The ranks' slices are disjoint and together are exactly the
world_size = 1 order. Because the state counts global samples, a run may resume on a different number of
ranks. Nothing is re-sharded or re-iterated: the loader only ever computes sample indices.

Batches are dicts of numpy arrays (convert with `torch.from_numpy`; `moecpt.data` does not import torch):
`tokens` int64 [B, seq_len + 1], `position_ids` int64 [B, seq_len] (restarting at 0 at each document start),
`corpus` int64 [B] and `index` int64 [B] (the global sample indices).

Stages: a loader may be given later datasets, each from a global sample count on (`stage_datasets`); it moves
to the next one when its first sample comes, so every sample of a stage is served once, and a resume inside a
stage continues it exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moecpt.data.mixture import MixtureDataset, ValidationDataset
from moecpt.errors import UserError

STATE_VERSION = 1


@dataclass
class DataLoaderState:
    """Where the data stream stands: global samples consumed, and what the stream was (fingerprint + parts).

    `stage_start` is the global sample count at which the current mixture (data stage) began; sample i of the
    run is sample i - stage_start of the stage's dataset. `stages` keeps the earlier stages for the record.
    """

    samples_consumed: int = 0
    stage_start: int = 0
    fingerprint: str = ""
    parts: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataLoaderState:
        if d.get("version") != STATE_VERSION:
            raise UserError(
                f"data loader state version {d.get('version')!r}; this moecpt reads version {STATE_VERSION}"
            )
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprint parts dicts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "shards" and isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    changes.append(f"shard content of {name!r} changed (re-tokenized or different files)")
        elif key == "tokenizer":
            changes.append(f"tokenizer changed: sha256 {_short(a)} -> {_short(b)}")
        else:
            changes.append(f"{key} changed: {json.dumps(a)} -> {json.dumps(b)}")
    return changes


def _short(hashes: Any) -> str:
    return ",".join(str(h)[:12] for h in hashes) if isinstance(hashes, list) else str(hashes)


class MixtureLoader:
    """Yields this rank's micro-batches of a `MixtureDataset`, forever (or until a corpus is exhausted and
    repeats are off). Save `state_dict()` with each checkpoint; `load_state_dict` resumes in O(1)."""

    def __init__(
        self,
        dataset: MixtureDataset,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        later_stages: Sequence[tuple[int, MixtureDataset]] = (),
    ):
        """`later_stages`: (first global sample, dataset) of each stage after `dataset`'s, ascending (see
        `moecpt.data.mixture.stage_datasets`)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.dataset, self.micro_batch, self.rank, self.world_size = dataset, micro_batch, rank, world_size
        self.stages: list[tuple[int, MixtureDataset]] = [(0, dataset), *later_stages]
        self.stage = 0  # index into self.stages of the stage being served
        self.state = DataLoaderState(fingerprint=dataset.fingerprint(), parts=dataset.fingerprint_parts())

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size

    def indices(self) -> np.ndarray:
        """Global sample indices (within the current stage) of this rank's next micro-batch."""
        base = self.state.samples_consumed - self.state.stage_start + self.rank * self.micro_batch
        return np.arange(base, base + self.micro_batch, dtype=np.int64)

    def next_batch(self) -> dict[str, np.ndarray]:
        self._enter_due_stages()
        idx = self.indices()
        batch = collate([self.dataset[int(i)] for i in idx])
        batch["index"] = idx
        self.state.samples_consumed += self.global_batch
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield self.next_batch()

    def _enter_due_stages(self) -> None:
        """Move to each later stage whose first sample has come (its sample 0 is served next)."""
        while self.stage + 1 < len(self.stages) and self.state.samples_consumed >= self.stages[self.stage + 1][0]:
            self.stage += 1
            self._begin(self.stages[self.stage][1], self.state.samples_consumed, self.state)

    def _begin(self, dataset: MixtureDataset, at_sample: int, previous: DataLoaderState) -> None:
        """Serve `dataset` from its sample 0 at global sample count `at_sample`; `previous` goes to the record."""
        self.state.stages = [*previous.stages, {"start": previous.stage_start, "fingerprint": previous.fingerprint,
                                                "parts": previous.parts}]
        self.dataset = dataset
        self.state.fingerprint, self.state.parts = dataset.fingerprint(), dataset.fingerprint_parts()
        self.start_new_stage(at_sample)

    def stage_at(self, sample: int) -> int:
        """The index of the configured stage that global sample `sample` falls in."""
        return max(k for k, (start, _) in enumerate(self.stages) if start <= sample)

    def stage_report(self, total_samples: int) -> list[dict[str, Any]]:
        """Per configured stage: its sample range within the first `total_samples` and the mixture report
        (weights, realised shares, passes) over it."""
        out = []
        for k, (start, ds) in enumerate(self.stages):
            end = self.stages[k + 1][0] if k + 1 < len(self.stages) else total_samples
            end = min(end, total_samples)
            out.append({"stage": k, "start_sample": start, "end_sample": end, "rows": ds.report(max(0, end - start))})
        return out

    def epochs_used(self) -> dict[str, float]:
        """Passes over each corpus made so far in this stage (above 1.0: data has been repeated)."""
        return self.dataset.epochs_used(self.state.samples_consumed - self.state.stage_start)

    def state_dict(self) -> dict[str, Any]:
        return self.state.to_dict()

    def load_state_dict(self, state: dict[str, Any], new_stage: bool = False) -> None:
        """Resume from `state`. A state saved with another mixture, seq_len, seed, tokenizer or shard content is
        refused, naming what changed, unless `new_stage`: then the current mixture starts afresh (from its
        sample 0) at the saved sample count, as when continual pre-training moves to a new data mix."""
        saved = DataLoaderState.from_dict(state)
        self.stage = self.stage_at(saved.stage_start)
        self.dataset = self.stages[self.stage][1]
        if self.stage + 1 < len(self.stages) and self.stages[self.stage + 1][0] < saved.samples_consumed:
            raise UserError(
                f"a data stage is configured to start at global sample {self.stages[self.stage + 1][0]}, but the "
                f"saved data position is already at sample {saved.samples_consumed}: a stage cannot start in the "
                "past. Start it at a later step (data.stages start_step), or start the new mixture here with "
                "data.new_stage = true and data.mixture"
            )
        current = self.dataset.fingerprint()
        if saved.fingerprint == current:
            self.state = DataLoaderState(**{**asdict(saved), "parts": self.dataset.fingerprint_parts()})
            return
        if not new_stage:
            changes = describe_changes(saved.parts, self.dataset.fingerprint_parts()) or [
                "fingerprint differs"
            ]
            raise UserError(
                "the data loader state was saved for a different data stream: "
                + "; ".join(changes)
                + ". Resume with the original data settings, or start a new data stage at this point "
                "(new_stage=True; in a training config data.new_stage = true) to train on the new mixture from here"
            )
        self._begin(self.dataset, saved.samples_consumed, saved)

    def start_new_stage(self, at_sample: int) -> None:
        """Begin this loader's mixture at global sample count `at_sample` (its sample 0 comes next), e.g. to
        continue from a model trained for `at_sample` samples elsewhere."""
        self.state.samples_consumed = self.state.stage_start = int(at_sample)


def collate(samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stack samples into a batch."""
    return {
        "tokens": np.stack([s["tokens"] for s in samples]),
        "position_ids": np.stack([s["position_ids"] for s in samples]),
        "corpus": np.array([s["corpus"] for s in samples], dtype=np.int64),
    }


def validation_batches(dataset: ValidationDataset, micro_batch: int, rank: int = 0, world_size: int = 1):
    """This rank's share of a validation set, in micro-batches (the last may be smaller). Every window is
    visited by exactly one rank."""
    mine = np.arange(rank, len(dataset), world_size)
    for i in range(0, mine.size, micro_batch):
        idx = mine[i : i + micro_batch]
        batch = collate([dataset[int(j)] for j in idx])
        batch["index"] = idx
        yield batch
