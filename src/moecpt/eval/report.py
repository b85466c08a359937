"""results.json and results.md: the scores in the layout of the Swallow-MX report, with an optional comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moecpt.errors import UserError
from moecpt.eval import tasks as T


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _delta(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None else f"{a - b:+.4f}"


def _columns(*runs: dict[str, Any]) -> list[str]:
    ran = set()
    for r in runs:
        ran |= set(r.get("tasks", {})) | set(r.get("skipped", {}))
    return [n for n in T.ALL_TASKS if n in ran]


def _score(run: dict[str, Any], task: str) -> float | None:
    entry = run.get("tasks", {}).get(task)
    return None if entry is None else entry["score"]


def _value(run: dict[str, Any], key: str) -> float | None:
    """A task's score, or the "average" / "average_en" of a run."""
    return run.get(key) if key in ("average", "average_en") else _score(run, key)


def score_table(cols: list[str], runs: list[tuple[str, dict[str, Any]]],
                difference: tuple[str, dict[str, Any], dict[str, Any]] | None = None) -> list[str]:
    """The Swallow-MX layout: a row per (label, results), a column per task in `cols` (Japanese tasks, their
    average, then English ones and theirs); `difference` = (label, a, b) adds a row of a - b."""
    ja = [c for c in cols if T.TASKS[c].lang == "ja"]
    en = [c for c in cols if T.TASKS[c].lang == "en"]
    keys = ja + (["average"] if ja else []) + en + (["average_en"] if en else [])
    titles = {"average": "Ja avg", "average_en": "En avg"}
    head = ["Model"] + [titles.get(k) or T.TASKS[k].title for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, run in runs:
        lines.append("| " + " | ".join([label] + [_fmt(_value(run, k)) for k in keys]) + " |")
    if difference is not None:
        label, a, b = difference
        cells = []
        for k in keys:
            x, y = _value(a, k), _value(b, k)
            cells.append("n/a" if x is None or y is None else f"{x - y:+.4f}")
        lines.append("| " + " | ".join([label] + cells) + " |")
    return lines


def markdown(results: dict[str, Any], compare: dict[str, Any] | None = None) -> str:
    """The Swallow-MX table (one row per model, one column per task, then the Japanese average), held-out
    bits per byte, and, with `compare`, a per-task comparison (this model, the other one, difference)."""
    name = results.get("name", "model")
    runs = [(compare.get("name", "compare"), compare)] if compare else []
    runs.append((name, results))
    cols = _columns(*(r for _, r in runs))
    lines = score_table(cols, runs)
    out = [f"# Evaluation: {name}", "", f"Protocol `{results.get('protocol')}`"
           + (f", first {results['limit']} items per task" if results.get("limit") else "") + ".", "", *lines]

    if compare:
        other = compare.get("name", "compare")
        out += ["", f"## {name} vs {other}", "", f"| Task | {name} | {other} | Δ |", "|---|---|---|---|"]
        for c in cols:
            a, b = _score(results, c), _score(compare, c)
            out.append(f"| {T.TASKS[c].title} | {_fmt(a)} | {_fmt(b)} | {_delta(a, b)} |")
        for key, label in (("average", "Ja avg"), ("average_en", "En avg")):
            if key in results or key in compare:
                a, b = results.get(key), compare.get(key)
                out.append(f"| {label} | {_fmt(a)} | {_fmt(b)} | {_delta(a, b)} |")

    heldout = results.get("heldout") or {}
    if heldout:
        other_h = (compare or {}).get("heldout") or {}
        out += ["", "## Held-out loss (bits per byte, lower is better)", ""]
        if compare:
            out += [f"| Corpus | {name} | {compare.get('name', 'compare')} | Δ |", "|---|---|---|---|"]
        else:
            out += ["| Corpus | bits/byte | docs | tokens | bytes |", "|---|---|---|---|---|"]
        for corpus, h in heldout.items():
            if compare:
                b = other_h.get(corpus, {}).get("bits_per_byte")
                out.append(f"| {corpus} | {_fmt(h['bits_per_byte'])} | {_fmt(b)} | {_delta(h['bits_per_byte'], b)} |")
            else:
                out.append(f"| {corpus} | {_fmt(h['bits_per_byte'])} | {h['docs']} | {h['tokens']} | {h['bytes']} |")

    if results.get("skipped"):
        out += ["", "## Not run", ""] + [f"- {task}: {why}" for task, why in results["skipped"].items()]
    n = {t: r["n"] for t, r in results.get("tasks", {}).items()}
    if n:
        out += ["", "Items scored: " + ", ".join(f"{t} {k}" for t, k in n.items()) + "."]
    return "\n".join(out) + "\n"


def read_results(path: str | Path) -> dict[str, Any]:
    """A results.json written by `moecpt eval` (or the directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise UserError(f"--compare {path}: no such results file; pass a results.json written by moecpt eval")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(data, dict) or "tasks" not in data:
        raise UserError(f"{path}: not a moecpt results.json (no 'tasks' key)")
    return data


def write(out_dir: Path, results: dict[str, Any], compare: dict[str, Any] | None = None) -> None:
    """Write results.json and results.md into `out_dir` (atomically, so a crash leaves the last good pair)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, ensure_ascii=False, indent=2) + "\n"),
                       ("results.md", markdown(results, compare))):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / name)
