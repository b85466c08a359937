"""Hugging Face Mixtral directories in and out: strict loading, sharded safetensors saving.

Two weight layouts are read:
- the hub layout of the published checkpoints: `model.layers.{i}.block_sparse_moe.experts.{j}.w1/w2/w3.weight`
  and `block_sparse_moe.gate.weight`;
- the stacked layout of transformers 5 modules: `model.layers.{i}.mlp.experts.gate_up_proj` [E, 2F, H],
  `mlp.experts.down_proj` [E, H, F] and `mlp.gate.weight`.
Loading is strict: every tensor in the files must be used and every expected tensor found with its shape, or
the load fails with the full list of missing, unexpected and mis-shaped keys. Saving writes the hub layout.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moecpt.errors import UserError
from moecpt.model.config import MixtralConfig
from moecpt.model.mixtral import MixtralForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# moecpt parameter name -> Hugging Face tensor name, for the tensors that are not experts.
_DENSE = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attn.q_proj.weight": "self_attn.q_proj.weight",
    "self_attn.k_proj.weight": "self_attn.k_proj.weight",
    "self_attn.v_proj.weight": "self_attn.v_proj.weight",
    "self_attn.o_proj.weight": "self_attn.o_proj.weight",
}


def load_config(hf_dir: str | Path) -> MixtralConfig:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir}: no config.json; expected a Hugging Face Mixtral directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return MixtralConfig.from_hf_dict(raw, source=str(path))


class _Tensors:
    """The tensors of a directory's safetensors file(s), read lazily by name."""

    def __init__(self, hf_dir: Path):
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
            self.files = {}
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

    def _handle(self, name: str):
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        return self._handles[path]


