"""Vocabulary expansion: new pieces learned on a corpus, appended to a tokenizer so that every existing id keeps
its piece and the new ids come after the old ones (Swallow's recipe for Llama 2; docs/cpt.md).

A SentencePiece BPE base gets the pieces of a SentencePiece BPE model trained on the corpus with the base's own
normalisation and splitting rules, scored below every old piece (old merges first, then the new ones). A
`tokenizer.json` BPE base gets merges learned on the corpus as the base segments it, appended after the old
merges, so each new merge applies where the old tokenizer stops. `base_tokenizations` gives each new piece's
tokens under the old tokenizer, which the model resize (`moecpt.tools.vocab`) initialises new rows from.
"""

from __future__ import annotations

import gzip
import heapq
import io
import json
import logging
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import IO, Any

from moecpt.data.preprocess import expand_inputs
from moecpt.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer
from moecpt.errors import UserError

log = logging.getLogger(__name__)

EXTENSION_FILE = "vocab_extension.json"  # what was added to which base, beside the tokenizer file
# Files that may sit beside a tokenizer.json and stay valid when pieces are appended (ids of special tokens
# do not move). vocab.json and merges.txt are left behind: they would describe the old vocabulary.
_JSON_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_SP_NORMAL, _SP_BPE = 1, 2  # sentencepiece_model.proto: ModelProto.SentencePiece.Type.NORMAL, TrainerSpec.BPE
_FORCED_SCORE = -1e8  # pieces scored below this were forced into a model (Mixtral's "▁▁": -1e9), not learned


def extend_tokenizer(base, corpora: list[Path], add: int, out_dir: Path, seed: int = 0) -> Path:
    """Learn up to `add` new pieces on the `corpora` (JSON Lines with a "text" field, or .txt; files, globs or
    directories) and write the base tokenizer with them appended to `out_dir`, a tokenizer directory that
    `load_tokenizer`, the trainer and export take like any other. Returns `out_dir`."""
    if not isinstance(add, int) or add < 1:
        raise UserError(f"vocab extend: --add must be a positive number of pieces, not {add!r}")
    tok = _extendable(load_tokenizer(base))
    files = expand_inputs([str(c) for c in corpora])
    out_dir = Path(out_dir)
    if out_dir.resolve() == Path(tok.path).parent.resolve():
        raise UserError(f"vocab extend: --out {out_dir} is the base tokenizer's directory; choose a new directory "
                        "(writing there would replace the base tokenizer)")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if isinstance(tok, HFTokenizer):
        info = _extend_tokenizer_json(Path(tok.path), files, add, out_dir)
    else:
        info = _extend_sentencepiece(Path(tok.path), files, add, out_dir, seed)
    new = load_tokenizer(out_dir)
    if new.vocab_size != tok.vocab_size + info["added"] or new.eos_id != tok.eos_id or new.bos_id != tok.bos_id:
        raise RuntimeError(f"{out_dir}: the extended tokenizer does not extend {tok.path} as written")
    meta = {"base": str(tok.path), "base_sha256": tok.fingerprint, "base_vocab_size": tok.vocab_size,
            "vocab_size": new.vocab_size, "requested": add, **info, "corpora": [str(f) for f in files],
            "seed": seed, "seconds": round(time.perf_counter() - start, 2)}
    (out_dir / EXTENSION_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    log.info("extended %s by %d pieces (%d -> %d) in %.1f s", tok.path, info["added"], tok.vocab_size,
             new.vocab_size, meta["seconds"])
    return out_dir


def _extendable(tok: Tokenizer) -> Tokenizer:
    if not isinstance(tok, HFTokenizer | SentencePieceTokenizer):
        raise UserError(f"{tok.path}: vocab extend and resize handle SentencePiece models and tokenizer.json files, "
                        f"not a {type(tok).__name__}")
    return tok


def read_extension(tokenizer_dir: str | Path) -> dict[str, Any] | None:
    """The record `extend_tokenizer` left in a tokenizer directory, or None for a tokenizer it did not write."""
    path = Path(tokenizer_dir) / EXTENSION_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


# ---- reading the corpus ------------------------------------------------------------------------------------
def corpus_texts(files: Iterable[Path], text_key: str = "text") -> Iterator[str]:
    """The documents of JSON Lines (.jsonl/.json: the `text_key` field) and plain text files (.txt: the whole
    file), UTF-8, optionally .gz or .zst compressed."""
    for path in files:
        try:
            yield from _file_texts(path, text_key)
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it first, e.g. "
                            f"iconv -f cp932 -t utf-8 for Shift_JIS") from None


