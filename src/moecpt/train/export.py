"""A trained model as a Hugging Face directory: weights, config and the tokenizer the run used."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from moecpt.data.tokenizer import HFTokenizer, load_tokenizer, tokenizer_json_for_export
from moecpt.model import CausalLM, hf
from moecpt.model.families import family_of
from moecpt.parallel.dist import rank
from moecpt.train import checkpoint as ckpt_lib

# The files that may accompany a tokenizer.json in its publisher's directory, copied as they are.
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                        "merges.txt")


def export_hf(model: CausalLM, tokenizer_path: str | None, out_dir: Path) -> Path:
    """Write `out_dir` with the weights, config and the tokenizer files."""
    model.save_pretrained(out_dir)
    if tokenizer_path:
        export_tokenizer(tokenizer_path, out_dir, model.config.max_position_embeddings)
    return out_dir


def export_tokenizer(tokenizer_path: str | Path, out_dir: Path, max_length: int) -> list[str]:
    """Copy the run's tokenizer into `out_dir` (names of the files written).

    A `tokenizer.json` (or a directory holding one) is copied with the publisher's companion files found
    beside it (TOKENIZER_COMPANIONS); without a `tokenizer_config.json` there, a minimal one naming
    PreTrainedTokenizerFast and the special tokens moecpt resolved is written, so that
    `transformers.AutoTokenizer` reads the file as it is. A SentencePiece model is written as `tokenizer.model`
    with a LlamaTokenizer `tokenizer_config.json` (BOS added, as Mixtral's)."""
    tok = load_tokenizer(tokenizer_path)
    src = Path(tok.path)
    out_dir = Path(out_dir)
    if not isinstance(tok, HFTokenizer):
        shutil.copyfile(src, out_dir / "tokenizer.model")
        tok_cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                   "model_max_length": max_length, "legacy": True}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        return ["tokenizer.model", "tokenizer_config.json"]
    text = tokenizer_json_for_export(tok)  # BOS put first as moecpt trained with it (DeepSeek-V3), or None
    if text is None:
        shutil.copyfile(src, out_dir / "tokenizer.json")
    else:
        (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    written = ["tokenizer.json"]
    for name in TOKENIZER_COMPANIONS:
        if (src.parent / name).is_file():
            shutil.copyfile(src.parent / name, out_dir / name)
            written.append(name)
    if "tokenizer_config.json" not in written:
        name_of = {i: tok.decode([i]) for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None}
        tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name_of.get(tok.bos_id),
                   "eos_token": name_of[tok.eos_id], "pad_token": name_of.get(tok.pad_id), "unk_token": None, "clean_up_tokenization_spaces": False, "model_max_length": max_length}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        written.append("tokenizer_config.json")
    return written


def hf_plan(config) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The Hugging Face tensors an export writes, in order, with their shapes, and the moecpt tensor each
    comes from (from the adapter's `to_hf_tensor` on meta tensors: no memory)."""
    adapter = family_of(config).adapter_cls(config)
    shapes, owner = {}, {}
    for name, shape in adapter.state_shapes().items():
        for hf_name, t in adapter.to_hf_tensor(name, torch.empty(shape, device="meta")).items():
            shapes[hf_name], owner[hf_name] = tuple(t.shape), name
    return shapes, owner


def streamed_writer(config, tensors: Iterator[tuple[str, torch.Tensor]]):
    """`get(hf_name)` for `save_streamed`: the moecpt tensors come from `tensors` in the adapter's order, one
    at a time, and each is converted with `to_hf_tensor` when its first Hugging Face tensor is asked for."""
    adapter = family_of(config).adapter_cls(config)
    _, owner = hf_plan(config)
    current: dict[str, torch.Tensor] = {}

    def get(hf_name: str) -> torch.Tensor:
        if hf_name not in current:
            current.clear()
            for name, t in tensors:
                current.update(adapter.to_hf_tensor(name, t))
                if name == owner[hf_name]:
                    break
        return current[hf_name]

    return get


def export_checkpoint(ckpt: Path, out_dir: Path, tokenizer_path: str | None, dtype: torch.dtype | None = None,
                      max_shard_size: str | int = "5GB") -> Path:
    """A moecpt checkpoint (DCP, saved at any world size and EP layout) as a Hugging Face directory, in one
    process, tensor by tensor: each moecpt tensor is read alone from the checkpoint, converted and written,
    so memory holds one tensor (never the whole model)."""
    config = ckpt_lib.saved_model_config(ckpt)
    shapes, _ = hf_plan(config)
    names = list(family_of(config).adapter_cls(config).state_shapes())
    get = streamed_writer(config, ckpt_lib.checkpoint_tensors(ckpt, names))
    hf.save_streamed(shapes, get, config, out_dir, max_shard_size, dtype or torch.float32)
    if tokenizer_path:
        export_tokenizer(tokenizer_path, out_dir, config.max_position_embeddings)
    return Path(out_dir)


def export_sharded(model: CausalLM, world: int, tokenizer_path: str | None, out_dir: Path,
                   max_shard_size: str | int = "5GB") -> Path | None:
    """`export_hf` of a model that may be sharded over `world` ranks: every rank calls it; the tensors are
    gathered one at a time (`full_tensor`, a collective every rank joins in the same order) and rank 0 writes
    each as it comes, so no rank holds the whole model (returns None on the other ranks)."""
    if world == 1:
        return export_hf(model, tokenizer_path, out_dir)
    config = model.config
    state = model.state_dict()
    names = list(family_of(config).adapter_cls(config).state_shapes())
    gathered = ((n, state[n].full_tensor() if isinstance(state[n], DTensor) else state[n]) for n in names)
    get = streamed_writer(config, gathered)
    shapes, _ = hf_plan(config)
    if rank() != 0:
        for hf_name in shapes:  # the same gathers, in the same order, as rank 0's writer makes
            get(hf_name)
        return None
    hf.save_streamed(shapes, get, config, out_dir, max_shard_size, next(iter(state.values())).dtype)
    if tokenizer_path:
        export_tokenizer(tokenizer_path, out_dir, config.max_position_embeddings)
    return Path(out_dir)
