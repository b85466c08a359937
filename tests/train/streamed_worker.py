"""Run under torchrun (gloo, 2 ranks) by the streamed load and export tests: a tiny Mixtral loaded from
Hugging Face directories (hub layout in sharded safetensors, fused layout in one file) into FSDP and
FSDP + EP 2 layouts; each rank reads only its parts (`load_model_weights`). Rank 0 writes what every layout
holds, gathered after the load, to OUT/{layout}-{source}.pt; the EP model is then saved as a 2-rank DCP
checkpoint (OUT/checkpoints/step_00000001) and exported live, tensor by tensor (OUT/live_hf).

`run_once()` (for the tests) writes the sources, runs this once per test session and returns OUT."""

from __future__ import annotations

import dataclasses
import functools
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from moecpt.config import ParallelSection
from moecpt.model import build_model
from moecpt.model.families import family_of, preset_config

# 3 experts: FSDP splits them 2 + 1 over 2 ranks (uneven, padded); odd widths for the same reason.
CONFIG = preset_config("tiny", vocab_size=96, hidden_size=24, intermediate_size=36, num_attention_heads=4,
                       num_key_value_heads=2, num_local_experts=3, num_hidden_layers=2)
EP_CONFIG = dataclasses.replace(CONFIG, num_local_experts=4)  # expert parallelism needs ep | experts


def write_sources(root: Path) -> dict[str, Path]:
    """The Hugging Face directories the ranks load: hub layout (sharded files) and fused layout, per config."""
    out = {}
    for tag, cfg in (("", CONFIG), ("ep-", EP_CONFIG)):
        model = build_model(cfg, device="cpu", seed=11)
        model.save_pretrained(root / f"{tag}hub", max_shard_size="20KB")
        adapter = family_of(cfg).adapter_cls(cfg)
        fused = {adapter.hf_name(n, "fused") if ".experts." not in n else "model." + n.replace(".moe.", ".mlp."): t
                 for n, t in model.state_dict().items() if n in adapter.state_shapes()}
        from moecpt.model import hf
        hf.save_pretrained(fused, cfg, root / f"{tag}fused")
        out[f"{tag}hub"], out[f"{tag}fused"] = root / f"{tag}hub", root / f"{tag}fused"
    return out


def sharded_model(cfg, ep: int):
    from moecpt.parallel.parallelize import parallelize

    model = build_model(cfg)
    parallelize(model, ParallelSection(expert_parallel=ep), torch.device("cpu"), dist.get_world_size(), None)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_buffers()
    return model


def main() -> None:
    from moecpt.config import OptimizerSection
    from moecpt.train import checkpoint as ckpt_lib
    from moecpt.train.export import export_sharded
    from moecpt.train.optim import build_optimizer

    out, src = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    model = None
    for ep, cfg, tag in ((1, CONFIG, ""), (2, EP_CONFIG, "ep-")):
        for layout in ("hub", "fused"):
            model = sharded_model(cfg, ep)
            ckpt_lib.load_model_weights(src / f"{tag}{layout}", model)
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if dist.get_rank() == 0:
                torch.save(full, out / f"{ep}-{layout}.pt")
    optimizer = build_optimizer(model, OptimizerSection(), torch.device("cpu"))
    state = {"model_type": "mixtral", "model_config": dataclasses.asdict(EP_CONFIG), "data": {}}
    ckpt_lib.save_checkpoint(out / "checkpoints", 1, model, optimizer, state)
    export_sharded(model, dist.get_world_size(), None, out / "live_hf", max_shard_size="20KB")
    dist.destroy_process_group()


@functools.cache
def run_once() -> Path:
    from ..parallel.conftest import REPO, torchrun

    root = Path(tempfile.mkdtemp(prefix="moecpt-streamed-"))
    write_sources(root / "src")
    (root / "out").mkdir()
    torchrun(2, [str(REPO / "tests" / "train" / "streamed_worker.py"), str(root / "out"), str(root / "src")],
             timeout=180)
    return root


if __name__ == "__main__":
    main()
