"""One small interface over the tokenizer formats in use: SentencePiece models, Hugging Face `tokenizer.json`, and
tiktoken's `o200k_base.tiktoken` ranks, read as gpt-oss's `o200k_harmony` encoding (offline, with `tiktoken`).

The default is the real Mixtral-8x7B tokenizer (SentencePiece, 32,000 pieces), which the PyPI package
`mistral-common` ships as `mistral_common/data/tokenizer.model.v1`. `encode` never adds BOS/EOS: where those go is
the caller's decision (the tokenize step appends EOS per document). `add_bos` says whether the publisher's
tokenizer puts BOS in front of a text (tokenizer_config.json's `add_bos_token`, else the tokenizer.json
post-processor): DeepSeek-V3's config says yes where its tokenizer.json does not, and transformers 5 follows the
tokenizer.json; `tokenizer_json_for_export` writes a tokenizer.json whose post-processor adds it, so that an
export, moecpt's evaluation and transformers agree.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from moecpt.data.indexed import file_sha256
from moecpt.errors import UserError

DEFAULT_TOKENIZER = "mistral_common/data/tokenizer.model.v1"

_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]", "<｜end▁of▁sentence｜>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "[BOS]", "<｜begin▁of▁sentence｜>")  # last: DeepSeek
_PAD_NAMES = ("<pad>", "<|pad|>", "<|padding|>", "[PAD]")
# End-of-turn tokens that chat models' tokenizer_config.json names as eos_token. A document ends with the
# end-of-text token of pretraining instead (Qwen3: <|endoftext|>, not <|im_end|>), when the vocabulary has one.
_TURN_END_NAMES = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|return|>")


def default_tokenizer_path() -> Path:
    """The Mixtral tokenizer file inside the installed `mistral-common`, located without importing it."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default tokenizer (Mixtral-8x7B) comes from the package mistral-common: "
            "pip install mistral-common, or pass --tokenizer PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise UserError(
            f"{path} is missing from the installed mistral-common; reinstall it or pass --tokenizer PATH"
        )
    return path


