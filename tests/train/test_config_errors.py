"""Config values the robustness trial found accepted or blamed on the wrong key: each is refused with the key,
the value and the fix."""

from __future__ import annotations

import pytest

from moecpt.errors import UserError
from moecpt.train.trainer import Trainer


@pytest.mark.parametrize(("override", "message"), [
    ("--checkpoint.keep_every=-1", r"config: checkpoint.keep_every must be >= 0 .*\(got -1\)"),
    ("--checkpoint.recovery_steps=-2", r"config: checkpoint.recovery_steps must be >= 0 \(got -2\)"),
    ("--optimizer.lr=inf", r"config: optimizer.lr must be a positive finite number, e.g. 2e-5 \(got inf\)"),
    ("--optimizer.lr=nan", r"config: optimizer.lr must be a positive finite number"),
    ("--optimizer.lr=-1", r"config: optimizer.lr must be a positive finite number, e.g. 2e-5 \(got -1.0\)"),
    ("--data.valid_fraction=1.5", r"config: data.valid_fraction must be at least 0 and below 1 .*\(got 1.5\)"),
    ("--data.valid_fraction=1", r"config: data.valid_fraction must be at least 0 and below 1"),
    ("--data.mixture=0.5 ja 0.5 fr", r"config: data.mixture names 'fr', which is neither a key of \[data.corpora\] "
                                     r"\(keys: ja, en\) nor a shard prefix or file; add it under \[data.corpora\]"),
    ("--data.mixture=inf ja 0.3 en", r"config: data.mixture: the weight of 'ja' must be a positive finite number "
                                     r"\(got inf\)"),
    ("--data.mixture=0 ja 1 en", r"the weight of 'ja' must be a positive finite number \(got 0\)"),
    ("--data.mixture=x ja 1 en", r"weight 'x' of 'ja' is not a number"),
])
def test_a_bad_value_is_refused_naming_the_key_and_the_fix(tiny_config, override, message):
    with pytest.raises(UserError, match=message):
        tiny_config(override)


def test_an_empty_corpus_list_is_refused_before_tokenizing(tiny_config, monkeypatch):
    from moecpt.train import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "prepare_data", lambda *a: pytest.fail("tokenized first"))
    with pytest.raises(UserError, match=r"config: data.corpora.fr is empty; list its JSON Lines files .*"
                                        r"--data.corpora.fr="):
        Trainer.from_config(tiny_config("--data.corpora.fr=[]", "--data.mixture=0.5 ja 0.3 en 0.2 fr"))


def test_a_mixture_may_still_name_shard_prefixes_and_files(tiny_config, tmp_path):
    shard = tmp_path / "made-later" / "fr"  # a path: perhaps written by an earlier step
    assert tiny_config(f"--data.mixture=0.5 ja 0.5 {shard}").data.mixture.endswith(str(shard))


def test_seq_len_above_the_models_positions_is_refused_before_tokenizing(tiny_config, monkeypatch):
    from moecpt.train import trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "prepare_data", lambda *a: pytest.fail("tokenized first"))
    with pytest.raises(UserError, match=r"config: data.seq_len \(4096\) is above the model's "
                                        r"max_position_embeddings \(2048\); lower data.seq_len .*"
                                        r"--model.overrides.max_position_embeddings=4096"):
        Trainer.from_config(tiny_config("--data.seq_len=4096"))
