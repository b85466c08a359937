"""Token shards in the Megatron-LM indexed-dataset format (`PREFIX.bin` + `PREFIX.idx`, `MMIDIDX` version 1).

Using Megatron's layout means shards preprocessed for Megatron-LM / moe-recipes load here unchanged, and ours
load there. The `.idx` file is, all little-endian:

    b"MMIDIDX\\x00\\x00"                 magic, 9 bytes
    <Q  version = 1
    <B  dtype code of the tokens in .bin (see DTYPE_CODES)
    <Q  S, the number of sequences
    <Q  D + 1, the length of the document-index array
    int32[S]     sequence lengths in tokens
    int64[S]     sequence pointers: byte offset of each sequence in .bin
    int64[D + 1] document indices: document d is sequences [doc[d], doc[d + 1])

`.bin` is the token ids of all sequences back to back. moecpt writes one sequence per document, so the
document indices are 0, 1, ..., D. A JSON sidecar `PREFIX.meta.json` (ours only; Megatron ignores it) records
the tokenizer, the sources and their hashes, the counts and a hash of `.bin`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from moecpt.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's dtype codes (megatron/core/datasets/indexed_dataset.py, DType).
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest token dtype Megatron also picks: uint16 below 65,536 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def meta_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.meta.json")


def shard_exists(prefix: str | os.PathLike) -> bool:
    """True when both halves of a finished shard are present (a run that was cut off leaves only temp files)."""
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


class ShardWriter:
    """Writes one shard, a document at a time, under temporary names; `finish()` renames it into place.

    An interrupted run therefore leaves `*.tmpPID` files, never a `PREFIX.bin`/`.idx` pair that looks valid.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no Megatron code")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        # The pid keeps two processes that build the same shard (e.g. one per node) from sharing temp files.
        tmp = f".tmp{os.getpid()}"
        self._tmp_bin = Path(f"{bin_path(prefix)}{tmp}")
        self._tmp_idx = Path(f"{idx_path(prefix)}{tmp}")
        self._tmp_meta = Path(f"{meta_path(prefix)}{tmp}")
        self._bin = open(self._tmp_bin, "wb")
        self._hash = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self.num_tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their concatenated tokens and their lengths."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._bin.write(data)
        self._hash.update(data)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.num_tokens += int(tokens.size)

    def abort(self) -> None:
        """Close and delete the temporary files."""
        self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx, self._tmp_meta):
            p.unlink(missing_ok=True)

    def finish(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the index and the sidecar, then rename all three into place. Returns the sidecar dict."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        write_index(self._tmp_idx, lengths, self.dtype)
        meta = dict(meta or {})
        meta.update(
            format="megatron-mmidx-v1",
            dtype=self.dtype.name,
            num_documents=int(lengths.size),
            num_tokens=int(self.num_tokens),
            bin_sha256=self._hash.hexdigest(),
        )
        self._tmp_meta.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # Remove a stale index first so no moment exists where an old .idx sits next to the new .bin.
        idx_path(self.prefix).unlink(missing_ok=True)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_meta, meta_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))  # last: the shard counts as present from here on
        return meta


