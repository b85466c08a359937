"""Data stages: mixtures that change at step boundaries (a shrinking English replay share, a final
high-quality stage). Within each stage every sample is served once, in order, through restarts and on any
number of ranks; each corpus continues its pass across stages (no document again from its start); the
trainer logs and reports the realised share of each corpus per stage, and a training run resumed before or
inside a stage repeats the uninterrupted run's losses.

The corpora are synthetic shards whose every token id is unique, so a token names the one place it comes from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from moecpt.data.indexed import ShardWriter
from moecpt.data.loader import MixtureLoader
from moecpt.data.mixture import MixtureDataset, stage_datasets
from moecpt.errors import UserError

SEQ, BLOCK = 8, 10
FIRST_ID = {"ja": 1000, "en": 12000, "hq": 23000}  # every token id < 32000, the tiny model's vocabulary


def _write_shard(prefix: Path, first_id: int, n_tokens: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < n_tokens:
        lengths.append(int(rng.integers(3, 30)))
    tokens = np.arange(first_id, first_id + sum(lengths), dtype=np.uint16)
    w = ShardWriter(prefix, np.dtype(np.uint16))
    w.add_documents(tokens, np.array(lengths))
    w.finish()
    return str(prefix)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stage_shards")
    return {name: _write_shard(root / name, first, 6000, i) for i, (name, first) in enumerate(FIRST_ID.items())}


def _mix(shards: dict[str, str], weights: str) -> str:
    parts = weights.split()
    return " ".join(f"{w} {n}={shards[n]}" for w, n in zip(parts[::2], parts[1::2], strict=True))


# stage 0: half English replay; stage 1 (from sample 200): a fifth; stage 2 (from 360): a high-quality stage
PLAN = [(0, "0.5 ja 0.5 en"), (200, "0.8 ja 0.2 en"), (360, "0.6 ja 0.1 en 0.3 hq")]
TOTAL = 480


def _stages(shards):
    first = MixtureDataset(_mix(shards, PLAN[0][1]), seq_len=SEQ, seed=3, allow_repeat=False, block_size=BLOCK)
    return stage_datasets(first, [(start, _mix(shards, w)) for start, w in PLAN[1:]])


def _loaders(stages, micro: int, world: int) -> list[MixtureLoader]:
    return [MixtureLoader(stages[0][1], micro, r, world, stages[1:]) for r in range(world)]


def _serve(shards, micro: int, world: int, restarts: set[int]) -> list[tuple[int, int, bytes]]:
    """(stage, index within the stage, tokens) of every sample served until TOTAL, in order; at each step in
    `restarts` every rank saves its state and new processes (new datasets) resume from it."""
    loaders, out, step = _loaders(_stages(shards), micro, world), [], 0
    while loaders[0].state.samples_consumed < TOTAL:
        if step in restarts:
            states = [json.loads(json.dumps(lo.state_dict())) for lo in loaders]
            loaders = _loaders(_stages(shards), micro, world)
            for lo, s in zip(loaders, states, strict=True):
                lo.load_state_dict(s)
        for lo in loaders:
            b = lo.next_batch()
            out += [(lo.stage, int(i), t.tobytes()) for i, t in zip(b["index"], b["tokens"], strict=True)]
        step += 1
    return out


def test_each_stage_serves_its_samples_once_in_order_through_restarts_on_any_ranks(shards):
    whole = _serve(shards, micro=4, world=1, restarts=set())
    assert len(whole) == TOTAL
    for k, (start, _) in enumerate(PLAN):  # within each stage: its samples 0, 1, 2, ... each once, none skipped
        end = PLAN[k + 1][0] if k + 1 < len(PLAN) else TOTAL
        assert [i for s, i, _ in whole if s == k] == list(range(end - start))
    # restarts mid-stage and right at a boundary (step 50 = sample 200), on 2 ranks: the same samples
    cut = _serve(shards, micro=2, world=2, restarts={7, 50, 51, 77, 90})
    assert sorted(cut) == sorted(whole)


def test_each_corpus_continues_its_pass_across_stages(shards):
    stages = _stages(shards)
    served: dict[str, list[int]] = {n: [] for n in FIRST_ID}
    for k, (start, ds) in enumerate(stages):
        end = stages[k + 1][0] if k + 1 < len(stages) else TOTAL
        for i in range(end - start):
            c, stream_index = ds.locate(i)
            served[ds.corpora[c].name].append(stream_index)
            targets = ds[i]["tokens"][1:]
            served.setdefault(f"{ds.corpora[c].name} tokens", []).extend(targets.tolist())
    for name in FIRST_ID:  # a corpus's samples over the run are its stream's first ones, each once
        assert sorted(served[name]) == list(range(len(served[name])))
        tokens = served[f"{name} tokens"]
        assert len(tokens) == len(set(tokens))  # no token is a target twice, across stages either
    # the English replay picks up where stage 0 left it: its first sample of stage 1 is stream sample 100
    assert stages[1][1].locate(int(np.argmax(stages[1][1].pattern == 1)))[1] == 100
    # a stage's fingerprint says where its corpora continue from, so a resume cannot confuse two stages
    assert stages[1][1].fingerprint_parts()["offsets"] == {"ja": 100, "en": 100}
    assert "offsets" not in stages[0][1].fingerprint_parts()  # a run without stages keeps its fingerprint


def test_realised_shares_per_stage_match_the_weights(shards):
    loader = _loaders(_stages(shards), 4, 1)[0]
    report = loader.stage_report(TOTAL)
    shares = [{r["name"]: round(r["share"], 3) for r in st["rows"]} for st in report]
    assert shares == [{"ja": 0.5, "en": 0.5}, {"ja": 0.8, "en": 0.2}, {"ja": 0.6, "en": 0.1, "hq": 0.3}]
    assert [(st["start_sample"], st["end_sample"]) for st in report] == [(0, 200), (200, 360), (360, 480)]


def test_a_stage_cannot_start_in_the_past_and_a_changed_stage_is_refused(shards):
    stages = _stages(shards)
    loader = _loaders(stages, 4, 1)[0]
    for _ in range(60):
        loader.next_batch()  # 240 samples: inside stage 1
    state = loader.state_dict()
    added = stage_datasets(stages[0][1], [(200, _mix(shards, PLAN[1][1])), (220, _mix(shards, "1 ja"))])
    with pytest.raises(UserError, match="a stage cannot start in the past"):  # 220 is behind the position 240
        MixtureLoader(added[0][1], 4, 0, 1, added[1:]).load_state_dict(state)
    other = stage_datasets(stages[0][1], [(200, _mix(shards, "0.7 ja 0.3 en"))])
    with pytest.raises(UserError, match="mixture changed"):
        MixtureLoader(other[0][1], 4, 0, 1, other[1:]).load_state_dict(state)


def test_training_with_stages_logs_and_reports_shares_per_stage(shards, tmp_path):
    from moecpt.config import load_config
    from moecpt.report.plots import plot_run
    from moecpt.report.report import _training_section, stage_table, training_summary
    from moecpt.train.metrics import read_metrics
    from moecpt.train.trainer import train

    from ..tiny_config import tiny_config_toml

    corpora = {name: [prefix] for name, prefix in shards.items()}
    later = [{"start_step": 3, "mixture": "0.5 ja 0.25 en 0.25 hq"}]
    toml = tiny_config_toml(tmp_path / "run", tmp_path / "cache", corpora,
                            {"data": {"mixture": "0.5 ja 0.5 en", "seq_len": SEQ, "stages": later},
                             "training": {"steps": 6}, "checkpoint": {"interval": 2}})
    (tmp_path / "cfg.toml").write_text(toml)
    cfg = load_config(tmp_path / "cfg.toml")
    assert cfg.data.stages[0].start_step == 3 and load_config(tmp_path / "cfg.toml") == cfg
    as_tables = "\n".join(line for line in toml.splitlines() if not line.startswith("stages = "))
    (tmp_path / "tables.toml").write_text(as_tables + '\n[[data.stages]]\nstart_step = 3\nmixture = "0.5 ja 0.25 en 0.25 hq"\n')
    assert load_config(tmp_path / "tables.toml") == cfg  # the same stages written as [[data.stages]] tables
    result = train(cfg)
    assert result["reason"] == "finished"
    assert {"val_bpb/ja", "val_bpb/en", "val_bpb/hq"} <= set(result["validation"])  # every stage's corpora
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["data_stage"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert records[-1]["stage_share/hq"] == pytest.approx(0.25) and "loss/hq" in records[-1]
    stages = json.loads((tmp_path / "run" / "data_stages.json").read_text())["stages"]
    assert [(s["start_step"], s["end_step"]) for s in stages] == [(0, 3), (3, 6)]
    table = "\n".join(stage_table(stages))
    assert "| 1 | 4-6 | ja | 0.500 | 0.500 |" in table and "| hq | 0.250 | 0.250 |" in table
    info = {"run_dir": str(tmp_path / "run"), "steps": 6, "tokens": 6 * 4 * SEQ, "mixture": cfg.data.mixture,
            "params": 1e6, "active_params": 1e6, "device": "cpu", "world_size": 1, "train_seconds": 1.0,
            "steps_this_session": 6, "mixture_report": []}
    section = "\n".join(_training_section("cpt", training_summary(info), {}))  # the `moecpt run` report's
    assert table in section and "LR schedule: `warmup_cosine`, cosine decay (steps: warmup 1-3, decay 4-6)" in section
    assert any(p.name == "stage_shares.png" for p in plot_run(tmp_path / "run"))
    # a run resumed from step 2 (stage 0) or step 4 (mid-stage 1) trains on the same samples: the same losses
    for step in (2, 4):
        again = tmp_path / f"from{step}"
        shutil.copytree(tmp_path / "run" / "checkpoints" / f"step_{step:08d}", again / "checkpoints" / f"step_{step:08d}")
        assert train(load_config(tmp_path / "cfg.toml", [f"--run_dir={again}"]))["reason"] == "finished"
        assert [(r["step"], r["loss"]) for r in read_metrics(again) if "loss" in r] == [
            (r["step"], r["loss"]) for r in records if r["step"] > step]
    # a stage boundary outside the run, or a stage naming an unknown corpus, is refused with the key
    with pytest.raises(UserError, match=r"data.stages\[0\].start_step = 6 must be above 0 and below training.steps"):
        load_config(tmp_path / "cfg.toml", ["--data.stages=[{start_step = 6, mixture = '1 ja'}]"])
    with pytest.raises(UserError, match=r"data.stages\[0\].mixture names 'de'"):
        load_config(tmp_path / "cfg.toml", ["--data.stages=[{start_step = 2, mixture = '1 de'}]"])
