"""Text corpora -> token shards: `tokenize_corpus` (behind `moecpt data tokenize`) and `cached_shard`.

Inputs are JSON Lines files (one document a line, text under a configurable key) or plain `.txt` files (the
whole file is one document), optionally compressed (`.gz`, `.zst`). Bad input stops the run with an error that
names the file and line (or byte offset); nothing is dropped silently: empty documents and, when asked,
invalid JSON lines are skipped and counted in the report and the shard's sidecar.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from glob import glob, has_magic
from pathlib import Path
from typing import IO, Any

import numpy as np

from moecpt.data.indexed import ShardWriter, dtype_for_vocab, file_sha256, shard_exists
from moecpt.data.tokenizer import Tokenizer, load_tokenizer
from moecpt.errors import UserError

_TEXT_SUFFIXES = (".jsonl", ".json", ".txt")
_SURROGATE = re.compile("[\ud800-\udfff]")  # only a JSON \\uXXXX escape can put one in a str
_BOM = "\ufeff"
_STALE_AFTER_S = 60.0  # a temp file of a dead process untouched this long is removed
_CHUNK_BYTES = 1 << 20  # text per work item: large enough to amortise IPC, small enough to stream


@dataclass
class TokenizeReport:
    """What a tokenize run read, wrote and skipped."""

    prefix: str
    num_documents: int = 0
    num_tokens: int = 0
    num_bytes: int = 0
    empty_documents: int = 0
    invalid_json_lines: int = 0
    invalid_json_examples: list[str] = field(default_factory=list)
    blank_lines: int = 0
    removed_temp_files: list[str] = field(default_factory=list)  # left by killed runs
    seconds: float = 0.0
    dtype: str = ""

    def summary(self) -> str:
        rate = self.num_tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"wrote {self.prefix}.bin/.idx: {self.num_documents:,} documents, {self.num_tokens:,} tokens ({self.dtype})",
            f"read {self.num_bytes / 1e6:.1f} MB of text in {self.seconds:.1f} s ({rate:,.0f} tokens/s)",
            f"skipped: {self.empty_documents} empty documents, {self.blank_lines} blank lines, "
            f"{self.invalid_json_lines} invalid JSON lines",
        ]
        lines += [f"  invalid JSON: {e}" for e in self.invalid_json_examples]
        lines += [f"removed {p} (left by a killed run)" for p in self.removed_temp_files]
        return "\n".join(lines)


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by paths, globs or directories, in a stable order; a name matching nothing is an error."""
    files: list[Path] = []
    for item in inputs:
        s = os.fspath(item)
        if has_magic(s):
            matches = sorted(Path(m) for m in glob(s, recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"{s}: no input file matches this pattern")
            files += matches
        elif Path(s).is_dir():
            matches = sorted(p for p in Path(s).rglob("*") if p.is_file() and _is_text_input(p))
            if not matches:
                raise UserError(f"{s}: directory has no .jsonl/.json/.txt files (optionally .gz/.zst)")
            files += matches
        elif Path(s).is_file():
            files.append(Path(s))
        else:
            raise UserError(f"{s}: input file not found")
    seen: set[Path] = set()
    unique = []
    for f in files:  # the same file named twice would silently double its weight
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def _is_text_input(p: Path) -> bool:
    name = p.name.removesuffix(".gz").removesuffix(".zst")
    return name.endswith(_TEXT_SUFFIXES)


def _open_binary(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        try:
            import zstandard
        except ImportError as e:
            raise UserError(
                f"{path}: reading .zst files needs the package zstandard: pip install zstandard"
            ) from e
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _decode_error(
    path: Path, offset: int, line: int | None, encoding: str, e: UnicodeDecodeError
) -> UserError:
    where = f"{path}:{line}" if line is not None else str(path)
    return UserError(
        f"{where}: cannot decode byte offset {offset} as {encoding} ({e.reason}). If the file uses another "
        "encoding, say which with --encoding, e.g. --encoding cp932 for Shift_JIS (Aozora Bunko) text"
    )


def _read_error(path: Path, lineno: int | None, e: Exception) -> UserError:
    where = f"{path}: after line {lineno}" if lineno else str(path)
    fix = ("the compressed file ends early or is damaged (an interrupted download or copy?): fetch or compress "
           "it again" if path.suffix in (".gz", ".zst") else "the file could not be read")
    return UserError(f"{where}: cannot read on ({type(e).__name__}: {e}); {fix}")


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The raw lines of a (possibly compressed) file, numbered from 1; a read or decompression error names the
    file and the last line read."""
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, start=1):
                yield lineno, raw
    except _decompress_errors() as e:
        raise _read_error(path, lineno, e) from None


def _bom_error(path: Path) -> UserError:
    return UserError(f"{path}:1: the file starts with a UTF-8 byte-order mark (BOM), which would become part of "
                     "the text; read it with --encoding utf-8-sig (or save the file without the BOM)")


class _Reader:
    """Yields document texts from the input files and keeps the counts for the report."""

    def __init__(
        self, files: list[Path], text_key: str, encoding: str, skip_invalid_json: bool, report: TokenizeReport
    ):
        self.files, self.text_key, self.encoding = files, text_key, encoding
        self.skip_invalid_json, self.report = skip_invalid_json, report
        self.documents_per_file: list[int] = []

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            before = self.report.num_documents
            name = path.name.removesuffix(".gz").removesuffix(".zst")
            yield from (self._text_file(path) if name.endswith(".txt") else self._jsonl_file(path))
            self.documents_per_file.append(self.report.num_documents - before)

    def _keep(self, text: str, nbytes: int) -> bool:
        self.report.num_bytes += nbytes
        if not text.strip():
            self.report.empty_documents += 1
            return False
        self.report.num_documents += 1
        return True

    def _text_file(self, path: Path) -> Iterator[str]:
        try:
            with _open_binary(path) as f:
                data = f.read()
        except _decompress_errors() as e:
            raise _read_error(path, None, e) from None
        try:
            text = data.decode(self.encoding)
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise _decode_error(path, e.start, line, self.encoding, e) from None
        if text.startswith(_BOM):
            raise _bom_error(path)
        if self._keep(text, len(data)):
            yield text

    def _jsonl_file(self, path: Path) -> Iterator[str]:
        offset = 0
        for lineno, raw in _numbered_lines(path):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode(self.encoding)
            except UnicodeDecodeError as e:
                raise _decode_error(path, start + e.start, lineno, self.encoding, e) from None
            if lineno == 1 and line.startswith(_BOM):
                raise _bom_error(path)
            if not line.strip():
                self.report.blank_lines += 1
                continue
            text = self._record_text(path, lineno, raw, line)
            if text is not None and self._keep(text, len(raw)):
                yield text

    def _record_text(self, path: Path, lineno: int, raw: bytes, line: str) -> str | None:
        """The text of one JSON line; None for a line skipped (and counted) as invalid."""
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return self._invalid(path, lineno, f"invalid JSON ({e.msg} at column {e.colno}); fix the line", e.msg)
        if not isinstance(record, dict) or self.text_key not in record:
            keys = ", ".join(map(repr, record)) if isinstance(record, dict) else type(record).__name__
            raise UserError(
                f"{path}:{lineno}: no key {self.text_key!r} in the record (it has: {keys}); "
                "name the text field with --text-key"
            )
        text = record[self.text_key]
        if not isinstance(text, str):
            raise UserError(f"{path}:{lineno}: key {self.text_key!r} holds a {type(text).__name__}, not a string")
        if b"\\u" in raw and (bad := _SURROGATE.search(text)):
            what = f"lone surrogate \\u{ord(bad.group()):04x}"
            return self._invalid(path, lineno, f"the text holds a {what} (at character {bad.start()}), half of a "
                                 "UTF-16 pair, which is not text; fix the escape in that line", what)
        return text

    def _invalid(self, path: Path, lineno: int, message: str, short: str) -> None:
        """Refuse an invalid line, or (--skip-invalid-json) count it for the report."""
        if not self.skip_invalid_json:
            raise UserError(f"{path}:{lineno}: {message}, or pass --skip-invalid-json to skip such lines (they are "
                            "counted in the report)")
        self.report.invalid_json_lines += 1
        if len(self.report.invalid_json_examples) < 10:
            self.report.invalid_json_examples.append(f"{path}:{lineno}: {short}")
        return None


def _chunks(texts: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for t in texts:
        chunk.append(t)
        size += len(t)
        if size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# Worker side. Each worker process loads the tokenizer once, in its initializer.
_worker_state: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, dtype: str, bos: int | None, eos: int | None) -> None:
    _worker_state.update(tok=load_tokenizer(tokenizer_path), dtype=np.dtype(dtype), bos=bos, eos=eos)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    s = _worker_state
    return encode_documents(s["tok"], texts, s["dtype"], s["bos"], s["eos"])


def encode_documents(
    tok: Tokenizer, texts: list[str], dtype: np.dtype, bos: int | None, eos: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Encode documents into (concatenated tokens, per-document lengths), adding BOS/EOS when given."""
    arrays = tok.encode_batch_arrays(texts)
    extra = (bos is not None) + (eos is not None)
    lengths = np.fromiter((a.size + extra for a in arrays), dtype=np.int32, count=len(arrays))
    if extra == 0:
        return np.concatenate(arrays).astype(dtype, copy=False), lengths
    out = np.empty(int(lengths.sum(dtype=np.int64)), dtype=dtype)
    ends = np.cumsum(lengths, dtype=np.int64)
    starts = ends - lengths
    if bos is not None:
        out[starts] = bos
    if eos is not None:
        out[ends - 1] = eos
    first = int(bos is not None)
    for a, s in zip(arrays, starts, strict=True):
        out[s + first : s + first + a.size] = a
    return out, lengths


def tokenize_corpus(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    text_key: str = "text",
    workers: int = 1,
    encoding: str = "utf-8",
    append_bos: bool = False,
    append_eos: bool = True,
    skip_invalid_json: bool = False,
    progress: bool | None = None,
) -> TokenizeReport:
    """Tokenize `inputs` (paths, globs, directories) into the Megatron shard `output`.bin/.idx (+ .meta.json).

    Document i of the inputs, in order, becomes sequence i: its text encoded without BOS, then EOS
    (`append_bos`/`append_eos` change that). `workers` > 1 encodes in that many processes; the output is the
    same either way. Written under temporary names and renamed only when complete.
    """
    codec = _codec_name(encoding)
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    dtype = dtype_for_vocab(tok.vocab_size)
    if append_bos and tok.bos_id is None:
        raise UserError(f"{tok.path}: the tokenizer has no BOS token, so BOS cannot be added")
    bos = tok.bos_id if append_bos else None
    eos = tok.eos_id if append_eos else None
    report = TokenizeReport(prefix=os.fspath(output), dtype=dtype.name)
    report.removed_temp_files = [str(p) for p in remove_stale_temp_files(output)]
    reader = _Reader(files, text_key, codec, skip_invalid_json, report)
    total_bytes = sum(f.stat().st_size for f in files)
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
    t0 = time.perf_counter()
    writer = ShardWriter(output, dtype)
    try:
        _encode_into(writer, reader, tok, dtype, bos, eos, workers, bar)
        meta = _shard_meta(tok, reader, append_bos=append_bos, append_eos=append_eos)
        if report.num_documents == 0:
            raise UserError(f"{', '.join(map(str, files))}: no non-empty documents; nothing to write")
        writer.finish(meta)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    report.num_tokens = writer.num_tokens
    report.seconds = time.perf_counter() - t0
    return report


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temp_files(prefix: str | os.PathLike, min_age_s: float = _STALE_AFTER_S) -> list[Path]:
    """Delete the `PREFIX.{bin,idx,meta.json}.tmpPID` files of writers that were killed: their process is gone
    from this host and the file has not changed for `min_age_s` (so that a writer on another host sharing the
    directory is left alone). Returns the files removed."""
    prefix = Path(prefix)
    if not prefix.parent.is_dir():
        return []
    pattern = re.compile(re.escape(prefix.name) + r"\.(?:bin|idx|meta\.json)\.tmp(\d+)$")
    removed, now = [], time.time()
    for p in prefix.parent.iterdir():
        m = pattern.match(p.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            if now - p.stat().st_mtime >= min_age_s:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _codec_name(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise UserError(f"unknown encoding {encoding!r} (try utf-8, cp932, euc-jp)") from None


def _encode_into(
    writer: ShardWriter,
    reader: _Reader,
    tok: Tokenizer,
    dtype: np.dtype,
    bos: int | None,
    eos: int | None,
    workers: int,
    bar: Any,
) -> None:
    """Encode the reader's documents, in order, into `writer`: here, or in `workers` processes with at most
    2 x workers chunks in flight."""
    if workers <= 1:
        for chunk in _chunks(iter(reader)):
            writer.add_documents(*encode_documents(tok, chunk, dtype, bos, eos))
            bar.update(reader.report.num_bytes - bar.n)
        return
    pool = mp.get_context().Pool(workers, _init_worker, (tok.path, dtype.str, bos, eos))
    try:
        pending: deque = deque()
        for chunk in _chunks(iter(reader)):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            while len(pending) > 2 * workers:
                writer.add_documents(*pending.popleft().get())
            bar.update(reader.report.num_bytes - bar.n)
        while pending:
            writer.add_documents(*pending.popleft().get())
    finally:
        pool.terminate()
        pool.join()


def _shard_meta(tok: Tokenizer, reader: _Reader, append_bos: bool, append_eos: bool) -> dict[str, Any]:
    """The shard's sidecar (.meta.json): tokenizer, options, sources with their hashes, and what was skipped."""
    report = reader.report
    return {
        "tokenizer": {
            "path": tok.path,
            "sha256": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
        },
        "append_bos": append_bos,
        "append_eos": append_eos,
        "text_key": reader.text_key,
        "encoding": reader.encoding,
        "sources": [
            {"path": str(f), "sha256": file_sha256(f), "bytes": f.stat().st_size, "documents": n}
            for f, n in zip(reader.files, reader.documents_per_file, strict=True)
        ],
        "skipped": {
            "empty_documents": report.empty_documents,
            "blank_lines": report.blank_lines,
            "invalid_json_lines": report.invalid_json_lines,
        },
    }


def cached_shard(
    inputs: Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    text_key: str = "text",
    encoding: str = "utf-8",
    workers: int = 1,
) -> Path:
    """The shard prefix for `inputs` in `cache_dir`, tokenizing them on first use (see `cache_prefix`)."""
    files = expand_inputs(inputs)
    tok_path = load_tokenizer(tokenizer).path
    prefix = _prefix_for(files, cache_dir, tok_path, text_key, encoding)
    remove_stale_temp_files(prefix)
    if not shard_exists(prefix):
        tokenize_corpus(
            files, prefix, tokenizer=tok_path, text_key=text_key, encoding=encoding, workers=workers
        )
    return prefix


def cache_prefix(
    inputs: Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    text_key: str = "text",
    encoding: str = "utf-8",
) -> Path:
    """The prefix `cached_shard` writes the shard of `inputs` to, without tokenizing (so that a rank can wait
    for a shard another rank makes). The cache key hashes the input files' contents, the tokenizer file and
    the options, so an edited corpus or another tokenizer gets a new shard instead of a stale one."""
    return _prefix_for(expand_inputs(inputs), cache_dir, load_tokenizer(tokenizer).path, text_key, encoding)


def _prefix_for(files: list[Path], cache_dir: str | os.PathLike, tok_path: str, text_key: str, encoding: str) -> Path:
    key = hashlib.sha256(
        json.dumps(
            {
                "files": [[f.name, file_sha256(f)] for f in files],
                "tokenizer": file_sha256(tok_path),
                "text_key": text_key,
                "encoding": encoding,
                "format": 1,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    stem = files[0].name.split(".")[0] if len(files) == 1 else f"{files[0].parent.name}-{len(files)}files"
    return Path(cache_dir) / f"{stem}-{key}"
