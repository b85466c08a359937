"""A trained model as a Hugging Face directory: weights, config and the tokenizer the run used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moecpt.data.tokenizer import HFTokenizer, load_tokenizer
from moecpt.model import CausalLM, build_model
from moecpt.parallel import parallelize as par
from moecpt.parallel.dist import rank

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
    shutil.copyfile(src, out_dir / "tokenizer.json")
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


def export_sharded(model: CausalLM, world: int, tokenizer_path: str | None, out_dir: Path) -> Path | None:
    """`export_hf` of a model that may be sharded over `world` ranks: every rank takes part in gathering the
    weights, rank 0 writes them (returns None on the others)."""
    if world == 1:
        return export_hf(model, tokenizer_path, out_dir)
    full = par.full_state_dict(model)
    if rank() != 0:
        return None
    plain = build_model(model.config)
    plain.load_state_dict(full, assign=True)
    plain.tie_weights()
    return export_hf(plain, tokenizer_path, out_dir)
