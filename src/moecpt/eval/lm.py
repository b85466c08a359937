"""The model side of evaluation: load a model directory and its tokenizer, complete prompts in batches.

Models are loaded by moecpt's one model loader, `moecpt.train.checkpoint.load_model` (re-exported here).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecpt.errors import UserError
from moecpt.train.checkpoint import load_model  # noqa: F401  (re-exported: the one model loader)

# The JP harness used by Swallow caps the context at 4096 tokens (its max_position_embeddings override); the
# same cap keeps memory bounded here. --max-length changes it.
DEFAULT_MAX_LENGTH = 4096


@dataclass(frozen=True)
class Request:
    """One prompt to complete: stop at any of `stop` (strings) or EOS, after at most `max_new_tokens`.

    `decode` says how the generated text is read back: "new_tokens" decodes the new tokens alone (the
    harnesses); "after_prompt" decodes prompt + new tokens and drops the decoded prompt's characters, as the
    Hugging Face text-generation pipeline does (llm-jp-eval), which keeps a leading space the model produced.
    `bos`: whether the prompt starts with BOS (no task of the 2024-03 protocol adds one).
    """

    prompt: str
    max_new_tokens: int
    stop: tuple[str, ...]
    decode: str = "new_tokens"
    bos: bool = True


def _is_trainer_checkpoint(path: Path) -> bool:
    return (path / "COMPLETE").is_file() or (path / "checkpoints").is_dir()


def model_identity(path: str | Path) -> dict[str, Any]:
    """What identifies the evaluated weights, for resuming: the resolved directory (a run directory resolves
    to its latest checkpoint) with the size and modification time of its files (weights re-exported into the
    same directory are another model), and the hash of config.json if any."""
    path = Path(path).resolve()
    if _is_trainer_checkpoint(path):
        from moecpt.train.checkpoint import find_checkpoint

        path = find_checkpoint(path) or path
    config = path / "config.json"
    return {
        "path": str(path),
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
        "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()},
    }


def load_eval_tokenizer(model_dir: str | Path, tokenizer: str | None = None):
    """The tokenizer given with --tokenizer; else the model directory's own; else, for a trainer checkpoint,
    the one the run used; else the default Mixtral one."""
    from moecpt.data.tokenizer import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    model_dir = Path(model_dir)
    if any((model_dir / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        return load_tokenizer(model_dir)
    if _is_trainer_checkpoint(model_dir):
        from moecpt.train.checkpoint import find_checkpoint, read_trainer_state

        ckpt = find_checkpoint(model_dir)
        used = read_trainer_state(ckpt).get("tokenizer") if ckpt is not None else None
        if used and Path(used).exists():  # the tokenizer file, or a directory holding one
            return load_tokenizer(used)
    return load_tokenizer(None)


class ModelLM:
    """Greedy batched completion with a moecpt Mixtral model (KV-cache `generate`) and a moecpt Tokenizer.

    A prompt longer than `max_length - max_new_tokens` keeps its last tokens (left truncation, as the JP
    harness does), after BOS when the request asks for one.
    """

    def __init__(self, model, tokenizer, max_length: int | None = None, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        limit = int(model.config.max_position_embeddings)
        self.max_length = min(limit, max_length or DEFAULT_MAX_LENGTH)
        self.batch_size = batch_size
        self._stop_ids: dict[tuple[str, ...], list[int]] = {}
        self._pieces: list[str] | None = None

    # -- tokens ---------------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def head(self, text: str, n: int) -> str:
        """The text of the first `n` tokens of `text` (how the JP harness shortens an over-long sentence)."""
        return self.tokenizer.decode(self.tokenizer.encode(text)[:max(n, 0)])

    def pieces(self, text: str) -> list[str]:
        """The tokenizer's piece strings of `text` (what the JP harness's XL-Sum ROUGE counts bigrams of)."""
        return self.tokenizer.pieces(text)

    def encode_prompt(self, text: str, max_new_tokens: int, bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text)
        bos = [self.tokenizer.bos_id] if bos and self.tokenizer.add_bos else []  # a BOS named but not added: none
        room = self.max_length - max_new_tokens - len(bos)
        if room <= 0:
            raise UserError(f"--max-length {self.max_length} leaves no room for a prompt and {max_new_tokens} "
                            f"new tokens; raise --max-length")
        return bos + ids[-room:]

    def stop_ids(self, stop: tuple[str, ...]) -> list[int]:
        """EOS plus every token whose text contains a stop string (a row can stop as soon as it emits one)."""
        if stop not in self._stop_ids:
            if self._pieces is None:
                self._pieces = [self.tokenizer.decode([i]) for i in range(self.tokenizer.vocab_size)]
            ids = {i for i, piece in enumerate(self._pieces) if any(s in piece for s in stop)}
            ids.add(self.tokenizer.eos_id)
            self._stop_ids[stop] = sorted(ids)
        return self._stop_ids[stop]

    # -- generation -----------------------------------------------------------------------------------------
    def complete(self, requests: Sequence[Request]) -> list[str]:
        """Generated texts, cut at the first stop string, for requests sharing max_new_tokens/stop/decode
        (the runner batches the items of one task together)."""
        import torch

        if not requests:
            return []
        r0 = requests[0]
        prompts = [self.encode_prompt(r.prompt, r0.max_new_tokens, r.bos) for r in requests]
        stop_ids = self.stop_ids(r0.stop)
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        out = self.model.generate(input_ids.to(device), attention_mask=mask.to(device),
                                  max_new_tokens=r0.max_new_tokens, do_sample=False,
                                  eos_token_id=stop_ids, pad_token_id=pad)
        stop_set = set(stop_ids)
        texts = []
        for row, p in enumerate(prompts):
            new: list[int] = []
            for t in out[row, width:].tolist():
                if t == self.tokenizer.eos_id:
                    break
                new.append(t)
                if t in stop_set:
                    break
            texts.append(cut_at_stop(self.read_back(p, new, r0.decode), r0.stop))
        return texts

    def read_back(self, prompt: list[int], new: list[int], decode: str) -> str:
        """The generated text: "new_tokens" decodes the new tokens; "after_prompt" decodes prompt + new and drops
        the decoded prompt's characters, both decodes cleaned up as the Hugging Face text-generation pipeline
        does by default (clean_up_tokenization_spaces=True)."""
        if decode != "after_prompt":
            return self.tokenizer.decode(new)
        full = clean_up_tokenization(self.tokenizer.decode(prompt + new))
        return full[len(clean_up_tokenization(self.tokenizer.decode(prompt))):]


# transformers' `clean_up_tokenization`: a space before punctuation and English contractions removed
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    """What `decode(..., clean_up_tokenization_spaces=True)` does to decoded text in transformers."""
    for before, after in _CLEAN_UP:
        text = text.replace(before, after)
    return text


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for s in stop:
        text = text.split(s)[0]
    return text
