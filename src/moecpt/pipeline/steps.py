"""The recipe steps around training: `[upcycle]` (a dense model upcycled into the MoE the cpt stage starts
from) and `[merge]` (after the cpt stage: an average of its last checkpoints, of named models, or a task
vector added to it), with their checks and their sections of the report.

    [upcycle]                         # the cpt stage's init_from = "upcycle"
    dense = "path/to/dense-hf"        # a Hugging Face llama, mistral or qwen3 directory
    family = "mixtral"                # or "qwen3_moe"
    experts = 8
    top_k = 2
    granularity = 1                   # G > 1: virtual groups of 1/G slices (arXiv 2410.07524)

    [merge]                           # one of:
    average_last = 3                  #   the last 3 checkpoints of the cpt run (keep_last >= 3)
    average = ["cpt", "path/x"]       #   named models; "cpt" is the cpt stage's model (weights: optional)
    task_vector = { plus = "instruct", minus = "base", scale = 1.0 }   # cpt + scale * (plus - minus)
    embeddings = "merge"              # or "shared_rows", "skip"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moecpt.errors import UserError

UPCYCLED = "upcycled"  # RUN_DIR/upcycled: the upcycled model
MERGED = "merged"  # RUN_DIR/merged: the merged model


@dataclass
class UpcycleSection:
    dense: str = ""
    family: str = "mixtral"
    experts: int = 8
    top_k: int = 2
    granularity: int = 1
    shared_experts: int = 0
    seed: int = 0
    router_std: float = 0.0  # 0: the dense model's initializer_range
    norm_topk_prob: bool = True


@dataclass
class TaskVectorSection:
    plus: str = ""
    minus: str = ""
    scale: float = 1.0
    base: str = "cpt"  # "cpt": the cpt stage's model


@dataclass
class MergeSection:
    average_last: int = 0
    average: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    task_vector: TaskVectorSection = field(default_factory=TaskVectorSection)
    embeddings: str = "merge"

    @property
    def kind(self) -> str:
        return "average_last" if self.average_last else "average" if self.average else "task_vector"


def check_steps(source: str, upcycle: UpcycleSection | None, merge: MergeSection | None, cpt_init: str,
                keep_last: int) -> None:
    """Refuse a recipe whose steps cannot run, before anything runs."""
    if cpt_init == "upcycle" and upcycle is None:
        raise UserError(f"{source}: [cpt] init_from = \"upcycle\" but the recipe has no [upcycle] step")
    if upcycle is not None:
        if cpt_init != "upcycle":
            raise UserError(f"{source}: the recipe has an [upcycle] step but [cpt] init_from = {cpt_init!r}; set "
                            "init_from = \"upcycle\" to continue from the upcycled model")
        if not upcycle.dense:
            raise UserError(f"{source}: [upcycle] needs dense = a Hugging Face llama, mistral or qwen3 directory")
    if merge is None:
        return
    given = [k for k, on in (("average_last", merge.average_last), ("average", merge.average),
                             ("task_vector", merge.task_vector.plus or merge.task_vector.minus)) if on]
    if len(given) != 1:
        raise UserError(f"{source}: [merge] needs exactly one of average_last, average or task_vector, got "
                        f"{', '.join(given) or 'none'}")
    if merge.average_last < 0 or merge.average_last == 1:
        raise UserError(f"{source}: [merge] average_last = {merge.average_last}: average at least 2 checkpoints")
    if merge.average_last > keep_last:
        raise UserError(f"{source}: [merge] average_last = {merge.average_last} needs the cpt run to keep that many "
                        f"checkpoints; set [cpt.checkpoint] keep_last >= {merge.average_last} (now {keep_last})")
    if merge.kind == "task_vector" and not (merge.task_vector.plus and merge.task_vector.minus):
        raise UserError(f"{source}: [merge] task_vector needs plus and minus (e.g. plus = \"instruct\", "
                        "minus = \"its base\")")
    if merge.weights and merge.kind != "average":
        raise UserError(f"{source}: [merge] weights go with average")


def run_upcycle(section: UpcycleSection, run_dir: Path) -> dict[str, Any]:
    """The [upcycle] step: RUN_DIR/upcycled, and its record for the report."""
    import json

    from moecpt.tools.upcycle import METADATA, upcycle

    s = section
    out = upcycle(s.dense, run_dir / UPCYCLED, family=s.family, experts=s.experts, top_k=s.top_k,
                  granularity=s.granularity, shared_experts=s.shared_experts, seed=s.seed,
                  router_std=s.router_std or None, norm_topk_prob=s.norm_topk_prob)
    return {"hf": str(out), **json.loads((out / METADATA).read_text())}


def merge_inputs(section: MergeSection, cpt_run: Path, cpt_hf: str) -> tuple[list[str], str]:
    """The models a [merge] step averages (or the task vector's base), with "cpt" resolved."""
    from moecpt.train.checkpoint import list_checkpoints

    if section.kind == "average_last":
        found = [str(p) for _, p in list_checkpoints(cpt_run / "checkpoints")]
        if len(found) < section.average_last:
            raise UserError(f"[merge] average_last = {section.average_last}, but {cpt_run / 'checkpoints'} holds "
                            f"{len(found)} complete checkpoint(s); save more often ([cpt.checkpoint] interval) or "
                            "average fewer")
        return found[-section.average_last:], "average"
    resolve = {"cpt": cpt_hf}
    if section.kind == "average":
        return [resolve.get(p, p) for p in section.average], "average"
    return [resolve.get(section.task_vector.base, section.task_vector.base)], "task_vector"


def run_merge(section: MergeSection, run_dir: Path, cpt_run: Path, cpt_hf: str) -> dict[str, Any]:
    """The [merge] step: RUN_DIR/merged, and its record for the report."""
    import json

    from moecpt.tools.merge import METADATA, TaskVector, merge

    models, kind = merge_inputs(section, cpt_run, cpt_hf)
    tv = section.task_vector
    if kind == "average":
        out = merge(run_dir / MERGED, average=models, weights=section.weights or None, embeddings=section.embeddings)
    else:
        out = merge(run_dir / MERGED, task_vector=TaskVector(models[0], tv.plus, tv.minus, tv.scale),
                    embeddings=section.embeddings)
    return {"hf": str(out), "recipe": {**asdict(section), "kind": section.kind},
            **json.loads((out / METADATA).read_text())}


# ---- the report -------------------------------------------------------------------------------------------
def report_lines(stages: dict[str, dict[str, Any]]) -> list[str]:
    """The report's sections for the steps that ran (none: no lines)."""
    md = []
    up = stages.get("upcycle")
    if up:
        scheme = ("every expert a copy of the dense MLP" if up["granularity"] == 1 else
                  f"each expert 1/{up['granularity']} of the dense MLP in virtual groups of {up['group']} "
                  f"(scales {sorted(set(up['scale']))})")
        md += ["", "## Upcycling (`upcycle`)", "",
               f"The continual pre-training started from `{up['dense']}` ({up['dense_model_type']}) upcycled into "
               f"{up['family']}: {up['experts']} experts, top-{up['top_k']}, {scheme}; router normal(0, "
               f"{up['router_std']:g}) with seed {up['seed']}. At initialisation it computes the dense model's "
               "function, so the `base` column is the dense model."]
    mg = stages.get("merge")
    if mg:
        terms = " ".join(f"{t['coefficient']:+.4g} x `{t['model']}`" for t in mg["terms"])
        what = (f"the weighted average {terms}" if mg["kind"] == "average" else
                f"`{mg['first']}` + {mg['scale']:g} x ({terms})")
        md += ["", "## Merge (`merge`)", "",
               f"The evaluated and exported model is {what}; embeddings and LM head: {mg['embeddings']}"
               + (f" (rows merged: {mg['vocab_rows_merged']})" if mg["embeddings"] == "shared_rows" else "") + "."]
    return md


def add_steps_to_report(run_dir: Path, stages: dict[str, dict[str, Any]]) -> None:
    """Append the steps' sections to RUN_DIR/report.md and their records to summary.json."""
    import json

    lines = report_lines(stages)
    if not lines:
        return
    report = run_dir / "report.md"
    report.write_text(report.read_text().rstrip("\n") + "\n" + "\n".join(lines) + "\n")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["steps"] = {k: stages[k] for k in ("upcycle", "merge") if k in stages}
    summary_path.write_text(json.dumps(summary, indent=1))