def _file_texts(path: Path, text_key: str) -> Iterator[str]:
    name = path.name.removesuffix(".gz").removesuffix(".zst")
    with _open_text(path) as f:
        if name.endswith(".txt"):
            yield f.read()
            return
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: not a JSON object with a {text_key!r} string field; "
                                "vocab extend reads JSON Lines with a 'text' field or .txt files") from None
            if isinstance(text, str) and text:
                yield text


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError as e:
            raise UserError(f"{path}: reading .zst files needs the package zstandard: pip install zstandard") from e
        return zstandard.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def training_lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Documents as lines short enough for the SentencePiece trainer (which skips longer ones): each line of
    a document, a long one cut after the last sentence end (。．.!?！？) that fits, else at `max_bytes`."""
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            while len(line.encode("utf-8")) > max_bytes:
                head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
                cut = max(head.rfind(c) for c in "。．.!?！？") + 1 or len(head)
                yield line[:cut]
                line = line[cut:].lstrip()
            if line:
                yield line


# ---- SentencePiece bases -----------------------------------------------------------------------------------
def _sp_proto(data: bytes):
    """A SentencePiece model's protobuf message (ModelProto), editable."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # the generated module imports google.protobuf
        raise UserError("extending a SentencePiece tokenizer needs the package protobuf: pip install 'moecpt[vocab]'") from e
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    return proto


def _sp_train(lines: list[str], base, vocab_size: int, seed: int):
    """A SentencePiece BPE model of `vocab_size` pieces trained on `lines` with the base's normaliser and
    splitting rules (so that its pieces are pieces the base's encoder can form)."""
    import sentencepiece as spm

    ts, ns = base.trainer_spec, base.normalizer_spec
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            hard_vocab_limit=False, character_coverage=0.9995, byte_fallback=True, input_sentence_size=0,
            normalization_rule_name=ns.name or "identity", add_dummy_prefix=ns.add_dummy_prefix,
            remove_extra_whitespaces=ns.remove_extra_whitespaces, split_digits=ts.split_digits,
            split_by_unicode_script=ts.split_by_unicode_script, split_by_whitespace=ts.split_by_whitespace,
            split_by_number=ts.split_by_number, treat_whitespace_as_suffix=ts.treat_whitespace_as_suffix,
            allow_whitespace_only_pieces=ts.allow_whitespace_only_pieces,
            max_sentencepiece_length=ts.max_sentencepiece_length or 16, max_sentence_length=1 << 16,
            num_threads=2, minloglevel=2)
    except RuntimeError as e:
        raise UserError(f"vocab extend: SentencePiece training failed on the corpus ({e})") from None
    return _sp_proto(model.getvalue())


