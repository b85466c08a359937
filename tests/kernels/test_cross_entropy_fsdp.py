"""The chunked loss inside moecpt's FSDP2 layout (LM head in the root unit): same losses and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moecpt.kernels import cross_entropy
from moecpt.model import MixtralForCausalLM
from moecpt.model.config import MixtralConfig
from moecpt.parallel import parallelize as par


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@pytest.mark.parametrize("param_dtype", [None, torch.bfloat16])
def test_loss_only_under_fsdp_matches_the_plain_model(one_rank_group, monkeypatch, param_dtype):
    monkeypatch.setattr(cross_entropy, "CHUNK_TOKENS", 8)  # 24 tokens: three chunks
    torch.manual_seed(0)
    plain = MixtralForCausalLM(MixtralConfig.from_preset("tiny", vocab_size=97, hidden_size=32, intermediate_size=48))
    sharded = copy.deepcopy(plain)
    par.apply_fsdp(sharded, par.build_meshes(torch.device("cpu"), 1, 1), param_dtype, reshard_after_forward=True)
    ids, targets = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    want = plain(ids, targets=targets)
    want.token_loss.sum().backward()
    got = sharded(ids, targets=targets)
    got.token_loss.sum().backward()
    tol = {"rtol": 1e-5, "atol": 1e-6} if param_dtype is None else {"rtol": 5e-2, "atol": 5e-2}
    torch.testing.assert_close(got.token_loss, want.token_loss, **tol)
    grads = dict(sharded.named_parameters())
    for name, p in plain.named_parameters():
        g = _full(grads[name].grad).float()
        if param_dtype is None:
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        else:  # bf16 compute: the gradients point the same way
            assert torch.nn.functional.cosine_similarity(g.flatten(), p.grad.flatten(), dim=0) > 0.99, name
