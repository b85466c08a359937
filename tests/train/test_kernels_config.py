"""The `[kernels]` section: the Triton switch resolves as documented, refuses what cannot run with a reason,
and a run with the Triton kernels (under Triton's interpreter on a CPU) trains as the PyTorch one does."""

from __future__ import annotations

import pytest
import torch

from moecpt.errors import UserError
from moecpt.kernels import support
from moecpt.train.setup import use_triton
from moecpt.train.trainer import Trainer, train

from .test_trainer import losses


def test_auto_uses_triton_only_on_a_gpu(tiny_config):
    cfg = tiny_config()
    assert cfg.kernels.triton == "auto"
    assert use_triton(cfg, torch.device("cpu")) is False
    assert use_triton(cfg, torch.device("cuda")) is support.triton_installed()
    assert use_triton(tiny_config("--kernels.triton=off"), torch.device("cuda")) is False


def test_on_without_a_way_to_run_triton_says_why(tiny_config, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match=r"kernels.triton = 'on'.*(CPU|not installed)"):
        Trainer.from_config(tiny_config("--kernels.triton=on"))


@pytest.mark.parametrize("override, key", [("--kernels.triton=yes", "kernels.triton"),
                                           ("--kernels.sdpa_backend=fast", "kernels.sdpa_backend"),
                                           ("--kernels.loss_chunk_tokens=0", "kernels.loss_chunk_tokens")])
def test_bad_kernel_settings_name_the_key(tiny_config, override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        tiny_config(override).validate()


def test_triton_kernels_train_like_the_pytorch_ones(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    common = ("--training.steps=3", "--checkpoint.interval=0", "--kernels.loss_chunk_tokens=24")
    ref = train(tiny_config(f"--run_dir={tmp_path / 'torch'}", "--kernels.triton=off", *common))
    fused = train(tiny_config(f"--run_dir={tmp_path / 'triton'}", "--kernels.triton=on", *common))
    assert ref["reason"] == fused["reason"] == "finished"
    a, b = losses(tmp_path / "torch"), losses(tmp_path / "triton")
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
    # fp32 on both sides; the kernels sum in another order, so the traces agree to rounding, not bits.
    assert [la for _, la in a] == pytest.approx([lb for _, lb in b], rel=1e-4)
