"""The main job end to end: `deepspeed --num_gpus 2 launch/train.py --config configs/tiny.json`.

Real launcher, 2 CPU ranks (gloo), ZeRO-2, demo shards generated on first use; then a resumed run;
then a single process without a launcher; then config mistakes that must fail at start.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distributed_utils import SMALL_DEMO_RUN, free_port, run_command

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny.json"
pytestmark = pytest.mark.distributed

# Small and quick: 4 train shards of 4 clips (2 ranks x 1 worker need >= 2 shards), 9 frames at 16 px.
SMALL = [
    *SMALL_DEMO_RUN,
    "loss.disc_start=2",
    "train.log_every=2",
    "train.checkpoint_every=2",
    "eval.every=2",
    "eval.max_clips=4",
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
    "eval/ssim",
    "eval/lpips",
    "eval_unseen/psnr",
    "grad_norm/generator",
    "perf/data_wait_fraction",
    "perf/peak_memory_gib",
    "train/skipped_steps",
    "data/skipped_samples",
    "data/skipped/corrupt_video",
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
    return run_command(command, timeout=900)


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
    for engine in ("generator", "discriminator", "trainer"):
        assert (run_dir / "checkpoints" / "step_00000004" / engine).is_dir()

    scalars = scalars_by_tag(run_dir)
    missing = EXPECTED_SCALARS - set(scalars)
    assert not missing, f"missing TensorBoard scalars: {sorted(missing)}"
    # reconstructions next to their inputs, as animated GIFs (TensorBoard's Images tab plays them)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    for prefix in ("eval", "eval_unseen"):
        gifs = events.Images(f"{prefix}/reconstruction/gif")
        assert [image.step for image in gifs] == [0, 2, 4]
        assert gifs[0].encoded_image_string.startswith(b"GIF89a")
        assert (gifs[0].width, gifs[0].height) == (2 * 16, 2 * 16)  # input | recon, 2 clips in rows
    assert [step for step, _ in scalars["loss/rec"]] == [2, 4]
    assert all(math.isfinite(value) for series in scalars.values() for _, value in series)
    # The adversarial terms start at disc_start=2: step 2's window holds steps 1-2, step 4's holds 3-4.
    assert [step for step, _ in scalars["loss/discriminator"]] == [4]

    second = launch_2_ranks(*common, "train.max_steps=6", "train.resume=auto")
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "continuing at step 5" in second.stdout + second.stderr
    assert "demo shards not found" not in second.stdout + second.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    train_steps = [record["step"] for record in train_records(run_dir)]
    assert train_steps == [2, 4, 6]  # the resumed run went on with steps 5 and 6 and did not redo 1-4


def test_resampled_stream_with_aspect_ratio_buckets_and_restoration(tmp_path, demo_dir):
    """data.mode=resampled and data.buckets reach the trainer: batches of one bucket's size train; and
    data.restoration: the model learns to restore degraded clips (evaluated on degraded inputs too)."""
    run_dir = tmp_path / "run"
    result = run_single_process(
        run_dir,
        demo_dir,
        "train.max_steps=2",
        "train.log_every=2",
        "data.num_workers=1",
        "data.mode=resampled",
        "data.buckets=[[32, 48], [48, 32]]",
        "data.batch_size=2",
        "data.restoration.enabled=true",
        "data.restoration.scale=2",
        "data.restoration.noise_std=0.02",
        "data.restoration.jpeg_quality=80",
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    state = torch.load(
        run_dir / "checkpoints" / "step_00000002" / "trainer" / "rank_00000.pt", weights_only=False
    )
    assert state["data"]["mode"] == "resampled"
    assert [record["step"] for record in train_records(run_dir)] == [2]
    assert any(math.isfinite(record["eval/psnr"]) for record in metric_records(run_dir, "eval/psnr"))


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
    result = run_command(command, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """One set of small demo shards for the single-process runs below (generated by the first run)."""
    return tmp_path_factory.mktemp("demo")


def run_single_process(
    run_dir: Path, demo: Path, *overrides: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "launch/train.py",
        "--config",
        TINY,
        *SMALL,
        "data.num_workers=0",
        "loss.disc_start=0",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "eval.every=1000",
        f"train.output_dir={run_dir}",
        f"data.demo.dir={demo}",
        *overrides,
    ]
    return run_command(command, env)


def metric_records(run_dir: Path, key: str) -> list[dict]:
    """The run's metrics.jsonl records that hold `key` (train steps: loss/rec; evaluations: eval/psnr)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if key in record]


def train_records(run_dir: Path) -> list[dict]:
    return metric_records(run_dir, "loss/rec")


DISCRIMINATOR_TYPES = ["3d", "hybrid3d", "causal3d", "patchgan3d", "magvit2d", "patchgan2d"]