class Tokenizer:
    """A loaded tokenizer. Use `load_tokenizer` to make one.

    Attributes: `bos_id` (None if the tokenizer has none: Qwen, OLMoE), `eos_id` (the token that ends a
    document), `pad_id` (or None), `vocab_size` (the number of token ids the tokenizer can produce: its largest
    id + 1, added tokens included; a model may have more embedding rows), `fingerprint` (sha256 of the
    tokenizer file, so a change of tokenizer is detectable), `path`.
    """

    bos_id: int | None
    add_bos: bool = False
    eos_id: int
    pad_id: int | None
    vocab_size: int
    fingerprint: str
    path: str

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_batch_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Like `encode_batch`, as numpy arrays (avoids building Python lists on the preprocessing hot path)."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def byte_length(self, ids) -> int:
        """UTF-8 bytes of the text that `ids` stand for; special tokens (BOS, EOS, pad) count zero."""
        return len(self.decode(list(ids)).encode("utf-8"))

    def pieces(self, text: str) -> list[str]:
        """The token strings of `text` (no BOS/EOS), as Hugging Face's `tokenizer.tokenize` gives them: for
        SentencePiece vocabularies with their "▁" marks and byte pieces such as "<0xE3>"."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"
        )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file (Mixtral, Mistral, Llama-2 and Swallow tokenizers)."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = str(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path}: not a readable SentencePiece model ({e})") from e
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = _or_none(self._sp.bos_id())
        self.add_bos = self.bos_id is not None  # the Llama/Mixtral convention (export writes add_bos_token)
        self.pad_id = _or_none(self._sp.pad_id())
        eos = _or_none(self._sp.eos_id())
        if eos is None:
            raise UserError(f"{path}: the SentencePiece model defines no EOS piece, which packing needs")
        self.eos_id = eos
        self.fingerprint = file_sha256(self.path)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=1)

    def encode_batch_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return self._sp.encode_as_numpy(list(texts), num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def pieces(self, text: str) -> list[str]:
        return self._sp.encode(text, out_type=str)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (read with the `tokenizers` library, not `transformers`).

    Special tokens come from a `tokenizer_config.json` beside it when present (`"bos_token": null` there means
    no BOS), else from the usual names among the file's special added tokens (`</s>`, `<|endoftext|>`, ...).
    A chat end-of-turn eos_token (`<|im_end|>`) gives way to the vocabulary's end-of-text token, which is what
    separated documents in pretraining.
    """

    def __init__(self, path: str | os.PathLike):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as e:
            raise UserError(
                "reading tokenizer.json needs the package tokenizers: pip install tokenizers"
            ) from e
        self.path = str(path)
        try:
            self._tok = _Tok.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise UserError(f"{path}: not a readable Hugging Face tokenizer.json ({e})") from e
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self._added = self._tok.get_added_tokens_decoder()
        self._byte_table: np.ndarray | None = None
        self._byte_table_known = False
        config = special_tokens_from_config(Path(path).parent / "tokenizer_config.json")
        self.bos_id = self._find(config, "bos_token", _BOS_NAMES)
        self.add_bos = self.bos_id is not None and config_adds_bos(
            Path(path).parent / "tokenizer_config.json", self._template_starts_with(self.bos_id))
        self.pad_id = self._find(config, "pad_token", _PAD_NAMES)
        eos = self._find(config, "eos_token", _EOS_NAMES)
        if config.get("eos_token") in _TURN_END_NAMES:
            eos = self._find({}, "eos_token", _EOS_NAMES) or eos
        if eos is None:
            raise UserError(
                f"{path}: no end-of-sequence token found (looked for eos_token in tokenizer_config.json and for "
                f"{', '.join(_EOS_NAMES)}); add eos_token to a tokenizer_config.json beside it"
            )
        self.eos_id = eos
        self.fingerprint = file_sha256(self.path)

    def _find(self, config: dict[str, str | None], key: str, names: tuple[str, ...]) -> int | None:
        """The id of the token `config` names under `key` (None when it says null), else of the first of
        `names` that is a special added token of the file, else of the first in the vocabulary at all."""
        if key in config:
            i = self._tok.token_to_id(config[key]) if config[key] else None
            return None if i is None else int(i)
        special = {t.content: i for i, t in self._added.items() if t.special}
        found = next((special[n] for n in names if n in special), None)
        if found is None:
            found = next((i for i in map(self._tok.token_to_id, names) if i is not None), None)
        return None if found is None else int(found)

    def _template_starts_with(self, token_id: int | None) -> bool:
        """Whether the file's post-processor puts token `token_id` in front of a single text."""
        proc = self._tok.post_processor
        if proc is None or token_id is None:
            return False
        state = json.loads(proc.__getstate__())
        steps = state.get("processors", [state]) if state.get("type") == "Sequence" else [state]
        for step in steps:
            single = step.get("single") or []
            if step.get("type") == "TemplateProcessing" and single and "SpecialToken" in single[0]:
                first = single[0]["SpecialToken"]["id"]
                ids = step.get("special_tokens", {}).get(first, {}).get("ids", [])
                return ids == [token_id] or self._tok.token_to_id(first) == token_id
        return False

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def byte_length(self, ids) -> int:
        """Exact for byte-level BPE (Qwen, OLMoE, DeepSeek: each token is a fixed byte string, so a token
        cut out of a multi-byte character counts its own bytes); else the text decoded without special tokens."""
        table = self.byte_table()
        if table is None:
            text = self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
            return len(text.encode("utf-8"))
        return int(table[np.asarray(ids, dtype=np.int64)].sum())

    def byte_table(self) -> np.ndarray | None:
        """Bytes of each token id (special tokens 0) for a byte-level tokenizer, else None."""
        if not self._byte_table_known:
            self._byte_table = byte_level_table(self._tok, self.vocab_size)
            self._byte_table_known = True
        return self._byte_table

    def pieces(self, text: str) -> list[str]:
        return list(self._tok.encode(text, add_special_tokens=False).tokens)


