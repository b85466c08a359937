"""The report of a `moecpt run` study: report.md, figures and summary.json, from what the run directory holds.

It answers the study's question: did continual pre-training make the model better at the new language
(evaluation table, held-out bits per byte), and what did it cost in the old one (the forgetting figure), with
the training curves, the realised mixture, expert load, and throughput and cost beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moecpt.errors import UserError
from moecpt.pipeline.steps import STEPS, report_lines
from moecpt.report.plots import plot_run, pyplot, read_data_stages, read_schedule
from moecpt.train.metrics import read_metrics


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _stages(run_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted((run_dir / "stages").glob("*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


def heldout_table(base: dict[str, Any], cpt: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Held-out bits per byte per language, before (base) and after (cpt) continual pre-training."""
    out = {}
    for lang in sorted(set(base.get("heldout", {})) | set(cpt.get("heldout", {}))):
        b = base.get("heldout", {}).get(lang, {}).get("bits_per_byte")
        c = cpt.get("heldout", {}).get(lang, {}).get("bits_per_byte")
        out[lang] = {"base": b, "cpt": c}
        if b is not None and c is not None:
            out[lang]["delta"] = c - b
    return out


def _forgetting_figure(path: Path, table: dict[str, dict[str, float]]) -> Path | None:
    langs = [k for k, v in table.items() if v.get("base") is not None and v.get("cpt") is not None]
    if not langs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(langs))
    ax.bar([i - 0.2 for i in x], [table[k]["base"] for k in langs], width=0.4, label="base")
    ax.bar([i + 0.2 for i in x], [table[k]["cpt"] for k in langs], width=0.4, label="continually pre-trained")
    ax.set_xticks(list(x), langs)
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title("held-out loss per language, before and after")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _eval_table(base: dict[str, Any], cpt: dict[str, Any]) -> list[str]:
    from moecpt.eval import tasks as T
    from moecpt.eval.report import score_table

    names = [n for n in T.ALL_TASKS if n in base.get("tasks", {}) or n in cpt.get("tasks", {})]
    if not names:
        skipped = cpt.get("skipped", {})
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) if skipped else "no task was selected"
        return [f"No benchmark task ran ({why})."]
    lines = score_table(names, [("base", base), ("continually pre-trained", cpt)], ("difference", cpt, base))
    limit = cpt.get("limit")
    if limit:
        lines.append("")
        lines.append(f"(first {limit} items of each task: a quick run, not comparable with published figures)")
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.md, RUN_DIR/figures/*.png and RUN_DIR/summary.json; return the report's path."""
    run_dir = Path(run_dir)
    stages = _stages(run_dir)
    base_res = _read_json(run_dir / "eval" / "base" / "results.json")
    cpt_res = _read_json(run_dir / "eval" / "cpt" / "results.json")
    if "cpt" not in stages or base_res is None or cpt_res is None:
        raise UserError(f"{run_dir}: the run has not finished its cpt and eval stages; run `moecpt run` first")
    recipe_name = _recipe_name(run_dir)
    heldout = heldout_table(base_res, cpt_res)
    made = _draw_figures(run_dir, stages, heldout)
    training = {stage: training_summary(stages[stage]) for stage in ("base", "cpt") if stages.get(stage)}
    summary = {
        "recipe": recipe_name, "report_dir": str(run_dir), "heldout_bpb": heldout,
        "eval": {"base": base_res, "cpt": cpt_res},
        "average": {"base": base_res.get("average"), "cpt": cpt_res.get("average")},
        "training": training, "figures": {k: str(v.relative_to(run_dir)) for k, v in made.items() if v},
        "steps": {k: stages[k] for k in STEPS if k in stages},  # upcycle, vocab, merge: those the recipe ran
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    md = [f"# moecpt report: {recipe_name}", "",
          "Continual pre-training study: a base model, then continual pre-training on a new mixture, evaluated "
          "before and after.", ""]
    md += ["## Evaluation", "", *_eval_table(base_res, cpt_res), ""]
    md += _heldout_section(heldout, made)
    for stage, info in training.items():
        md += _training_section(stage, info, made)
    md += report_lines(stages)
    md += ["", "Files: `summary.json` (all figures above as data), `eval/base`, `eval/cpt` (predictions and "
               "results), `hf/` (the continually pre-trained model), `base/`, `cpt/` (training runs).", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(md))
    return path


def _draw_figures(run_dir: Path, stages: dict[str, dict[str, Any]],
                  heldout: dict[str, dict[str, float]]) -> dict[str, Path | None]:
    """The forgetting figure and each training stage's curves, in RUN_DIR/figures; keyed by figure name."""
    figures = run_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    made = {"forgetting": _forgetting_figure(figures / "heldout_bpb.png", heldout)}
    for stage in ("base", "cpt"):
        if stage in stages and read_metrics(stages[stage]["run_dir"]):
            for p in plot_run(stages[stage]["run_dir"], figures / stage):
                made[f"{stage}/{p.stem}"] = p
    return made


def training_summary(info: dict[str, Any]) -> dict[str, Any]:
    """What a training stage did and cost, from its stage record and the metrics of its run directory."""
    records = [r for r in read_metrics(info["run_dir"]) if "tokens_per_s" in r]
    tps = [r["tokens_per_s"] for r in records]
    last = records[-1] if records else {}
    kind = "GPU" if info["device"].startswith("cuda") else "CPU"
    return {
        "steps": info["steps"], "tokens": info["tokens"], "mixture": info["mixture"],
        "params": info["params"], "active_params": info["active_params"],
        "device": info["device"], "world_size": info["world_size"],
        "tokens_per_s": sum(tps) / len(tps) if tps else None,
        "wall_seconds": info["train_seconds"], "steps_this_session": info["steps_this_session"],
        f"{kind.lower()}_hours": info["train_seconds"] * info["world_size"] / 3600,
        "final_loss": last.get("loss"), "final_lb_loss": last.get("lb_loss"),
        "expert_load_max": last.get("expert_load_max"), "expert_idle": last.get("expert_idle"),
        "mixture_report": info["mixture_report"],
        "data_stages": read_data_stages(info["run_dir"]), "schedule": _schedule_summary(info["run_dir"]),
    }


def _schedule_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's LR schedule without its planned points: kind, decay shape, phases, branch."""
    return {k: v for k, v in read_schedule(Path(run_dir)).items() if k != "planned"}


def stage_table(stages: list[dict[str, Any]]) -> list[str]:
    """Markdown: per data stage, its steps and each corpus's weight, realised share and passes so far."""
    md = ["| stage | steps | corpus | weight | realised share | passes so far |", "|---|---|---|---|---|---|"]
    for st in stages:
        for i, row in enumerate(st["rows"]):
            head = (f"{st['stage']} | {st['start_step'] + 1}-{st['end_step']}" if i == 0 else " | ")
            md.append(f"| {head} | {row['name']} | {row['weight']:.3f} | {row['share']:.3f} | {row['epochs']:.2f} |")
    return md


def schedule_line(schedule: dict[str, Any]) -> str:
    """One sentence on the LR schedule of a training run."""
    if not schedule:
        return ""
    phases = ", ".join(f"{name} {a + 1}-{b}" for name, a, b in schedule.get("phases", []))
    branch = schedule.get("branch")
    what = (f"a cooldown branch of `{branch['source']}` from LR {branch['lr']:.3g}" if branch
            else f"`{schedule['kind']}`")
    return f"LR schedule: {what}, {schedule['decay']} decay (steps: {phases})."


def _heldout_section(heldout: dict[str, dict[str, float]], made: dict[str, Path | None]) -> list[str]:
    md = ["## Held-out loss per language (bits per byte, lower is better)", "",
          "| language | base | continually pre-trained | difference |", "|---|---|---|---|"]
    for lang, v in heldout.items():
        md.append(f"| {lang} | {_fmt(v.get('base'))} | {_fmt(v.get('cpt'))} | "
                  f"{'n/a' if 'delta' not in v else format(v['delta'], '+.4f')} |")
    if made.get("forgetting"):
        md += ["", "![held-out loss before and after](figures/heldout_bpb.png)"]
    return md


def _training_section(stage: str, info: dict[str, Any], made: dict[str, Path | None]) -> list[str]:
    title = "Base pre-training" if stage == "base" else "Continual pre-training"
    md = ["", f"## {title} (`{stage}`)", "",
          f"{info['steps']} steps, {info['tokens']:,} tokens, mixture `{info['mixture']}`, "
          f"{info['params'] / 1e6:.1f}M parameters ({info['active_params'] / 1e6:.1f}M active), "
          f"{info['device']} x {info['world_size']}.", ""]
    if len(info.get("data_stages") or []) > 1:
        md += ["Data stages (each corpus continues its pass across stages):", "", *stage_table(info["data_stages"])]
    else:
        md += ["| corpus | weight | realised share | epochs | training tokens available |", "|---|---|---|---|---|"]
        for row in info["mixture_report"]:
            md.append(f"| {row['name']} | {row['weight']:.3f} | {row['share']:.3f} | {row['epochs']:.2f} | "
                      f"{row['train_tokens']:,} |")
    if info.get("schedule"):
        md += ["", schedule_line(info["schedule"])]
    hours = info.get("gpu_hours", info.get("cpu_hours"))
    kind = "GPU" if "gpu_hours" in info else "CPU"
    md += ["", f"Throughput {_fmt(info['tokens_per_s'], 0)} tokens/s; {info['wall_seconds']:.0f} s of training "
               f"in the last session ({info['steps_this_session']} steps) = {hours:.3f} {kind}-hours. "
               f"Final loss {_fmt(info['final_loss'])}, load-balancing loss {_fmt(info['final_lb_loss'])}."]
    if info["expert_load_max"]:
        md += ["", "Expert load at the last logged step (busiest expert / mean; experts with no token):", "",
               "| layer | max/mean | idle |", "|---|---|---|"]
        md += [f"| {i} | {m:.2f} | {z} |" for i, (m, z) in
               enumerate(zip(info["expert_load_max"], info["expert_idle"], strict=True))]
    for fig in ("loss", "lb_loss", "lr", "stage_shares", "val_bpb", "expert_load"):
        if f"{stage}/{fig}" in made:
            md += ["", f"![{stage} {fig}](figures/{stage}/{fig}.png)"]
    return md


def _recipe_name(run_dir: Path) -> str:
    recipe = run_dir / "recipe.toml"
    if recipe.is_file():
        from moecpt.config import tomllib

        return tomllib.loads(recipe.read_text()).get("name", run_dir.name)
    return run_dir.name
