"""Runs that are killed, preempted or hit NaNs, through the real launcher (2 CPU ranks, gloo) unless said.

- exact resume: a run killed (SIGKILL, whole process group) after its step-4 checkpoint and resumed logs
  the same losses, step for step, as an uninterrupted run, and ends with the same weights and EMA;
- a kill during a checkpoint save leaves the previous checkpoint as `latest`, and the run resumes from it;
- SIGTERM to one rank saves a checkpoint and exits 0; the checkpoint resumes, and SIGTERM to the whole
  process group (as the Docker image's `tini -g` sends it) saves one too;
- a NaN input on one rank skips that step on both ranks and counts it; NaNs in a row stop the run with
  exit code 3 and a checkpoint holding the last good weights.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from distributed_utils import SMALL_DEMO_RUN, free_port, run_command
from trainer.export import consolidated_state_dict

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed

SMALL = [
    *SMALL_DEMO_RUN,
    "loss.disc_start=2",
    "train.log_every=1",
    "eval.every=0",
    "eval.max_clips=2",
    "eval.media_clips=0",
]


def command(*overrides: str, ranks: int = 2, script: str = "launch/train.py") -> list[str]:
    args = ["--config", "configs/tiny.json", *SMALL, *overrides]
    if ranks == 1:
        return [sys.executable, script, *args]
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
    return [*launcher, "--master_port", str(free_port()), script, *args]


def run(*overrides: str, ranks: int = 2, env: dict[str, str] | None = None, script: str = "launch/train.py"):
    return run_command(command(*overrides, ranks=ranks, script=script), env)


def start(*overrides: str) -> subprocess.Popen:
    """A 2-rank run in a process group of its own (a signal to the group reaches the launcher, the ranks
    and their DataLoader workers), its output captured as text."""
    return subprocess.Popen(
        command(*overrides),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def output(result) -> str:
    return result.stdout[-5000:] + result.stderr[-5000:]


def train_records(run_dir: Path) -> dict[int, dict[str, float]]:
    """The last logged training record of each step (a resumed run logs some steps again)."""
    records: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/rec" in record:
            records[record["step"]] = record
    return records


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it was interrupted"
        if metrics.is_file() and any(
            json.loads(line).get("step", 0) >= step and "loss/rec" in line
            for line in metrics.read_text().splitlines()
            if line.strip()
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} was not logged within {timeout} s")


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


# The same schedule whatever train.max_steps is (warm-up then constant), so a longer run to be killed
# trains the same steps as the reference; EMA on, so its resume is checked too.
RESUME = ["train.checkpoint_every=4", "optim.generator.warmup_steps=3", "ema.enabled=true", "ema.decay=0.9"]
COMPARED = ("loss/", "adaptive_weight", "logits/", "lr/", "grad_norm/")


def test_resume_after_kill_matches_uninterrupted_run_step_for_step(tmp_path):
    demo = f"data.demo.dir={tmp_path / 'demo'}"
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"

    reference = run(*RESUME, demo, f"train.output_dir={reference_dir}", "train.max_steps=8")
    assert reference.returncode == 0, output(reference)

    # Longer than the reference, so it is still running when killed; SIGKILL to the whole group
    # (launcher and both ranks and their DataLoader workers), once step 6 is logged.
    process = subprocess.Popen(
        command(*RESUME, demo, f"train.output_dir={killed_dir}", "train.max_steps=12"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_step(killed_dir, 6, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert latest(killed_dir) == "step_00000004"

    resumed = run(*RESUME, demo, f"train.output_dir={killed_dir}", "train.max_steps=8")
    assert resumed.returncode == 0, output(resumed)
    assert "continuing at step 5" in output(resumed)

    expected, got = train_records(reference_dir), train_records(killed_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in range(1, 9):
        keys = sorted(k for k in expected[step] if k.startswith(COMPARED))
        assert keys == sorted(k for k in got[step] if k.startswith(COMPARED)), step
        assert "loss/discriminator" in keys or step <= 2
        for key in keys:  # the same arithmetic in the same order on the same CPU: equal, not close
            assert got[step][key] == expected[step][key], (step, key, got[step][key], expected[step][key])

    end = "checkpoints/step_00000008"
    for engine in ("generator", "discriminator"):
        want = consolidated_state_dict(reference_dir / end, engine)
        have = consolidated_state_dict(killed_dir / end, engine)
        assert all(torch.equal(want[k], have[k]) for k in want), engine
    want_ema = torch.load(reference_dir / end / "ema.pt")
    have_ema = torch.load(killed_dir / end / "ema.pt")
    assert int(have_ema["__ema_updates__"]) == 8
    assert all(torch.equal(want_ema[k], have_ema[k]) for k in want_ema)


def test_kill_during_checkpoint_save_resumes_from_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    common = [f"train.output_dir={run_dir}", f"data.demo.dir={tmp_path / 'demo'}", "train.checkpoint_every=2"]
    fault = {"FAULT": "kill_publish", "FAULT_STEPS": "4"}
    killed = run(*common, "train.max_steps=6", ranks=1, env=fault, script="tests/fault_injection.py")
    assert killed.returncode == -signal.SIGKILL, output(killed)
    checkpoints = run_dir / "checkpoints"
    assert latest(run_dir) == "step_00000002"
    assert (checkpoints / ".step_00000004.tmp" / "generator").is_dir()  # written, never published
    assert not (checkpoints / "step_00000004").exists()

    resumed = run(*common, "train.max_steps=6", "train.keep_checkpoints=2", ranks=1)
    assert resumed.returncode == 0, output(resumed)
    assert "continuing at step 3" in output(resumed)
    assert latest(run_dir) == "step_00000006"
    # the stale temporary folder was replaced by the save of step 4; the oldest checkpoint was pruned
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000004", "step_00000006"]


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    run_dir = tmp_path / "run"
    common = [f"train.output_dir={run_dir}", f"data.demo.dir={tmp_path / 'demo'}", "train.checkpoint_every=0"]
    process = start(*common, "train.max_steps=1000")
    try:
        wait_for_step(run_dir, 2, process)
        # As SLURM does at preemption: the signal goes to the ranks (the launcher would forward it too).
        # the ranks are the children of the node's launcher (their DataLoader workers are theirs)
        node_launcher = next(
            p
            for p in psutil.Process(process.pid).children(recursive=True)
            if "deepspeed.launcher.launch" in " ".join(p.cmdline())
        )
        ranks = node_launcher.children()
        assert len(ranks) == 2 and all("launch/train.py" in " ".join(p.cmdline()) for p in ranks)
        ranks[0].send_signal(signal.SIGTERM)  # one rank only: the other must stop at the same step
        log, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, log[-5000:]
    assert "SIGTERM received: saving a checkpoint" in log
    tag = latest(run_dir)
    step = int(tag.split("_")[1])
    assert step >= 2
    assert sorted(p.name for p in (run_dir / "checkpoints" / tag / "trainer").iterdir()) == [
        "rank_00000.pt",
        "rank_00001.pt",
    ]

    # The resumed run is stopped the way `docker stop` with the image's `tini -g` does it: SIGTERM to the
    # whole process group (runner, launcher, ranks and their DataLoader workers). The workers used to die of
    # it, and the ranks then failed on their next batch without saving.
    process = start(*common, "train.max_steps=1000")
    try:
        wait_for_step(run_dir, step + 2, process)
        os.killpg(process.pid, signal.SIGTERM)
        log, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert f"continuing at step {step + 1}" in log, log[-5000:]
    assert "SIGTERM received: saving a checkpoint" in log, log[-5000:]
    assert "DataLoader worker" not in log, log[-5000:]
    assert int(latest(run_dir).split("_")[1]) >= step + 2, log[-5000:]


def test_nan_is_skipped_on_every_rank_and_repeated_nans_stop_the_run(tmp_path):
    run_dir = tmp_path / "run"
    # rank 1's input is NaN at step 3 (one skip, then training goes on), and from step 6 on (two skips
    # in a row with max_consecutive_skips=2: the run stops after step 7)
    fault = {"FAULT": "nan", "FAULT_STEPS": "3,6,7,8,9,10", "FAULT_RANK": "1"}
    result = run(
        f"train.output_dir={run_dir}",
        f"data.demo.dir={tmp_path / 'demo'}",
        "train.checkpoint_every=5",
        "train.max_consecutive_skips=2",
        "train.max_steps=10",
        env=fault,
        script="tests/fault_injection.py",
    )
    log = output(result)
    assert result.returncode == 3, log
    assert "2 steps in a row (up to step 7)" in log
    assert "step 3 skipped: NaN/Inf loss or gradient norm (1 in a row, 1 in all)" in log

    records = train_records(run_dir)
    # a skipped step logs no losses; its perf scalars are still logged under the step
    assert sorted(records) == [1, 2, 4, 5]
    for record in records.values():
        assert all(math.isfinite(v) for k, v in record.items() if k != "step")
    skipped = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/skipped_steps" in record:
            skipped[record["step"]] = record["train/skipped_steps"]
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 2, 7: 3}

    # the stop saved step 7, whose weights are step 5's (steps 6 and 7 were skipped on both ranks)
    assert latest(run_dir) == "step_00000007"
    checkpoints = run_dir / "checkpoints"
    for engine in ("generator", "discriminator"):
        at_5 = consolidated_state_dict(checkpoints / "step_00000005", engine)
        at_7 = consolidated_state_dict(checkpoints / "step_00000007", engine)
        assert all(torch.equal(at_5[k], at_7[k]) for k in at_5), engine
        assert all(torch.isfinite(v).all() for v in at_7.values())
    for rank in (0, 1):
        state = torch.load(
            checkpoints / "step_00000007" / "trainer" / f"rank_{rank:05d}.pt", weights_only=False
        )
        assert (state["skipped_steps"], state["consecutive_skips"]) == (3, 2)
