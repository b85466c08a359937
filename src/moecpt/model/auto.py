"""Building and loading a model of any family: from a config (on the meta device, or initialised), or from a
Hugging Face directory, strictly (every tensor used, every shape checked, else nothing is loaded)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import StorageReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future

from moecpt.errors import UserError
from moecpt.model import hf
from moecpt.model.adapter import BIAS
from moecpt.model.base import CausalLM
from moecpt.model.families import family, family_of


def config_from_hf(d: dict[str, Any], source: str = "config.json"):
    """A Hugging Face `config.json` dict as the config of its family (chosen by `model_type`)."""
    return family(d.get("model_type"), source).config_cls.from_hf_dict(d, source=source)


def load_config(hf_dir: str | Path):
    """The model config of a Hugging Face directory."""
    return config_from_hf(hf.read_config_json(hf_dir), source=str(Path(hf_dir) / "config.json"))


def param_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, without building the model."""
    return family_of(config).adapter_cls(config).param_shapes()


def build_model(config, device: str | torch.device = "meta", seed: int | None = None) -> CausalLM:
    """The family's model, built on the meta device (no memory) and, for another `device`, materialised there
    and initialised once by the family's rule from a generator seeded with `seed` (None: torch's global RNG)."""
    with torch.device("meta"):
        model = family_of(config).model_cls(config)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.tie_weights()
        model.init_weights(None if seed is None else torch.Generator().manual_seed(seed))
    return model


def from_pretrained(hf_dir: str | Path, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu") -> CausalLM:
    """Load a Hugging Face directory (config.json + safetensors, single or sharded) strictly, in the hub or
    the transformers-5 fused layout. `dtype=None` keeps the checkpoint's dtype."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir}: not a directory; expected a Hugging Face model directory")
    config = load_config(hf_dir)
    adapter = family_of(config).adapter_cls(config)
    tensors = hf.SafetensorsDir(hf_dir)
    layout = adapter.detect_layout(tensors.names())
    hf.check_tensors(tensors, adapter.hf_shapes(layout), str(hf_dir), optional=adapter.optional_hf_shapes())
    model = build_model(config)
    state = {name: t.to(device=device, dtype=torch.float32 if name.endswith(BIAS) else dtype or t.dtype)
             for name, t in adapter.from_hf(tensors.get, layout)}  # a selection bias stays fp32 (see Router)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


class HFShardReader(StorageReader):
    """A Hugging Face directory as a `torch.distributed.checkpoint` storage: DCP's planner works out, from
    each rank's DTensor placements (FSDP, expert parallelism, padding), which part of each moecpt tensor the
    rank holds, and this reader fills exactly that part through the adapter (`hf_region`): memory-mapped
    slices of the Hugging Face tensors, one moecpt tensor at a time, the files closed after each."""

    def __init__(self, hf_dir: str | Path, config):
        super().__init__()
        self.hf_dir = Path(hf_dir)
        self.adapter = family_of(config).adapter_cls(config)
        self.tensors = hf.SafetensorsDir(self.hf_dir)
        self.layout = self.adapter.detect_layout(self.tensors.names())
        hf.check_tensors(self.tensors, self.adapter.hf_shapes(self.layout), str(self.hf_dir),
                         optional=self.adapter.optional_hf_shapes())

    def read_metadata(self) -> Metadata:
        """Every moecpt tensor as one stored chunk of its full shape."""
        def entry(shape):
            size = torch.Size(shape)
            return TensorStorageMetadata(TensorProperties(dtype=torch.float32), size,
                                         [ChunkStorageMetadata(torch.Size([0] * len(shape)), size)])

        return Metadata({name: entry(shape) for name, shape in self.adapter.state_shapes().items()})

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for req in sorted(plan.items, key=lambda r: r.storage_index.fqn):
            region = tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths, strict=True))
            target = planner.resolve_tensor(req).detach()
            if target.numel():
                part = self.adapter.hf_region(req.storage_index.fqn, self.tensors.get, self.tensors.get_slice,
                                              self.layout, region)
                target.copy_(part)
                del part
                self.tensors.close()
            planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return Path(checkpoint_id).is_dir()


def load_hf_sharded(model: CausalLM, hf_dir: str | Path) -> None:
    """Load a Hugging Face directory (hub or fused layout, single or sharded safetensors) into `model` as it is
    laid out: one device, FSDP-sharded or expert-parallel. Every rank calls this; each reads only the parts of
    each tensor its shards hold, so no rank holds the whole model (peak host memory: its shards plus one
    tensor). Strict: every tensor used and every shape checked, before anything is read."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    reader = HFShardReader(hf_dir, model.config)
    names = reader.adapter.state_shapes()
    full = get_model_state_dict(model)
    state = {k: v for k, v in full.items() if k in names}  # a tied LM head is read once, as the embedding
    with warnings.catch_warnings():  # one process without a process group is intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    set_model_state_dict(model, {k: state.get(k, state.get("embed_tokens.weight")) for k in full})
