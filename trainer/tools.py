"""What the inference tools (launch/reconstruct.py, launch/evaluate.py, launch/export.py) share: loading an
autoencoder from a run, a checkpoint or a diffusers folder, reading and writing videos (PyAV) and images,
reconstructing a video of any length and size, and scoring it.

Any length and size: a segment of T frames is padded to the next 4k+1 frames by repeating its last frame,
and its frames to multiples of the spatial compression (8) by replicating the edge pixels; the
reconstruction is cropped back, so the output has the input's frame count and size exactly.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from data.pipeline import build_dataloader, build_video_dataset
from data.transforms import to_model_range
from losses.lpips import LPIPS, LPIPS_HEADS_FILENAME, LPIPSWeightsUnavailable
from losses.vgg import VGG16_FILENAME
from models import CausalVideoAutoencoder
from models.convert import CONFIG_NAME, WEIGHTS_NAME, load_diffusers_folder
from trainer.export import load_checkpoint_autoencoder
from trainer.quality import MSE_FLOOR, SSIM_RADIUS, lpips_per_clip, ssim

log = logging.getLogger("trainer")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_FPS = Fraction(24)
LPIPS_MIN_SIZE = 16  # LPIPS' VGG trunk pools 4 times


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def load_autoencoder(path: str | Path, *, ema: bool = True) -> tuple[CausalVideoAutoencoder, str]:
    """(autoencoder in eval mode, fp32 on the CPU, a description of its weights) from a diffusers folder
    (config.json + safetensors), a run directory (its latest checkpoint), its checkpoints/ folder, or one
    checkpoint folder; a checkpoint gives its EMA weights when it has them and `ema`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        return load_diffusers_folder(path).eval(), f"diffusers folder {path}"
    weights = load_checkpoint_autoencoder(path, ema=ema)
    return weights.build(), f"{weights.source} weights of {weights.folder}"


def build_lpips(
    device: torch.device,
    *,
    enabled: bool = True,
    weights_path: str | None = None,
    random_weights: bool = False,
) -> LPIPS | None:
    """LPIPS from `weights_path` or the torch hub cache (never a download), seeded random weights when
    asked (tests only), or None when disabled or when the hub cache has no weights (with a warning)."""
    if not enabled:
        return None
    if random_weights:
        with torch.random.fork_rng(devices=[]):  # the same weights in every process and run
            torch.manual_seed(0)
            return LPIPS(pretrained=False).to(device)
    if weights_path is not None:  # given explicitly: a missing or wrong file is an error, not a skip
        return LPIPS(weights_path=weights_path, download=False).to(device)
    try:
        return LPIPS(download=False).to(device)
    except LPIPSWeightsUnavailable:
        log.warning(
            "LPIPS skipped: no pretrained weights in the torch hub cache (%s/checkpoints/%s and %s). Give "
            "--lpips-weights FILE (see losses.lpips.bake_lpips_weights) or put them there; --no-lpips "
            "hides this.",
            torch.hub.get_dir(),
            VGG16_FILENAME,
            LPIPS_HEADS_FILENAME,
        )
        return None


def add_lpips_arguments(parser: argparse.ArgumentParser) -> None:
    """--lpips-weights FILE | --no-lpips | --lpips-random, read back by `lpips_from_args`."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--lpips-weights", default=None, help="LPIPS weights file (else the torch hub cache)")
    group.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    group.add_argument(
        "--lpips-random", action="store_true", help="LPIPS with random weights: for testing only"
    )


def lpips_from_args(args: argparse.Namespace, device: torch.device) -> LPIPS | None:
    """`build_lpips` as the `add_lpips_arguments` options ask."""
    return build_lpips(
        device, enabled=not args.no_lpips, weights_path=args.lpips_weights, random_weights=args.lpips_random
    )


# ---------------------------------------------------------------------------------------------- media I/O


def video_fps(path: str | Path) -> Fraction:
    """The video's average frame rate (DEFAULT_FPS when the container does not say)."""
    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate else DEFAULT_FPS