def _expected(config: MixtralConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name of this config and layout, with its shape."""
    H, F, E, V = config.hidden_size, config.intermediate_size, config.num_local_experts, config.vocab_size
    q_dim = config.num_attention_heads * config.attn_head_dim
    kv_dim = config.num_key_value_heads * config.attn_head_dim
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    layer_shapes = {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (q_dim, H), "self_attn.k_proj.weight": (kv_dim, H),
        "self_attn.v_proj.weight": (kv_dim, H), "self_attn.o_proj.weight": (H, q_dim),
    }
    if layout == "hub":
        layer_shapes["block_sparse_moe.gate.weight"] = (E, H)
        for j in range(E):
            layer_shapes |= {f"block_sparse_moe.experts.{j}.w1.weight": (F, H),
                             f"block_sparse_moe.experts.{j}.w3.weight": (F, H),
                             f"block_sparse_moe.experts.{j}.w2.weight": (H, F)}
    else:
        layer_shapes |= {"mlp.gate.weight": (E, H), "mlp.experts.gate_up_proj": (E, 2 * F, H),
                         "mlp.experts.down_proj": (E, H, F)}
    for i in range(config.num_hidden_layers):
        shapes |= {f"model.layers.{i}.{k}": s for k, s in layer_shapes.items()}
    return shapes


def _detect_layout(names: set[str]) -> str:
    hub = any(".block_sparse_moe." in n for n in names)
    stacked = any(".mlp.experts." in n or ".mlp.gate." in n for n in names)
    if hub and stacked:
        raise UserError("checkpoint mixes the hub expert layout (block_sparse_moe.experts.*) and the stacked "
                        "transformers-5 layout (mlp.experts.*); re-save it with one layout")
    return "stacked" if stacked else "hub"


def _check(tensors: _Tensors, expected: dict[str, tuple[int, ...]], where: str) -> None:
    names = tensors.names()
    # Tied checkpoints sometimes carry a copy of the embedding as lm_head: accept it only if equal in shape.
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected) - {"lm_head.weight"})
    if "lm_head.weight" in names and "lm_head.weight" not in expected:
        if tensors.shape("lm_head.weight") != expected["model.embed_tokens.weight"]:
            unexpected.append("lm_head.weight")
    misshaped = [f"{n}: file {tensors.shape(n)}, config {expected[n]}"
                 for n in sorted(set(expected) & names) if tensors.shape(n) != expected[n]]
    if missing or unexpected or misshaped:
        lines = [f"{where}: the weights do not match config.json (nothing was loaded)"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise UserError("\n".join(lines))


def _state_dict_from_hf(tensors: _Tensors, config: MixtralConfig, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (moecpt name, tensor), stacking hub-layout experts into [E, ...] tensors."""
    for ours, theirs in _DENSE.items():
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue
        yield ours, tensors.get(theirs)
    E = config.num_local_experts
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for ours, theirs in _LAYER.items():
            yield f"layers.{i}.{ours}", tensors.get(p + theirs)
        if layout == "hub":
            moe = p + "block_sparse_moe."
            yield f"layers.{i}.moe.gate.weight", tensors.get(moe + "gate.weight")
            yield f"layers.{i}.moe.experts.gate_up_proj", torch.stack(
                [torch.cat([tensors.get(f"{moe}experts.{j}.w1.weight"), tensors.get(f"{moe}experts.{j}.w3.weight")])
                 for j in range(E)])
            yield f"layers.{i}.moe.experts.down_proj", torch.stack(
                [tensors.get(f"{moe}experts.{j}.w2.weight") for j in range(E)])
        else:
            yield f"layers.{i}.moe.gate.weight", tensors.get(p + "mlp.gate.weight")
            yield f"layers.{i}.moe.experts.gate_up_proj", tensors.get(p + "mlp.experts.gate_up_proj")
            yield f"layers.{i}.moe.experts.down_proj", tensors.get(p + "mlp.experts.down_proj")


def from_pretrained(hf_dir: str | Path, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu") -> MixtralForCausalLM:
    """Load a Hugging Face Mixtral directory (config.json + safetensors, single or sharded), strictly.

    `dtype=None` keeps the checkpoint's dtype.
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir}: not a directory; expected a Hugging Face Mixtral directory")
    config = load_config(hf_dir)
    tensors = _Tensors(hf_dir)
    layout = _detect_layout(tensors.names())
    _check(tensors, _expected(config, layout), str(hf_dir))

    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    state = {}
    for name, t in _state_dict_from_hf(tensors, config, layout):
        state[name] = t.to(device=device, dtype=dtype or t.dtype)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def hf_state_dict(model: MixtralForCausalLM) -> dict[str, torch.Tensor]:
    """moecpt parameters renamed and split into the hub layout (each expert's w1, w2, w3)."""
    config = model.config
    sd = model.state_dict()
    out = {}
    for ours, theirs in _DENSE.items():
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue
        out[theirs] = sd[ours]
    F = config.intermediate_size
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for ours, theirs in _LAYER.items():
            out[p + theirs] = sd[f"layers.{i}.{ours}"]
        out[p + "block_sparse_moe.gate.weight"] = sd[f"layers.{i}.moe.gate.weight"]
        gate_up, down = sd[f"layers.{i}.moe.experts.gate_up_proj"], sd[f"layers.{i}.moe.experts.down_proj"]
        for j in range(config.num_local_experts):
            e = f"{p}block_sparse_moe.experts.{j}."
            out[e + "w1.weight"] = gate_up[j, :F]
            out[e + "w3.weight"] = gate_up[j, F:]
            out[e + "w2.weight"] = down[j]
    return out


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


def save_pretrained(model: MixtralForCausalLM, out_dir: str | Path, max_shard_size: str | int = "5GB",
                    dtype: torch.dtype | None = None) -> None:
    """Write config.json, generation_config.json and safetensors weights (sharded above `max_shard_size`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    out_dtype = dtype or next(iter(tensors.values())).dtype
    dtype_name = {v: k for k, v in _DTYPES.items()}.get(out_dtype, "float32")

    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * out_dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes

    for stale in [*out_dir.glob("model-*-of-*.safetensors"), out_dir / SINGLE_FILE, out_dir / INDEX_FILE]:
        stale.unlink(missing_ok=True)  # never leave shards of an earlier save beside the new ones
    def write(shard: dict[str, torch.Tensor], path: Path) -> None:
        # Expert tensors are views into the stacked weights: copy them (one shard at a time) before writing.
        shard = {k: v.detach().to("cpu", dtype=out_dtype).clone() for k, v in shard.items()}
        save_file(shard, str(path), metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_umask())  # safetensors writes owner-only files; others may need to read the model

    if len(shards) == 1:
        write(shards[0], out_dir / SINGLE_FILE)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write(shard, out_dir / fname)
            weight_map |= dict.fromkeys(shard, fname)
        total = sum(t.numel() for t in tensors.values()) * out_dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    config = model.config
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(dtype_name), indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
