"""A recipe: one TOML file describing a whole continual pre-training study.

    name, run_dir            what the study is called and where everything goes
    [corpora]                corpus name -> sources (JSON Lines files, globs, directories, shard prefixes,
                             or `builtin:NAME` for the corpora moecpt generates itself)
    [heldout]                language -> JSON Lines file for held-out bits per byte, before and after
    [train]                  training settings shared by both stages (the tables of `moecpt train` configs)
    [base]                   optional: pre-train a base model from scratch (`mixture` + overrides of [train])
    [cpt]                    continual pre-training (`mixture`, `init_from` = "base" or a Hugging Face
                             directory, + overrides of [train])
    [eval]                   suite, limit, data_dir ("" = ../shared/data/eval when present, "none" = held-out only)
    [upcycle]                optional: a dense model upcycled into the MoE the cpt stage starts from
                             ([cpt] init_from = "upcycle"; see moecpt.pipeline.steps)
    [vocab]                  optional: the cpt stage's tokenizer extended with pieces learned on Japanese
                             text, and the model it starts from (after [upcycle] or [base]) given rows for
                             them; the cpt stage tokenizes and trains with the new tokenizer
    [merge]                  optional, after cpt: average its last checkpoints or named models, or add a task
                             vector; the merged model is the one evaluated and exported

Relative paths are relative to the directory `moecpt run` is started from, like those of `moecpt train`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from moecpt.config import TrainConfig, apply_overrides, config_from_dict, dataclass_from_dict, read_toml
from moecpt.errors import UserError
from moecpt.pipeline.steps import (
    TOKENIZER,
    MergeSection,
    UpcycleSection,
    VocabSection,
    check_steps,
    check_vocab,
)

DEFAULT_RECIPE = "mini"
RECIPE_KEYS = {"name", "description", "run_dir", "corpora", "heldout", "train", "base", "cpt", "eval", "upcycle",
               "vocab", "merge"}
STAGE_KEYS = {"mixture", "init_from"}


@dataclass
class EvalSection:
    suite: str = "ja"
    tasks: str = ""  # comma-separated task names instead of the suite
    limit: int = 0  # items per task (0: all)
    data_dir: str = ""  # "" = ../shared/data/eval when present; "none" = held-out loss only
    batch_size: int = 8
    max_length: int = 0  # context length for evaluation (0: the evaluator's default)


@dataclass
class Recipe:
    name: str
    run_dir: Path
    corpora: dict[str, list[str]]
    heldout: dict[str, str]
    train: dict[str, Any]
    base: dict[str, Any] | None
    cpt: dict[str, Any]
    eval: EvalSection = field(default_factory=EvalSection)
    source: str = ""
    description: str = ""
    upcycle: UpcycleSection | None = None
    merge: MergeSection | None = None
    vocab: VocabSection | None = None

    def stage_config(self, stage: str, corpora: dict[str, list[str]], init_from: str = "",
                     extended: bool = True) -> TrainConfig:
        """The `moecpt train` configuration of a stage: [train], overridden by the stage's own tables. With a
        [vocab] step, the cpt stage's tokenizer is the extended one (`extended=False`: the one it extends)."""
        spec = copy.deepcopy(self.train)
        stage_spec = copy.deepcopy(self.base if stage == "base" else self.cpt)
        mixture = stage_spec.pop("mixture", None)
        stage_spec.pop("init_from", None)
        for key, value in stage_spec.items():
            if isinstance(value, dict) and isinstance(spec.get(key), dict):
                spec[key] = {**spec[key], **value}
            else:
                spec[key] = value
        spec["run_dir"] = str(self.run_dir / stage)
        spec["init_from"] = init_from
        spec["resume"] = "auto"
        data = spec.setdefault("data", {})
        data["mixture"] = mixture
        data["corpora"] = corpora
        data.setdefault("cache_dir", str(self.run_dir / "cache" / "shards"))
        if stage == "cpt" and self.vocab is not None and extended:
            data["tokenizer"] = str(self.run_dir / TOKENIZER)
        return config_from_dict(spec, f"{self.source} [{stage}]")


def builtin_recipe_path(name: str) -> Path:
    """A recipe shipped inside the package (`moecpt run` with no argument runs `mini`)."""
    path = Path(str(resources.files("moecpt.pipeline") / "recipes" / f"{name}.toml"))
    if not path.is_file():
        raise UserError(f"no built-in recipe {name!r}")
    return path


def load_recipe(path: str | Path | None, run_dir: str | None = None, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file (None: the embedded default) with `--key.sub=value` overrides."""
    path = Path(path) if path else builtin_recipe_path(DEFAULT_RECIPE)
    data = read_toml(path, "recipe")
    apply_overrides(data, list(overrides))
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; a recipe has {', '.join(sorted(RECIPE_KEYS))}")
    for need in ("name", "corpora", "cpt"):
        if need not in data:
            raise UserError(f"{path}: missing {need!r}")
    for stage in ("base", "cpt"):
        if stage in data:
            if "mixture" not in data[stage]:
                raise UserError(f"{path}: [{stage}] needs a mixture, e.g. mixture = \"0.644 ja 0.256 en 0.1 code\"")
            for key in set(data[stage]) - STAGE_KEYS:
                if not isinstance(data[stage][key], dict):
                    raise UserError(f"{path}: [{stage}] {key}: only mixture, init_from and tables of the training "
                                    "config (model, data, optimizer, schedule, training, checkpoint, logging) go here")
    cpt_init = data["cpt"].get("init_from", "base")
    if cpt_init == "base" and "base" not in data:
        raise UserError(f"{path}: [cpt] init_from = \"base\" but the recipe has no [base] stage; add one or set "
                        "init_from to a Hugging Face directory")
    corpora = {k: [v] if isinstance(v, str) else list(v) for k, v in data["corpora"].items()}
    ev = dataclass_from_dict(EvalSection, data.get("eval", {}), "eval.", str(path))
    upcycle = dataclass_from_dict(UpcycleSection, data["upcycle"], "upcycle.", str(path)) if "upcycle" in data else None
    merge = dataclass_from_dict(MergeSection, data["merge"], "merge.", str(path)) if "merge" in data else None
    vocab = dataclass_from_dict(VocabSection, data["vocab"], "vocab.", str(path)) if "vocab" in data else None
    recipe = Recipe(
        name=data["name"], run_dir=Path(run_dir or data.get("run_dir") or f"runs/{data['name']}"), corpora=corpora,
        heldout=dict(data.get("heldout", {})), train=data.get("train", {}), base=data.get("base"), cpt=data["cpt"],
        eval=ev, source=str(path), description=data.get("description", ""), upcycle=upcycle, merge=merge,
        vocab=vocab,
    )
    keep_last = 0
    if merge is not None and merge.average_last:
        keep_last = recipe.stage_config("cpt", {k: ["x"] for k in corpora}).checkpoint.keep_last
    check_steps(str(path), upcycle, merge, cpt_init, keep_last)
    check_vocab(str(path), vocab, corpora, recipe.heldout)
    return recipe