def write_index(path: str | os.PathLike, lengths: np.ndarray, dtype: np.dtype) -> None:
    """Write a Megatron `.idx` for sequences of `lengths` tokens, one sequence per document."""
    lengths = np.asarray(lengths, dtype=np.int32)
    n = lengths.size
    pointers = np.zeros(n, dtype=np.int64)
    if n:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    doc_idx = np.arange(n + 1, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[np.dtype(dtype)], n, n + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(doc_idx.tobytes())


class IndexedShard:
    """Read-only, memory-mapped view of a Megatron shard, with its documents as (token offset, length).

    Multi-sequence documents (Megatron's sentence-split shards) are supported: a document is the run of its
    sequences, which Megatron always writes contiguously. Opening checks the header, the array sizes and that
    `.bin` has exactly the bytes the index points at.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not p.is_file():
                raise UserError(
                    f"{p}: shard file not found; create it with `moecpt data tokenize ... --output {prefix}`"
                )
        size = ipath.stat().st_size
        if size < _HEADER.size:
            raise UserError(f"{ipath}: too short to be an index ({size} bytes); re-create the shard")
        raw = np.memmap(ipath, dtype=np.uint8, mode="r")
        magic, version, code, n_seq, n_doc_idx = _HEADER.unpack(bytes(raw[: _HEADER.size]))
        if magic != MAGIC:
            raise UserError(f"{ipath}: not a Megatron MMIDIDX index (magic {magic!r})")
        if version != VERSION:
            raise UserError(f"{ipath}: index version {version}, only version {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise UserError(f"{ipath}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc_idx
        if raw.size != expected:
            raise UserError(
                f"{ipath}: {raw.size} bytes but its header announces {n_seq} sequences and {n_doc_idx} document "
                f"indices ({expected} bytes); the file is truncated or corrupt, re-create the shard"
            )
        off = _HEADER.size
        self.sequence_lengths = np.frombuffer(raw, np.int32, n_seq, off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(raw, np.int64, n_seq, off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(raw, np.int64, n_doc_idx, off)

        total_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        bin_size = bpath.stat().st_size
        if bin_size != total_tokens * self.dtype.itemsize:
            raise UserError(
                f"{bpath}: {bin_size} bytes, but {ipath} describes {total_tokens} tokens of {self.dtype.name} "
                f"({total_tokens * self.dtype.itemsize} bytes); the pair does not belong together or a write was "
                "cut off. Re-create the shard with `moecpt data tokenize`"
            )
        self.num_tokens = total_tokens
        self.tokens = (
            np.memmap(bpath, dtype=self.dtype, mode="r") if total_tokens else np.zeros(0, dtype=self.dtype)
        )
        self._set_documents(ipath)
        mpath = meta_path(prefix)
        self.meta: dict[str, Any] = json.loads(mpath.read_text(encoding="utf-8")) if mpath.is_file() else {}

    def _set_documents(self, ipath: Path) -> None:
        doc = self.document_indices
        n_seq = self.sequence_lengths.size
        if doc.size == 0 or doc[0] != 0 or doc[-1] != n_seq or np.any(np.diff(doc) < 0):
            raise UserError(f"{ipath}: document indices are not a non-decreasing run from 0 to {n_seq}")
        item = self.dtype.itemsize
        expected_ptr = np.zeros(n_seq, np.int64)
        if n_seq:
            np.cumsum(self.sequence_lengths[:-1].astype(np.int64) * item, out=expected_ptr[1:])
        if not np.array_equal(expected_ptr, self.sequence_pointers):
            raise UserError(
                f"{ipath}: sequence pointers are not contiguous; this shard layout is not supported"
            )
        starts, ends = doc[:-1], doc[1:]
        seq_starts = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        self.doc_offsets = seq_starts[starts]  # first token of each document
        self.doc_lengths = seq_starts[ends] - seq_starts[starts]

    @property
    def num_documents(self) -> int:
        return int(self.doc_lengths.size)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i."""
        start = int(self.doc_offsets[i])
        return np.asarray(self.tokens[start : start + int(self.doc_lengths[i])])

    def fingerprint(self) -> str:
        """A content hash: the sidecar's hash of `.bin` when present, plus the index bytes.

        Hashing `.bin` itself on every load would cost minutes on a large corpus; the sidecar records it when
        the shard is written. Shards from elsewhere (no sidecar) are fingerprinted by index and `.bin` size.
        """
        h = hashlib.sha256()
        h.update(file_sha256(idx_path(self.prefix)).encode())
        h.update(str(self.meta.get("bin_sha256", f"size:{self.num_tokens}")).encode())
        return h.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
