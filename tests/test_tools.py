"""The inference tools: launch/export.py (EMA weights, diffusers decode, measured scaling factor),
launch/reconstruct.py (any length and size, side by side, images) and launch/evaluate.py (1 and 2 ranks).

One tiny training run (2 steps, EMA on) is shared by the module; reconstruction of larger clips uses a
smaller random autoencoder saved as a diffusers folder, since the tools accept both.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from PIL import Image
from safetensors.torch import load_file
from skimage import data as photos

from data.pipeline import build_video_dataset
from distributed_utils import free_port
from models import AutoencoderConfig, CausalVideoAutoencoder
from models.convert import CONFIG_NAME, WEIGHTS_NAME, save_diffusers_folder
from trainer.checkpoint import Checkpointer, find_checkpoint
from trainer.ema import weights_without_bookkeeping
from trainer.export import autoencoder_state_dict, consolidated_state_dict
from trainer.quality import QualityMetrics
from trainer.tools import ReconstructionScore, build_lpips, load_autoencoder, reconstruct_clip

REPO = Path(__file__).resolve().parents[1]
METRICS = re.compile(r"PSNR (\S+) dB  SSIM (\S+)  LPIPS (\S+)  L1 (\S+)")


def run(*command: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *command],
        env=None if env is None else {**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, demo shards dir) of a 2-step single-process tiny run with EMA weights."""
    root = tmp_path_factory.mktemp("tiny_run")
    run(
        "launch/train.py", "--config", "configs/tiny.json",
        "train.max_steps=2", "train.checkpoint_every=2", "train.log_every=1", "train.progress_bar=false",
        "ema.enabled=true", "data.demo.train_shards=1", "data.demo.eval_shards=1", "data.demo.clips_per_shard=4",
        "data.resolution=32", "data.batch_size=1", "data.num_workers=0", "data.shuffle_buffer=2",
        "eval.every=0", "eval.max_clips=1", "eval.batch_size=1",
        f"train.output_dir={root / 'run'}", f"data.demo.dir={root / 'demo'}",
    )  # fmt: skip
    return root / "run", root / "demo"


@pytest.fixture(scope="module")
def mini_folder(tmp_path_factory) -> Path:
    """A diffusers folder holding a small random autoencoder (cheap on large clips)."""
    torch.manual_seed(0)
    config = AutoencoderConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    folder = tmp_path_factory.mktemp("mini")
    save_diffusers_folder(CausalVideoAutoencoder(config).state_dict(), config, folder)
    return folder


def pan_frames(frames: int, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3): a camera pan over skimage's astronaut photograph, 3 px per frame."""
    photo = photos.astronaut()  # 512 x 512
    return np.stack([photo[80 : 80 + height, 40 + 3 * t : 40 + 3 * t + width] for t in range(frames)])


def write_mp4(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    _, height, width, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))
            )
        container.mux(stream.encode())
    return path


