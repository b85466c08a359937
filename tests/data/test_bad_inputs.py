"""Bad tokenize inputs the robustness trial found: each gets an error naming the file and line and the fix
(a lone surrogate, a truncated .gz, a UTF-8 byte-order mark in .jsonl and .txt), and the temp files of killed
runs are removed."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time

import pytest

from moecpt.data.indexed import IndexedShard
from moecpt.data.preprocess import cached_shard, remove_stale_temp_files, tokenize_corpus
from moecpt.errors import UserError


def _lines(path, lines: list[str], prefix: bytes = b""):
    path.write_bytes(prefix + "".join(line + "\n" for line in lines).encode("utf-8"))
    return path


def test_a_lone_surrogate_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    src = _lines(tmp_path / "a.jsonl", ['{"text": "fine"}', '{"text": "bad \\ud800 half"}',
                                        '{"text": "pair \\ud83d\\ude00 ok"}'])
    with pytest.raises(UserError, match=r"a\.jsonl:2: the text holds a lone surrogate \\ud800 .*fix the escape "
                                        r"in that line, or pass --skip-invalid-json"):
        tokenize_corpus([src], tmp_path / "s", progress=False)
    report = tokenize_corpus([src], tmp_path / "s", skip_invalid_json=True, progress=False)
    assert report.num_documents == 2 and report.invalid_json_lines == 1  # the valid pair (an emoji) is kept
    assert "lone surrogate" in report.invalid_json_examples[0]


def test_a_truncated_gz_names_the_file_and_the_last_line_read(tmp_path):
    records = [json.dumps({"text": f"document {i} " * 50}) for i in range(400)]
    whole = gzip.compress("".join(r + "\n" for r in records).encode())
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"cut\.jsonl\.gz: after line \d+: cannot read on \(EOFError: .*\); the "
                                        r"compressed file ends early or is damaged"):
        tokenize_corpus([gz], tmp_path / "s", progress=False)
    txt = tmp_path / "cut.txt.gz"
    txt.write_bytes(gzip.compress(" ".join(f"word{i}" for i in range(5000)).encode())[:200])
    with pytest.raises(UserError, match=r"cut\.txt\.gz: cannot read on \(EOFError"):
        tokenize_corpus([txt], tmp_path / "t", progress=False)


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.txt"])
def test_a_utf8_bom_points_to_utf_8_sig(tmp_path, name):
    bom = b"\xef\xbb\xbf"
    lines = ['{"text": "first"}', '{"text": "second"}'] if name.endswith(".jsonl") else ["first", "second"]
    src = _lines(tmp_path / name, lines, prefix=bom)
    with pytest.raises(UserError, match=rf"{name}:1: the file starts with a UTF-8 byte-order mark .*--encoding "
                                        r"utf-8-sig"):
        tokenize_corpus([src], tmp_path / "s", progress=False)
    report = tokenize_corpus([src], tmp_path / "s", encoding="utf-8-sig", progress=False)
    assert report.num_documents == (2 if name.endswith(".jsonl") else 1)  # document 1 kept, not skipped
    plain = _lines(tmp_path / f"plain-{name}", lines)
    tokenize_corpus([plain], tmp_path / "p", progress=False)
    a, b = IndexedShard(tmp_path / "s"), IndexedShard(tmp_path / "p")
    assert a.tokens.tolist() == b.tokens.tolist()  # no BOM in the tokens


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_files_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    src = _lines(tmp_path / "a.jsonl", ['{"text": "one"}', '{"text": "two"}'])
    dead, old = _dead_pid(), time.time() - 3600
    stale = [tmp_path / f"s.{ext}.tmp{dead}" for ext in ("bin", "idx", "meta.json")]
    live = tmp_path / f"s.bin.tmp{os.getppid()}"  # a process that is alive
    fresh = tmp_path / f"s.idx.tmp{dead}"
    for p in [*stale, live]:
        p.write_bytes(b"partial")
        os.utime(p, (old, old))
    report = tokenize_corpus([src], tmp_path / "s", progress=False)
    assert sorted(report.removed_temp_files) == sorted(map(str, stale)) and live.exists()
    assert "removed" in report.summary() and not any(p.exists() for p in stale)
    fresh.write_bytes(b"partial")  # just written: perhaps a writer on another host sharing the directory
    assert remove_stale_temp_files(tmp_path / "s") == [] and fresh.exists()
    os.utime(fresh, (old, old))
    assert remove_stale_temp_files(tmp_path / "s") == [fresh]


def test_the_shard_cache_removes_temp_files_of_killed_runs(tmp_path):
    src = _lines(tmp_path / "a.jsonl", ['{"text": "one"}'])
    prefix = cached_shard([src], tmp_path / "cache")
    dead, old = _dead_pid(), time.time() - 3600
    left = prefix.parent / f"{prefix.name}.bin.tmp{dead}"
    left.write_bytes(b"partial")
    os.utime(left, (old, old))
    assert cached_shard([src], tmp_path / "cache") == prefix and not left.exists()
