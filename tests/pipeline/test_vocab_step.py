"""The recipe's [vocab] step: `moecpt run` extends the tokenizer on the recipe's Japanese text, resizes the model
the cpt stage starts from (here an upcycled one), trains it on text tokenized with the new tokenizer, and
reports tokens per character old vs new and the old vocabulary's unchanged logits; recipes whose [vocab] step
cannot run are refused when they load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moecpt.cli import main
from moecpt.data.indexed import IndexedShard
from moecpt.data.preprocess import tokenize_corpus
from moecpt.data.tokenizer import load_tokenizer
from moecpt.errors import UserError
from moecpt.pipeline.recipe import load_recipe
from moecpt.pipeline.steps import MergeSection, TaskVectorSection, check_merge_vocab, check_shard_tokenizer
from moecpt.train.checkpoint import load_model

from ..corpora import SHARED_DATA
from ..tools.dense_models import make_dense
from .test_cpt_steps import BASE, UPCYCLE

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "data" / "fixtures"
VOCAB = '\n[vocab]\nadd = 400\nheldout_ja = "{ja}"\nheldout_en = "{en}"\n'


def _recipe(tmp_path: Path, corpora: dict[str, list[str]], vocab: str = VOCAB) -> Path:
    heldout = tmp_path / "heldout.jsonl"  # held-out bits per byte: two short documents
    heldout.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                               for t in ("吾輩は猫である。名前はまだ無い。", "どこで生れたかとんと見当がつかぬ。")))
    text = (BASE.format(ja=corpora["ja"][0], en=corpora["en"][0], heldout=heldout)
            .replace("steps = 4", "steps = 2").replace("keep_last = 3", "keep_last = 1")
            + UPCYCLE.format(dense=tmp_path / "dense").replace("granularity = 2", "granularity = 1")
            + vocab.format(ja=FIXTURES / "heldout_ja.txt", en=FIXTURES / "heldout_en.txt"))
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_vocab_step_extends_resizes_trains_with_the_new_tokenizer_and_reports_both_numbers(tmp_path, tiny_corpora,
                                                                                           capsys):
    make_dense("llama", tmp_path / "dense", vocab_size=32000, max_position_embeddings=128)
    recipe, run = _recipe(tmp_path, tiny_corpora), tmp_path / "run"
    argv = ["run", str(recipe), "--run-dir", str(run)]

    # The cluster way: the step alone first, then the training config that uses what it made.
    assert main([*argv, "--stop-after", "vocab"]) == 0
    assert {p.stem for p in (run / "stages").glob("*.json")} == {"corpora", "upcycle", "vocab"}
    capsys.readouterr()
    assert main([*argv, "--print-config", "cpt"]) == 0
    printed = capsys.readouterr().out
    assert f'init_from = "{run / "resized"}"' in printed and f'tokenizer = "{run / "tokenizer"}"' in printed
    assert f"moecpt data tokenize {tiny_corpora['ja'][0]} --tokenizer {run / 'tokenizer'}" in printed
    assert "--stop-after vocab" not in printed  # done already

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tokens per character ja: " in out and "max |difference| 0.0" in out
    summary = json.loads((run / "summary.json").read_text())
    vocab = summary["steps"]["vocab"]
    ext, tpc = vocab["extension"], vocab["tokens_per_character"]
    assert (ext["base_vocab_size"], ext["vocab_size"]) == (32000, 32000 + ext["added"]) and ext["added"] > 300
    assert tpc["ja"]["new_tokens_per_character"] < 0.95 * tpc["ja"]["old_tokens_per_character"]
    assert abs(tpc["en"]["change"]) < 0.02
    assert tpc["ja"]["characters"] == len(FIXTURES.joinpath("heldout_ja.txt").read_text(encoding="utf-8"))
    assert vocab["resize"]["old_logits_max_abs_diff"] == 0.0
    assert vocab["model"] == str(run / "upcycled")  # vocab after upcycle
    report = (run / "report.md").read_text()
    assert "## Vocabulary expansion (`vocab`)" in report and "## Upcycling (`upcycle`)" in report
    assert f"| {tpc['ja']['old_tokens_per_character']:.4f} | {tpc['ja']['new_tokens_per_character']:.4f} |" in report
    assert "on old-token inputs: unchanged (largest absolute difference 0.0)" in report

    # The trained model has the new vocabulary: its config, its tokenizer, and new rows that training moved.
    new_size = ext["vocab_size"]
    trained, resized = load_model(run / "hf"), load_model(run / "resized")
    assert trained.config.vocab_size == resized.config.vocab_size == new_size
    assert load_tokenizer(run / "hf").vocab_size == new_size
    emb, start = (m.state_dict()["embed_tokens.weight"] for m in (trained, resized))
    assert not torch.equal(emb[32000:], start[32000:])
    shard = IndexedShard(vocab["shards"]["ja"][0])
    assert max(int(shard.document(i).max()) for i in range(shard.num_documents)) >= 32000  # trained on the new pieces
    assert summary["eval"]["base"]["model"] == str(run / "upcycled")

    stamp = (run / "tokenizer" / "tokenizer.model").stat().st_mtime_ns
    assert main(argv) == 0  # a rerun reuses everything; the report keeps the step
    assert (run / "tokenizer" / "tokenizer.model").stat().st_mtime_ns == stamp
    assert "## Vocabulary expansion (`vocab`)" in (run / "report.md").read_text()
    (run / "stages" / "vocab.json").unlink()  # the step cut short: a retry keeps the tokenizer it made
    assert main([*argv, "--stop-after", "vocab"]) == 0
    assert (run / "tokenizer" / "tokenizer.model").stat().st_mtime_ns == stamp
    assert json.loads((run / "stages" / "vocab.json").read_text())["extension"] == ext


@pytest.mark.parametrize(("vocab", "message"), [
    ("\n[vocab]\nadd = 0\n", r"\[vocab\] add = 0: give the number of pieces"),
    ('\n[vocab]\nadd = 10\ncorpora = ["jp"]\n', r"\[vocab\] corpora: 'jp' is neither a corpus of \[corpora\] \(ja, en\)"),
    ('\n[vocab]\nadd = 10\ncorpora = []\n', r"\[vocab\] corpora is empty"),
    ("\n[vocab]\nadd = 10\nheldout_ja = \"x.txt\"\n", r"\[vocab\] heldout_en: no held-out English text"),
    ("\n[vocab]\nadd = 10\npieces = 5\n", r"unknown key vocab.pieces"),
])
def test_vocab_steps_that_cannot_run_are_refused_when_the_recipe_loads(tmp_path, tiny_corpora, vocab, message):
    path = _recipe(tmp_path, tiny_corpora, vocab)
    path.write_text(path.read_text().replace("[heldout]\nja =", "[heldout]\nxx ="))  # no [heldout] ja or en
    with pytest.raises(UserError, match=message):
        load_recipe(path)


def test_vocab_refuses_shards_to_learn_from_and_shards_of_the_old_tokenizer(tmp_path, tiny_corpora):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "吾輩は猫である。"}\n{"text": "名前はまだ無い。"}\n')
    old = tmp_path / "old"
    tokenize_corpus([docs], old, progress=False)
    path = _recipe(tmp_path, {"ja": [str(old)], "en": tiny_corpora["en"]})
    with pytest.raises(UserError, match=r"\[vocab\] corpora: .*old \(ja\) is a tokenized shard; new pieces are learned "
                       "from text"):
        load_recipe(path)
    qwen = SHARED_DATA / "tokenizers" / "qwen3"
    if not qwen.is_dir():
        pytest.skip("no second tokenizer in ../shared/data/tokenizers")
    with pytest.raises(UserError, match=r"\[corpora\] ja: the shard .*old was tokenized with .*not the extended "
                       r"tokenizer .*moecpt data tokenize FILES --tokenizer"):
        check_shard_tokenizer({"ja": [str(old)], "en": tiny_corpora["en"]}, str(qwen))
    check_shard_tokenizer({"ja": [str(old)]}, str(load_tokenizer(None).path))  # the same tokenizer: accepted


def test_the_vocab_example_recipe_is_valid_and_plans_the_cluster_steps(capsys):
    recipe = load_recipe(REPO / "recipes" / "swallow-mx-vocab.toml")
    assert recipe.vocab.add == 16000 and recipe.vocab.corpora == ["data/jsonl/ja_wikipedia/*.jsonl"]
    cpt = recipe.stage_config("cpt", recipe.corpora)
    assert cpt.data.tokenizer == "runs/swallow-mx-vocab/tokenizer"
    assert recipe.stage_config("cpt", recipe.corpora, extended=False).data.tokenizer == ""  # Mixtral's, extended
    assert main(["run", str(REPO / "recipes" / "swallow-mx-vocab.toml"), "--print-config", "cpt"]) == 0
    out = capsys.readouterr().out
    assert 'init_from = "runs/swallow-mx-vocab/resized"' in out
    head = [line for line in out.splitlines() if line.startswith("#")]
    assert any("--stop-after vocab" in line for line in head)
    assert any(line.startswith("#   moecpt data tokenize 'data/jsonl/ja_swallow_corpus/*.jsonl.zst'") and
               "--tokenizer runs/swallow-mx-vocab/tokenizer --output runs/swallow-mx-vocab/shards/ja" in line
               for line in head)


def test_a_merge_with_models_of_the_old_vocabulary_is_refused_before_training(tmp_path):
    for name, rows in (("instruct", 32000), ("base", 32000), ("same", 32400)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"vocab_size": rows}))
    tv = MergeSection(task_vector=TaskVectorSection(plus=str(tmp_path / "instruct"), minus=str(tmp_path / "base")))
    with pytest.raises(UserError, match=r"\[merge\] embeddings = \"merge\": .*instruct has 32000 vocabulary rows, "
                       r"the vocabulary-expanded model 32400; set embeddings = \"shared_rows\""):
        check_merge_vocab(tv, 32400)
    tv.embeddings = "shared_rows"
    check_merge_vocab(tv, 32400)  # the rows both have are merged
    check_merge_vocab(MergeSection(average=["cpt", str(tmp_path / "same")]), 32400)
    check_merge_vocab(MergeSection(average_last=2), 32400)
