"""`moecpt run`: a whole continual pre-training study from one recipe, stage by stage, resumable.

Stages, in order, each skipped when its output is complete (a marker in RUN_DIR/stages/ records it), so a
rerun after a crash continues where the run stopped (training itself resumes from its last checkpoint and
evaluation from its saved predictions):

    corpora   write the built-in corpora (if the recipe uses them) and tokenize every corpus into shards
              (with [vocab] and no base stage: the vocab stage tokenizes, with the new tokenizer)
    upcycle   upcycle a dense model into the MoE the cpt stage starts from (optional, RUN_DIR/upcycled)
    base      pre-train a base model from scratch (optional)
    vocab     extend the tokenizer (RUN_DIR/tokenizer) and give the model the cpt stage starts from rows for
              the new pieces (optional, RUN_DIR/resized); tokens per character on held-out text, old vs new
    cpt       continual pre-training on the recipe's mixture, from the base model, the upcycled one or a
              Hugging Face model
    merge     average the cpt run's last checkpoints or named models, or add a task vector (optional,
              RUN_DIR/merged: then the model evaluated and exported)
    eval      evaluate the base and the continually pre-trained (or merged) model (tasks + held-out bits per byte)
    export    the final model as a Hugging Face directory in RUN_DIR/hf
    report    RUN_DIR/report.md, figures and summary.json
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moecpt.errors import UserError
from moecpt.pipeline.recipe import Recipe

if TYPE_CHECKING:
    from moecpt.config import TrainConfig

STAGES = ("corpora", "upcycle", "base", "vocab", "cpt", "merge", "eval", "export", "report")
OPTIONAL = {"base": "base", "upcycle": "upcycle", "vocab": "vocab", "merge": "merge"}  # stage -> the Recipe field that enables it


def say(msg: str) -> None:
    print(f"[moecpt run] {msg}", flush=True)


class Pipeline:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.run_dir = recipe.run_dir
        self.stage_dir = self.run_dir / "stages"

    # ---- stage bookkeeping --------------------------------------------------------------------------------
    def done(self, stage: str) -> dict[str, Any] | None:
        path = self.stage_dir / f"{stage}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def mark(self, stage: str, info: dict[str, Any]) -> None:
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.stage_dir / f"{stage}.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, self.stage_dir / f"{stage}.json")

    def run(self, stop_after: str | None = None) -> dict[str, Any] | None:
        """Every stage not yet complete, in order; the summary, or None when stopped after `stop_after`."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        copy = self.run_dir / "recipe.toml"
        if not (copy.exists() and copy.samefile(self.recipe.source)):  # rerun from the run directory's own copy
            shutil.copyfile(self.recipe.source, copy)
        say(f"recipe {self.recipe.name!r} ({self.recipe.source}) -> {self.run_dir}")
        stages = [s for s in STAGES if s not in OPTIONAL or getattr(self.recipe, OPTIONAL[s]) is not None]
        if stop_after is not None and stop_after not in stages:
            raise UserError(f"--stop-after {stop_after}: {self.recipe.source} has no {stop_after} stage; its stages "
                            f"are {', '.join(stages)}")
        self.check_eval_requirements()
        for stage in stages:
            if self.done(stage) is not None and stage != "report":
                say(f"stage {stage}: already complete, skipped")
            else:
                say(f"stage {stage}: start")
                t0 = time.perf_counter()
                info = getattr(self, f"stage_{stage}")() or {}
                info["seconds"] = time.perf_counter() - t0
                self.mark(stage, info)
                say(f"stage {stage}: done in {info['seconds']:.0f}s")
            if stage == stop_after:
                say(f"stopped after stage {stage}; run again without --stop-after to go on")
                return None
        return json.loads((self.run_dir / "summary.json").read_text())

    # ---- stages -------------------------------------------------------------------------------------------
    def resolved_corpora(self, write: bool = True) -> dict[str, list[str]]:
        """Corpus sources with `builtin:NAME` replaced by the generated files (made first if `write`)."""
        from moecpt.pipeline.builtin import builtin_paths, write_builtin_corpora

        out: dict[str, list[str]] = {}
        builtin: dict[str, Path] | None = None
        make = write_builtin_corpora if write else builtin_paths
        for name, sources in self.recipe.corpora.items():
            out[name] = []
            for s in sources:
                if s.startswith("builtin:"):
                    builtin = builtin or make(self.run_dir / "corpus")
                    key = s.removeprefix("builtin:")
                    if key not in builtin:
                        raise UserError(f"{self.recipe.source}: [corpora] {name}: unknown {s!r}; built-in corpora are "
                                        + ", ".join(f"builtin:{k}" for k in builtin))
                    out[name].append(str(builtin[key]))
                else:
                    out[name].append(s)
        return out

    def heldout_files(self) -> dict[str, str]:
        return {lang: self.text_file(src, f"[heldout] {lang}") for lang, src in self.recipe.heldout.items()}

    def stage_corpora(self) -> dict[str, Any]:
        self.resolved_corpora()
        self.heldout_files()
        if self.recipe.vocab is not None:  # the cpt stage's tokenizer is made by the vocab stage
            return self.tokenize_corpora("base") if self.recipe.base is not None else {}
        return self.tokenize_corpora("cpt")

    def tokenize_corpora(self, stage: str) -> dict[str, Any]:
        """Every corpus as shards of the tokenizer the training `stage` uses (made once, in its cache)."""
        from moecpt.data.mixture import resolve_mixture
        from moecpt.data.tokenizer import load_tokenizer

        corpora = self.resolved_corpora()
        cfg = self.recipe.stage_config(stage, corpora)
        tok = load_tokenizer(cfg.data.tokenizer or None)
        entries = resolve_mixture([(n, 1.0, s) for n, s in corpora.items()], cfg.data.cache_dir, tokenizer=tok.path)
        return {"shards": {e.name: list(e.prefixes) for e in entries}, "tokenizer": tok.path}

    def _train(self, stage: str, init_from: str) -> dict[str, Any]:
        from moecpt.train.trainer import Trainer

        cfg = self.recipe.stage_config(stage, self.resolved_corpora(), init_from=init_from)
        cfg.checkpoint.export_at_end = True
        trainer = Trainer.from_config(cfg)
        first_step = trainer.step
        t0 = time.perf_counter()
        result = trainer.train()
        if result["reason"] != "finished":
            raise UserError(f"stage {stage} stopped early ({result['reason']}); rerun `moecpt run` to continue")
        t, stages = cfg.training, trainer.mixture_report()
        return {
            "run_dir": cfg.run_dir, "hf": result["export"], "steps": result["step"],
            "tokens": t.steps * t.global_batch * cfg.data.seq_len, "mixture": cfg.data.mixture,
            # Per corpus over the run; with data stages, per stage and corpus (each row names its stage).
            "mixture_report": [row | ({"stage": s["stage"]} if len(stages) > 1 else {})
                               for s in stages for row in s["rows"]],
            "device": str(trainer.rt.device), "world_size": trainer.rt.world,
            "train_seconds": time.perf_counter() - t0, "steps_this_session": result["step"] - first_step,
            "params": trainer.model.num_params(), "active_params": trainer.model.num_params(active=True),
            "validation": result.get("validation", {}),
        }

    def stage_base(self) -> dict[str, Any]:
        return self._train("base", init_from=self.recipe.base.get("init_from", ""))

    def stage_upcycle(self) -> dict[str, Any]:
        from moecpt.pipeline.steps import run_upcycle

        return run_upcycle(self.recipe.upcycle, self.run_dir)

    def cpt_start(self) -> str:
        """The model the cpt stage continues (before a [vocab] step resizes it)."""
        init = self.recipe.cpt.get("init_from", "base")
        return self.done(init)["hf"] if init in ("base", "upcycle") else init

    def stage_vocab(self) -> dict[str, Any]:
        from moecpt.pipeline.steps import run_vocab, vocab_sources

        v = self.recipe.vocab
        heldout = self.heldout_files()
        measure = {lang: getattr(v, f"heldout_{lang}") or heldout[lang] for lang in ("ja", "en")}
        measure = {lang: self.text_file(f, f"[vocab] heldout_{lang}") for lang, f in measure.items()}
        base_tokenizer = self.recipe.stage_config("cpt", self.resolved_corpora(), extended=False).data.tokenizer
        info = run_vocab(v, self.run_dir, self.cpt_start(), base_tokenizer,
                         vocab_sources(v, self.resolved_corpora()), measure)
        return {**info, "shards": self.tokenize_corpora("cpt")["shards"]}

    def stage_cpt(self) -> dict[str, Any]:
        if self.recipe.vocab is None:
            return self._train("cpt", init_from=self.cpt_start())
        from moecpt.pipeline.steps import check_merge_vocab, check_shard_tokenizer

        cfg = self.recipe.stage_config("cpt", self.resolved_corpora())
        check_shard_tokenizer(cfg.data.corpora, cfg.data.tokenizer)
        check_merge_vocab(self.recipe.merge, self.done("vocab")["resize"]["new_rows"])
        return self._train("cpt", init_from=self.done("vocab")["hf"])

    def stage_merge(self) -> dict[str, Any]:
        from moecpt.pipeline.steps import run_merge

        cpt = self.done("cpt")
        return run_merge(self.recipe.merge, self.run_dir, Path(cpt["run_dir"]), cpt["hf"])

    def text_file(self, src: str, key: str) -> str:
        """A held-out text file named in the recipe (`builtin:NAME` resolved), which must exist."""
        from moecpt.pipeline.builtin import write_builtin_corpora

        if src.startswith("builtin:"):
            src = str(write_builtin_corpora(self.run_dir / "corpus")[src.removeprefix("builtin:")])
        if not Path(src).is_file():
            raise UserError(f"{self.recipe.source}: {key} = {src}: file not found")
        return src

    def base_model_dir(self) -> str:
        if self.recipe.base is not None:
            return self.done("base")["hf"]
        if self.recipe.upcycle is not None:
            return self.done("upcycle")["hf"]
        return self.recipe.cpt["init_from"]

    def final_model_dir(self) -> str:
        """The study's result: the merged model when the recipe merges, else the cpt stage's."""
        return self.done("merge")["hf"] if self.recipe.merge is not None else self.done("cpt")["hf"]

    def stage_eval(self) -> dict[str, Any]:
        base = self.evaluate("base", self.base_model_dir())
        cpt = self.evaluate("cpt", self.final_model_dir(), compare=base)
        return {"base": base, "cpt": cpt}

    def evaluate(self, label: str, model_dir: str, compare: str | None = None) -> str:
        """Evaluate one model into RUN_DIR/eval/LABEL; returns its results.json."""
        ev = self.recipe.eval
        out = self.run_dir / "eval" / label
        heldout = self.heldout_files()
        data_dir = self.eval_data_dir()
        if data_dir is None:
            return str(self.heldout_only(label, model_dir, heldout, out))
        from moecpt.eval.runner import evaluate_model

        # a task without data is skipped (named in the log and in results.json); the others run
        evaluate_model(model_dir, out, data_dir=data_dir, suite=ev.suite, tasks=ev.tasks or None,
                       limit=ev.limit or None, batch_size=ev.batch_size, max_length=ev.max_length or None,
                       heldout=",".join(f"{k}={v}" for k, v in heldout.items()) if heldout else "none",
                       compare=compare, name=label, progress=False)
        return str(out / "results.json")

    def check_eval_requirements(self) -> None:
        """Before the first stage: when the eval stage will run tasks, the packages they need are installed."""
        if self.done("eval") is not None or self.eval_data_dir() is None:
            return
        from moecpt.eval.tasks import check_requirements, select_tasks

        check_requirements(select_tasks(self.recipe.eval.suite, self.recipe.eval.tasks or None))

    def eval_data_dir(self) -> Path | None:
        setting = self.recipe.eval.data_dir
        if setting == "none":
            return None
        if setting:
            return Path(setting)
        from moecpt.eval.runner import default_data_dir

        return default_data_dir()

    def heldout_only(self, label: str, model_dir: str, heldout: dict[str, str], out: Path) -> Path:
        """Held-out bits per byte alone, in the layout of `moecpt eval`'s results.json."""
        from moecpt.eval.heldout import heldout_bits_per_byte, read_texts
        from moecpt.eval.lm import load_eval_tokenizer, load_model

        model = load_model(model_dir)
        tok = load_eval_tokenizer(model_dir)
        limit = self.recipe.eval.limit or None
        results = {"name": label, "model": model_dir, "tasks": {}, "average": None,
                   "skipped": {"tasks": "no evaluation data directory (eval.data_dir); held-out loss only"},
                   "heldout": {lang: {**heldout_bits_per_byte(model, tok, read_texts(Path(f), limit=limit),
                                                      model.config.max_position_embeddings), "file": f}
                               for lang, f in heldout.items()}}
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        return out / "results.json"

    def stage_export(self) -> dict[str, Any]:
        dst = self.run_dir / "hf"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(self.final_model_dir(), dst)
        return {"hf": str(dst)}

    def stage_report(self) -> dict[str, Any]:
        from moecpt.report.report import write_report

        report = write_report(self.run_dir)  # with the recipe steps' sections, from their stage records
        return {"report": str(report)}


