"""The main job end to end: `deepspeed --num_gpus 2 launch/train.py --config configs/tiny.json`.

Real launcher, 2 CPU ranks (gloo), bf16, ZeRO-2, demo shards generated on first use; then a resumed run;
then a single process without a launcher; then config mistakes that must fail at start.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distributed_utils import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny.json"
pytestmark = pytest.mark.distributed

# Small and quick: 4 train shards of 4 clips (2 ranks x 1 worker need >= 2 shards), 9 frames at 32 px.
SMALL = [
    "data.demo.train_shards=4",
    "data.demo.eval_shards=2",
    "data.demo.clips_per_shard=4",
    "data.resolution=32",
    "data.batch_size=1",
    "data.num_workers=1",
    "data.shuffle_buffer=4",
    "loss.disc_start=2",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "train.progress_bar=false",
    "eval.every=2",
    "eval.max_clips=4",
    "eval.batch_size=2",
]

EXPECTED_SCALARS = {
    "loss/rec",
    "loss/perceptual",
    "loss/kl",
    "loss/generator_adversarial",
    "loss/generator_total",
    "loss/discriminator",
    "adaptive_weight",
    "logits/real",
    "logits/fake",
    "lr/generator",
    "lr/discriminator",
    "perf/clips_per_sec",
    "eval/psnr",
    "eval_unseen/psnr",
}


def launch_2_ranks(*overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "launch/train.py",
        "--config",
        TINY,
        *overrides,
    ]
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
    )


def scalars_by_tag(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_deepspeed_two_ranks_trains_logs_checkpoints_and_resumes(tmp_path):
    run_dir, demo_dir = tmp_path / "run", tmp_path / "demo"
    common = [*SMALL, f"train.output_dir={run_dir}", f"data.demo.dir={demo_dir}"]

    first = launch_2_ranks(*common, "train.max_steps=4")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    log = first.stdout + first.stderr
    assert "demo shards not found" in log  # generated on first use, and said so
    assert (demo_dir / "DONE").is_file() or any(demo_dir.glob("*.tar"))
    assert json.loads((run_dir / "config.json").read_text())["train"]["max_steps"] == 4
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    for engine in ("generator", "discriminator"):
        assert (run_dir / "checkpoints" / engine / "step_00000004").is_dir()

    scalars = scalars_by_tag(run_dir)
    missing = EXPECTED_SCALARS - set(scalars)
    assert not missing, f"missing TensorBoard scalars: {sorted(missing)}"
    assert [step for step, _ in scalars["loss/rec"]] == [2, 4]
    assert all(math.isfinite(value) for series in scalars.values() for _, value in series)
    # The adversarial terms start at disc_start=2: step 2's window holds steps 1-2, step 4's holds 3-4.
    assert [step for step, _ in scalars["loss/discriminator"]] == [4]

    second = launch_2_ranks(*common, "train.max_steps=6", "train.resume=auto")
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "continuing at step 5" in second.stdout + second.stderr
    assert "demo shards not found" not in second.stdout + second.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [record["step"] for record in records if "loss/rec" in record]
    assert train_steps == [2, 4, 6]  # the resumed run went on with steps 5 and 6 and did not redo 1-4


def test_single_process_without_launcher(tmp_path):
    command = [
        sys.executable,
        "launch/train.py",
        "--config",
        TINY,
        *SMALL,
        "train.max_steps=2",
        f"train.output_dir={tmp_path / 'run'}",
        f"data.demo.dir={tmp_path / 'demo'}",
        "data.num_workers=0",
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert "1 rank(s)" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_step=3", "unknown config key train.max_step"),
        ("data.num_frames=16", "data.num_frames must be 4k+1"),
    ],
)
def test_bad_config_fails_at_start_with_a_message(tmp_path, override, message):
    command = [
        sys.executable,
        "launch/train.py",
        "--config",
        TINY,
        override,
        f"train.output_dir={tmp_path}/run",
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing started
