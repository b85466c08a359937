"""A weighted mixture of token corpora, packed into fixed-length training samples.

Every global sample index maps to its tokens by index arithmetic alone, so the order of samples is a pure
function of (seed, mixture, seq_len, shard contents) and any sample can be produced without producing the
ones before it (resume at sample 10^9 costs what resume at sample 10 costs):

1. Mixing. Samples come in blocks of `block_size` (default 1000). Each block holds a fixed quota of samples
   from each corpus (the weights, rounded by largest remainder) laid out in a fixed, evenly interleaved
   pattern. Global sample i is slot i % block_size of block i // block_size, so its corpus c, and its index k
   among corpus c's samples, follow from two table lookups. Every sample has seq_len + 1 tokens, so sample
   shares are token shares.
2. Packing. Corpus c's k-th sample is in epoch e = k // S_c (S_c samples per epoch). Epoch e shuffles the
   corpus's training documents (seeded by seed, corpus and e), concatenates them (each ends in EOS) into one
   token stream and cuts it into windows of seq_len + 1 tokens with stride seq_len, so each token is a
   target exactly once; the windows are visited in a seeded random order. The tail of fewer than seq_len
   tokens left at the end of an epoch is not used in that epoch (it differs from epoch to epoch).
3. Repeats. A sample in epoch e > 0 repeats data. That is allowed by default (and logged once per corpus and
   epoch, and counted by `epochs_used`), or an error with `allow_repeat=False`.

Each corpus holds out a deterministic set of documents as its validation split (`validation_dataset`);
those never appear in training samples.

Stages (`stage_datasets`): a run may change its mixture at fixed sample counts. Each stage is a
`MixtureDataset` of its own whose corpora continue their passes where the earlier stages left them (its
`offsets`: samples of each corpus used before it) with the same shuffles (its `streams`: a corpus keeps its
seed key across stages), so a corpus in several stages serves each of its samples once over the whole run,
until it runs out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from moecpt.data.indexed import IndexedShard
from moecpt.errors import UserError

log = logging.getLogger(__name__)


class DataExhaustedError(UserError):
    """A corpus ran out of unseen data and repeats were not allowed."""


@dataclass(frozen=True)
class MixtureEntry:
    """One weighted corpus: a shard prefix or a group of prefixes that are sampled as one."""

    name: str
    weight: float
    prefixes: tuple[str, ...]


class Mixture(list):
    """A parsed mixture: `MixtureEntry`s with weights that sum to 1 and distinct names, as `parse_mixture` and
    `resolve_mixture` return it. Both of them and `MixtureDataset` take it as it is, without parsing it again
    (so do not change it in place)."""


MixtureSpec = (
    str | Sequence[MixtureEntry | tuple[float, str | Sequence[str]] | tuple[str, float, str | Sequence[str]]]
)


def parse_mixture(spec: MixtureSpec) -> Mixture:
    """Read a mixture from the Megatron string form or a list; weights are normalised to sum to 1.

    String form: `"0.644 ja 0.256 en 0.1 code"` (weight, prefix pairs), where a prefix may name a group as
    `name=prefix1,prefix2`; a single prefix alone means weight 1. List form: `MixtureEntry`s, `(weight,
    prefix_or_prefixes)` or `(name, weight, prefix_or_prefixes)` tuples. A `Mixture` is returned as it is.
    """
    if isinstance(spec, Mixture):
        return spec
    raw: list[tuple[str | None, float, tuple[str, ...]]] = []
    if isinstance(spec, str):
        parts = spec.split()
        if len(parts) == 1:
            parts = ["1", parts[0]]
        if not parts or len(parts) % 2:
            raise UserError(
                f"mixture {spec!r}: expected pairs of weight and prefix, e.g. '0.644 ja 0.256 en 0.1 code'"
            )
        for w, p in zip(parts[::2], parts[1::2], strict=True):
            name, _, group = p.rpartition("=")
            raw.append((name or None, _weight(w, spec), tuple(group.split(","))))
    else:
        for item in spec:
            if isinstance(item, MixtureEntry):
                raw.append((item.name, item.weight, item.prefixes))
            elif len(item) == 2:
                raw.append((None, _weight(item[0], spec), _prefixes(item[1])))
            elif len(item) == 3:
                raw.append((str(item[0]), _weight(item[1], spec), _prefixes(item[2])))
            else:
                raise UserError(
                    f"mixture entry {item!r}: expected (weight, prefixes) or (name, weight, prefixes)"
                )
    if not raw:
        raise UserError("the mixture is empty")
    total = sum(w for _, w, _ in raw)
    entries, names = Mixture(), set()
    for name, w, prefixes in raw:
        name = name or (Path(prefixes[0]).name + (f"+{len(prefixes) - 1}" if len(prefixes) > 1 else ""))
        if name in names:
            raise UserError(f"mixture: the name {name!r} is used twice; name the entries (name=prefix,...)")
        names.add(name)
        entries.append(MixtureEntry(name, w / total, prefixes))
    return entries


def _weight(w: Any, spec: Any) -> float:
    try:
        value = float(w)
    except (TypeError, ValueError):
        raise UserError(f"mixture {spec!r}: {w!r} is not a number; write weight and prefix pairs") from None
    if not value > 0:
        raise UserError(f"mixture {spec!r}: weight {w!r} must be positive (drop the entry instead)")
    return value


def _prefixes(p: str | os.PathLike | Sequence[str]) -> tuple[str, ...]:
    return (os.fspath(p),) if isinstance(p, str | os.PathLike) else tuple(os.fspath(x) for x in p)


# Swallow-MX's mixture (Japanese : English : math+code = 64.4 : 25.6 : 10) over the shared corpora.
SWALLOW_MX_WEIGHTS = {"ja": 0.644, "en": 0.256, "code": 0.1}
_SHARED_GROUPS = {"ja": ("corpus/ja",), "en": ("corpus/en",), "code": ("corpus/code", "corpus/math")}


def shared_corpus_mixture(data_root: str | os.PathLike) -> list[MixtureEntry]:
    """The Swallow-MX mixture over the JSON Lines corpora in `data_root` (e.g. ../shared/data); pass it through
    `resolve_mixture` to get shards."""
    root = Path(data_root)
    return [
        MixtureEntry(n, w, tuple(str(root / p) for p in _SHARED_GROUPS[n]))
        for n, w in SWALLOW_MX_WEIGHTS.items()
    ]


def resolve_mixture(
    spec: MixtureSpec,
    cache_dir: str | os.PathLike | None,
    tokenizer: str | os.PathLike | None = None,
    workers: int = 1,
    sources: Mapping[str, Sequence[str]] | None = None,
) -> Mixture:
    """Replace every source in the mixture that is not a shard prefix (a JSON Lines file, glob or directory) by
    its shard in `cache_dir`, tokenizing it on first use (see `cached_shard`).

    `sources` names corpora (a training config's `data.corpora`): a prefix of the mixture that is one of its
    keys stands for the sources listed under it. The mixture is parsed once, here; the result goes to
    `MixtureDataset` as it is.
    """
    from moecpt.data.indexed import shard_exists
    from moecpt.data.preprocess import cached_shard

    sources = sources or {}
    entries = Mixture()
    for e in parse_mixture(spec):
        prefixes = []
        for p in (src for name in e.prefixes for src in sources.get(name, [name])):
            if shard_exists(p):
                prefixes.append(p)
            elif cache_dir is None:
                raise UserError(
                    f"mixture entry {e.name!r}: {p} is not a shard ({p}.bin/.idx not found); tokenize it with "
                    "`moecpt data tokenize`, or give a cache directory (--cache-dir) to tokenize it on first use"
                )
            else:
                prefixes.append(str(cached_shard([p], cache_dir, tokenizer=tokenizer, workers=workers)))
        entries.append(MixtureEntry(e.name, e.weight, tuple(prefixes)))
    return entries


def _one_tokenizer(corpora: list[Corpus]) -> str | None:
    """The sha256 of the tokenizer all shards were made with (None if no shard records one); mixing shards
    of different tokenizers is refused, since their ids mean different things."""
    seen: dict[str, str] = {}
    for c in corpora:
        for shard, h in zip(c.entry.prefixes, c.tokenizer_hashes(), strict=True):
            if h is not None:
                seen.setdefault(h, shard)
    if len(seen) > 1:
        listing = "; ".join(f"{shard} ({h[:12]})" for h, shard in seen.items())
        raise UserError(
            f"the mixture's shards were tokenized with different tokenizers: {listing}. Re-tokenize them"
        )
    return next(iter(seen), None)


def block_pattern(weights: Sequence[float], block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quotas per corpus in a block of `block_size` samples, the corpus of each slot, and each slot's rank
    among its corpus's slots. Quotas round `weights * block_size` by largest remainder; slots are spread
    evenly (each slot goes to the corpus furthest behind its share)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w * block_size
    quota = np.floor(exact).astype(np.int64)
    short = block_size - int(quota.sum())
    quota[np.argsort(-(exact - quota), kind="stable")[:short]] += 1
    pattern = np.empty(block_size, dtype=np.int64)
    rank = np.empty(block_size, dtype=np.int64)
    count = np.zeros(len(w), dtype=np.int64)
    for j in range(block_size):
        behind = np.where(count < quota, quota * (j + 1) / block_size - count, -np.inf)
        c = int(np.argmax(behind))
        pattern[j], rank[j] = c, count[c]
        count[c] += 1
    return quota, pattern, rank


class Corpus:
    """The documents of one mixture entry (all its shards), split into training and validation documents."""

    def __init__(self, entry: MixtureEntry, valid_fraction: float, valid_max_documents: int):
        self.entry = entry
        self.shards = [IndexedShard(p) for p in entry.prefixes]
        self.doc_shard = np.concatenate(
            [np.full(s.num_documents, i, np.int32) for i, s in enumerate(self.shards)]
        )
        self.doc_offset = np.concatenate([s.doc_offsets for s in self.shards]).astype(np.int64)
        self.doc_length = np.concatenate([s.doc_lengths for s in self.shards]).astype(np.int64)
        self.fingerprints = [s.fingerprint() for s in self.shards]
        n = self.doc_length.size
        n_valid = 0
        if valid_fraction > 0 and n >= 2:
            n_valid = min(max(1, round(valid_fraction * n)), valid_max_documents, n - 1)
        # The split depends only on the shards and the fraction, not on the training seed.
        digest = hashlib.sha256("".join(self.fingerprints).encode()).digest()
        order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(n)
        self.valid_docs = np.sort(order[:n_valid])
        self.train_docs = np.sort(order[n_valid:])
        self.train_tokens = int(self.doc_length[self.train_docs].sum())

    @property
    def name(self) -> str:
        return self.entry.name

    def tokenizer_hashes(self) -> list[str | None]:
        return [s.meta.get("tokenizer", {}).get("sha256") for s in self.shards]

    def gather(
        self, docs: np.ndarray, ends: np.ndarray, start: int, length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, start + length) of the stream made of `docs` (whose cumulative lengths are `ends`),
        and the positions within that window where a document starts."""
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, start + length - 1, side="right"))
        out = np.empty(length, dtype=np.int64)
        pos = 0
        for d in range(first, last + 1):
            doc = int(docs[d])
            doc_start = int(ends[d] - self.doc_length[doc])
            lo = max(start, doc_start) - doc_start
            hi = min(start + length, int(ends[d])) - doc_start
            shard = self.shards[self.doc_shard[doc]]
            base = int(self.doc_offset[doc])
            out[pos : pos + hi - lo] = shard.tokens[base + lo : base + hi]
            pos += hi - lo
        starts = ends[first:last] - start  # documents first+1..last begin here
        return out, np.concatenate([[0], starts]).astype(np.int64)