def _rank_new_pieces(trained, lines: list[str], have: set[str], add: int) -> list[str]:
    """The trained model's pieces that the base lacks, most useful first: its merged pieces in its merge order
    (so that a piece's parts come before it), interleaved with its characters by the tokens each saves on the
    corpus: a merged piece one per use (its count when the corpus is encoded with the trained model's first
    `add` merged pieces: later, longer ones would take uses of it that the extension will not have), a
    character its UTF-8 bytes - 1 per occurrence (the byte pieces the base spells it with)."""
    import sentencepiece as spm

    new = [p.piece for p in trained.pieces if p.type == _SP_NORMAL and p.piece not in have]
    counting = type(trained)()
    counting.CopyFrom(trained)
    del counting.pieces[:]
    merged_seen = 0
    for p in trained.pieces:
        merged_seen += p.type == _SP_NORMAL and len(p.piece) > 1
        if merged_seen <= add or p.type != _SP_NORMAL or len(p.piece) == 1:
            counting.pieces.append(p)
    uses = Counter(p for pieces in spm.SentencePieceProcessor(model_proto=counting.SerializeToString()).encode(
        lines, out_type=str) for p in pieces)
    occurrences: Counter[str] = Counter()
    for line in lines:
        occurrences.update(line)
    chars = sorted((p for p in new if len(p) == 1), key=lambda c: (-occurrences[c] * (len(c.encode()) - 1), c))
    merged = [p for p in new if len(p) > 1]
    out, i, j = [], 0, 0
    while i < len(merged) or j < len(chars):
        char_saves = occurrences[chars[j]] * (len(chars[j].encode()) - 1) if j < len(chars) else -1
        if i < len(merged) and uses[merged[i]] >= char_saves:
            out.append(merged[i])
            i += 1
        else:
            out.append(chars[j])
            j += 1
    return out


def _extend_sentencepiece(path: Path, files: list[Path], add: int, out_dir: Path, seed: int) -> dict[str, Any]:
    """Append up to `add` pieces of a BPE model trained on the corpus (`_rank_new_pieces` order), each scored
    below every learned piece of the base, so that the base's merges come first and then the new ones; a
    piece that the extended model does not produce from its own text is replaced by the next candidate."""
    base = _sp_proto(path.read_bytes())
    if base.trainer_spec.model_type != _SP_BPE:
        raise UserError(f"{path}: vocab extend handles SentencePiece BPE models (Mixtral, Llama 2, Mistral); "
                        "this one is another model type (unigram?)")
    lines = list(training_lines(corpus_texts(files), base.trainer_spec.max_sentence_length or 4192))
    if not lines:
        raise UserError(f"vocab extend: the corpus ({', '.join(map(str, files))}) holds no text")
    have = {p.piece for p in base.pieces}
    chars: set[str] = set()
    for line in lines:
        chars.update(line)
    # Room for the corpus's characters (the trained model holds them all) beside `add` merged pieces; the first
    # merges do not depend on the size.
    vocab_size, ranked = add + len(chars) + 300, []
    for _ in range(4):  # train larger while pieces the base already has crowd out new ones
        trained = _sp_train(lines, base, vocab_size, seed)
        ranked = _rank_new_pieces(trained, lines, have, add)
        if len(ranked) >= add or len(trained.pieces) < vocab_size:  # enough, or the corpus gave all it has
            break
        vocab_size += int(1.2 * (add - len(ranked))) + 100
    chosen, spare, replaced = ranked[:add], ranked[add:], 0
    for _ in range(4):
        extended = _append_pieces(base, chosen)
        dead = _unreachable(extended, len(base.pieces))
        chosen, replaced = [p for p in chosen if p not in dead], replaced + len(dead)
        if not dead:
            break
        chosen, spare = chosen + spare[:len(dead)], spare[len(dead):]
    else:
        extended = _append_pieces(base, chosen)
    (out_dir / "tokenizer.model").write_bytes(extended.SerializeToString())
    (out_dir / "tokenizer.json").unlink(missing_ok=True)  # a stale one would not be the tokenizer loaded
    _copy_companions(path.parent, out_dir, ("tokenizer_config.json", "special_tokens_map.json"))
    return {"format": "sentencepiece", "added": len(chosen), "first_new_id": len(base.pieces),
            "replaced_unreachable": replaced, "corpus_characters": sum(len(s) for s in lines)}


def _append_pieces(base, pieces: list[str]):
    """A copy of the SentencePiece model `base` with `pieces` appended, scored one apart below its lowest
    learned piece (pieces forced in with a huge negative score, as Mixtral's "▁▁", are not counted)."""
    out = type(base)()
    out.CopyFrom(base)
    low = min((p.score for p in base.pieces if p.type == _SP_NORMAL and p.score > _FORCED_SCORE), default=0.0)
    for i, piece in enumerate(pieces):
        p = out.pieces.add()
        p.piece, p.type, p.score = piece, _SP_NORMAL, low - 1.0 - i
    out.trainer_spec.vocab_size = len(out.pieces)
    return out


