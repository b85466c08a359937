"""Figures of a training run, drawn from its metrics.jsonl: the curves a continual pre-training study shows."""

from __future__ import annotations

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
               logy: bool = False) -> Path | None:
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label, marker="o" if len(x) < 30 else None, markersize=3)
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
    made.append(_line_plot(out / "lr.png", "learning rate", "lr", {"lr": _series(train, "lr")}))
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
