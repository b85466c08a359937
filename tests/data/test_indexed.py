"""The Megatron MMIDIDX v1 byte layout, checked against the published specification, and refused bad shards."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from moecpt.data.indexed import (
    DTYPE_CODES,
    IndexedShard,
    ShardWriter,
    bin_path,
    dtype_for_vocab,
    idx_path,
    shard_exists,
)
from moecpt.errors import UserError


def test_dtype_codes_are_megatrons():
    # megatron/core/datasets/indexed_dataset.py, class DType
    megatron = {
        1: "uint8",
        2: "int8",
        3: "int16",
        4: "int32",
        5: "int64",
        6: "float64",
        7: "float32",
        8: "uint16",
    }
    assert {k: np.dtype(v).name for k, v in DTYPE_CODES.items()} == megatron
    assert dtype_for_vocab(32000) == np.uint16 and dtype_for_vocab(65535) == np.uint16
    assert dtype_for_vocab(65536) == np.int32 and dtype_for_vocab(152064) == np.int32


@pytest.mark.parametrize(("dtype", "code"), [(np.uint16, 8), (np.int32, 4)])
def test_index_byte_layout(tmp_path, dtype, code):
    docs = [[5, 6, 7, 2], [9, 2], [70000 if dtype == np.int32 else 65535, 1, 2]]
    w = ShardWriter(tmp_path / "s", np.dtype(dtype))
    w.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    w.finish()

    raw = idx_path(tmp_path / "s").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, dtype_code, n_seq, n_doc_idx = struct.unpack_from("<QBQQ", raw, 9)
    assert (version, dtype_code, n_seq, n_doc_idx) == (1, code, 3, 4)
    off = 9 + 8 + 1 + 8 + 8
    lengths = struct.unpack_from("<3i", raw, off)
    pointers = struct.unpack_from("<3q", raw, off + 12)
    doc_idx = struct.unpack_from("<4q", raw, off + 12 + 24)
    item = np.dtype(dtype).itemsize
    assert lengths == (4, 2, 3)
    assert pointers == (0, 4 * item, 6 * item)  # byte offsets into .bin
    assert doc_idx == (0, 1, 2, 3)
    assert len(raw) == off + 12 + 24 + 32
    tokens = np.frombuffer(bin_path(tmp_path / "s").read_bytes(), dtype=np.dtype(dtype).newbyteorder("<"))
    assert tokens.tolist() == sum(docs, [])

    shard = IndexedShard(tmp_path / "s")
    assert shard.dtype == dtype and shard.num_documents == 3 and shard.num_tokens == 9
    assert [shard.document(i).tolist() for i in range(3)] == docs


def _write_megatron_shard(prefix, sequences, document_indices):
    """A shard as Megatron's sentence-splitting preprocessor lays it out, built straight from the spec."""
    lengths = [len(s) for s in sequences]
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1]) * 2]) if sequences else []
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(sequences), len(document_indices)))
        f.write(struct.pack(f"<{len(lengths)}i", *lengths))
        f.write(struct.pack(f"<{len(lengths)}q", *pointers))
        f.write(struct.pack(f"<{len(document_indices)}q", *document_indices))
    np.array(sum(sequences, []), dtype="<u2").tofile(f"{prefix}.bin")


def test_reads_multi_sequence_documents_from_megatron(tmp_path):
    # three sentences forming document 0, one sentence forming document 1
    _write_megatron_shard(tmp_path / "m", [[10, 11], [12], [13, 14, 2], [20, 2]], [0, 3, 4])
    shard = IndexedShard(tmp_path / "m")
    assert shard.num_documents == 2
    assert shard.document(0).tolist() == [10, 11, 12, 13, 14, 2]
    assert shard.document(1).tolist() == [20, 2]
    assert shard.meta == {}  # no sidecar: fingerprint falls back to the index bytes and size
    assert len(shard.fingerprint()) == 64


def test_bin_size_disagreeing_with_idx_is_refused(tmp_path):
    _write_megatron_shard(tmp_path / "m", [[1, 2, 3], [4, 2]], [0, 1, 2])
    with open(tmp_path / "m.bin", "ab") as f:
        f.write(b"\x00\x00")  # one token too many
    with pytest.raises(
        UserError, match=r"m\.bin: 12 bytes, but .*m\.idx describes 5 tokens of uint16 \(10 bytes\)"
    ):
        IndexedShard(tmp_path / "m")
    (tmp_path / "m.bin").write_bytes(b"\x00" * 6)  # too few
    with pytest.raises(UserError, match="does not belong together"):
        IndexedShard(tmp_path / "m")


def test_truncated_or_foreign_index_is_refused(tmp_path):
    _write_megatron_shard(tmp_path / "m", [[1, 2, 3], [4, 2]], [0, 1, 2])
    raw = (tmp_path / "m.idx").read_bytes()
    (tmp_path / "m.idx").write_bytes(raw[:-8])
    with pytest.raises(UserError, match="truncated or corrupt"):
        IndexedShard(tmp_path / "m")
    (tmp_path / "m.idx").write_bytes(b"TNTIDX\x00\x00" + raw[8:])
    with pytest.raises(UserError, match="not a Megatron MMIDIDX index"):
        IndexedShard(tmp_path / "m")
    (tmp_path / "m.idx").write_bytes(b"")
    with pytest.raises(UserError, match=r"too short to be an index \(0 bytes\)"):
        IndexedShard(tmp_path / "m")
    with pytest.raises(UserError, match="shard file not found"):
        IndexedShard(tmp_path / "absent")


def test_unfinished_write_never_looks_like_a_shard(tmp_path):
    w = ShardWriter(tmp_path / "s", np.dtype(np.uint16))
    w.add_documents(np.array([1, 2, 3]), np.array([3]))
    # the process dies here: only temporary files exist
    assert not shard_exists(tmp_path / "s")
    with pytest.raises(UserError, match="not found"):
        IndexedShard(tmp_path / "s")
    w.abort()
    assert list(tmp_path.iterdir()) == []
