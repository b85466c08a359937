"""Streamed, sharded `init_from` of a Hugging Face directory: each rank reads only the parts of each tensor its
shards hold (memory-mapped slices, one tensor at a time) and the result equals a one-process load exactly."""

from __future__ import annotations

import random

import pytest
import torch

from moecpt.model import from_pretrained, hf
from moecpt.model.families import family_of

from .streamed_worker import CONFIG, EP_CONFIG, run_once, write_sources


def _regions(shape: tuple[int, ...], rng: random.Random, n: int) -> list[tuple[slice, ...]]:
    out = [tuple(slice(0, s) for s in shape)]
    for _ in range(n):
        region = []
        for s in shape:
            a = rng.randrange(s)
            region.append(slice(a, rng.randrange(a + 1, s + 1)))
        out.append(tuple(region))
    return out


def test_hf_region_reads_only_slices_and_equals_the_sliced_tensor(tmp_path):
    """Every tensor, hub and fused layouts, regions of every kind (gate and up rows of stacked experts cut
    anywhere): the same values as the whole tensor sliced, read without one whole-tensor read."""
    src = write_sources(tmp_path)
    adapter = family_of(CONFIG).adapter_cls(CONFIG)
    rng = random.Random(0)
    for layout in ("hub", "fused"):
        tensors = hf.SafetensorsDir(src[layout])

        def whole_read_refused(name):
            raise AssertionError(f"{name}: read whole where a slice was enough")

        for name, shape in adapter.state_shapes().items():
            full = adapter.hf_tensor(name, tensors.get, layout)
            for region in _regions(shape, rng, 6):
                part = adapter.hf_region(name, whole_read_refused, tensors.get_slice, layout, region)
                assert torch.equal(part, full[region]), (layout, name, region)


def test_two_rank_fsdp_and_ep_loads_equal_the_one_process_load():
    """2 gloo ranks: FSDP (3 experts split unevenly) and FSDP + EP 2, from the hub layout in sharded files
    and from the fused layout; gathered after the load, every tensor equals `from_pretrained` exactly."""
    root = run_once()
    for ep, tag in ((1, ""), (2, "ep-")):
        ref = from_pretrained(root / "src" / f"{tag}hub").state_dict()
        for layout in ("hub", "fused"):
            got = torch.load(root / "out" / f"{ep}-{layout}.pt")
            assert got.keys() == ref.keys(), (ep, layout)
            for k in ref:
                assert torch.equal(got[k], ref[k]), (ep, layout, k)


def test_a_wrong_shape_is_refused_before_anything_is_read(tmp_path):
    import dataclasses

    from moecpt.errors import UserError
    from moecpt.model import build_model
    from moecpt.train.checkpoint import load_model_weights

    src = write_sources(tmp_path)
    model = build_model(dataclasses.replace(CONFIG, intermediate_size=40), device="cpu", seed=0)
    with pytest.raises(UserError, match="mis-shaped"):
        load_model_weights(src["hub"], model)
    assert EP_CONFIG.num_local_experts == 4
