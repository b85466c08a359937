"""A trained model as a Hugging Face directory: weights, config and the tokenizer the run used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moecpt.model import CausalLM, build_model
from moecpt.parallel import parallelize as par
from moecpt.parallel.dist import rank


def export_hf(model: CausalLM, tokenizer_path: str | None, out_dir: Path) -> Path:
    """Write `out_dir` with the weights, config and the tokenizer files."""
    model.save_pretrained(out_dir)
    if tokenizer_path:
        src = Path(tokenizer_path)
        if src.suffix == ".json":
            shutil.copyfile(src, out_dir / "tokenizer.json")
        elif src.is_file():
            shutil.copyfile(src, out_dir / "tokenizer.model")
        tok_cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                   "model_max_length": model.config.max_position_embeddings, "legacy": True}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return out_dir


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