# ---- gpt-oss: o200k_harmony from tiktoken's o200k_base ranks -------------------------------------------
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # tiktoken's expected_hash
# The o200k split pattern (tiktoken's o200k_base, which o200k_harmony shares).
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
HARMONY_NAMED = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
                 "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008,
                 "<|call|>": 200012}
HARMONY_VOCAB = 201088  # ids 0..201087: 199,998 ranks, then the specials (gpt-oss's embedding rows)


def harmony_special_tokens() -> dict[str, int]:
    """o200k_harmony's special tokens as tiktoken defines them: the named ones, `<|reserved_N|>` for every
    other id from 200,000 to 201,087, and o200k_base's `<|endofprompt|>` (200018, also reserved_200018)."""
    named = set(HARMONY_NAMED.values())
    return ({"<|endofprompt|>": 200018} | HARMONY_NAMED
            | {f"<|reserved_{i}|>": i for i in range(200000, HARMONY_VOCAB) if i not in named})


class TiktokenTokenizer(Tokenizer):
    """gpt-oss's `o200k_harmony` built offline from an `o200k_base.tiktoken` ranks file (checked by its
    sha256) and the harmony special tokens, run by `tiktoken`. Special-token text inside a document is read
    as that special token, as a Hugging Face tokenizer.json of the same encoding does. No BOS is added
    (harmony has `<|startoftext|>` but never puts it in front of a text); a document ends with
    `<|endoftext|>` (199,999), the pretraining separator, not the chat's `<|return|>`."""

    def __init__(self, path: str | os.PathLike):
        try:
            import tiktoken
        except ImportError as e:
            raise UserError("reading a .tiktoken file needs the package tiktoken: pip install tiktoken") from e
        self.path = str(path)
        self.fingerprint = file_sha256(self.path)
        if self.fingerprint != O200K_SHA256:
            raise UserError(f"{path}: not tiktoken's o200k_base.tiktoken (sha256 {self.fingerprint}); moecpt reads "
                            "this file as gpt-oss's o200k_harmony encoding only")
        ranks = {}
        for line in Path(path).read_bytes().splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        self._enc = tiktoken.Encoding("o200k_harmony", pat_str=O200K_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=harmony_special_tokens())
        self._ranks = ranks
        self.vocab_size = self._enc.n_vocab
        self.bos_id, self.add_bos, self.pad_id = None, False, None
        self.eos_id = HARMONY_NAMED["<|endoftext|>"]
        self._byte_table: np.ndarray | None = None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_batch(list(texts), allowed_special="all", num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")

    def byte_length(self, ids) -> int:
        return int(self.byte_table()[np.asarray(ids, dtype=np.int64)].sum())

    def byte_table(self) -> np.ndarray:
        """Bytes of each id (special tokens 0): exact, every rank is a byte string."""
        if self._byte_table is None:
            self._byte_table = np.zeros(self.vocab_size, dtype=np.int64)
            for token, rank in self._ranks.items():
                self._byte_table[rank] = len(token)
        return self._byte_table

    def pieces(self, text: str) -> list[str]:
        """Token strings spelled in the byte-level alphabet, as a Hugging Face tokenizer.json's tokens are."""
        table = byte_level_alphabet()
        return [self._enc.decode_single_token_bytes(i).decode("latin-1").translate(table)
                if i < len(self._ranks) else self._enc.decode([i]) for i in self.encode(text)]


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character map (printable bytes as themselves, the rest shifted past 255), as a
    `str.translate` table over latin-1 characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_table(tok, vocab_size: int) -> np.ndarray | None:
    """Bytes of each id of the `tokenizers.Tokenizer` `tok` when it is byte-level (its decoder is ByteLevel and
    every vocabulary entry is spelled in the byte alphabet); special added tokens count 0, other added tokens
    the UTF-8 bytes of their text. None for any other tokenizer."""
    if type(tok.decoder).__name__ != "ByteLevel":
        return None
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    added = tok.get_added_tokens_decoder()
    table = np.zeros(vocab_size, dtype=np.int64)
    for token, i in tok.get_vocab(with_added_tokens=False).items():
        if i in added:
            continue
        if not set(token) <= alphabet:
            return None
        table[i] = len(token)  # one character of the byte alphabet per byte
    for i, t in added.items():
        table[i] = 0 if t.special else len(t.content.encode("utf-8"))
    return table


def special_tokens_from_config(path: Path) -> dict[str, str | None]:
    """bos_token / eos_token / pad_token of a `tokenizer_config.json` (a key set to null maps to None; a key
    absent is absent); {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    out: dict[str, str | None] = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        if key not in cfg:
            continue
        value = cfg[key]
        if isinstance(value, dict):  # {"content": "</s>", ...} in older configs
            value = value.get("content")
        out[key] = value if isinstance(value, str) else None
    return out


def config_adds_bos(config_path: Path, post_processor_adds: bool) -> bool:
    """Whether a tokenizer puts BOS in front of a text: `add_bos_token` of its tokenizer_config.json when the
    file sets it (transformers 4's rule for Llama-style tokenizers), else what the tokenizer.json post-processor
    does."""
    if config_path.is_file():
        try:
            cfg = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{config_path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        if isinstance(cfg.get("add_bos_token"), bool):
            return cfg["add_bos_token"]
    return post_processor_adds


def tokenizer_json_for_export(tokenizer: Tokenizer) -> str | None:
    """The text of the tokenizer.json an export should write for a Hugging Face tokenizer that adds BOS where
    its own post-processor does not (DeepSeek-V3: `add_bos_token` true in tokenizer_config.json only, which
    transformers 5 ignores): the same file with a post-processor that puts BOS first, after the original one.
    None when the file can be copied as it is."""
    if not isinstance(tokenizer, HFTokenizer) or not tokenizer.add_bos:
        return None
    if tokenizer._template_starts_with(tokenizer.bos_id):
        return None
    from tokenizers import processors

    bos = tokenizer._tok.id_to_token(tokenizer.bos_id)
    template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                             special_tokens=[(bos, tokenizer.bos_id)])
    data = json.loads(Path(tokenizer.path).read_text(encoding="utf-8"))
    own = data.get("post_processor")
    steps = [json.loads(template.__getstate__())]
    if own is not None:
        steps = (own["processors"] if own.get("type") == "Sequence" else [own]) + steps
    data["post_processor"] = {"type": "Sequence", "processors": steps}
    return json.dumps(data, ensure_ascii=False)


def _or_none(i: int) -> int | None:
    return None if i < 0 else int(i)


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer: None for the default Mixtral one; a SentencePiece `.model`; a `tokenizer.json`; an
    `o200k_base.tiktoken` (gpt-oss's o200k_harmony); or a directory holding one of them (in that order)."""
    p = default_tokenizer_path() if path is None else Path(path)
    if p.is_dir():
        for name in ("tokenizer.model", "tokenizer.json", "o200k_base.tiktoken"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise UserError(f"{p}: directory has neither tokenizer.model nor tokenizer.json")
    if not p.is_file():
        raise UserError(
            f"{p}: tokenizer not found; pass --tokenizer with a .model file, tokenizer.json or directory"
        )
    if p.suffix == ".json":
        return HFTokenizer(p)
    if p.suffix == ".tiktoken":
        return TiktokenTokenizer(p)
    return SentencePieceTokenizer(p)