def print_stage_config(recipe: Recipe, stage: str) -> str:
    """The resolved `moecpt train` config of a training stage, as TOML (corpora resolved, init_from set), after
    comment lines on what to do before launching it on a cluster."""
    from moecpt.config import to_toml
    from moecpt.pipeline.steps import RESIZED, UPCYCLED

    if stage == "base" and recipe.base is None:
        raise UserError(f"{recipe.source}: the recipe has no [base] stage")
    pipe = Pipeline(recipe)
    if stage == "cpt":
        init = recipe.cpt.get("init_from", "base")
        init = {"base": str(recipe.run_dir / "base" / "hf"), "upcycle": str(recipe.run_dir / UPCYCLED)}.get(init, init)
        if recipe.vocab is not None:
            init = str(recipe.run_dir / RESIZED)
    else:
        init = recipe.base.get("init_from", "")
    planned = pipe.resolved_corpora(write=False)
    missing = sorted({f for files in planned.values() for f in files if f.startswith(str(recipe.run_dir / "corpus"))
                      and not Path(f).is_file()})
    corpora = pipe.resolved_corpora()  # the stage trains on them: make the built-in corpora it names
    if missing:
        print(f"wrote the built-in corpora the config names into {recipe.run_dir / 'corpus'}", file=sys.stderr)
    cfg = recipe.stage_config(stage, corpora, init_from=init)
    vocab_pending = stage == "cpt" and recipe.vocab is not None and pipe.done("vocab") is None
    return "".join(f"# {line}\n" for line in before_cluster_run(recipe, cfg, vocab_pending)) + to_toml(cfg)


