"""The README's two commands as a newcomer first runs them: in a fresh clone with no ../shared beside it,
with `python3` but no `python` on PATH, and with PIP_REQUIRE_VIRTUALENV=1 so that any install outside a
virtual environment fails. Each script makes or reuses .venv, and a rerun installs nothing. Sizes are tiny
(recipe overrides for the embedded default, two test files for the test script): about a minute and a half."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Set for the scripts run here, so that the test script they run can never start this check again.
INNER = "MOECPT_SCRIPTS_CHECK"
TIMEOUT = 600  # seconds for one script run

TINY = ["--train.model.overrides={hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, "
        "num_attention_heads = 4, num_key_value_heads = 2}",
        "--train.data.seq_len=64", "--train.training.global_batch=8", "--train.training.micro_batch=8",
        "--train.logging.interval=10", "--train.checkpoint.interval=0", "--train.schedule.warmup_steps=1",
        "--base.training.steps=2", "--cpt.training.steps=2", "--eval.limit=1"]
# One file of tests that read real text (the built-in stand-ins here) and one that needs ../shared/data/eval.
INNER_TESTS = ["tests/data/test_tokenizer.py", "tests/eval/test_tasks.py"]


def fresh_clone(dest: Path) -> Path:
    """`git clone` of this repository, then the working tree's own versions of its files (tracked or not,
    unless git ignores them) laid over it, so that uncommitted edits are what gets checked; a clean
    checkout, as in CI, is the clone as it is."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True, timeout=120)
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, listed):
        src, dst = REPO / name, dest / name
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        elif not src.exists() and dst.is_file():  # deleted in the working tree
            dst.unlink()
    return dest


def newcomer_env(bindir: Path, python3: str) -> dict[str, str]:
    """PATH with `python3` (a wrapper of `python3`) and the system's tools but no `python`; pip refuses to
    install outside a virtual environment."""
    bindir.mkdir()
    (bindir / "python3").write_text(f'#!/bin/sh\nexec "{python3}" "$@"\n')
    (bindir / "python3").chmod(0o755)
    path = os.pathsep.join([str(bindir), "/usr/local/bin", "/usr/bin", "/bin"])
    if shutil.which("python", path=path):  # a system with python-is-python3: hide it as a missing command
        (bindir / "python").write_text('#!/bin/sh\necho "python: command not found" >&2\nexit 127\n')
        (bindir / "python").chmod(0o755)
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MOECPT_PYTHON", "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PATH": path, "PIP_REQUIRE_VIRTUALENV": "1", INNER: "1"}


def run(script: str, clone: Path, env: dict[str, str], *args: str) -> list[str]:
    proc = subprocess.run(["bash", script, *args], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"bash {script} exited {proc.returncode}:\n{out[-6000:]}"
    return proc.stdout.splitlines()


def said(lines: list[str], text: str) -> bool:
    return any(line.startswith("moecpt: ") and text in line for line in lines)


@pytest.mark.slow
def test_both_scripts_in_a_fresh_clone_without_python_or_shared_data(tmp_path):
    if os.environ.get(INNER):
        pytest.skip("already inside this check (the test script it runs)")
    if not shutil.which("git"):
        pytest.skip("needs git to clone the repository")
    # The interpreter outside any virtual environment; the check keeps its torch, as CI does.
    python3 = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    if subprocess.run([python3, "-c", "import torch"], capture_output=True).returncode:
        pytest.skip(f"{python3} has no torch: the fresh clone would download torch into its .venv")

    clone = fresh_clone(tmp_path / "clone")
    assert not (tmp_path / "shared").exists()
    env = newcomer_env(tmp_path / "bin", python3)
    stamp = clone / ".venv" / ".moecpt-eval"

    first = run("scripts/run_default.sh", clone, env, *TINY)
    assert said(first, "creating .venv") and said(first, "installing moecpt[eval] into .venv")
    assert (clone / "runs" / "mini" / "report.md").is_file() and stamp.is_file()
    assert ".venv/bin/activate" in first[-1]  # the last line says how to use the environment
    installed = stamp.stat().st_mtime_ns

    again = run("scripts/run_default.sh", clone, env, *TINY)
    assert said(again, "reusing .venv") and not said(again, "installing") and not said(again, "creating")
    assert stamp.stat().st_mtime_ns == installed

    for attempt in ("first", "again"):
        lines = run("scripts/test.sh", clone, env, *INNER_TESTS)
        assert not said(lines, "creating")
        assert said(lines, "installing moecpt[test]") == (attempt == "first"), lines
        assert said(lines, "reusing .venv") == (attempt == "again"), lines
        totals = next(line for line in reversed(lines) if re.search(r"\d+ passed.* in [\d.]+s", line))
        skipped = int(re.search(r"(\d+) skipped", totals).group(1))
        # The last line: how many were skipped, and why (the tests that need ../shared/data/eval).
        assert skipped > 0 and re.fullmatch(rf"{skipped} skipped: .+", lines[-1]), lines[-3:]
        assert str(tmp_path / "shared" / "data") in lines[-1]
        assert "shared corpora" not in lines[-1]  # the text-only tests ran on the built-in corpora
    assert (clone / ".venv" / ".moecpt-test").is_file()
