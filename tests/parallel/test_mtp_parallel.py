"""DeepSeek-V3 with a trained multi-token prediction layer, sharded: FSDP + expert parallelism on 2 gloo ranks
(the MTP layer's routed experts split over the EP group like a decoder block's, the MTP layer its own FSDP
unit) matches one process: the same losses (the MTP loss included) and the same weights after 2 steps, the MTP
layer's among them, with recomputed blocks; and the end-of-run validation, where one rank has no window and
runs a dummy forward without targets (the MTP layer, a training loss, runs on neither: no collective waits).
Same tolerances as test_training.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from moecpt.model.auto import build_model
from moecpt.model.families import preset_config
from moecpt.parallel import parallelize as par
from moecpt.train import checkpoint as ckpt_lib
from moecpt.train.metrics import read_metrics
from moecpt.train.trainer import train

from .conftest import torchrun
from .test_training import LOSS_RTOL, assert_same_run, validation


def test_sharded_deepseek_v3_with_mtp_matches_one_process(parallel_config, config_for, tmp_path):
    common = ["--model.preset=deepseek-v3-tiny", "--training.steps=2", "--checkpoint.interval=0",
              "--model.overrides.num_nextn_predict_layers=1", "--model.overrides.mtp_loss_coef=0.3",
              "--model.overrides.router_balance_scope=micro_batch", "--model.overrides.router_aux_loss_coef=0.001",
              "--model.overrides.vocab_size=32000", "--model.overrides.num_key_value_heads=4"]
    single, ep = tmp_path / "single", tmp_path / "ep"
    train(config_for(f"--run_dir={single}", *common))
    torchrun(2, ["-m", "moecpt.train", "--config", str(parallel_config), *common, f"--run_dir={ep}",
                 "--parallel.expert_parallel=2", "--parallel.activation_checkpointing=true"])
    assert_same_run(Path(ep), single, [1, 2])
    mtp = {run: [r["mtp_loss"] for r in read_metrics(run) if "loss" in r] for run in (ep, single)}
    assert len(mtp[single]) == 2 and all(v > 0 for v in mtp[single])
    assert mtp[ep] == pytest.approx(mtp[single], rel=LOSS_RTOL)
    assert validation(ep) == pytest.approx(validation(single), rel=LOSS_RTOL)
    # the MTP layer's weights are in the checkpoint, so assert_same_run compared them too
    names = ckpt_lib.load_model(ckpt_lib.step_dir(ep / "checkpoints", 2)).state_dict().keys()
    assert any(n.startswith("mtp.0.block.moe.experts.") for n in names)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_each_mtp_depth_is_an_fsdp_unit_of_its_own(one_rank_group):
    c = preset_config("deepseek-v3-tiny", num_nextn_predict_layers=2, mtp_loss_coef=0.3, vocab_size=97)
    model = build_model(c, device="cpu", seed=0)
    par.apply_fsdp(model, par.build_meshes(torch.device("cpu"), 1, 1), None, reshard_after_forward=True)
    assert all(isinstance(m, FSDPModule) for m in [*model.layers, *model.mtp])
    ids = torch.randint(0, 97, (2, 12))
    out = model(ids, targets=torch.randint(0, 97, (2, 12)))
    out.objective(1.0).backward()
    assert out.mtp_loss > 0 and all(p.grad is not None for p in model.mtp.parameters())
