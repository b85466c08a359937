"""FSDP (2 ranks) and FSDP + expert parallelism (2 x 2) training on CPU with gloo against one process, and
resuming a 4-rank checkpoint on 2 ranks and on 1.

Tolerance: fp32 throughout. The sharded runs add the same numbers in a different order (gradient
reduce-scatter over ranks, all-to-all regrouping of expert rows, the grad-norm sum), so results differ from
one process by float32 rounding: a few 1e-7 relative per operation, amplified by AdamW (which divides by
sqrt of the second moment) over 4 steps. Losses must agree to 1e-5 relative and weights to 1e-4 absolute
(weights are ~N(0, 0.02); the learning rate is 3e-3); an error in sharding, scaling or data order is orders
of magnitude larger (a wrong gradient averaging moves the loss at the 1e-3 level, a wrong sample order at 1e-2).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moecpt.train import checkpoint as ckpt_lib
from moecpt.train.metrics import read_metrics
from moecpt.train.trainer import train

from .conftest import REPO, torchrun

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4


def trace(run_dir: Path) -> dict[int, tuple[float, float, float]]:
    return {r["step"]: (r["loss"], r["lb_loss"], r["grad_norm"]) for r in read_metrics(run_dir) if "loss" in r}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return ckpt_lib.load_model(ckpt).state_dict()


def assert_same_run(run: Path, ref: Path, steps: list[int]) -> None:
    a, b = trace(run), trace(ref)
    assert sorted(a) == steps, a
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=LOSS_RTOL), (s, a[s], b[s])
    wa = weights(ckpt_lib.step_dir(run / "checkpoints", steps[-1]))
    wb = weights(ckpt_lib.step_dir(ref / "checkpoints", steps[-1]))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=WEIGHT_ATOL, msg=k)


@pytest.fixture(scope="module")
def runs(parallel_config, config_for, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {name: root / name for name in ("single", "fsdp", "ep")}
    train(config_for(f"--run_dir={out['single']}"))  # also fills the shard cache the ranks read
    cfg = ["-m", "moecpt.train", "--config", str(parallel_config)]
    # FSDP over 2 ranks, 2 accumulated micro-batches each, kept unsharded between them; recomputed blocks.
    torchrun(2, [*cfg, f"--run_dir={out['fsdp']}", "--parallel.accumulate_unsharded=true",
                 "--parallel.activation_checkpointing=true"])
    # 4 ranks: experts split over EP groups {0, 1}, {2, 3}, FSDP over the rest; ZeRO-2-like forward.
    torchrun(4, [*cfg, f"--run_dir={out['ep']}", "--parallel.expert_parallel=2",
                 "--parallel.reshard_after_forward=false"])
    return out


def validation(run_dir: Path) -> dict[str, float]:
    """The end-of-run validation record: the same windows at any world size, so the same values."""
    (last,) = [r for r in read_metrics(run_dir) if "val_bpb/ja" in r]
    return {k: v for k, v in last.items() if k.startswith("val_")}


def test_fsdp_two_ranks_matches_one_process(runs):
    assert_same_run(runs["fsdp"], runs["single"], [1, 2, 3, 4])
    assert validation(runs["fsdp"]) == pytest.approx(validation(runs["single"]), rel=LOSS_RTOL)


def test_fsdp_with_expert_parallel_2x2_matches_one_process(runs):
    assert_same_run(runs["ep"], runs["single"], [1, 2, 3, 4])
    assert validation(runs["ep"]) == pytest.approx(validation(runs["single"]), rel=LOSS_RTOL)


def test_checkpoint_of_4_ranks_resumes_on_2_and_on_1(runs, parallel_config, config_for, tmp_path):
    saved = ckpt_lib.step_dir(runs["ep"] / "checkpoints", 2)
    assert ckpt_lib.read_trainer_state(saved)["world_size"] == 4
    assert ckpt_lib.read_trainer_state(saved)["data"]["samples_consumed"] == 8
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun(2, ["-m", "moecpt.train", "--config", str(parallel_config), f"--run_dir={two}", f"--resume={saved}"])
    train(config_for(f"--run_dir={one}", f"--resume={saved}"))
    for run in (two, one):
        # Steps 3 and 4 read the same samples (the data position is global) and give the single run's numbers.
        assert_same_run(run, runs["single"], [3, 4])


def test_single_process_checkpoint_resumes_with_expert_parallel(runs, parallel_config, tmp_path):
    run = tmp_path / "ep_from_single"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt_lib.step_dir(runs["single"] / "checkpoints", 2), ckpt_lib.step_dir(run / "checkpoints", 2))
    torchrun(2, ["-m", "moecpt.train", "--config", str(parallel_config), f"--run_dir={run}", "--resume=auto",
                 "--parallel.expert_parallel=2", "--checkpoint.export_at_end=true"])
    assert_same_run(run, runs["single"], [3, 4])
    exported = run / "hf" / "model.safetensors"
    assert exported.is_file()  # gathered from the shards by rank 0


def test_compiled_blocks_with_expert_parallel_and_unsharded_accumulation_match_one_process(runs, parallel_config, tmp_path):
    run = tmp_path / "compiled"
    torchrun(2, ["-m", "moecpt.train", "--config", str(parallel_config), f"--run_dir={run}", "--training.steps=2",
                 "--parallel.compile=true", "--parallel.expert_parallel=2", "--parallel.accumulate_unsharded=true"])
    assert_same_run(run, runs["single"], [1, 2])


def _worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (its children, read from /proc)."""
    try:
        children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step(parallel_config, tmp_path):
    run = tmp_path / "signalled"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moecpt.train",
           "--config", str(parallel_config), f"--run_dir={run}", "--training.steps=200", "--checkpoint.interval=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").exists() and max(trace(run), default=0) >= 2):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no step 2 within 120 s"
            time.sleep(0.5)
        pid = _worker_pid(proc.pid, rank=1)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)  # only rank 1 is told to stop
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "stopped at step" in out and "signal SIGTERM" in out
    (step, ckpt), = ckpt_lib.list_checkpoints(run / "checkpoints")
    assert 2 <= step < 200 and ckpt_lib.read_trainer_state(ckpt)["data"]["samples_consumed"] == 4 * step


def test_init_from_a_hugging_face_directory_on_two_ranks(runs, parallel_config, config_for, tmp_path):
    from moecpt.cli import main

    hf = tmp_path / "hf"
    assert main(["export", str(runs["single"]), str(hf)]) == 0
    one, two = tmp_path / "one", tmp_path / "two"
    train(config_for(f"--run_dir={one}", f"--init_from={hf}", "--training.steps=2"))
    # Rank 0 reads the directory and broadcasts the weights into the expert-parallel shards.
    torchrun(2, ["-m", "moecpt.train", "--config", str(parallel_config), f"--run_dir={two}", f"--init_from={hf}",
                 "--training.steps=2", "--parallel.expert_parallel=2"])
    assert_same_run(two, one, [1, 2])