def _sample_dict(tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int, corpus: int) -> dict[str, Any]:
    """Inputs are tokens[:-1], labels tokens[1:]; position ids restart at 0 where a document of the inputs
    starts."""
    starts = doc_starts[doc_starts < seq_len]
    lengths = np.diff(np.append(starts, seq_len))
    position_ids = np.arange(seq_len, dtype=np.int64) - np.repeat(starts, lengths)
    return {"tokens": tokens, "position_ids": position_ids, "corpus": corpus}


class MixtureDataset:
    """Training samples of a mixture: `dataset[i]` is global sample i (see the module docstring).

    Each sample is a dict of numpy arrays: `tokens` int64 [seq_len + 1] (inputs `tokens[:-1]`, labels
    `tokens[1:]`), `position_ids` int64 [seq_len] restarting at 0 at each document start (the document
    boundaries, for intra-document attention) and `corpus` (index of the mixture entry). `len(dataset)` is the number of samples before any corpus would repeat.
    """

    def __init__(
        self,
        mixture: MixtureSpec,
        seq_len: int,
        seed: int = 1234,
        allow_repeat: bool = True,
        valid_fraction: float = 0.01,
        valid_max_documents: int = 1000,
        block_size: int = 1000,
        offsets: Mapping[str, int] | None = None,
        streams: Sequence[int] | None = None,
    ):
        """`offsets`: per corpus name, its samples used before this dataset's sample 0 (a later stage);
        `streams`: per entry, the key of its shuffles (default: its index), kept by a corpus across stages."""
        if seq_len < 1:
            raise UserError(f"seq_len must be positive, got {seq_len}")
        self.entries = parse_mixture(mixture)
        self.seq_len, self.seed, self.allow_repeat, self.block_size = seq_len, seed, allow_repeat, block_size
        self.valid_fraction, self.valid_max_documents = valid_fraction, valid_max_documents
        self.corpora = [Corpus(e, valid_fraction, valid_max_documents) for e in self.entries]
        self.tokenizer_fingerprint = _one_tokenizer(self.corpora)
        self.offsets = np.array([int((offsets or {}).get(c.name, 0)) for c in self.corpora], dtype=np.int64)
        self.streams = [int(x) for x in streams] if streams is not None else list(range(len(self.corpora)))
        if len(self.streams) != len(self.corpora):
            raise ValueError(f"{len(self.streams)} streams for {len(self.corpora)} mixture entries")
        self.samples_per_epoch = np.array([max(0, (c.train_tokens - 1) // seq_len) for c in self.corpora])
        for c, s in zip(self.corpora, self.samples_per_epoch, strict=True):
            if s == 0:
                raise UserError(
                    f"mixture entry {c.name!r} ({', '.join(c.entry.prefixes)}): {c.train_tokens} training tokens, "
                    f"fewer than one sample of seq_len + 1 = {seq_len + 1}; add data or lower seq_len"
                )
        self.quota, self.pattern, self.rank = block_pattern([e.weight for e in self.entries], block_size)
        if np.any(self.quota == 0):
            small = [e.name for e, q in zip(self.entries, self.quota, strict=True) if q == 0]
            raise UserError(
                f"mixture entries {small} get no sample in a block of {block_size}; raise block_size"
            )
        self._epoch = lru_cache(maxsize=4)(self._build_epoch)
        self._logged_epochs: set[tuple[int, int]] = set()

    def __len__(self) -> int:
        """Samples before the first corpus would start a second epoch (counting what `offsets` used)."""
        left = np.maximum(self.samples_per_epoch - self.offsets, 0)
        n = min(int(s) * self.block_size // int(q) for s, q in zip(left, self.quota, strict=True))
        while n > 0 and np.any(self.corpus_counts(n) > left):
            n -= 1
        return n

    def locate(self, index: int) -> tuple[int, int]:
        """(corpus, index among that corpus's samples, offset included) of global sample `index`."""
        block, slot = divmod(index, self.block_size)
        c = int(self.pattern[slot])
        return c, int(self.offsets[c]) + block * int(self.quota[c]) + int(self.rank[slot])

    def corpus_counts(self, num_samples: int) -> np.ndarray:
        """How many of the first `num_samples` global samples come from each corpus."""
        block, slot = divmod(num_samples, self.block_size)
        in_block = np.bincount(self.pattern[:slot], minlength=len(self.entries))
        return block * self.quota + in_block

    def epochs_used(self, num_samples: int) -> dict[str, float]:
        """Passes over each corpus's training data made by the first `num_samples` samples (>1 means repeats)."""
        counts = self.corpus_counts(num_samples) + self.offsets
        return {
            c.name: float(n / s) for c, n, s in zip(self.corpora, counts, self.samples_per_epoch, strict=True)
        }

    def _build_epoch(self, c: int, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        corpus = self.corpora[c]
        rng = np.random.default_rng([self.seed, self.streams[c], epoch])
        docs = corpus.train_docs[rng.permutation(corpus.train_docs.size)]
        ends = np.cumsum(corpus.doc_length[docs])
        window_order = rng.permutation(int(self.samples_per_epoch[c]))
        return docs, ends, window_order

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            raise IndexError(index)
        c, k = self.locate(int(index))
        epoch, j = divmod(k, int(self.samples_per_epoch[c]))
        if epoch > 0:
            self._note_repeat(c, epoch, int(index))
        docs, ends, window_order = self._epoch(c, epoch)
        start = int(window_order[j]) * self.seq_len
        tokens, doc_starts = self.corpora[c].gather(docs, ends, start, self.seq_len + 1)
        return _sample_dict(tokens, doc_starts, self.seq_len, c)

    def _note_repeat(self, c: int, epoch: int, index: int) -> None:
        name, per_epoch = self.corpora[c].name, int(self.samples_per_epoch[c])
        if not self.allow_repeat:
            raise DataExhaustedError(
                f"corpus {name!r} is exhausted at global sample {index}: its {per_epoch} samples were all used and "
                "repeats are not allowed (allow_repeat=False: data.allow_repeat = false in training, --no-repeat in moecpt data). Add data, lower its weight or train "
                "for fewer samples"
            )
        if (c, epoch) not in self._logged_epochs:
            self._logged_epochs.add((c, epoch))
            log.warning(
                "corpus %r starts epoch %d (a reshuffled repeat of its %d samples) at global sample %d",
                name,
                epoch + 1,
                per_epoch,
                index,
            )

    def validation_dataset(self, corpus: int | str) -> ValidationDataset:
        """The held-out documents of one corpus (by index or name), packed the same way, in a fixed order."""
        c = corpus if isinstance(corpus, int) else [x.name for x in self.corpora].index(corpus)
        return ValidationDataset(self.corpora[c], self.seq_len, c)

    def fingerprint_parts(self) -> dict[str, Any]:
        """Everything the sample order depends on, by name, so a mismatch can say what changed."""
        parts = {
            "seq_len": self.seq_len,
            "seed": self.seed,
            "block_size": self.block_size,
            "validation": [self.valid_fraction, self.valid_max_documents],
            "mixture": [[c.name, round(c.entry.weight, 12)] for c in self.corpora],
            "tokenizer": sorted({str(h) for c in self.corpora for h in c.tokenizer_hashes()}),
            "shards": {c.name: c.fingerprints for c in self.corpora},
        }
        if self.offsets.any() or self.streams != list(range(len(self.corpora))):  # a later stage
            parts["offsets"] = {c.name: int(o) for c, o in zip(self.corpora, self.offsets, strict=True)}
            parts["streams"] = list(self.streams)
        return parts

    def fingerprint(self) -> str:
        return fingerprint_of(self.fingerprint_parts())

    def report(self, num_samples: int) -> list[dict[str, Any]]:
        """Per corpus: weight, documents, tokens, samples per epoch and the realised share over `num_samples`."""
        counts = self.corpus_counts(num_samples)
        rows = []
        for c, n, s, off in zip(self.corpora, counts, self.samples_per_epoch, self.offsets, strict=True):
            rows.append(
                {
                    "name": c.name,
                    "weight": c.entry.weight,
                    "train_documents": int(c.train_docs.size),
                    "valid_documents": int(c.valid_docs.size),
                    "train_tokens": c.train_tokens,
                    "samples_per_epoch": int(s),
                    "samples": int(n),
                    "tokens": int(n) * self.seq_len,
                    "share": float(n / max(1, num_samples)),
                    "epochs": float((n + off) / s),  # passes over the corpus so far, earlier stages included
                }
            )
        return rows


def stage_datasets(first: MixtureDataset, later: Sequence[tuple[int, MixtureSpec]]) -> list[tuple[int, MixtureDataset]]:
    """The stages of a run as (first global sample, dataset): `first` from sample 0, then each later mixture
    from its start (ascending). A corpus (by name) continues its pass and its shuffles where the earlier
    stages left it, so its samples are served once across the stages, not again from its start."""
    out = [(0, first)]
    streams = {c.name: (s, c.fingerprints) for c, s in zip(first.corpora, first.streams, strict=True)}
    used: dict[str, int] = {}
    for start, spec in later:
        prev_start, prev = out[-1]
        if start <= prev_start:
            raise UserError(f"data stages must start in order: a stage at sample {start} follows one at {prev_start}")
        counts = prev.corpus_counts(start - prev_start) + prev.offsets
        used.update((c.name, int(n)) for c, n in zip(prev.corpora, counts, strict=True))
        entries = parse_mixture(spec)
        keys = []
        for e in entries:  # a corpus new in this stage gets a shuffle key no earlier corpus has
            keys.append(streams[e.name][0] if e.name in streams else max([*keys, *(k for k, _ in streams.values())]) + 1)
        ds = MixtureDataset(entries, first.seq_len, first.seed, first.allow_repeat, first.valid_fraction,
                            first.valid_max_documents, first.block_size, offsets=used, streams=keys)
        for c, key in zip(ds.corpora, keys, strict=True):
            earlier = streams.setdefault(c.name, (key, c.fingerprints))[1]
            if earlier != c.fingerprints:
                raise UserError(f"data stage at sample {start}: corpus {c.name!r} is made of other shards than in an "
                                "earlier stage; give the new sources another name")
        out.append((start, ds))
    return out


def fingerprint_of(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class ValidationDataset:
    """A corpus's validation documents in a fixed order, cut into windows like training samples (the last,
    shorter-than-a-window tail is dropped). Items have the same layout as `MixtureDataset` samples."""

    def __init__(self, corpus: Corpus, seq_len: int, corpus_index: int):
        self.corpus, self.seq_len, self.corpus_index = corpus, seq_len, corpus_index
        self.docs = corpus.valid_docs
        self.ends = np.cumsum(corpus.doc_length[self.docs])
        total = int(self.ends[-1]) if self.ends.size else 0
        self._len = max(0, (total - 1) // seq_len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self._len:
            raise IndexError(i)
        tokens, starts = self.corpus.gather(self.docs, self.ends, i * self.seq_len, self.seq_len + 1)
        return _sample_dict(tokens, starts, self.seq_len, self.corpus_index)