def before_cluster_run(recipe: Recipe, cfg: TrainConfig, vocab_pending: bool) -> list[str]:
    """Next steps before a stage trains on a cluster: the [vocab] step, if it has not run (its tokenizer and
    resized model are the stage's), and tokenizing its JSON Lines corpora once beforehand (docs/distributed.md)."""
    import shlex

    from moecpt.data.indexed import shard_exists

    lines = []
    if vocab_pending:
        lines += [f"{cfg.data.tokenizer} and {cfg.init_from} do not exist yet: make them first with",
                  f"  moecpt run {shlex.quote(recipe.source)} --run-dir {shlex.quote(str(recipe.run_dir))} "
                  "--stop-after vocab", "(it resizes the model in one process: the machine needs its full weights in memory)"]
    text = {name: [s for s in sources if not shard_exists(s)] for name, sources in cfg.data.corpora.items()}
    text = {name: files for name, files in text.items() if files}
    if text:
        tok = f" --tokenizer {shlex.quote(cfg.data.tokenizer)}" if cfg.data.tokenizer else ""
        lines += ["On a cluster, tokenize the corpora once beforehand (docs/distributed.md), so that the ranks read "
                  "shards and tokenize nothing:"]
        lines += [f"  moecpt data tokenize {' '.join(map(shlex.quote, files))}{tok} --output "
                  f"{shlex.quote(str(recipe.run_dir / 'shards' / name))}" for name, files in text.items()]
        lines += ["then name those shard prefixes in the recipe's [corpora] (or in [data.corpora] below)"
                  + (", and the text files in its [vocab] corpora." if recipe.vocab is not None else ".")]
    return lines


def run_recipe(recipe: Recipe, stop_after: str | None = None) -> dict[str, Any] | None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "moecpt run drives a study from one process; do not start it under torchrun. For multi-GPU "
            "training, write the stage's config with `moecpt run RECIPE --print-config cpt > cpt.toml`, train it "
            "with `torchrun ... -m moecpt.train --config cpt.toml`, then run `moecpt run RECIPE` again: it "
            "finds the finished training run and goes on with evaluation and the report")
    try:
        return Pipeline(recipe).run(stop_after)
    finally:
        sys.stdout.flush()
