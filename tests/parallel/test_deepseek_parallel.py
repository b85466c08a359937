"""DeepSeek-V3 sharded: FSDP + expert parallelism on 2 gloo ranks (EP 2: each rank half the routed experts,
everything else FSDP-sharded) matches one process, with
multi-head latent attention, group-limited sigmoid routing, the aux-loss-free selection bias updated every step
from the global expert load, shared experts and a dense first layer. Same tolerances as test_training.py."""

from __future__ import annotations

from pathlib import Path

from moecpt.train.trainer import train

from .conftest import torchrun
from .test_training import assert_same_run


def test_sharded_deepseek_v3_runs_match_one_process(parallel_config, config_for, tmp_path):
    common = ["--model.preset=deepseek-v3-tiny", "--training.steps=2", "--checkpoint.interval=0",
              "--model.overrides.router_balance_scope=micro_batch", "--model.overrides.router_aux_loss_coef=0.001",
              "--model.overrides.vocab_size=32000", "--model.overrides.num_key_value_heads=4"]
    single, ep = tmp_path / "single", tmp_path / "ep"
    train(config_for(f"--run_dir={single}", *common))
    torchrun(2, ["-m", "moecpt.train", "--config", str(parallel_config), *common, f"--run_dir={ep}",
                 "--parallel.expert_parallel=2"])
    assert_same_run(Path(ep), single, [1, 2])
