"""The tokenizers of the two new families, with the real files: gpt-oss's o200k_harmony built offline from
o200k_base.tiktoken (the same ids as tiktoken's own o200k_harmony), and DeepSeek-V3's, whose BOS is added by
its tokenizer_config.json but not its tokenizer.json (moecpt, an export and transformers agree on it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from moecpt.data.tokenizer import load_tokenizer, tokenizer_json_for_export
from moecpt.errors import UserError
from moecpt.train.setup import check_token_ids

CHECK = "吾輩は猫である。名前はまだ無い。"
TEXTS = [CHECK, "def f(x):\n    return x ** 2  # ok\r\n", "<|start|>user<|message|>hi<|end|><|endoftext|>",
         "  spaces\t\ttabs 12345 ÄÖÜ 🤖 don't WE'LL", "「" + CHECK + "」"]


@pytest.fixture(scope="module")
def harmony(shared_data):
    return load_tokenizer(shared_data / "tokenizers" / "gpt-oss")  # the directory holds o200k_base.tiktoken


def test_o200k_harmony_gives_tiktokens_own_ids(harmony, shared_data, tmp_path):
    """tiktoken's o200k_harmony, fed the same file through its cache (named by the sha1 of its URL), in a
    separate process (its registry caches encodings)."""
    pytest.importorskip("tiktoken")
    shutil.copyfile(shared_data / "tokenizers" / "gpt-oss" / "o200k_base.tiktoken",
                    tmp_path / "fb374d419588a4632f3f557e76b4b70aebbca790")
    code = ("import json, sys, tiktoken; e = tiktoken.get_encoding('o200k_harmony'); "
            "print(json.dumps([e.n_vocab] + [e.encode(t, allowed_special='all') for t in json.load(sys.stdin)]))")
    import json

    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(TEXTS), capture_output=True, text=True,
                         env={**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path)}, check=True, timeout=120)
    n_vocab, *theirs = json.loads(out.stdout)
    assert n_vocab == harmony.vocab_size == 201088
    assert theirs == harmony.encode_batch(TEXTS)


def test_o200k_harmony_specials_bytes_and_documents(harmony):
    assert len(harmony.encode(CHECK)) == 14 and len(harmony.encode("「" + CHECK + "」")) == 15
    assert (harmony.bos_id, harmony.add_bos, harmony.eos_id, harmony.pad_id) == (None, False, 199999, None)
    assert harmony.encode("<|return|><|call|><|startoftext|><|reserved_201087|>") == [200002, 200012, 199998, 201087]
    for text in TEXTS:
        ids = harmony.encode(text)
        assert harmony.decode(ids) == text
        specials = sum(len(s) for s in ("<|start|>", "<|message|>", "<|end|>", "<|endoftext|>") if s in text)
        assert harmony.byte_length(ids) == len(text.encode("utf-8")) - specials
    assert harmony.pieces("Hello world") == ["Hello", "Ġworld"]


def test_token_ids_past_the_embedding_rows_are_refused(harmony):
    """gpt-oss has 201,088 rows, exactly the encoding's ids; one published definition has an id 201,088."""
    check_token_ids(harmony, dataset=_NoShards(), vocab_size=201088)
    harmony_plus = load_tokenizer(harmony.path)
    harmony_plus.vocab_size = 201089
    with pytest.raises(UserError, match="token ids up to 201088 but the model has 201088 embedding rows"):
        check_token_ids(harmony_plus, dataset=_NoShards(), vocab_size=201088)


class _NoShards:
    corpora: list = []


def test_another_tiktoken_file_is_refused(tmp_path):
    (tmp_path / "cl100k_base.tiktoken").write_text("IQ== 0\n")
    with pytest.raises(UserError, match="not tiktoken's o200k_base"):
        load_tokenizer(tmp_path / "cl100k_base.tiktoken")


def test_deepseek_v3_bos_agrees_between_moecpt_an_export_and_transformers(shared_data, tmp_path):
    """tokenizer_config.json says add_bos_token; tokenizer.json's post-processor adds nothing, and transformers
    5 follows the latter. moecpt adds BOS (evaluation scores [BOS] + ids) and the tokenizer.json an export
    writes adds it too, so transformers reading the export gives moecpt's ids."""
    transformers = pytest.importorskip("transformers")
    src = shared_data / "tokenizers" / "deepseek-v3"
    tok = load_tokenizer(src)
    assert (tok.bos_id, tok.add_bos, tok.eos_id, tok.vocab_size) == (0, True, 1, 128815)
    assert len(tok.encode(CHECK)) == 12
    published = transformers.AutoTokenizer.from_pretrained(src)
    assert published(CHECK)["input_ids"] == tok.encode(CHECK)  # transformers 5: no BOS from these files

    out = tmp_path / "export"
    out.mkdir()
    (out / "tokenizer.json").write_text(tokenizer_json_for_export(tok))
    shutil.copyfile(src / "tokenizer_config.json", out / "tokenizer_config.json")
    exported = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert exported(text)["input_ids"] == [tok.bos_id, *tok.encode(text)]
    again = load_tokenizer(out)
    assert again.add_bos and again.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert tokenizer_json_for_export(again) is None  # already adds it

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(src / "tokenizer.json", alone / "tokenizer.json")
    plain = load_tokenizer(alone)  # without the config: no BOS added, as transformers reads the file alone
    assert (plain.bos_id, plain.add_bos, plain.eos_id) == (0, False, 1) and tokenizer_json_for_export(plain) is None
    assert transformers.PreTrainedTokenizerFast(tokenizer_file=str(alone / "tokenizer.json"))(CHECK)["input_ids"] \
        == plain.encode(CHECK)
