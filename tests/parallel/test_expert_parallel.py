"""Expert parallelism and FSDP on 2 and 4 gloo ranks with a forced routing that leaves experts (and, under
EP, whole ranks) without tokens: no hang (bounded by the launch timeout), outputs and gradients equal to one
device, per-rank sharded state exactly as `moecpt plan` counts it, and sharded DCP checkpoints (dim-0 and
other-dim placements, EP over FSDP) that load on one process to the same weights.

Tolerance: 1e-6 absolute on per-token losses and gradients (fp32; the gradients are O(1e-3..1e-1) and differ
only by the order of the reduce-scatter / all-to-all sums, ~1e-8 observed)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from moecpt.config import ParallelSection
from moecpt.errors import UserError
from moecpt.model import MixtralForCausalLM
from moecpt.parallel.parallelize import check_layout, parallelize
from moecpt.parallel.plan import Layout, plan_memory

from .conftest import REPO, torchrun
from .ep_worker import CONFIG, config


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the DCP load on one process is intended
@pytest.mark.parametrize(("world", "experts"), [(2, 4), (4, 4), (4, 2)])
def test_idle_experts_do_not_hang_and_match_one_device(world, experts, tmp_path):
    torchrun(world, [str(REPO / "tests" / "parallel" / "ep_worker.py"), str(tmp_path), str(experts)], timeout=180)
    cfg = config(experts)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    layouts = [k for k in results[0] if k.startswith("ep")]
    assert layouts == [f"ep{e}" for e in (1, 2, 4) if world % e == 0 and experts % e == 0]
    for res in results:
        for key in layouts:
            r = res[key]
            # Experts 2 and 3 (when there are 4) get nothing in any layer; under EP whole ranks get no rows.
            assert r["idle_experts"] == (experts - 2) * cfg.num_hidden_layers
            assert r["counts_equal"]
            assert r["loss_err"] <= 1e-6 and r["grad_err"] <= 1e-6, (key, r)
            assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-6)
    # Rank 0 holds the largest shards: exactly the plan's per-GPU parameter, gradient and AdamW bytes (fp32).
    for key in layouts:
        plan = plan_memory(cfg, Layout(gpus=world, expert_parallel=int(key[2:]), dtype_bytes=4),
                           seq_len=16, gpu_memory=80e9)
        r = results[0][key]
        assert (r["param_bytes"], r["grad_bytes"], r["optim_bytes"]) == (plan.params, plan.grads, plan.optimizer)
        assert max(res[key]["param_bytes"] for res in results) == plan.params
        if experts < world:  # the 2 experts (and the [2, H] router) are sharded on another dim than 0
            assert any("Shard(dim=1)" in p or "Shard(dim=2)" in p for p in r["placements"]), r["placements"]
        # The sharded checkpoint loads on one process (no process group) to the same full weights.
        model = MixtralForCausalLM(cfg)
        state = model.state_dict()
        dcp.load(state, checkpoint_id=str(tmp_path / f"dcp_{key}"))
        expected = torch.load(tmp_path / f"full_{key}.pt")
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


def test_bad_layouts_name_the_config_key():
    with pytest.raises(UserError, match=r"parallel\.expert_parallel \(3\) must divide the world size \(4\)"):
        check_layout(world=4, ep=3, num_experts=8)
    with pytest.raises(UserError, match=r"parallel\.expert_parallel \(4\) must divide the number of experts"):
        check_layout(world=8, ep=4, num_experts=6)
    with torch.device("meta"):
        model = MixtralForCausalLM(CONFIG)
    with pytest.raises(UserError, match="parallel.expert_parallel = 2 needs that many processes"):
        parallelize(model, ParallelSection(expert_parallel=2), torch.device("cpu"), 1, None)


def test_global_batch_not_divisible_by_ranks_is_a_user_error(parallel_config):
    proc = None
    try:
        torchrun(2, ["-m", "moecpt.train", "--config", str(parallel_config), "--training.global_batch=3"], timeout=120)
    except pytest.fail.Exception as e:
        proc = str(e)
    assert proc is not None and "training.global_batch (3) must be a multiple of training.micro_batch x world size" in proc
