"""FSDP + expert parallelism on 2 gloo ranks (each rank two of the tiny gpt-oss's experts, with their biases
and the clamped SwiGLU; the dense weights, sinks and routers sharded by FSDP) trains like one process: the same
losses and weights after 2 steps. Same tolerances as test_training.py."""

from __future__ import annotations

from pathlib import Path

from moecpt.train.trainer import train

from .conftest import torchrun
from .test_training import assert_same_run


def test_fsdp_with_expert_parallelism_matches_one_process(parallel_config, config_for, tmp_path):
    # Micro-batch balancing (see test_families_parallel.py); the tiny config's 4 experts split 2 + 2.
    common = ["--model.preset=gpt-oss-tiny", "--model.overrides.num_local_experts=4", "--training.steps=2",
              "--checkpoint.interval=0", "--model.overrides.router_balance_scope=micro_batch"]
    single, ep = tmp_path / "single", tmp_path / "ep"
    train(config_for(f"--run_dir={single}", *common))
    torchrun(2, ["-m", "moecpt.train", "--config", str(parallel_config), *common, f"--run_dir={ep}",
                 "--parallel.expert_parallel=2"])
    assert_same_run(Path(ep), single, [1, 2])
