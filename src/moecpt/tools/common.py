"""What the tools share: carrying a model's tokenizer files into the directory a tool writes."""

from __future__ import annotations

import shutil
from pathlib import Path

from moecpt.train.checkpoint import find_checkpoint, is_hf_dir, read_trainer_state
from moecpt.train.export import TOKENIZER_COMPANIONS, export_tokenizer

# A Hugging Face directory's tokenizer: the model file(s), its companions, and transformers 5's chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", *TOKENIZER_COMPANIONS, "chat_template.jinja")


def copy_tokenizer_files(src: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer of `src` into `out_dir`: the tokenizer files of a Hugging Face directory as they are,
    or the tokenizer a moecpt checkpoint (or run directory) was trained with. Returns the names written
    (none when `src` has no tokenizer)."""
    src, out_dir = Path(src), Path(out_dir)
    if is_hf_dir(src):
        written = [name for name in TOKENIZER_FILES if (src / name).is_file()]
        for name in written:
            shutil.copyfile(src / name, out_dir / name)
        return written
    ckpt = find_checkpoint(src)
    tok = read_trainer_state(ckpt).get("tokenizer") if ckpt is not None else None
    if not tok or not Path(tok).exists():
        return []
    from moecpt.model.auto import load_config

    return export_tokenizer(tok, out_dir, load_config(out_dir).max_position_embeddings)