def iter_video(path: str | Path, segment_frames: int | None = None) -> Iterator[Tensor]:
    """The video's frames as uint8 (T, H, W, C) RGB tensors of `segment_frames` frames (the last one
    shorter), or all frames in one tensor when `segment_frames` is None."""
    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        pending: list[np.ndarray] = []
        for frame in container.decode(stream):
            pending.append(frame.to_ndarray(format="rgb24"))
            if segment_frames is not None and len(pending) == segment_frames:
                yield torch.from_numpy(np.stack(pending))
                pending = []
        if pending:
            yield torch.from_numpy(np.stack(pending))


def read_video(path: str | Path) -> tuple[Tensor, Fraction]:
    """(all frames as uint8 (T, H, W, C) RGB, frame rate)."""
    segments = list(iter_video(path))
    if not segments:
        raise ValueError(f"{path} has no video frames")
    return segments[0], video_fps(path)


def _video_stream(container: av.container.InputContainer, path: str | Path) -> av.VideoStream:
    if not container.streams.video:
        raise ValueError(f"{path} has no video stream")
    return container.streams.video[0]


def read_image(path: str | Path) -> Tensor:
    """An image as a 1-frame uint8 (1, H, W, C) RGB video (alpha dropped, grey expanded)."""
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy())[None]


def write_image(path: str | Path, frame: Tensor) -> None:
    """uint8 (H, W, C) RGB -> an image file (format from the suffix; png for lossless output)."""
    from PIL import Image

    Image.fromarray(frame.numpy()).save(path)


class VideoWriter:
    """H.264 (libx264) writer of uint8 (T, H, W, C) RGB frames.

    yuv420p (what every player decodes) needs even sizes; a frame with an odd width or height is written
    as yuv444p instead, which keeps the exact size and colours but plays only in full decoders (ffmpeg,
    VLC, mpv), not in browsers or QuickTime.
    """

    def __init__(self, path: str | Path, fps: Fraction | float, crf: int = 18) -> None:
        self.path = Path(path)
        self.fps = Fraction(fps).limit_denominator(1001 * 1000)
        self.crf = crf
        self._container: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None

    def write(self, frames: Tensor) -> None:
        if self._container is None:
            _, height, width, _ = frames.shape
            self.pixel_format = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
            if self.pixel_format != "yuv420p":
                log.warning(
                    "%dx%d (WxH) has an odd side: writing yuv444p H.264 to keep the size (yuv420p needs "
                    "even sizes; browsers and QuickTime do not play yuv444p, ffmpeg/VLC/mpv do)",
                    width,
                    height,
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), mode="w")
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width, self._stream.height = width, height
            self._stream.pix_fmt = self.pixel_format
            self._stream.options = {"crf": str(self.crf)}
        for frame in frames.numpy():
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))

    def close(self) -> None:
        if self._container is not None:
            self._container.mux(self._stream.encode())  # flush the encoder's delayed frames
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ reconstruction


