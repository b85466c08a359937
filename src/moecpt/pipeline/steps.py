"""The recipe steps around training: `[upcycle]` (a dense model upcycled into the MoE the cpt stage starts
from), `[vocab]` (the tokenizer extended with pieces learned on the recipe's Japanese text and the cpt
stage's model given rows for them, before it trains) and `[merge]` (after the cpt stage: an average of its
last checkpoints, of named models, or a task vector added to it), with their checks and their sections of
the report.

    [upcycle]                         # the cpt stage's init_from = "upcycle"
    dense = "path/to/dense-hf"        # a Hugging Face llama, mistral or qwen3 directory
    family = "mixtral"                # or "qwen3_moe"
    experts = 8
    top_k = 2
    granularity = 1                   # G > 1: virtual groups of 1/G slices (arXiv 2410.07524)

    [vocab]                           # after upcycle/base, before cpt: RUN_DIR/tokenizer and RUN_DIR/resized
    add = 16000                       # new pieces (at most), learned on
    corpora = ["ja"]                  #   corpora of [corpora] (JSON Lines, not shards) or files, globs, dirs
    heldout_ja = ""                   # tokens per character measured on ("": [heldout] ja)
    heldout_en = ""                   #   and ("": [heldout] en)

    [merge]                           # one of:
    average_last = 3                  #   the last 3 checkpoints of the cpt run (keep_last >= 3)
    average = ["cpt", "path/x"]       #   named models; "cpt" is the cpt stage's model (weights: optional)
    task_vector = { plus = "instruct", minus = "base", scale = 1.0 }   # cpt + scale * (plus - minus)
    embeddings = "merge"              # or "shared_rows", "skip"
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moecpt.errors import UserError

UPCYCLED = "upcycled"  # RUN_DIR/upcycled: the upcycled model
MERGED = "merged"  # RUN_DIR/merged: the merged model
TOKENIZER = "tokenizer"  # RUN_DIR/tokenizer: the extended tokenizer the cpt stage tokenizes with
RESIZED = "resized"  # RUN_DIR/resized: the model the cpt stage starts from, with rows for the new pieces
STEPS = ("upcycle", "vocab", "merge")  # the recipe steps, in the order they run and are reported


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
class VocabSection:
    add: int = 0
    corpora: list[str] = field(default_factory=lambda: ["ja"])  # [corpora] names, or files, globs, directories
    seed: int = 0
    heldout_ja: str = ""  # "" = [heldout] ja
    heldout_en: str = ""  # "" = [heldout] en


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

    from moecpt.tools.upcycle import METADATA, upcycle

    s = section
    out = upcycle(s.dense, run_dir / UPCYCLED, family=s.family, experts=s.experts, top_k=s.top_k,
                  granularity=s.granularity, shared_experts=s.shared_experts, seed=s.seed,
                  router_std=s.router_std or None, norm_topk_prob=s.norm_topk_prob)
    return {"hf": str(out), **json.loads((out / METADATA).read_text())}


def check_vocab(source: str, vocab: VocabSection | None, corpora: dict[str, list[str]],
                heldout: dict[str, str]) -> None:
    """Refuse a [vocab] step that cannot run: no pieces to add, text it cannot learn from, nothing to measure."""
    from glob import has_magic

    from moecpt.data.indexed import shard_exists

    if vocab is None:
        return
    if vocab.add < 1:
        raise UserError(f"{source}: [vocab] add = {vocab.add}: give the number of pieces to add, e.g. add = 16000")
    if not vocab.corpora:
        raise UserError(f"{source}: [vocab] corpora is empty: name the corpora the new pieces are learned on, "
                        "e.g. corpora = [\"ja\"]")
    for name in vocab.corpora:  # a path is checked when the step runs (the recipe may be read elsewhere)
        if name not in corpora and not (has_magic(name) or "/" in name or Path(name).exists()):
            raise UserError(f"{source}: [vocab] corpora: {name!r} is neither a corpus of [corpora] "
                            f"({', '.join(corpora)}) nor a path (file, glob or directory)")
        for src in corpora.get(name, [name]):
            if shard_exists(src):
                raise UserError(f"{source}: [vocab] corpora: {src} ({name}) is a tokenized shard; new pieces are "
                                "learned from text: name JSON Lines or .txt files (a corpus of them, or the files)")
    for lang, what in (("ja", "Japanese"), ("en", "English")):
        if not (getattr(vocab, f"heldout_{lang}") or heldout.get(lang)):
            raise UserError(f"{source}: [vocab] heldout_{lang}: no held-out {what} text to measure tokens per "
                            f"character on; set heldout_{lang} = a JSON Lines or .txt file, or [heldout] {lang}")


def vocab_sources(section: VocabSection, corpora: dict[str, list[str]]) -> list[str]:
    """The text the [vocab] step learns from: each named corpus's sources (`corpora` resolved), or the path."""
    return [src for name in section.corpora for src in corpora.get(name, [name])]