def decode_mp4(path: Path) -> tuple[list[av.VideoFrame], float, str]:
    """(frames, fps, pixel format) of a video file, decoded with PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        return frames, float(stream.average_rate), stream.codec_context.pix_fmt


def printed_metrics(output: str) -> dict[str, float | None]:
    match = METRICS.search(output)
    assert match, output
    values = [None if text == "n/a" else float(text) for text in match.groups()]
    return dict(zip(("psnr", "ssim", "lpips", "l1"), values, strict=True))


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.slow  # the tiny run takes about a minute
def test_export_loads_in_diffusers_and_decodes_like_the_project(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    run("launch/export.py", "--checkpoint", str(run_dir), "--output", str(tmp_path / "out"))
    theirs = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "out").eval()
    ours, weights = load_autoencoder(run_dir)
    assert weights.startswith("ema weights")

    torch.manual_seed(1)
    latents = torch.randn(1, ours.config.latent_channels, 3, 4, 4)  # decodes to 9 frames of 32x32
    with torch.no_grad():
        want = ours.decode(latents)
        have = theirs.decode(latents).sample
    assert have.shape == want.shape == (1, 3, 9, 32, 32)
    torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())

    # the EMA weights were exported, exactly
    ema = weights_without_bookkeeping(Checkpointer.load_ema(find_checkpoint(run_dir)))
    exported = load_file(tmp_path / "out" / WEIGHTS_NAME)
    assert set(exported) == set(ema)
    for key, value in ema.items():
        assert torch.equal(exported[key], value.float()), key


@pytest.mark.slow  # the tiny run takes about a minute
def test_export_no_ema_gives_the_trained_weights(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    run("launch/export.py", "--checkpoint", str(run_dir), "--output", str(tmp_path / "out"), "--no-ema")
    folder = find_checkpoint(run_dir)
    trained = autoencoder_state_dict(consolidated_state_dict(folder, "generator"))
    ema = weights_without_bookkeeping(Checkpointer.load_ema(folder))
    exported = load_file(tmp_path / "out" / WEIGHTS_NAME)
    assert set(exported) == set(trained)
    for key, value in trained.items():
        assert torch.equal(exported[key], value.float()), key
    assert any(not torch.equal(trained[key].float(), ema[key].float()) for key in trained)


@pytest.mark.slow  # the tiny run takes about a minute
def test_measured_scaling_factor_is_one_over_the_latent_std(tiny_run, tmp_path):
    run_dir, demo = tiny_run
    shards = str(demo / "eval-000000.tar")
    result = run(
        "launch/export.py", "--checkpoint", str(run_dir), "--output", str(tmp_path / "out"),
        "--measure-scaling-factor", "--data", shards, "--max-clips", "3", "--num-frames", "9", "--resolution", "32",
    )  # fmt: skip
    written = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())["scaling_factor"]
    assert f"scaling factor {written:.8g}" in result.stdout

    # Independently: diffusers' encoder on the same first 3 clips; Var z = E[mean^2 + std^2] - E[mean]^2
    vae = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "out").eval()
    clips = build_video_dataset(shards, num_frames=9, resolution=32, train=False, rank=0, world_size=1)
    means, second_moments = [], []
    with torch.no_grad():
        for _, sample in zip(range(3), clips, strict=False):
            posterior = vae.encode(sample["video"][None]).latent_dist
            mean, var = posterior.mean.double(), posterior.var.double()
            means.append(mean.flatten())
            second_moments.append((mean.square() + var).flatten())
    assert len(means) == 3
    means, second_moments = torch.cat(means), torch.cat(second_moments)
    expected = 1 / math.sqrt(second_moments.mean() - means.mean() ** 2)
    assert written == pytest.approx(expected, rel=1e-5)
    # and the std of one draw of posterior samples is close to it
    noise = torch.randn(means.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    draws = means + noise * (second_moments - means.square()).sqrt()
    assert 1 / draws.std().item() == pytest.approx(expected, rel=0.1)


# ---------------------------------------------------------------------------------------- reconstruct


@pytest.mark.slow
def test_reconstruct_video_keeps_frames_size_and_fps_and_prints_metrics(mini_folder, tmp_path):
    source = write_mp4(tmp_path / "in.mp4", pan_frames(33, 96, 160))
    result = run(
        "launch/reconstruct.py", "--checkpoint", str(mini_folder), "--input", str(source),
        "--output", str(tmp_path / "out.mp4"), "--lpips-random", "--device", "cpu",
    )  # fmt: skip
    frames, fps, pixel_format = decode_mp4(tmp_path / "out.mp4")
    assert len(frames) == 33
    assert (frames[0].width, frames[0].height) == (160, 96)
    assert fps == 8 and pixel_format == "yuv420p"
    metrics = printed_metrics(result.stdout)
    assert 0 < metrics["psnr"] < 100 and -1 <= metrics["ssim"] <= 1
    assert metrics["lpips"] >= 0 and 0 <= metrics["l1"] <= 2


def test_side_by_side_doubles_the_width_also_tiled(mini_folder, tmp_path):
    source = write_mp4(tmp_path / "in.mp4", pan_frames(9, 48, 64))
    run(
        "launch/reconstruct.py", "--checkpoint", str(mini_folder), "--input", str(source),
        "--output", str(tmp_path / "out.mp4"), "--side-by-side", "--no-lpips", "--tile", "32", "--tile-overlap", "8",
    )  # fmt: skip
    frames, _, _ = decode_mp4(tmp_path / "out.mp4")
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (128, 48)
    # the left half is the input (up to H.264 losses)
    left = frames[4].to_ndarray(format="rgb24")[:, :64].astype(float)
    assert np.abs(left - pan_frames(9, 48, 64)[4]).mean() < 8


def test_any_frame_count_and_size(mini_folder, tmp_path):
    """15 frames (not 4k+1) of 100x90 (not multiples of 8), in segments of 9 frames (the last one, of 6
    frames, padded to 9): the output keeps 15 frames of 100x90."""
    source = write_mp4(tmp_path / "in.mp4", pan_frames(15, 90, 100))
    result = run(
        "launch/reconstruct.py", "--checkpoint", str(mini_folder), "--input", str(source),
        "--output", str(tmp_path / "out.mp4"), "--segment-frames", "9", "--no-lpips",
    )  # fmt: skip
    frames, _, _ = decode_mp4(tmp_path / "out.mp4")
    assert len(frames) == 15 and (frames[0].width, frames[0].height) == (100, 90)
    metrics = printed_metrics(result.stdout)
    assert metrics["lpips"] is None and math.isfinite(metrics["psnr"])


def test_odd_sizes_are_kept_as_yuv444(mini_folder, tmp_path):
    source = tmp_path / "in.mp4"
    with av.open(str(source), mode="w") as container:  # yuv444p input: odd sizes
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 61, 45, "yuv444p"
        for frame in pan_frames(5, 45, 61):
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))
            )
        container.mux(stream.encode())
    run(
        "launch/reconstruct.py", "--checkpoint", str(mini_folder), "--input", str(source),
        "--output", str(tmp_path / "out.mp4"), "--no-lpips",
    )  # fmt: skip
    frames, fps, pixel_format = decode_mp4(tmp_path / "out.mp4")
    assert len(frames) == 5 and (frames[0].width, frames[0].height) == (61, 45)
    assert fps == 5 and pixel_format == "yuv444p"


@pytest.mark.slow  # the tiny run takes about a minute
def test_image_in_png_out_from_a_run(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    Image.fromarray(pan_frames(1, 50, 70)[0]).save(tmp_path / "in.png")
    result = run(
        "launch/reconstruct.py", "--checkpoint", str(run_dir), "--input", str(tmp_path / "in.png"),
        "--output", str(tmp_path / "out.png"), "--lpips-random",
    )  # fmt: skip
    assert "ema weights" in result.stdout
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (70, 50) and image.mode == "RGB"
    assert printed_metrics(result.stdout)["lpips"] is not None


def test_lpips_is_skipped_with_a_message_when_no_weights_are_found(mini_folder, tmp_path):
    Image.fromarray(pan_frames(1, 32, 40)[0]).save(tmp_path / "in.png")
    result = run(
        "launch/reconstruct.py", "--checkpoint", str(mini_folder), "--input", str(tmp_path / "in.png"),
        "--output", str(tmp_path / "out.png"), env={"TORCH_HOME": str(tmp_path / "empty_hub")},
    )  # fmt: skip
    assert "LPIPS skipped" in result.stderr and "--lpips-weights" in result.stderr
    metrics = printed_metrics(result.stdout)
    assert metrics["lpips"] is None and metrics["ssim"] is not None


def test_image_input_with_video_output_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "launch/reconstruct.py", "--checkpoint", str(tmp_path), "--input", "a.png", "--output", "b.mp4"],
        cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2 and "--output must be an image" in result.stderr


def test_segment_scores_equal_quality_metrics_on_the_whole_clip():
    torch.manual_seed(0)
    target = torch.rand(1, 3, 13, 24, 32) * 2 - 1
    recon = (target + 0.2 * torch.randn_like(target)).clamp(-1, 1)
    lpips = build_lpips(torch.device("cpu"), random_weights=True)
    score = ReconstructionScore(lpips)
    for start, end in ((0, 5), (5, 10), (10, 13)):
        score.add(recon[:, :, start:end], target[:, :, start:end])
    whole = {name: value.item() for name, value in QualityMetrics(lpips)(recon, target).items()}
    result = score.result()
    assert result["frames"] == 13
    for name in ("psnr", "ssim", "lpips", "l1"):
        assert result[name] == pytest.approx(whole[name], rel=1e-5), name


def test_reconstruct_clip_pads_and_crops_back():
    torch.manual_seed(0)
    config = AutoencoderConfig(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
    model = CausalVideoAutoencoder(config).eval()
    video = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    assert torch.equal(reconstruct_clip(model, video), model.reconstruct(video).clamp(-1, 1))
    # 7 frames of 13x21 -> padded to 9 frames of 16x24 by replication, then cropped back
    small = video[:, :, :7, :13, :21]
    padded = torch.nn.functional.pad(small, (0, 3, 0, 3, 0, 2), mode="replicate")
    want = model.reconstruct(padded).clamp(-1, 1)[:, :, :7, :13, :21]
    assert torch.equal(reconstruct_clip(model, small), want)


# ------------------------------------------------------------------------------------------- evaluate


@pytest.mark.distributed
def test_evaluate_one_and_two_ranks_agree(tiny_run, tmp_path):
    run_dir, demo = tiny_run
    common = [
        "launch/evaluate.py", "--checkpoint", str(run_dir), "--data", str(demo / "eval-000000.tar"),
        "--num-frames", "9", "--resolution", "32", "--max-clips", "3", "--batch-size", "1", "--lpips-random",
    ]  # fmt: skip
    single = run(*common, "--output", str(tmp_path / "one.json"))
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["clips"] == 3 and one["ranks"] == 1
    for name in ("psnr", "ssim", "lpips", "l1"):
        assert math.isfinite(one[name]) and name in single.stdout
    launcher = ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    run(*launcher, *common, "--output", str(tmp_path / "two.json"))
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["clips"] == 3 and two["ranks"] == 2  # 3 batches: rank 0 took two, rank 1 one
    for name in ("psnr", "ssim", "lpips", "l1"):
        assert two[name] == pytest.approx(one[name], rel=1e-6), name