def to_uint8(video: Tensor) -> Tensor:
    """(C, T, H, W) in [-1, 1] -> uint8 (T, H, W, C) on the CPU (the inverse of data.transforms.to_model_range)."""
    frames = ((video.float().cpu() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return rearrange(frames, "c t h w -> t h w c").contiguous()


@torch.no_grad()
def reconstruct_clip(
    model: CausalVideoAutoencoder,
    video: Tensor,
    *,
    tile_size: tuple[int, int] | None = None,
    tile_overlap: tuple[int, int] = (64, 64),
) -> Tensor:
    """Reconstruction of (B, C, T, H, W) in [-1, 1] with any T >= 1, H, W: padded to 4k+1 frames
    (the last frame repeated) and to multiples of the spatial compression (edges replicated), encoded
    to the posterior mode and decoded (tiled when `tile_size` is given), cropped back, clamped to [-1, 1],
    fp32. The input should be on the model's device; it is cast to the model's dtype."""
    frames, height, width = video.shape[-3:]
    rt, s = model.temporal_compression, model.spatial_compression
    pad_t, pad_h, pad_w = (-(frames - 1)) % rt, (-height) % s, (-width) % s
    dtype = next(model.parameters()).dtype
    x = video.to(dtype)
    if pad_t or pad_h or pad_w:
        # replicate pads the last three dims (T, H, W): the last frame repeats, edge pixels extend
        x = F.pad(x, (0, pad_w, 0, pad_h, 0, pad_t), mode="replicate")
    if tile_size is None:
        recon = model.reconstruct(x)
    else:
        recon = model.reconstruct(x, tiled=True, tile_size=tile_size, tile_overlap=tile_overlap)
    return recon[:, :, :frames, :height, :width].float().clamp_(-1.0, 1.0)


class ReconstructionScore:
    """PSNR, SSIM, LPIPS and L1 of one video accumulated over its segments; equal to `QualityMetrics` on
    the whole video (PSNR from the MSE over all frames; SSIM, LPIPS per frame, averaged over frames)."""

    def __init__(self, lpips: nn.Module | None = None) -> None:
        self.lpips = lpips
        self.squared_error = self.absolute_error = self.values = 0.0
        self.ssim_sum = self.lpips_sum = 0.0
        self.frames = 0
        self.has_ssim = self.has_lpips = True

    @torch.no_grad()
    def add(self, recon: Tensor, target: Tensor) -> None:
        """One segment: two (B, C, T, H, W) videos in [-1, 1]."""
        difference = recon.float() - target.float()
        self.squared_error += difference.double().square().sum().item()
        self.absolute_error += difference.double().abs().sum().item()
        self.values += difference.numel()
        frames = target.shape[0] * target.shape[2]
        self.frames += frames
        # the per-clip SSIM and LPIPS are means over the segment's frames: weigh them by its frame count
        size = min(target.shape[-2:])
        self.has_ssim = self.has_ssim and size >= 2 * SSIM_RADIUS + 1
        if self.has_ssim:
            self.ssim_sum += ssim(recon, target).double().mean().item() * frames
        self.has_lpips = self.has_lpips and self.lpips is not None and size >= LPIPS_MIN_SIZE
        if self.has_lpips:
            self.lpips_sum += lpips_per_clip(self.lpips, recon, target).double().mean().item() * frames

    def result(self) -> dict[str, float]:
        """{"psnr", "ssim", "lpips", "l1", "frames"} (ssim/lpips left out when not computed)."""
        if not self.frames:
            raise ValueError("no frames scored")
        mse = self.squared_error / self.values
        result = {"psnr": 10 * math.log10(4.0 / max(mse, MSE_FLOOR))}
        if self.has_ssim:
            result["ssim"] = self.ssim_sum / self.frames
        if self.has_lpips:
            result["lpips"] = self.lpips_sum / self.frames
        return {**result, "l1": self.absolute_error / self.values, "frames": self.frames}


def frames_to_clip(frames: Tensor, device: torch.device) -> Tensor:
    """uint8 (T, H, W, C) -> float32 (1, C, T, H, W) in [-1, 1] on `device`."""
    return to_model_range(frames.to(device))[None]


def parse_size(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '240x360' -> (240, 360) (height x width)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"expected a size like 256 or 240x360 (height x width), got {text!r}")
    values = [int(part) for part in parts]
    return (values[0], values[-1])


# ------------------------------------------------------------------------------------------------- data


def evaluation_batches(
    shards: str,
    *,
    num_frames: int,
    resolution: int,
    batch_size: int,
    max_clips: int | None = None,
    num_workers: int = 0,
) -> Iterator[Tensor]:
    """(B, C, T, H, W) float32 batches in [-1, 1] of one pass over `shards` in order (clips from the
    first frame, centre crops), the first `max_clips` clips in all; the same batches in every process
    (the data is not split by rank)."""
    if max_clips is not None and max_clips < 1:
        raise ValueError(f"max_clips must be >= 1, got {max_clips}")
    dataset = build_video_dataset(
        shards,
        num_frames=num_frames,
        resolution=resolution,
        train=False,
        rank=0,
        world_size=1,
        batch_size=batch_size,
        drop_last=False,
    )
    loader = build_dataloader(dataset, batch_size=None, num_workers=num_workers)
    return _first_clips(loader, max_clips)  # built here, so bad shards or settings raise here


def _first_clips(loader: Iterable[dict], max_clips: int | None) -> Iterator[Tensor]:
    seen = 0
    for batch in loader:
        video = batch["video"]
        if max_clips is not None:
            video = video[: max_clips - seen]
        seen += video.shape[0]
        yield video
        if max_clips is not None and seen >= max_clips:
            return
