"""Run tasks against a completer, keep every prediction on disk as it is made, score, and write the results.

Layout of an output directory:
- `run.json`: what was evaluated (model identity, tokenizer, protocol, context length); a rerun with a
  different one is refused, so predictions of two models never mix;
- `predictions/<task>.jsonl`: one line per item, appended as it is produced; a rerun skips what is there;
- `results.json`, `results.md`: the scores, rewritten after every task.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from moecpt.errors import UserError
from moecpt.eval import tasks as T
from moecpt.eval.lm import Request


class Completer(Protocol):
    """What the runner needs from a model: its tokenizer's counts, heads and pieces, a context length, batched
    completion."""

    max_length: int
    batch_size: int

    def count_tokens(self, text: str) -> int: ...

    def head(self, text: str, n: int) -> str: ...

    def pieces(self, text: str) -> list[str]: ...

    def complete(self, requests: Sequence[Request]) -> list[str]: ...


def default_data_dir() -> Path | None:
    """`../shared/data/eval` beside the working directory or the source checkout, when it exists."""
    here = Path(__file__).resolve()
    for base in (Path.cwd(), *here.parents):
        candidate = base.parent / "shared" / "data" / "eval"
        if candidate.is_dir():
            return candidate
    return None


def prompt_hash(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


class PredictionStore:
    """Per-item predictions of one task, as JSON Lines; a torn last line (a crash mid-write) is dropped."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        records: dict[str, dict] = {}
        good_bytes = 0
        with self.path.open("rb") as f:
            for raw in f:
                try:
                    rec = json.loads(raw.decode("utf-8"))
                    if not raw.endswith(b"\n"):
                        raise ValueError("unterminated line")
                except ValueError:
                    break  # everything after a torn line is discarded
                records[str(rec["id"])] = rec
                good_bytes += len(raw)
        if good_bytes != self.path.stat().st_size:
            with self.path.open("r+b") as f:
                f.truncate(good_bytes)
        return records

    def append(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def check_run_identity(out_dir: Path, identity: dict[str, Any]) -> None:
    """Record what this output directory evaluates; refuse to mix predictions of something else into it."""
    path = out_dir / "run.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
        if diff:
            raise UserError(f"{path}: this output directory holds predictions of a different run "
                            f"({', '.join(diff)} differ); use another --output, or delete it to start over")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def run_task(task: T.Task, items: list[T.Item], lm: Completer, store: PredictionStore, max_new_tokens: int,
             stop: tuple[str, ...], progress: bool = True) -> tuple[list[str], list[str]]:
    """Complete the items not yet in the store, appending each batch as it finishes; return (preds, golds)."""
    done = store.load()
    for item in items:
        rec = done.get(item.id)
        if rec is not None and rec.get("prompt_sha1") != prompt_hash(item.prompt):
            raise UserError(f"{store.path}: item {item.id} was predicted from a different prompt (data or protocol "
                            f"changed); use another --output, or delete this file to redo the task")
    todo = [it for it in items if it.id not in done]
    todo.sort(key=lambda it: len(it.prompt), reverse=True)  # longest first: memory trouble shows at once

    from tqdm import tqdm

    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=task.name, unit="item",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for start in range(0, len(todo), lm.batch_size):
        batch = todo[start:start + lm.batch_size]
        texts = lm.complete([Request(it.prompt, max_new_tokens, stop, task.decode, task.bos) for it in batch])
        records = []
        for it, raw in zip(batch, texts, strict=True):
            pred = task.clean(raw)
            rec = {"id": it.id, "prompt_sha1": prompt_hash(it.prompt), "output": raw, "prediction": pred,
                   "gold": it.gold}
            if task.item_score is not None:
                rec["score"] = task.item_score(pred, it.gold)
            records.append(rec)
            done[it.id] = rec
        store.append(records)
        bar.update(len(batch))
    bar.close()
    return [done[it.id]["prediction"] for it in items], [it.gold for it in items]


def averages(task_results: dict[str, dict]) -> dict[str, float]:
    """`average`: plain mean of the Japanese tasks that ran (of the English ones when none did);
    `average_en`: mean of the English tasks, when any ran."""
    ja = [r["score"] for n, r in task_results.items() if T.TASKS[n].lang == "ja"]
    en = [r["score"] for n, r in task_results.items() if T.TASKS[n].lang == "en"]
    out: dict[str, float] = {}
    if ja or en:
        out["average"] = sum(ja or en) / len(ja or en)
    if en:
        out["average_en"] = sum(en) / len(en)
    return out


def evaluate(
    lm: Completer,
    tasks: list[T.Task],
    data_dir: Path,
    out_dir: Path,
    identity: dict[str, Any],
    protocol: str = T.DEFAULT_PROTOCOL,
    limit: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    extra: dict[str, Any] | None = None,
    write: Callable[[Path, dict], None] | None = None,
) -> dict[str, Any]:
    """Evaluate `tasks`, writing predictions and results under `out_dir`; returns the results dict.

    A task whose data is missing is reported (in the log and under "skipped") and the others still run.
    """
    out_dir = Path(out_dir)
    check_run_identity(out_dir, {**identity, "protocol": protocol, "max_length": lm.max_length})
    spec = T.load_protocol(Path(data_dir), protocol)
    results: dict[str, Any] = {"tasks": {}, "skipped": {}, "protocol": protocol, "limit": limit, **(extra or {})}
    for task in tasks:
        max_new_tokens, stop = T.generation(task, spec)
        budget = T.Budget(lm.count_tokens, lm.max_length - max_new_tokens - int(task.bos), lm.max_length, lm.head)
        try:
            items = task.build(Path(data_dir), spec, limit, budget)
        except T.MissingData as e:
            log(f"skipping {e}")
            results["skipped"][task.name] = str(e)
            continue
        store = PredictionStore(out_dir / "predictions" / f"{task.name}.jsonl")
        preds, golds = run_task(task, items, lm, store, max_new_tokens, stop, progress)
        results["tasks"][task.name] = {"score": task.score(preds, golds, lm.pieces), "n": len(items),
                                       "metric": task.metric, "source": task.source}
        results.update(averages(results["tasks"]))
        if write is not None:
            write(out_dir, results)
    results.update(averages(results["tasks"]))
    return results


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The evaluation data directory: the one given, else `default_data_dir()`; a UserError when there is none."""
    path = Path(data_dir) if data_dir is not None else default_data_dir()
    if path is None:
        raise UserError("no evaluation data directory: pass --data-dir DIR (the layout of ../shared/data/eval)")
    if not path.is_dir():
        raise UserError(f"evaluation data directory {path}: not a directory")
    return path


def check_options(limit: int | None, batch_size: int) -> None:
    if limit is not None and limit <= 0:
        raise UserError(f"limit {limit}: must be a positive number of items")
    if batch_size <= 0:
        raise UserError(f"batch size {batch_size}: must be positive")


def load_model_and_tokenizer(model: str | Path, tokenizer: str | None, dtype: str, device: str):
    """The model (eval mode) and its tokenizer, checked to fit each other."""
    from moecpt.eval.lm import load_eval_tokenizer, load_model

    loaded = load_model(model, dtype=dtype, device=device)
    tok = load_eval_tokenizer(model, tokenizer)
    if tok.vocab_size > loaded.config.vocab_size:
        raise UserError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocabulary has "
                        f"{loaded.config.vocab_size}; pass the model's tokenizer with --tokenizer")
    return loaded, tok


def heldout_losses(model, tokenizer, corpora: dict[str, Path], limit: int | None, max_length: int,
                   batch_size: int) -> dict[str, dict[str, Any]]:
    """Bits per byte of each held-out corpus, with the file it came from."""
    from moecpt.eval.heldout import heldout_bits_per_byte, read_texts

    return {corpus: {**heldout_bits_per_byte(model, tokenizer, read_texts(path, limit=limit), max_length, batch_size),
                     "file": str(path)} for corpus, path in corpora.items()}


def evaluate_model(model: str | Path, output: str | Path, *, data_dir: str | Path | None = None, suite: str = "ja",
                   tasks: str | None = None, limit: int | None = None, batch_size: int = 8,
                   max_length: int | None = None, heldout: str = "auto", compare: str | Path | None = None,
                   name: str | None = None, device: str = "auto", dtype: str = "auto", tokenizer: str | None = None,
                   protocol: str = T.DEFAULT_PROTOCOL, progress: bool = True) -> dict[str, Any]:
    """Evaluate the model directory `model` (Hugging Face directory, trainer checkpoint or run directory) on a
    task suite (`ja`, `en`, `all`) or an explicit comma-separated `tasks` list, plus held-out bits per byte
    (`heldout`: auto, none or NAME=FILE.jsonl,...), into `output` (results.json, results.md, predictions/).

    Everything that can be checked before the model is loaded is checked first: options, data directory,
    the Python packages the tasks need (`tasks.check_requirements`), the comparison file, held-out files.
    Returns the results dict (what results.json holds); tasks skipped for missing data are under "skipped".
    """
    from moecpt.eval import report
    from moecpt.eval.heldout import resolve_heldout
    from moecpt.eval.lm import ModelLM, model_identity

    data = resolve_data_dir(data_dir)
    check_options(limit, batch_size)
    selected = T.select_tasks(suite, tasks)
    T.check_requirements(selected)
    other = report.read_results(compare) if compare else None
    corpora = resolve_heldout(heldout, {t.lang for t in selected}, data.parent)

    loaded, tok = load_model_and_tokenizer(model, tokenizer, dtype, device)
    lm = ModelLM(loaded, tok, max_length=max_length, batch_size=batch_size)
    identity = {"model": model_identity(model), "tokenizer": tok.fingerprint}
    extra = {"name": name or Path(model).resolve().name, "model": str(Path(model).resolve()),
             "data_dir": str(data.resolve())}
    out = Path(output)
    results = evaluate(lm, selected, data, out, identity, protocol=protocol, limit=limit, progress=progress,
                       extra=extra, write=lambda path, res: report.write(path, res, other))
    if corpora:
        results["heldout"] = heldout_losses(loaded, tok, corpora, limit, lm.max_length, batch_size)
    results.setdefault("average", None)
    report.write(out, results, other)
    return results
