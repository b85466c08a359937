"""`moecpt run [RECIPE]`."""

from __future__ import annotations

import argparse

from moecpt.pipeline.run import STAGES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run a whole continual pre-training study from a recipe",
        description="Tokenize corpora, (pre-train a base model,) continually pre-train, evaluate before and after, "
                    "export and report, from one recipe. Without RECIPE: the embedded miniature study. Stages "
                    "already complete are skipped, so rerunning continues an interrupted run. Recipe keys can be "
                    "overridden as --key.sub=value (e.g. --cpt.training.steps=20).")
    p.add_argument("recipe", nargs="?", help="recipe TOML file or built-in recipe name (default: mini)")
    p.add_argument("--run-dir", help="where everything goes (default: the recipe's run_dir)")
    p.add_argument("--print-config", choices=["base", "cpt"], metavar="STAGE",
                   help="print the `moecpt train` config of a training stage (base or cpt) and exit, e.g. to "
                        "launch that stage under torchrun or Slurm (built-in corpora it names are generated)")
    p.add_argument("--stop-after", choices=STAGES, metavar="STAGE",
                   help="stop once this stage is complete, e.g. vocab, to make the extended tokenizer and the "
                        f"resized model before training on a cluster (stages: {', '.join(STAGES)})")
    p.set_defaults(func=_run, accepts_overrides=True)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moecpt.pipeline.recipe import builtin_recipe_path, load_recipe
    from moecpt.pipeline.run import print_stage_config, run_recipe

    recipe = args.recipe
    if recipe and not Path(recipe).exists() and "/" not in recipe and not recipe.endswith(".toml"):
        recipe = builtin_recipe_path(recipe)
    loaded = load_recipe(recipe, args.run_dir, args.overrides)
    if args.print_config:
        print(print_stage_config(loaded, args.print_config), end="")
        return 0
    summary = run_recipe(loaded, args.stop_after)
    if summary is None:
        return 0
    bpb = summary["heldout_bpb"]
    for lang, v in bpb.items():
        print(f"held-out {lang}: {v['base']:.4f} -> {v['cpt']:.4f} bits/byte")
    vocab = summary.get("steps", {}).get("vocab")
    if vocab:
        for lang in ("ja", "en"):
            r = vocab["tokens_per_character"][lang]
            print(f"tokens per character {lang}: {r['old_tokens_per_character']:.4f} -> "
                  f"{r['new_tokens_per_character']:.4f} ({100 * r['change']:+.1f}%)")
        print(f"old-vocabulary logits after the resize: max |difference| {vocab['resize']['old_logits_max_abs_diff']}")
    print(f"report: {Path(summary['report_dir']) / 'report.md'}")
    return 0
