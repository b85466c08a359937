"""The router's selection bias stays fp32 when a model is cast, loaded or exported in bf16 (as the hub stores
it and transformers keeps it): rounded to bf16, biases a few ulps apart would route tokens to other experts."""

from __future__ import annotations

import json
import struct

import torch

import moecpt
from moecpt.model import build_model
from moecpt.model.families import preset_config

BIAS = "e_score_correction_bias"


def header_dtypes(path) -> dict[str, str]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return {k: v["dtype"] for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


def test_bias_stays_fp32_through_cast_export_and_load(tmp_path):
    model = build_model(preset_config("deepseek-v3-tiny"), device="cpu", seed=0)
    biases = {n: b for n, b in model.named_buffers() if n.endswith(BIAS)}
    assert biases
    with torch.no_grad():
        for b in biases.values():
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(1)) * 1e-3 + 1.0)
    want = {n: b.clone() for n, b in biases.items()}

    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    dtypes = header_dtypes(tmp_path / "model.safetensors")
    assert {d for n, d in dtypes.items() if n.endswith(BIAS)} == {"F32"}
    assert {d for n, d in dtypes.items() if not n.endswith(BIAS)} == {"BF16"}

    loaded = moecpt.from_pretrained(tmp_path, dtype=torch.bfloat16)
    got = dict(loaded.named_buffers())
    assert all(got[n].dtype == torch.float32 and torch.equal(got[n], w) for n, w in want.items())

    cast = model.to(torch.bfloat16)
    got = dict(cast.named_buffers())
    assert all(got[n].dtype == torch.float32 and torch.equal(got[n], w) for n, w in want.items())
    assert cast.lm_head.weight.dtype == torch.bfloat16
