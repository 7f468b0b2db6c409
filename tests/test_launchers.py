"""The same launch/train.py under other launchers than deepspeed's: torchrun, SLURM's srun (emulated:
two processes with the variables srun sets), and the sbatch example's command line."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_utils import SMALL_DEMO_RUN, free_port, run_command

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed

SMALL = [
    *SMALL_DEMO_RUN,
    "data.num_workers=0",
    "loss.disc_start=1",
    "train.max_steps=2",
    "train.log_every=1",
    "eval.max_clips=2",
]


def overrides(tmp_path: Path) -> list[str]:
    return [*SMALL, f"train.output_dir={tmp_path / 'run'}", f"data.demo.dir={tmp_path / 'demo'}"]


def check_run(tmp_path: Path, log: str, returncode: int) -> None:
    assert returncode == 0, log[-5000:]
    assert "2 rank(s)" in log
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    trainer_files = sorted(
        p.name for p in (tmp_path / "run" / "checkpoints" / "step_00000002" / "trainer").iterdir()
    )
    assert trainer_files == ["rank_00000.pt", "rank_00001.pt"]


def test_torchrun_two_ranks(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "launch/train.py",
        "--config",
        "configs/tiny.json",
        *overrides(tmp_path),
    ]
    result = run_command(command)
    check_run(tmp_path, result.stdout + result.stderr, result.returncode)


def test_slurm_variables_two_tasks(tmp_path):
    """What `srun --ntasks 2 python launch/train.py ...` starts: no RANK/WORLD_SIZE, SLURM's variables."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    }
    port = str(free_port())
    processes = []
    for rank in range(2):
        slurm = {
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": str(rank),
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_JOB_NODELIST": "localhost",
            "MASTER_PORT": port,
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "launch/train.py", "--config", "configs/tiny.json", *overrides(tmp_path)],
                cwd=REPO,
                env={**env, **slurm},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
            )
        )
    logs = [p.communicate(timeout=600)[0] for p in processes]
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-5000:]
    check_run(tmp_path, logs[0], 0)


def test_sbatch_example_runs_the_trainer_under_srun():
    script = (REPO / "launch" / "slurm_train.sbatch").read_text()
    subprocess.run(["bash", "-n", str(REPO / "launch" / "slurm_train.sbatch")], check=True)
    directives = dict(
        re.match(r"#SBATCH --([\w-]+)(?:=(.*))?", line).groups()
        for line in script.splitlines()
        if line.startswith("#SBATCH")
    )
    assert directives["signal"] == "USR1@180"  # the trainer saves and exits on SIGUSR1
    assert "requeue" in directives
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    words = shlex.split(srun)
    assert words[words.index("python") + 1] == "launch/train.py"
    assert "--config" in words and "train.resume=auto" in words
    readme = (REPO / "README.md").read_text()
    assert "sbatch --nodes 4 launch/slurm_train.sbatch configs/cogvideo_vae.json" in readme
    for launcher in ("torchrun --nproc_per_node", "accelerate launch", "deepspeed --hostfile"):
        assert launcher in readme
