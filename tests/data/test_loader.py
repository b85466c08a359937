"""The loader's contract: a pass cut by restarts or split over ranks serves each sample exactly once, in the
single-process order; resume is O(1); a changed data stream is refused unless a new stage is started."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from moecpt.data.loader import MixtureLoader, collate, validation_batches
from moecpt.data.mixture import MixtureDataset
from moecpt.errors import UserError

SEQ = 256


@pytest.fixture(scope="module")
def dataset(swallow_mixture):
    return MixtureDataset(swallow_mixture, seq_len=SEQ, seed=11, allow_repeat=False)


def _digest(tokens: np.ndarray) -> bytes:
    return tokens.tobytes()


@pytest.fixture(scope="module")
def full_pass(dataset):
    """Sample index -> tokens for one full pass (until a corpus would repeat), uninterrupted, one process."""
    loader = MixtureLoader(dataset, micro_batch=4)
    out = {}
    for _ in range(len(dataset) // 4):
        b = loader.next_batch()
        out.update((int(i), _digest(t)) for i, t in zip(b["index"], b["tokens"], strict=True))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_full_pass_cut_by_five_restarts_on_w_ranks_serves_each_sample_once(dataset, full_pass, world_size):
    micro = 4
    steps = len(dataset) // (micro * world_size)
    total = steps * micro * world_size
    assert total > len(dataset) - micro * world_size > 5000  # the whole pass, up to the last partial step
    rng = np.random.default_rng(world_size)
    stops = set(rng.choice(np.arange(1, steps), size=5, replace=False).tolist())

    loaders = [MixtureLoader(dataset, micro, rank=r, world_size=world_size) for r in range(world_size)]
    served: list[int] = []
    for step in range(steps):
        if step in stops:  # every rank checkpoints, the job dies, new processes resume from the saved state
            states = [json.loads(json.dumps(lo.state_dict())) for lo in loaders]
            assert all(s == states[0] for s in states)  # the state is the same on every rank
            fresh = MixtureDataset(dataset.entries, seq_len=SEQ, seed=11, allow_repeat=False)
            loaders = [MixtureLoader(fresh, micro, rank=r, world_size=world_size) for r in range(world_size)]
            for lo, s in zip(loaders, states, strict=True):
                lo.load_state_dict(s)
        for lo in loaders:
            b = lo.next_batch()
            for i, t in zip(b["index"], b["tokens"], strict=True):
                assert _digest(t) == full_pass[int(i)]
            served += b["index"].tolist()
    assert sorted(served) == list(range(total))  # disjoint ranks, nothing skipped, nothing twice
    assert len(set(full_pass.values())) == len(full_pass)  # and no two samples carry the same tokens
    assert loaders[0].state.samples_consumed == total


def test_rank_slices_interleave_into_the_single_rank_order(dataset):
    one = MixtureLoader(dataset, micro_batch=8)
    two = [MixtureLoader(dataset, micro_batch=4, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        whole = one.next_batch()["tokens"]
        parts = np.concatenate([lo.next_batch()["tokens"] for lo in two])
        assert np.array_equal(whole, parts)


def test_resume_far_into_training_is_o1(swallow_mixture):
    ds = MixtureDataset(swallow_mixture, seq_len=2048, seed=5)
    loader = MixtureLoader(ds, micro_batch=2)
    state = loader.state_dict()

    def resume_at(n):
        fresh = MixtureLoader(MixtureDataset(swallow_mixture, seq_len=2048, seed=5), micro_batch=2)
        t = time.perf_counter()
        fresh.load_state_dict({**state, "samples_consumed": n})
        batch = fresh.next_batch()
        return time.perf_counter() - t, batch

    near, _ = resume_at(10)
    far, batch = resume_at(10**9)
    assert far < 5 * near + 0.05, (near, far)
    assert batch["index"].tolist() == [10**9, 10**9 + 1]
    assert np.array_equal(batch["tokens"][1], ds[10**9 + 1]["tokens"])
    assert ds.epochs_used(10**9)["ja"] > 1000


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mixture": "0.5 ja={ja} 0.4 en={en} 0.1 code={code}"}, r'mixture changed: \[\["ja", 0.644\]'),
        ({"seq_len": 512}, "seq_len changed: 256 -> 512"),
        ({"seed": 12}, "seed changed: 11 -> 12"),
    ],
)
def test_resume_refuses_a_changed_stream(dataset, shards, change, message):
    loader = MixtureLoader(dataset, micro_batch=4)
    loader.next_batch()
    mixture = change.get("mixture", "0.644 ja={ja} 0.256 en={en} 0.1 code={code}").format(**shards)
    other = MixtureDataset(mixture, seq_len=change.get("seq_len", SEQ), seed=change.get("seed", 11))
    with pytest.raises(UserError, match=message):
        MixtureLoader(other, micro_batch=4).load_state_dict(loader.state_dict())


def test_resume_refuses_changed_shard_content_and_tokenizer(dataset, shards, tmp_path):
    from moecpt.data.preprocess import tokenize_corpus

    from .conftest import GROUPS

    loader = MixtureLoader(dataset, micro_batch=4)
    # the same English corpus, re-tokenized with BOS: same name, different content
    tokenize_corpus(GROUPS["en"], tmp_path / "en", append_bos=True, progress=False)
    other = MixtureDataset(
        f"0.644 ja={shards['ja']} 0.256 en={tmp_path / 'en'} 0.1 code={shards['code']}", SEQ, seed=11
    )
    with pytest.raises(UserError, match="shard content of 'en' changed"):
        MixtureLoader(other, micro_batch=4).load_state_dict(loader.state_dict())
    parts = {**loader.state.parts, "tokenizer": ["0" * 64]}
    with pytest.raises(UserError, match="tokenizer changed"):
        MixtureLoader(dataset, micro_batch=4).load_state_dict(
            {**loader.state_dict(), "fingerprint": "x", "parts": parts}
        )


def test_new_data_stage_starts_the_new_mixture_at_the_saved_count(dataset, shards):
    stage1 = MixtureLoader(dataset, micro_batch=4)
    for _ in range(5):
        stage1.next_batch()
    stage2_data = MixtureDataset(f"0.5 ja={shards['ja']} 0.5 code={shards['code']}", seq_len=SEQ, seed=11)
    stage2 = MixtureLoader(stage2_data, micro_batch=4)
    stage2.load_state_dict(stage1.state_dict(), new_stage=True)
    b = stage2.next_batch()
    assert b["index"].tolist() == [0, 1, 2, 3]  # the new mixture from its first sample
    assert np.array_equal(b["tokens"][0], stage2_data[0]["tokens"])
    state = stage2.state_dict()
    assert (state["samples_consumed"], state["stage_start"]) == (24, 20)
    assert state["stages"][0]["start"] == 0 and state["stages"][0]["fingerprint"] == dataset.fingerprint()
    # resuming inside stage 2 needs no override
    again = MixtureLoader(stage2_data, micro_batch=4)
    again.load_state_dict(state)
    assert again.next_batch()["index"].tolist() == [4, 5, 6, 7]


def test_batch_layout(dataset):
    b = MixtureLoader(dataset, micro_batch=3).next_batch()
    assert b["tokens"].shape == (3, SEQ + 1) and b["position_ids"].shape == (3, SEQ)
    assert b["corpus"].shape == (3,) and b["index"].tolist() == [0, 1, 2]
    assert np.all(b["position_ids"][:, 0] == 0)  # no document crosses a sample boundary
    manual = collate([dataset[i] for i in range(3)])
    assert all(np.array_equal(manual[k], b[k]) for k in manual)
    assert set(b) == {"tokens", "position_ids", "corpus", "index"}


def test_validation_batches_cover_each_window_once_across_ranks(dataset):
    val = dataset.validation_dataset("ja")
    seen = []
    for rank in range(3):
        for b in validation_batches(val, micro_batch=2, rank=rank, world_size=3):
            seen += b["index"].tolist()
    assert sorted(seen) == list(range(len(val))) and len(val) > 3