def _unreachable(proto, first: int) -> set[str]:
    """The pieces from id `first` on that the model does not encode their own text to."""
    pieces = [p.piece for p in proto.pieces[first:]]
    encoded = _piece_encoder(proto).encode([p.replace("▁", " ") for p in pieces])
    return {p for i, (p, ids) in enumerate(zip(pieces, encoded, strict=True)) if ids != [first + i]}


# ---- tokenizer.json (BPE) bases ----------------------------------------------------------------------------
def _read_tokenizer_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("model", {}).get("type") != "BPE":
        raise UserError(f"{path}: vocab extend handles BPE tokenizer.json files; this model is "
                        f"{data.get('model', {}).get('type')!r}")
    return data


def _word_counts(tok, texts: Iterable[str]) -> tuple[Counter[str], int]:
    """The base's pre-tokenized words of the corpus (after its normaliser), with their counts, and the
    corpus's characters."""
    words: Counter[str] = Counter()
    chars = 0
    for text in texts:
        chars += len(text)
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        pieces = tok.pre_tokenizer.pre_tokenize_str(text) if tok.pre_tokenizer is not None else [(text, None)]
        words.update(w for w, _ in pieces)
    return words, chars


def learn_merges(segmented: dict[tuple[str, ...], int], count: int, vocab: dict[str, int],
                 skip: Callable[[tuple[str, str]], bool]) -> list[tuple[str, str]]:
    """BPE on words already segmented (symbol tuple -> frequency): the most frequent adjacent pair is merged
    (ties: the lexically smallest pair, so the result is deterministic) until `count` merges made symbols
    that are not in `vocab`; pairs for which `skip` is true are never merged."""
    words = [list(w) for w in segmented]
    freq = list(segmented.values())
    pairs: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for pair in pairwise(w):
            pairs[pair] += freq[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    new = 0
    while heap and new < count:
        n, pair = heapq.heappop(heap)
        if n == 0 or -n != pairs.get(pair, 0) or skip(pair):
            continue  # gone, a stale entry (its count changed since it was pushed), or not to be merged
        merges.append(pair)
        new += pair[0] + pair[1] not in vocab
        changed: set[tuple[str, str]] = set()
        for i in where.pop(pair):
            changed |= _merge_word(words, i, pair, freq[i], pairs, where)
        pairs.pop(pair, None)
        changed.discard(pair)
        for p in changed:
            heapq.heappush(heap, (-pairs[p], p))
    return merges


def _merge_word(words: list[list[str]], i: int, pair: tuple[str, str], f: int, pairs: Counter,
                where: defaultdict) -> set[tuple[str, str]]:
    """Merge `pair` left to right in word `i` (of frequency `f`), moving the counts of the pairs around each
    merge; returns the pairs whose count changed."""
    w, (a, b) = words[i], pair
    ab, out, changed, k = a + b, [], set(), 0
    while True:
        try:
            j = w.index(a, k)
        except ValueError:
            break
        if j + 1 >= len(w) or w[j + 1] != b:
            out.extend(w[k:j + 1])
            k = j + 1
            continue
        out.extend(w[k:j])
        moved = [((out[-1], a), (out[-1], ab))] if out else []
        if j + 2 < len(w):
            moved.append(((b, w[j + 2]), (ab, w[j + 2])))
        for old, new in moved:
            pairs[old] -= f
            pairs[new] += f
            where[new].add(i)
            changed |= {old, new}
        out.append(ab)
        k = j + 2
    if changed or k:
        words[i] = out + w[k:]
    return changed


def _extend_tokenizer_json(path: Path, files: list[Path], add: int, out_dir: Path) -> dict[str, Any]:
    """Append merges learned on the base's own segmentation of the corpus after the base's merges, and the
    tokens they make after the base's largest id (added special tokens included)."""
    from tokenizers import Tokenizer

    data = _read_tokenizer_json(path)
    tok = Tokenizer.from_file(str(path))
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    pair_form = bool(model["merges"]) and not isinstance(model["merges"][0], str)
    base_merges = len(model["merges"])
    old = {tuple(m) if pair_form else tuple(m.split(" ", 1)) for m in model["merges"]}
    words, chars = _word_counts(tok, corpus_texts(files))
    if not words:
        raise UserError(f"vocab extend: the corpus ({', '.join(map(str, files))}) holds no text")
    segmented: Counter[tuple[str, ...]] = Counter()
    for word, n in words.items():
        segmented[tuple(t.value for t in tok.model.tokenize(word))] += n
    specials = {t["content"] for t in data.get("added_tokens", [])}  # never learned as pieces

    def skip(pair: tuple[str, str]) -> bool:  # a base merge again, a special token, or not writable as "a b"
        return pair in old or pair[0] + pair[1] in specials or (not pair_form and " " in pair[0] + pair[1])

    merges = learn_merges(dict(segmented), add, vocab, skip)
    added_tokens = data.get("added_tokens", [])
    for t in added_tokens:  # the tokenizers library numbers added tokens that are not in the model's
        vocab.setdefault(t["content"], t["id"])  # vocabulary after it: new ids would push them on
    next_id = max(vocab.values()) + 1
    first, added = next_id, 0
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = next_id
            next_id += 1
            added += 1
        model["merges"].append([a, b] if pair_form else f"{a} {b}")
    (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "tokenizer.model").unlink(missing_ok=True)  # load_tokenizer would prefer it
    _copy_companions(path.parent, out_dir, _JSON_COMPANIONS)
    return {"format": "tokenizer.json", "added": added, "first_new_id": first, "base_merges": base_merges,
            "merges_added": len(merges), "corpus_characters": chars}


def _copy_companions(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copyfile(src / name, dst / name)


# ---- the old tokenizer's view of the new pieces ------------------------------------------------------------
def base_tokenizations(tokenizer_dir: str | Path, old_vocab_size: int) -> list[list[int]]:
    """For each id from `old_vocab_size` up of the tokenizer in `tokenizer_dir`, the ids its piece has under
    the old tokenizer: the same tokenizer cut back to its first `old_vocab_size` ids (and, for a
    tokenizer.json that `extend_tokenizer` wrote, its base's merges)."""
    tok = _extendable(load_tokenizer(tokenizer_dir))
    if not 0 < old_vocab_size < tok.vocab_size:
        raise UserError(f"{tok.path}: has {tok.vocab_size} ids; nothing comes after an old vocabulary of "
                        f"{old_vocab_size}")
    if isinstance(tok, HFTokenizer):
        meta = read_extension(Path(tok.path).parent) or {}
        return _json_base_tokenizations(Path(tok.path), old_vocab_size, meta.get("base_merges"))
    proto = _sp_proto(Path(tok.path).read_bytes())
    pieces = [p.piece for p in proto.pieces[old_vocab_size:]]
    del proto.pieces[old_vocab_size:]
    return _piece_encoder(proto).encode([p.replace("▁", " ") for p in pieces])


def _piece_encoder(proto):
    """A processor of the SentencePiece model `proto` that encodes a piece's text ("▁" written as a space) as
    it is, with no dummy prefix."""
    import sentencepiece as spm

    probe = type(proto)()
    probe.CopyFrom(proto)
    probe.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=probe.SerializeToString())


def _json_base_tokenizations(path: Path, old_size: int, base_merges: int | None) -> list[list[int]]:
    from tokenizers import Tokenizer

    data = _read_tokenizer_json(path)
    model = data["model"]
    new = sorted((i, t) for t, i in model["vocab"].items() if i >= old_size)
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < old_size}
    if base_merges is not None:
        model["merges"] = model["merges"][:base_merges]
    else:
        model["merges"] = [m for m in model["merges"] if all(
            s in model["vocab"] for s in ((m[0], m[1], m[0] + m[1]) if not isinstance(m, str)
                                          else (*m.split(" ", 1), m.replace(" ", "", 1))))]
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < old_size]
    old = Tokenizer.from_str(json.dumps(data)).model
    return [[t.id for t in old.tokenize(piece)] for _, piece in new]
