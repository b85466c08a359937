"""Held-out loss in bits per byte: comparable across tokenizers, and the direct measure of what continual
pre-training gains in the new language and costs in the old one.

bits/byte = (sum over documents of the next-token cross-entropy of the predicted tokens, in nats) / ln 2
            / (UTF-8 bytes of the text those tokens stand for).
With a BOS the tokenizer adds (`Tokenizer.add_bos`: Mixtral, DeepSeek-V3) a document is `BOS + tokens`: every token after BOS is predicted once and
the bytes are all of the document's text. Without one (Qwen, OLMoE, and gpt-oss, whose BOS is named but never added) a document is `tokens`: its first token
has no context and is not predicted, so its bytes are not counted either (the bytes are the text's minus those
of the first token; for byte-level BPE that token may be a single byte of a multi-byte character). A document
longer than the context is cut into windows of `max_length` tokens that overlap by one token, so each window
predicts fresh tokens from what it holds (no context carried across windows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moecpt.config import IGNORE_INDEX
from moecpt.errors import UserError
from moecpt.model.loss import bits_per_byte

# Default held-out corpora, relative to the shared data directory (the parent of the evaluation directory).
DEFAULT_HELDOUT = {
    "ja": ("ja_wikipedia_dev", "corpus/ja/wikipedia_dev.jsonl"),
    "en": ("en_wikitext2_valid", "corpus/en/wikitext2_valid.jsonl"),
}


def read_texts(path: Path, limit: int | None = None) -> list[str]:
    """The "text" field of each JSON Lines record (the corpus format of moecpt)."""
    if not path.is_file():
        raise UserError(f"held-out corpus {path} not found; pass --heldout NAME=FILE.jsonl or --heldout none")
    texts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{n}: expected a JSON object with a \"text\" field") from e
            if text:
                texts.append(text)
            if limit is not None and len(texts) >= limit:
                break
    return texts


def windows(ids: list[int], max_length: int) -> list[list[int]]:
    """Windows of at most `max_length` tokens overlapping by one, so that tokens 1..n-1 are each predicted once."""
    if len(ids) <= max_length:
        return [ids]
    step = max_length - 1
    return [ids[s:s + max_length] for s in range(0, len(ids) - 1, step)]


def document_windows(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int, int]:
    """The windows of `texts` to score, the number of tokens they predict and the UTF-8 bytes those stand
    for (see the module docstring: without BOS the first token of each document and its bytes are left out)."""
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []  # as the publisher's tokenizer (and training) do
    pieces: list[list[int]] = []
    n_tokens = n_bytes = 0
    for text in texts:
        ids = bos + tokenizer.encode(text)
        n_tokens += max(len(ids) - 1, 0)
        n_bytes += len(text.encode("utf-8")) - (tokenizer.byte_length(ids[:1]) if not bos else 0)
        pieces += [w for w in windows(ids, max_length) if len(w) > 1]
    return pieces, n_tokens, n_bytes


def heldout_bits_per_byte(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 4) -> dict[str, Any]:
    """Summed next-token loss over `texts` through the model's own loss (no [tokens, vocab] logits), in bits
    per UTF-8 byte, with the counts behind it."""
    import torch

    pieces, n_tokens, n_bytes = document_windows(tokenizer, texts, max_length)
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, len(pieces), batch_size):
            batch = pieces[start:start + batch_size]
            width = max(len(w) for w in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, w in enumerate(batch):
                ids[row, :len(w)] = torch.tensor(w)
                targets[row, :len(w) - 1] = torch.tensor(w[1:])
                mask[row, :len(w)] = 1
            out = model(ids.to(device), attention_mask=mask.to(device), targets=targets.to(device))
            total += out.token_loss.sum().double()
    nats = total.item()
    return {"bits_per_byte": bits_per_byte(nats, n_bytes), "nats_per_token": nats / max(n_tokens, 1),
            "docs": len(texts), "tokens": n_tokens, "bytes": n_bytes}


def resolve_heldout(spec: str, langs: set[str], data_root: Path | None) -> dict[str, Path]:
    """--heldout: "auto" (the default corpus of each evaluated language, when present), "none", or a
    comma-separated list of NAME=FILE.jsonl."""
    if spec == "none":
        return {}
    if spec == "auto":
        if data_root is None:
            return {}
        out = {}
        for lang in sorted(langs):
            name, rel = DEFAULT_HELDOUT[lang]
            if (data_root / rel).is_file():
                out[name] = data_root / rel
        return out
    out = {}
    for part in spec.split(","):
        name, sep, path = part.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--heldout {spec}: expected auto, none, or NAME=FILE.jsonl[,NAME=FILE.jsonl...]")
        out[name.strip()] = Path(path.strip())
    return out