def test_tiny_run_trains_with_every_discriminator_type(tmp_path, demo_dir):
    """Every discriminator type in one set (one run instead of one per type: each run is mostly start-up):
    each builds, takes its discriminator and generator losses, and the adaptive weight stays positive."""
    run_dir = tmp_path / "run"
    kinds = json.dumps([{"type": kind} for kind in DISCRIMINATOR_TYPES])
    result = run_single_process(
        run_dir, demo_dir, "train.max_steps=2", f"discriminator.discriminators={kinds}"
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = train_records(run_dir)
    assert [record["step"] for record in records] == [1, 2]
    for record in records:
        for key in ("loss/discriminator", "loss/generator_adversarial", "adaptive_weight", "logits/real"):
            assert math.isfinite(record[key]), key
        for kind in DISCRIMINATOR_TYPES:
            for key in (f"discriminator/{kind}", f"generator_adversarial/{kind}"):
                assert math.isfinite(record[key]), key
        assert record["adaptive_weight"] > 0
    # the log names the discriminators it built; one process without a launcher is one rank
    assert f"discriminators {', '.join(DISCRIMINATOR_TYPES)}: " in result.stdout + result.stderr
    assert "1 rank(s) on cpu" in result.stdout + result.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"  # saved at the end


def test_tiny_run_with_a_compiled_autoencoder(tmp_path, demo_dir):
    """train.compile reaches the trainer: it trains, evaluates (the compiled model in eval mode) and saves,
    and the forward is compiled once per grad mode: evaluation's TensorBoard media (einops on numpy arrays)
    recompiled it before the trainer registered einops' backends ahead of compiling.

    Dynamo's aot_eager back-end stands in for inductor here (torch's TORCH_COMPILE_OVERRIDE_BACKENDS): the
    tracing, the guards and the autograd graphs are the same; inductor's code generation for this run's two
    graphs takes about 5 minutes on a 2-core CPU with a cold cache. test_compile checks inductor's step."""
    run_dir = tmp_path / "run"
    result = run_single_process(
        run_dir,
        demo_dir,
        "train.max_steps=2",
        "train.compile=true",
        "eval.every=2",
        "train.checkpoint_every=2",
        env={"TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager", "TORCH_LOGS": "recompiles"},
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "autoencoder forward compiled with torch.compile" in log
    # evaluation at step 0 compiles the no-grad forward; the first training step, with grad, recompiles
    # it; nothing else does (evaluations at steps 0 and 2, two evaluation sets each, media logged)
    assert log.count("Recompiling function forward") == 1, log[-4000:]
    assert "GLOBAL_STATE changed: grad_mode" in log
    records = train_records(run_dir)
    assert [record["step"] for record in records] == [1, 2]
    assert all(math.isfinite(record["loss/rec"]) and record["adaptive_weight"] > 0 for record in records)
    evaluations = metric_records(run_dir, "eval/psnr")
    assert evaluations and math.isfinite(evaluations[0]["eval/psnr"])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_tiny_run_with_every_term_of_the_objective(tmp_path, demo_dir):
    """Two discriminators (one 2D at two scales), every loss term and regulariser on, then a resume."""
    run_dir = tmp_path / "run"
    everything = [
        "data.resolution=32",  # the 2D discriminator at half scale needs 16 px frames
        'discriminator.discriminators=[{"type": "causal3d"}, {"type": "magvit2d", "weight": 0.5}]',
        "discriminator.image_frames=2",
        "discriminator.multiscale_factors=[2]",
        "loss.multiscale_adversarial_loss_weight=0.5",
        "loss.gan_loss=non_saturating",
        "loss.adversarial_warmup_steps=2",
        "loss.feature_matching_weight=0.5",
        "loss.learn_logvar=true",
        "loss.vgg_perceptual_weight=0.1",
        "loss.style_weight=10.0",
        "loss.vgg.pretrained=false",
        'loss.vgg.layers={"relu3_3": 1.0}',
        "loss.vgg.distance=cosine",
        "loss.grad_penalty_loss_weight=1.0",
        "loss.grad_penalty_every=2",
        "loss.lecam_weight=0.1",
        "train.checkpoint_every=3",
    ]
    first = run_single_process(run_dir, demo_dir, "train.max_steps=3", *everything)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    records = train_records(run_dir)
    assert [record["step"] for record in records] == [1, 2, 3]
    for key in (
        "loss/logvar",
        "loss/vgg_perceptual",
        "loss/style",
        "loss/feature_matching",
        "loss/discriminator_gan",
        "loss/lecam",
        "discriminator/causal3d",
        "discriminator/magvit2d@2x",
        "generator_adversarial/magvit2d",
    ):
        assert all(math.isfinite(record[key]) for record in records), key
    # lazy R1 every 2 steps: on the steps run with global_step 0 and 2 (logged as steps 1 and 3)
    assert [("loss/gradient_penalty" in record) for record in records] == [True, False, True]
    assert records[1]["loss/logvar"] != 0.0  # the log-variance trains

    state = torch.load(
        run_dir / "checkpoints" / "step_00000003" / "trainer" / "rank_00000.pt", weights_only=False
    )
    saved = state["lecam"]
    assert sorted({key.split(".")[0] for key in saved}) == ["causal3d", "magvit2d", "magvit2d@2x"]
    assert saved["magvit2d.initialized"].item()

    second = run_single_process(run_dir, demo_dir, "train.max_steps=4", "train.resume=auto", *everything)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert [record["step"] for record in train_records(run_dir)] == [1, 2, 3, 4]
