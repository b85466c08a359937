"""Hugging Face directories on disk: config.json, safetensors weights (single or sharded) read lazily by
name, the strict shape check, and sharded saving. Which tensor names a family uses, and how they map onto
moecpt's parameters, is the family's state-dict adapter (`moecpt.model.families`); this module only reads and
writes.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moecpt.errors import UserError
from moecpt.model.adapter import BIAS

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_config_json(hf_dir: str | Path) -> dict[str, Any]:
    """The config.json of a Hugging Face directory, as a dict."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir}: no config.json; expected a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


class SafetensorsDir:
    """The tensors of a directory's safetensors file(s), read lazily by name."""

    def __init__(self, hf_dir: str | Path):
        hf_dir = Path(hf_dir)
        index, single = hf_dir / INDEX_FILE, hf_dir / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({e})") from None
            self.files = {name: hf_dir / f for name, f in weight_map.items()}
            absent = sorted({str(p) for p in self.files.values() if not p.is_file()})
            if absent:
                raise UserError(f"{index} names shard file(s) that do not exist: {', '.join(absent)}")
        elif single.is_file():
            with self._open(single) as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise UserError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} (moecpt reads safetensors weights; "
                            "convert .bin checkpoints with transformers' save_pretrained first)")
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise UserError(f"{path}: cannot read safetensors file ({e}); the file may be truncated or corrupt") from None

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def get_slice(self, name: str, region: tuple[slice, ...]) -> torch.Tensor:
        """Only `region` of the tensor (one slice per leading dim): the memory-mapped file is read there alone."""
        return self._handle(name).get_slice(name)[region]

    def close(self) -> None:
        """Drop the open files (their memory maps, and the pages read through them, go with them)."""
        self._handles.clear()

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        return self._handles[path]


def check_tensors(tensors: SafetensorsDir, expected: dict[str, tuple[int, ...]], where: str,
                  optional: dict[str, tuple[int, ...]] | None = None) -> None:
    """Refuse, listing every missing, unexpected and mis-shaped tensor, unless the files hold exactly the
    `expected` names with their shapes (`optional` ones may be there, with their shape)."""
    names, optional = tensors.names(), optional or {}
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected) - set(optional))
    wanted = expected | {n: s for n, s in optional.items() if n in names}
    misshaped = [f"{n}: file {tensors.shape(n)}, config {wanted[n]}"
                 for n in sorted(set(wanted) & names) if tensors.shape(n) != wanted[n]]
    if missing or unexpected or misshaped:
        lines = [f"{where}: the weights do not match config.json (nothing was loaded)"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise UserError("\n".join(lines))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parse_size(size: str | int) -> int:
    """'5GB' -> 5 * 10**9 bytes (decimal units, as Hugging Face uses); also KB, MB, GiB, MiB, plain ints."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise UserError(f"max_shard_size {size!r} is not a size like '5GB' or '500MB'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


def save_pretrained(tensors: dict[str, torch.Tensor], config: Any, out_dir: str | Path,
                    max_shard_size: str | int = "5GB", dtype: torch.dtype | None = None) -> None:
    """Write `tensors` (Hugging Face names) as safetensors, sharded above `max_shard_size`, with config.json
    (`config.to_hf_dict`) and generation_config.json."""
    shapes = {name: tuple(tensors[name].shape) for name in sorted(tensors)}
    save_streamed(shapes, tensors.__getitem__, config, out_dir, max_shard_size,
                  dtype or next(iter(tensors.values())).dtype)


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, limit: int) -> list[list[str]]:
    """The tensor names of each file, in order, a new file begun where the next tensor would pass `limit` bytes."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_streamed(shapes: dict[str, tuple[int, ...]], get: Callable[[str], torch.Tensor], config: Any,
                  out_dir: str | Path, max_shard_size: str | int = "5GB", dtype: torch.dtype = torch.float32) -> None:
    """Write the Hugging Face tensors `shapes` names (in that order) as safetensors files of at most
    `max_shard_size`, each tensor read with `get(name)` only when its bytes are written: each file's header
    is known from the shapes, so no more than one tensor is held at a time. Then config.json
    (`config.to_hf_dict`) and generation_config.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype not in _ST_DTYPES:
        raise UserError(f"cannot write {dtype} weights as safetensors; choose float32, bfloat16 or float16")
    dtype_name = {v: k for k, v in _DTYPES.items()}.get(dtype, "float32")
    shards = plan_shards(shapes, dtype.itemsize, parse_size(max_shard_size))
    for stale in [*out_dir.glob("model-*-of-*.safetensors"), out_dir / SINGLE_FILE, out_dir / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # never leave shards of an earlier save beside the new ones
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                                                    for k in range(1, len(shards) + 1)]
    for fname, shard in zip(names, shards, strict=True):
        _write_safetensors(out_dir / fname, {n: shapes[n] for n in shard}, get, dtype)
    if len(shards) > 1:
        total = sum(math.prod(s) * tensor_dtype(n, dtype).itemsize for n, s in shapes.items())
        weight_map = {n: fname for fname, shard in zip(names, shards, strict=True) for n in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(dtype_name), indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def tensor_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is written in: the export's, except a router selection bias, always fp32 (as the hub
    stores it and transformers keeps it)."""
    return torch.float32 if name.endswith(BIAS) else dtype


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], get: Callable[[str], torch.Tensor],
                       dtype: torch.dtype) -> None:
    """One safetensors file (the format: an 8-byte little-endian header length, the JSON header padded with
    spaces to 8 bytes, then each tensor's bytes in header order), written tensor by tensor."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * tensor_dtype(name, dtype).itemsize
        header[name] = {"dtype": _ST_DTYPES[tensor_dtype(name, dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            t = get(name).detach().to("cpu", dtype=tensor_dtype(name, dtype)).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)}, planned {shape}")
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    os.chmod(path, 0o666 & ~_umask())  # readable by others, as transformers' files are
