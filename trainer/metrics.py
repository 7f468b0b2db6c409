"""Metrics: accumulated locally every step, reduced across ranks on log steps, written by rank 0."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange


class MetricAccumulator:
    """Running sums of scalars since the last log step; `reduce` averages them over steps and ranks."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, values: dict[str, float | torch.Tensor]) -> None:
        for key, value in values.items():
            self._sums[key] += float(value)
            self._counts[key] += 1

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Means since the last call, averaged across ranks (every rank must call it on the same keys)."""
        keys = sorted(self._sums)
        packed = torch.tensor(
            [self._sums[k] for k in keys] + [float(self._counts[k]) for k in keys],
            dtype=torch.float64,
            device=device,
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        sums, counts = packed[: len(keys)], packed[len(keys) :]
        self._sums.clear()
        self._counts.clear()
        return {k: (s / c).item() for k, s, c in zip(keys, sums, counts, strict=True) if c > 0}


class MetricsLogger:
    """The no-op logger every rank but 0 uses."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def log_media(
        self, step: int, tag: str, input_video: torch.Tensor, recon_video: torch.Tensor, fps: int = 8
    ) -> None:
        """Show input and reconstruction side by side; videos (C, T, H, W) or (B, C, T, H, W) in [-1, 1]."""

    def close(self) -> None:
        pass


def side_by_side_frames(
    input_video: torch.Tensor, recon_video: torch.Tensor, max_width: int | None = 1024
) -> np.ndarray:
    """uint8 frames (T, H', W', 3) showing `input | recon`, one row per clip of a batch.

    Videos are (C, T, H, W) or (B, C, T, H, W) in [-1, 1] with 1 or 3 channels. When the grid is wider than
    `max_width`, each frame is shrunk (area) so it is not: a 768x1360 clip would make a 2720 px wide GIF.
    """
    if input_video.shape != recon_video.shape or input_video.ndim not in (4, 5):
        raise ValueError(
            "log_media wants input and reconstruction of the same shape, (C, T, H, W) or (B, C, T, H, W); "
            f"got {tuple(input_video.shape)} and {tuple(recon_video.shape)}"
        )
    if input_video.shape[-4] not in (1, 3):
        raise ValueError(f"log_media wants 1 or 3 channels; got shape {tuple(input_video.shape)}")
    # (V=2, B, C, T, H, W) -> (V*B*T, C, H, W): input and recon stacked, frames resized as images.
    both = torch.stack([input_video, recon_video]).detach().to("cpu", torch.float32)
    if both.ndim == 5:
        both = both.unsqueeze(1)
    videos, batch, _, frames, height, width = both.shape
    images = rearrange(both, "v b c t h w -> (v b t) c h w")
    if max_width is not None and videos * width > max_width:
        scale = max_width / (videos * width)
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
        images = F.interpolate(images, size=(height, width), mode="area")
    images = images.expand(-1, 3, -1, -1)  # grayscale -> RGB; a no-op for 3 channels
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    # (V*B*T, 3, H, W) -> (T, B*H, V*W, 3): clips as rows, input | recon as columns.
    grid = rearrange(pixels, "(v b t) c h w -> t (b h) (v w) c", v=videos, b=batch, t=frames)
    return grid.numpy()


def encode_gif(frames: np.ndarray, fps: int) -> bytes:
    """An endlessly looping animated GIF of uint8 frames (T, H, W, 3), written by Pillow."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    # Pillow merges consecutive identical frames into one longer frame; the timing stays right.
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=max(1, round(1000 / fps)),
        loop=0,
    )
    return buffer.getvalue()


class TensorBoardLogger(MetricsLogger):
    """Scalars to TensorBoard event files and, one JSON object per log step, to metrics.jsonl."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.jsonl = (run_dir / "metrics.jsonl").open("a")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def log_media(
        self,
        step: int,
        tag: str,
        input_video: torch.Tensor,
        recon_video: torch.Tensor,
        fps: int = 8,
        max_width: int | None = 1024,
        still_frames: int = 8,
    ) -> None:
        """An animated GIF at `{tag}/gif` (input | recon, clips as rows; TensorBoard's Images tab plays it)
        and a still strip at `{tag}/frames` of up to `still_frames` evenly spaced frames (input frames over
        recon frames, per clip). Rank 0 only; the forward that made `recon_video` ran on every rank."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        if fps < 1:
            raise ValueError(f"log_media: fps must be >= 1; got {fps}")
        frames = side_by_side_frames(input_video, recon_video, max_width)  # (T, H, W, 3) uint8
        # add_video would need moviepy (and breaks with moviepy 2): write the GIF image summary ourselves,
        # the way torch.utils.tensorboard.summary.image builds its PNG ones.
        num_frames, height, width, channels = frames.shape
        image = Summary.Image(
            height=height, width=width, colorspace=channels, encoded_image_string=encode_gif(frames, fps)
        )
        summary = Summary(value=[Summary.Value(tag=f"{tag}/gif", image=image)])
        self.writer._get_file_writer().add_summary(summary, global_step=step)
        if still_frames > 0:
            picks = np.unique(
                np.linspace(0, num_frames - 1, min(still_frames, num_frames)).round().astype(int)
            )
            batch = input_video.shape[0] if input_video.ndim == 5 else 1
            # (K, B*H, 2*W, 3) -> (B*2*H, K*W, 3): per clip a row of input frames over a row of recon frames.
            strip = rearrange(frames[picks], "k (b h) (v w) c -> (b v h) (k w) c", b=batch, v=2)
            self.writer.add_image(f"{tag}/frames", strip, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()
