"""Real text for the tests, with or without ../shared/data beside the repository.

With ../shared/data/corpus there, the tests read the shared corpora as they always did. Without it (a fresh
clone on a newcomer's machine), tests that need real text but not one particular file read moecpt's own
built-in corpora instead: those `moecpt run` makes (moecpt/pipeline/builtin.py: generated Japanese prose and
arithmetic problems, the docstrings and source of the Python standard library), written once per test session
into a temporary directory laid out like ../shared/data (corpus/{ja,en,code,math}/*.jsonl). Only tests that
need a specific file of ../shared/data (evaluation sets, a Shift-JIS original, a shipped config naming the
shared files) still skip.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HAVE_SHARED = (SHARED_DATA / "corpus").is_dir()

# The stand-in for a shared corpus file: the built-in corpus of its language (its directory under corpus/);
# the held-out file for a shared dev / valid / test split.
_HELDOUT_MARKS = ("dev", "valid", "test")


# ../shared/data, or the directory that stands in for it (made empty here, filled by `data_root()`)
DATA = SHARED_DATA if HAVE_SHARED else Path(tempfile.mkdtemp(prefix="moecpt-test-data-"))
if not HAVE_SHARED:
    atexit.register(shutil.rmtree, DATA, ignore_errors=True)


@functools.cache
def data_root() -> Path:
    """`DATA` with its corpora: ../shared/data when it holds them; else the stand-in directory, laid out the
    same way, whose corpus/ gets moecpt's built-in corpora on first use (removed when the session ends)."""
    if not HAVE_SHARED:
        from moecpt.pipeline.builtin import BUILTIN, write_builtin_corpora

        written = write_builtin_corpora(DATA / "builtin")
        for name in BUILTIN:
            (DATA / "corpus" / name).mkdir(parents=True, exist_ok=True)
            for key in (name, f"{name}_heldout"):
                written[key].replace(DATA / "corpus" / name / f"builtin_{key}.jsonl")
    return DATA


def corpus_files() -> list[Path]:
    """Every corpus file: corpus/*/*.jsonl of `data_root()`."""
    return sorted((data_root() / "corpus").glob("*/*.jsonl"))


def corpus_file(name: str | Path, docs: int | None = None) -> Path:
    """The shared corpus file `name` (relative to corpus/, e.g. "ja/aozora_neko.jsonl") when ../shared/data is
    there, else its stand-in from the built-in corpora: the corpus of the same language (the held-out one for a
    dev / valid / test file), cut to its first `docs` documents when a test counts them (`docs` is the number
    the shared file has; the shared file itself is returned as it is)."""
    name = Path(name)
    if HAVE_SHARED:
        return SHARED_DATA / "corpus" / name
    lang = name.parts[0]
    heldout = any(mark in name.stem for mark in _HELDOUT_MARKS)
    src = data_root() / "corpus" / lang / f"builtin_{lang}{'_heldout' if heldout else ''}.jsonl"
    if not src.is_file():
        raise FileNotFoundError(f"no built-in stand-in for the shared corpus file {name} (languages: ja, en, code, math)")
    if docs is None:
        return src
    cut = data_root() / "cuts" / f"{src.stem}_first{docs}.jsonl"
    if not cut.is_file():
        cut.parent.mkdir(exist_ok=True)
        with src.open(encoding="utf-8") as f:
            cut.write_text("".join(itertools.islice(f, docs)), encoding="utf-8")
    return cut


def tiny_text() -> dict[str, list[str]]:
    """The two small corpora of the tiny training config (tests/tiny_config.py), or their stand-ins."""
    from .tiny_config import tiny_corpora

    corpus = SHARED_DATA / "corpus"
    return {k: [str(corpus_file(Path(p).relative_to(corpus))) for p in v]
            for k, v in tiny_corpora(SHARED_DATA).items()}
