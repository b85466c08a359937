"""The model side of evaluation: load a model directory and its tokenizer, complete prompts in batches.

Loading goes through `MODEL_LOADERS`, a list of (name, can_load, load) tried in order: a trainer checkpoint
loader is added there when moecpt has one, without touching the runner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moecpt.errors import UserError

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


def _load_trainer_checkpoint(path: Path, dtype: Any, device: str):
    from moecpt.train.checkpoint import find_checkpoint, load_model

    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise UserError(f"--model {path}: a run directory without a complete checkpoint under checkpoints/")
    return load_model(ckpt).to(device=device, dtype=dtype)


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _load_hf_dir(path: Path, dtype: Any, device: str):
    from moecpt.model.hf import from_pretrained

    return from_pretrained(path, dtype=dtype, device=device)


MODEL_LOADERS: list[tuple[str, Callable[[Path], bool], Callable[[Path, Any, str], Any]]] = [
    ("moecpt-checkpoint", _is_trainer_checkpoint, _load_trainer_checkpoint),
    ("huggingface", _is_hf_dir, _load_hf_dir),
]


def load_model(path: str | Path, dtype: str = "auto", device: str = "auto"):
    """Load the model in `path` with the first loader of MODEL_LOADERS that recognises it, in eval mode."""
    import torch

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--model {path}: not a directory; pass a Hugging Face model directory "
                        f"(config.json + *.safetensors), a moecpt checkpoint or a training run directory")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise UserError(f"--dtype {dtype}: choose float32, bfloat16, float16 or auto")
    for _, can_load, load in MODEL_LOADERS:
        if can_load(path):
            model = load(path, torch_dtype, device)
            model.eval()
            return model
    raise UserError(f"--model {path}: no config.json and no checkpoint there; expected a Hugging Face model "
                    f"directory (as `moecpt export` writes), a moecpt checkpoint or a training run directory")


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
        if used and Path(used).is_file():
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

    def encode_prompt(self, text: str, max_new_tokens: int, bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text)
        bos = [self.tokenizer.bos_id] if bos and self.tokenizer.bos_id is not None else []
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
            if r0.decode == "after_prompt":
                text = self.tokenizer.decode(p + new)[len(self.tokenizer.decode(p)):]
            else:
                text = self.tokenizer.decode(new)
            texts.append(cut_at_stop(text, r0.stop))
        return texts


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for s in stop:
        text = text.split(s)[0]
    return text
