"""Figures of a training run, drawn from its metrics.jsonl: the curves a continual pre-training study shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moecpt.errors import UserError
from moecpt.train.metrics import read_metrics


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r and isinstance(r[key], int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _line_plot(path: Path, title: str, ylabel: str, curves: dict[str, tuple[list[int], list[float]]],
               logy: bool = False, spans: list[tuple[str, float, float]] = ()) -> Path | None:
    """One figure of curves over steps; `spans` shades named step ranges (schedule phases, data stages)."""
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, a, b) in enumerate(spans):
        ax.axvspan(a, b, color=f"C{i % 10}", alpha=0.08, lw=0)
        ax.annotate(name, (a, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, alpha=0.8)
    for label, (x, y) in curves.items():
        planned = label.startswith("planned")
        ax.plot(x, y, label=label, marker="o" if len(x) < 30 and not planned else None, markersize=3,
                **({"linewidth": 4, "alpha": 0.35, "zorder": 1} if planned else {}))  # the plan, under the log
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if len(curves) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNG figures of a run (into RUN_DIR/plots by default) and return their paths."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    if not train:
        raise UserError(f"{run_dir}: no training records in metrics.jsonl; is this a moecpt run directory?")
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    made = []
    corpora = sorted({k.split("/", 1)[1] for r in train for k in r if k.startswith("loss/")})
    made.append(_line_plot(out / "loss.png", "training loss (cross-entropy)", "nats/token",
                           {"all": _series(train, "loss"), **{c: _series(train, f"loss/{c}") for c in corpora}}))
    made.append(_line_plot(out / "lb_loss.png", "load-balancing loss", "aux loss (before coefficient)",
                           {"lb_loss": _series(train, "lb_loss")}))
    schedule = read_schedule(run_dir)
    made.append(_line_plot(out / "lr.png", f"learning rate ({schedule.get('kind', 'schedule')})", "lr",
                           lr_curves(schedule, train), spans=schedule_spans(schedule)))
    stages = read_data_stages(run_dir)
    if len(stages) > 1:
        made.append(_line_plot(out / "stage_shares.png", "realised share of each corpus in its data stage",
                               "share of the stage's samples so far",
                               {c: _series(train, f"stage_share/{c}") for c in _stage_corpora(train)},
                               spans=[(f"stage {s['stage']}", s["start_step"] + 0.5, s["end_step"] + 0.5)
                                      for s in stages]))
    val_corpora = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("val_bpb/")})
    made.append(_line_plot(out / "val_bpb.png", "validation loss per corpus", "bits per byte",
                           {c: _series(records, f"val_bpb/{c}") for c in val_corpora}))
    made.append(_expert_heatmap(out / "expert_load.png", train))
    made.append(_line_plot(out / "expert_imbalance.png", "expert load imbalance (max / mean, worst MoE layer)",
                           "busiest expert / mean", {"max over layers": _per_layer(train, "expert_load_max", max)}))
    made.append(_line_plot(out / "router_bias.png", "router selection bias (aux-loss-free balancing)",
                           "L2 norm, mean over MoE layers",
                           {"bias norm": _per_layer(train, "router_bias_norm", lambda v: sum(v) / len(v))}))
    return [p for p in made if p is not None]


def read_schedule(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/schedule.json (the planned LR schedule the trainer writes), or {} for runs before it existed."""
    path = Path(run_dir) / "schedule.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def read_data_stages(run_dir: Path) -> list[dict[str, Any]]:
    """The data stages of RUN_DIR/data_stages.json (per stage: steps, mixture, report rows), or []."""
    path = Path(run_dir) / "data_stages.json"
    return json.loads(path.read_text())["stages"] if path.is_file() else []


def lr_curves(schedule: dict[str, Any], train: list[dict[str, Any]]) -> dict[str, tuple[list, list]]:
    """The LR figure's curves: the planned schedule (every step, from schedule.json) and the logged LR."""
    curves = {}
    if schedule.get("planned"):
        x, y = zip(*schedule["planned"], strict=True)
        curves[f"planned ({schedule['kind']}, {schedule['decay']} decay)"] = (list(x), list(y))
    curves["logged"] = _series(train, "lr")
    return curves


def schedule_spans(schedule: dict[str, Any]) -> list[tuple[str, float, float]]:
    """The schedule's phases as step ranges of the figures (steps count from 1: 0-based step s is step s + 1)."""
    return [(name, a + 0.5, b + 0.5) for name, a, b in schedule.get("phases", [])]


def _stage_corpora(records: list[dict[str, Any]]) -> list[str]:
    return sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("stage_share/")})


def _per_layer(records: list[dict[str, Any]], key: str, reduce) -> tuple[list[int], list[float]]:
    """A per-layer list metric reduced to one number per logged step."""
    pts = [(r["step"], reduce(r[key])) for r in records if r.get(key)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _expert_heatmap(path: Path, records: list[dict[str, Any]]) -> Path | None:
    """Busiest expert's load relative to the mean (1.0 = perfectly balanced), per layer and logged step."""
    rows = [r for r in records if "expert_load_max" in r]
    if not rows:
        return None
    plt = pyplot()
    import numpy as np

    grid = np.array([r["expert_load_max"] for r in rows]).T  # [layers, steps]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * grid.shape[0]))
    first, last = rows[0]["step"], rows[-1]["step"]
    if first == last:  # a single logged step: give it a visible width
        first, last = first - 0.5, last + 0.5
    im = ax.imshow(grid, aspect="auto", cmap="viridis", origin="lower", extent=(first, last, -0.5, grid.shape[0] - 0.5))
    ax.set_title("expert load: busiest expert / mean, per layer")
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