def run_vocab(section: VocabSection, run_dir: Path, model_dir: str, base_tokenizer: str, sources: list[str],
              heldout: dict[str, str]) -> dict[str, Any]:
    """The [vocab] step: RUN_DIR/tokenizer (the base tokenizer extended on `sources`; kept when a previous
    attempt made the same one), RUN_DIR/resized (`model_dir` with rows for the new ids), and the record:
    tokens per character on the held-out texts, old vs new, and the old vocabulary's logit change."""
    from moecpt.data.preprocess import expand_inputs
    from moecpt.data.tokenizer import load_tokenizer
    from moecpt.data.vocab import corpus_texts, extend_tokenizer, read_extension
    from moecpt.tools.vocab import resize_model, vocab_report

    base = load_tokenizer(base_tokenizer or None)
    files = [str(f) for f in expand_inputs(sources)]
    tok_dir = run_dir / TOKENIZER
    made = read_extension(tok_dir)
    wanted = {"base_sha256": base.fingerprint, "requested": section.add, "seed": section.seed, "corpora": files}
    if made is None or any(made.get(k) != v for k, v in wanted.items()):
        extend_tokenizer(base.path, [Path(f) for f in files], section.add, tok_dir, seed=section.seed)
        made = read_extension(tok_dir)
    resize = resize_model(model_dir, tok_dir, run_dir / RESIZED)
    texts = {lang: list(corpus_texts(expand_inputs([f]))) for lang, f in heldout.items()}
    return {"hf": str(run_dir / RESIZED), "tokenizer": str(tok_dir), "model": model_dir, "heldout": heldout,
            "extension": {k: made[k] for k in ("base", "base_vocab_size", "vocab_size", "requested", "added",
                                                 "format", "corpus_characters", "seed", "seconds") if k in made},
            "corpora": list(section.corpora), "resize": resize,
            "tokens_per_character": vocab_report(base, tok_dir, texts["ja"], texts["en"])}


def check_shard_tokenizer(corpora: dict[str, list[str]], tokenizer: str) -> None:
    """Refuse shards among the `corpora`' sources that another tokenizer made (after [vocab]: the base's, whose
    ids never use the new pieces), naming the command that re-tokenizes them."""
    from moecpt.data.indexed import meta_path, shard_exists
    from moecpt.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    for name, sources in corpora.items():
        for prefix in filter(shard_exists, sources):
            path = meta_path(prefix)
            made_with = json.loads(path.read_text()).get("tokenizer", {}) if path.is_file() else {}
            if made_with.get("sha256") not in (None, tok.fingerprint):
                raise UserError(f"[corpora] {name}: the shard {prefix} was tokenized with {made_with.get('path')}, "
                                f"not the extended tokenizer {tokenizer}: its ids never use the new pieces. "
                                f"Tokenize the text again: moecpt data tokenize FILES --tokenizer {tokenizer} "
                                f"--output {prefix}_ext, or name the JSON Lines files in [corpora]")


def check_merge_vocab(section: MergeSection | None, rows: int) -> None:
    """Before the cpt stage trains with an expanded vocabulary of `rows` ids: refuse a [merge] step whose other
    models (task vector, named average) have another vocabulary size while embeddings = "merge" (it would be
    refused after training)."""
    if section is None or section.kind == "average_last" or section.embeddings != "merge":
        return
    tv = section.task_vector
    others = section.average if section.kind == "average" else [tv.base, tv.plus, tv.minus]
    for model in others:
        config = Path(model) / "config.json"
        size = json.loads(config.read_text()).get("vocab_size") if model != "cpt" and config.is_file() else None
        if size is not None and size != rows:
            raise UserError(f"[merge] embeddings = \"merge\": {model} has {size} vocabulary rows, the vocabulary-expanded "
                            f"model {rows}; set embeddings = \"shared_rows\" (merge the rows both have) or \"skip\"")


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
    if stages.get("vocab"):
        md += vocab_lines(stages["vocab"])
    mg = stages.get("merge")
    if mg:
        terms = " ".join(f"{t['coefficient']:+.4g} x `{t['model']}`" for t in mg["terms"])
        what = (f"the weighted average {terms}" if mg["kind"] == "average" else
                f"`{mg['first']}` + {mg['scale']:g} x ({terms})")
        md += ["", "## Merge (`merge`)", "",
               f"The evaluated and exported model is {what}; embeddings and LM head: {mg['embeddings']}"
               + (f" (rows merged: {mg['vocab_rows_merged']})" if mg["embeddings"] == "shared_rows" else "") + "."]
    return md


def vocab_lines(v: dict[str, Any]) -> list[str]:
    """The [vocab] step's section: what was added, tokens per character old vs new, the old logits' change."""
    ext, tpc, diff = v["extension"], v["tokens_per_character"], v["resize"]["old_logits_max_abs_diff"]
    md = ["", "## Vocabulary expansion (`vocab`)", "",
          f"The tokenizer `{ext['base']}` ({ext['base_vocab_size']:,} ids) was extended by {ext['added']:,} pieces "
          f"(of {ext['requested']:,} asked) learned on {', '.join(v['corpora'])} into `{v['tokenizer']}` "
          f"({ext['vocab_size']:,} ids). The continual pre-training started from `{v['model']}` with a row per new "
          f"id in its embedding and LM head, each the mean of the rows of the piece's old tokens (`{v['hf']}`), "
          "and trained on text tokenized with the new tokenizer. The `base` column is the model before expansion, "
          "with its own tokenizer (bits per byte do not depend on the tokenizer).", "",
          "| held-out text | characters | tokens per character, old | new | change |", "|---|---|---|---|---|"]
    for lang in ("ja", "en"):
        r = tpc[lang]
        md.append(f"| {lang} (`{v['heldout'][lang]}`) | {r['characters']:,} | {r['old_tokens_per_character']:.4f} "
                  f"| {r['new_tokens_per_character']:.4f} | {100 * r['change']:+.1f}% |")
    verdict = ("unchanged" if diff == 0 else "CHANGED") if diff is not None else "not checked"
    md += ["", f"The resized model's logits of the old vocabulary on old-token inputs: {verdict} "
               f"(largest absolute difference {diff if diff is not None else 'n/a'})."]
    return md
