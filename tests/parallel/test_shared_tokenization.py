"""Multi-rank runs share the tokenization of raw corpora before training, with no rank in a collective while
another tokenizes (each rank its share, then a wait on the shard files). The same 2-rank run writes
asynchronous checkpoints (`checkpoint.async_save`) through a process group of their own."""

from __future__ import annotations

from moecpt.config import load_config
from moecpt.data.indexed import shard_exists
from moecpt.data.preprocess import cache_prefix
from moecpt.train import checkpoint as ckpt_lib
from moecpt.train.metrics import read_metrics
from moecpt.train.setup import raw_sources

from .conftest import torchrun


def test_two_ranks_tokenize_one_corpus_each_then_train_with_async_checkpoints(parallel_config, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "fresh-cache"
    overrides = [f"--run_dir={run}", f"--data.cache_dir={cache}", "--training.steps=2", "--checkpoint.interval=1",
                 "--checkpoint.async_save=true", "--checkpoint.keep_last=5"]
    cfg = load_config(parallel_config, overrides)
    sources = raw_sources(cfg)
    assert len(sources) == 2  # ja and en: one per rank
    proc = torchrun(2, ["-m", "moecpt.train", "--config", str(parallel_config), *overrides])
    said = proc.stdout + proc.stderr
    for rank, src in enumerate(sources):
        assert f"rank {rank} tokenizing {src}" in said
    prefixes = [cache_prefix([src], cache) for src in sources]
    assert all(shard_exists(p) for p in prefixes)  # the shards a one-process run would write and read
    assert not list(cache.glob("*.tmp*"))
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2]
    done = ckpt_lib.list_checkpoints(run / "checkpoints")
    assert [s for s, _ in done] == [1, 2] and all(ckpt_lib.verify_checkpoint(d) == [] for _, d in done)
    assert not list((run / "checkpoints").glob("*.tmp"))
