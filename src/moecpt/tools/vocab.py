"""Vocabulary expansion, the model side: `resize_model` gives a model embedding and LM-head rows for the pieces
an extended tokenizer (`moecpt.data.vocab.extend_tokenizer`) appended, each the mean of the rows of the
piece's tokens under the old tokenizer (Swallow's initialisation); `vocab_report` measures what the new
tokenizer saves, in tokens per character; `old_logits_difference` checks that the old vocabulary's logits
did not move. `register` adds `moecpt vocab extend|resize|report`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moecpt.errors import UserError

# torch, the model and the trainer are imported where they are used: `moecpt` imports this module for its
# command list, and a command that does not need them (or `moecpt --help`) should not wait for them.
if TYPE_CHECKING:
    import torch

    from moecpt.data.tokenizer import Tokenizer
    from moecpt.model import CausalLM

RESIZE_FILE = "vocab_resize.json"  # resize_model's report, beside the weights it wrote


def resize_model(model_dir: str | Path, new_tokenizer_dir: str | Path, out_dir: str | Path,
                 check_tokens: int = 32) -> dict[str, Any]:
    """Write `out_dir`: the model of `model_dir` (a Hugging Face directory, checkpoint or run directory, any
    family) with rows for the new ids of `new_tokenizer_dir` in the embedding and the LM head, config
    `vocab_size` updated, and the new tokenizer's files. Old rows are copied as they are; the row of a new id
    is the mean of the rows of its piece's tokens under the old tokenizer. Embedding rows past the old
    tokenizer's ids (padding rows, as Qwen's) are taken by new ids before rows are added. With
    `check_tokens` > 0, the old and resized models run on that many random old ids and the report's
    `old_logits_max_abs_diff` is the largest change of an old-vocabulary logit (0.0: unchanged)."""
    from moecpt.data.tokenizer import load_tokenizer
    from moecpt.data.vocab import base_tokenizations
    from moecpt.model import build_model
    from moecpt.train.checkpoint import load_model
    from moecpt.train.export import export_tokenizer

    start = time.perf_counter()
    if Path(out_dir).resolve() in (Path(model_dir).resolve(), Path(new_tokenizer_dir).resolve()):
        raise UserError(f"vocab resize: OUT_DIR {out_dir} must be a new directory, not the model's or the "
                        "tokenizer's")
    new_tok = load_tokenizer(new_tokenizer_dir)
    old_size = _old_vocab_size(Path(model_dir), Path(new_tok.path).parent, new_tok)
    model = load_model(model_dir, dtype=None)
    config = model.config
    if config.vocab_size < old_size:
        raise UserError(f"{model_dir}: the model has {config.vocab_size} embedding rows, fewer than the "
                        f"{old_size} ids of the tokenizer {new_tok.path} extends: it is not this model's tokenizer")
    pieces = base_tokenizations(new_tok.path, old_size)
    rows = max(config.vocab_size, new_tok.vocab_size)
    new_config = dataclasses.replace(config, vocab_size=rows)
    state = dict(model.state_dict())
    for name in vocab_rows(config, new_config):  # the embedding and LM head, whatever the family calls them
        state[name] = extend_rows(state[name], old_size, pieces, rows)
    if config.tie_word_embeddings:  # the head is the embedding (one parameter, two state-dict names)
        state["lm_head.weight"] = state["embed_tokens.weight"]
    resized = build_model(new_config)
    resized.load_state_dict(state, strict=True, assign=True)
    resized.tie_weights()
    resized.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resized.save_pretrained(out_dir)
    tokenizer_files = export_tokenizer(new_tok.path, out_dir, config.max_position_embeddings)
    report = {"model": str(model_dir), "tokenizer": str(new_tok.path), "out_dir": str(out_dir),
              "old_vocab_size": old_size, "new_vocab_size": new_tok.vocab_size, "new_pieces": len(pieces),
              "old_rows": config.vocab_size, "new_rows": rows, "tokenizer_files": tokenizer_files,
              "old_logits_max_abs_diff": (old_logits_difference(model, resized, old_size, check_tokens)
                                          if check_tokens > 0 else None),
              "seconds": round(time.perf_counter() - start, 2)}
    (out_dir / RESIZE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _old_vocab_size(model_dir: Path, tokenizer_dir: Path, new_tok: Tokenizer) -> int:
    """The base vocabulary size the new tokenizer extends: from its `extend_tokenizer` record, else from the
    tokenizer in `model_dir` (which must then be a prefix of the new one: its size is all that is checked)."""
    from moecpt.data.tokenizer import load_tokenizer
    from moecpt.data.vocab import read_extension

    meta = read_extension(tokenizer_dir)
    if meta is not None:
        return int(meta["base_vocab_size"])
    if not any((model_dir / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        raise UserError(f"{tokenizer_dir}: no vocab_extension.json (it was not written by `moecpt vocab extend`) "
                        f"and {model_dir} has no tokenizer to compare it with; put the model's own tokenizer "
                        f"files in {model_dir}")
    old = load_tokenizer(model_dir)
    if old.vocab_size >= new_tok.vocab_size:
        raise UserError(f"{new_tok.path} has {new_tok.vocab_size} ids, no more than the {old.vocab_size} of "
                        f"{old.path}: it adds no pieces to the model's tokenizer")
    return old.vocab_size


def vocab_rows(config, new_config) -> list[str]:
    """The parameters with a row per vocabulary id: those whose first dimension changes with vocab_size (from
    the family's table of parameter shapes); refused if vocab_size changes another dimension."""
    from moecpt.model import param_shapes

    old, new = param_shapes(config), param_shapes(new_config)
    names = [n for n in new if new[n] != old[n]]
    wrong = [n for n in names if new[n][1:] != old[n][1:]]
    if wrong or not names:
        raise UserError(f"vocab resize: cannot resize {type(config).__name__}: vocab_size changes "
                        f"{', '.join(wrong) or 'no parameter'} other than by rows")
    return names


def extend_rows(weight: torch.Tensor, old_size: int, pieces: list[list[int]], rows: int) -> torch.Tensor:
    """`weight` [V, H] grown to [rows, H]: row old_size + j becomes the mean (in fp32) of the rows `pieces[j]`;
    every other row of `weight` is kept."""
    import torch

    if any(not ids for ids in pieces):
        raise UserError("a new piece has no tokens under the old tokenizer; the tokenizer is damaged")
    weight = weight.detach()
    flat = torch.tensor([i for ids in pieces for i in ids], dtype=torch.long, device=weight.device)
    lengths = torch.tensor([len(ids) for ids in pieces], device=weight.device)
    owner = torch.repeat_interleave(torch.arange(len(pieces), device=weight.device), lengths)
    sums = torch.zeros(len(pieces), weight.shape[1], dtype=torch.float32, device=weight.device)
    sums.index_add_(0, owner, weight[flat].float())
    out = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    out[:weight.shape[0]] = weight
    out[old_size:old_size + len(pieces)] = (sums / lengths[:, None]).to(weight.dtype)
    return out


def old_logits_difference(old: CausalLM, new: CausalLM, old_size: int, tokens: int, seed: int = 0) -> float:
    """Largest |difference| of the logits of the first `old_size` ids between `old` and `new` on `tokens`
    random old ids (one sequence, capped at the context length)."""
    import torch

    tokens = min(tokens, old.config.max_position_embeddings)
    ids = torch.randint(0, old_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(old.parameters()).device)
    with torch.no_grad():
        a, b = (m(ids).logits[..., :old_size].float() for m in (old, new))
    return float((a - b).abs().max())


def tokens_per_character(tok: Tokenizer, texts: list[str]) -> dict[str, float]:
    chars = sum(len(t) for t in texts)
    if chars == 0:
        raise UserError("vocab report: no text to measure")
    tokens = sum(len(ids) for ids in tok.encode_batch_arrays(texts))
    return {"characters": chars, "tokens": tokens, "tokens_per_character": tokens / chars}


def vocab_report(old_tokenizer, new_tokenizer, ja_texts: list[str], en_texts: list[str]) -> dict[str, Any]:
    """Tokens per character of held-out Japanese and English text under the old and the new tokenizer
    (paths, directories or loaded tokenizers), and the relative change (new / old - 1)."""
    from moecpt.data.tokenizer import Tokenizer, load_tokenizer

    old = old_tokenizer if isinstance(old_tokenizer, Tokenizer) else load_tokenizer(old_tokenizer)
    new = new_tokenizer if isinstance(new_tokenizer, Tokenizer) else load_tokenizer(new_tokenizer)
    report: dict[str, Any] = {"old": {"path": old.path, "vocab_size": old.vocab_size},
                              "new": {"path": new.path, "vocab_size": new.vocab_size}}
    for lang, texts in (("ja", ja_texts), ("en", en_texts)):
        a, b = tokens_per_character(old, texts), tokens_per_character(new, texts)
        report[lang] = {"characters": a["characters"], "old_tokens": a["tokens"], "new_tokens": b["tokens"],
                        "old_tokens_per_character": round(a["tokens_per_character"], 4),
                        "new_tokens_per_character": round(b["tokens_per_character"], 4),
                        "change": round(b["tokens"] / a["tokens"] - 1, 4)}
    return report


# ---- moecpt vocab ------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `moecpt vocab extend|resize|report`."""
    parser = subparsers.add_parser("vocab", help="vocabulary expansion: extend a tokenizer, resize a model")
    sub = parser.add_subparsers(dest="vocab_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    p = sub.add_parser("extend", help="append pieces learned on a corpus to a tokenizer",
                       description="Learn new pieces on the corpus (SentencePiece BPE for a SentencePiece base, "
                       "BPE merges on the base's segmentation for a tokenizer.json base) and write the base with "
                       "them appended to DIR: every old id keeps its piece, byte fallback keeps working.")
    p.add_argument("--tokenizer", metavar="BASE", help="SentencePiece .model, tokenizer.json or a directory "
                   "(default: the Mixtral-8x7B tokenizer from mistral-common)")
    p.add_argument("--corpus", nargs="+", required=True, metavar="PATH",
                   help="JSON Lines (text field) or .txt files, globs or directories")
    p.add_argument("--add", type=int, required=True, metavar="N", help="number of pieces to add (at most)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_extend)
    p = sub.add_parser("resize", help="add embedding and LM-head rows for an extended tokenizer",
                       description="Write OUT_DIR: MODEL_DIR with a row per new id of NEW_TOKENIZER in the "
                       "embedding and LM head, each the mean of the rows of the piece's old tokens (Swallow), "
                       "and the new tokenizer; checks the old vocabulary's logits are unchanged.")
    p.add_argument("model_dir")
    p.add_argument("new_tokenizer")
    p.add_argument("out_dir")
    p.set_defaults(func=_resize)
    p = sub.add_parser("report", help="tokens per character of Japanese and English text, old vs new tokenizer")
    p.add_argument("old_tokenizer")
    p.add_argument("new_tokenizer")
    p.add_argument("--ja", nargs="+", required=True, metavar="PATH", help="held-out Japanese .jsonl/.txt")
    p.add_argument("--en", nargs="+", required=True, metavar="PATH", help="held-out English .jsonl/.txt")
    p.set_defaults(func=_report)


def _extend(args: argparse.Namespace) -> int:
    from moecpt.data.vocab import extend_tokenizer, read_extension

    out = extend_tokenizer(args.tokenizer, [Path(c) for c in args.corpus], args.add, Path(args.out), seed=args.seed)
    print(json.dumps(read_extension(out), indent=2, ensure_ascii=False))
    return 0


def _resize(args: argparse.Namespace) -> int:
    print(json.dumps(resize_model(args.model_dir, args.new_tokenizer, args.out_dir), indent=2))
    return 0


def _report(args: argparse.Namespace) -> int:
    from moecpt.data.preprocess import expand_inputs
    from moecpt.data.vocab import corpus_texts

    ja, en = (list(corpus_texts(expand_inputs(paths))) for paths in (args.ja, args.en))
    print(json.dumps(vocab_report(args.old_tokenizer, args.new_tokenizer, ja, en), indent=2))
    return 0
