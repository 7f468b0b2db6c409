"""Clip transforms: uint8 (T, H, W, C) frames -> float32 (C, T, H, W) model input in [-1, 1]."""

from __future__ import annotations

from random import Random

import torch
import torch.nn.functional as F
from einops import rearrange


def resize_shorter_side(video: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (T, H, W, C) frames so the shorter side is `size`, keeping the aspect ratio.

    Bilinear with antialiasing (so downscaling does not alias); the output has the input's dtype.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    _, height, width, _ = video.shape
    if min(height, width) == size:
        return video
    scale = size / min(height, width)
    # The shorter side lands exactly on `size`; the longer one rounds.
    new_hw = (
        (size, max(size, round(width * scale)))
        if height <= width
        else (max(size, round(height * scale)), size)
    )
    return resize(video, new_hw)


def resize(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (T, H, W, C) frames to `size` (height, width): bilinear with antialiasing, the input's dtype."""
    if tuple(video.shape[1:3]) == tuple(size):
        return video
    # (T, H, W, C) viewed as (T, C, H, W) is channels_last, the layout torch's CPU kernels want.
    frames = rearrange(video, "t h w c -> t c h w")
    if frames.dtype != torch.uint8 or frames.device.type != "cpu":
        frames = frames.float()
    # On CPU torch has a native uint8 antialiased bilinear kernel: about 10-50x faster than float
    # and equal to it within 1 grey level, so uint8 frames are resized without conversion.
    frames = F.interpolate(frames, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    if video.dtype == torch.uint8 and frames.dtype != torch.uint8:
        frames = frames.round_().clamp_(0, 255).to(torch.uint8)
    return rearrange(frames.to(video.dtype), "t c h w -> t h w c")


def crop_window(
    height: int, width: int, crop_h: int, crop_w: int, random: bool = False, rng: Random | None = None
) -> tuple[int, int]:
    """(top, left) of a `crop_h` x `crop_w` window in `height` x `width` frames: uniform from `rng` when
    `random` (two draws, top then left, even when one has a single choice), else centred."""
    if crop_h > height or crop_w > width:
        raise ValueError(f"cannot crop {crop_h}x{crop_w} from frames of {height}x{width}; resize first")
    if random:
        rng = rng or Random()
        return rng.randint(0, height - crop_h), rng.randint(0, width - crop_w)
    return (height - crop_h) // 2, (width - crop_w) // 2


def cover_window(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """The largest (h, w) window of `height` x `width` frames with the aspect ratio of `size` (rounded):
    resizing it to `size` is resizing the frames to cover `size` (shorter side first), then cropping."""
    target_h, target_w = size
    if width * target_h > height * target_w:  # the frames are wider than the target: full height
        return height, min(width, (2 * height * target_w + target_h) // (2 * target_h))
    return min(height, (2 * width * target_h + target_w) // (2 * target_w)), width


def crop(
    video: torch.Tensor, size: int | tuple[int, int], random: bool = False, rng: Random | None = None
) -> torch.Tensor:
    """Crop (T, H, W, C) frames to `size` (int: square, or (height, width)).

    `random=True` picks the window uniformly with `rng` (training); otherwise it is centred (eval).
    """
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    _, height, width, _ = video.shape
    top, left = crop_window(height, width, crop_h, crop_w, random=random, rng=rng)
    return video[:, top : top + crop_h, left : left + crop_w]


def to_model_range(video: torch.Tensor) -> torch.Tensor:
    """(T, H, W, C) frames with values in [0, 255] (uint8 or float) -> float32 (C, T, H, W) in [-1, 1]."""
    # One copy into the new layout, then in-place scaling.
    frames = rearrange(video, "t h w c -> c t h w").to(
        torch.float32, memory_format=torch.contiguous_format, copy=True
    )
    frames.mul_(2 / 255).sub_(1.0)
    return frames if video.dtype == torch.uint8 else frames.clamp_(-1.0, 1.0)


def uint8_to_model_range(video: torch.Tensor) -> torch.Tensor:
    """uint8 clips (..., C, T, H, W) -> float32 in [-1, 1] (on whatever device they are: the trainer does
    it on the accelerator, so DataLoader workers ship 4x fewer bytes and skip this pass)."""
    if video.dtype != torch.uint8:
        raise TypeError(f"expected uint8 clips, got {video.dtype}")
    return video.float().mul_(2 / 255).sub_(1.0)


def video_to_clip_tensor(
    frames_uint8: torch.Tensor,
    resolution: int,
    train: bool,
    rng: Random | None = None,
    *,
    uint8: bool = False,
) -> torch.Tensor:
    """uint8 (T, H, W, C) -> float32 (C, T, resolution, resolution) in [-1, 1]; with `uint8`, the same
    clip as uint8 (C, T, resolution, resolution) in [0, 255] (see `uint8_to_model_range`).

    Takes the largest square (random position when `train`, centred otherwise) and resizes it to
    `resolution`: the same picture as resizing the shorter side then cropping, but the resize only
    touches the pixels that are kept.
    """
    _, height, width, _ = frames_uint8.shape
    frames = crop(frames_uint8, min(height, width), random=train, rng=rng)
    frames = resize_shorter_side(frames, resolution)
    if uint8:
        return rearrange(frames, "t h w c -> c t h w").contiguous()
    return to_model_range(frames)
