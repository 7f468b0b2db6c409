"""Restoration training: a degraded copy of each clip is the model's input, the clean clip its target.

`degrade` applies, per frame and in this order: a Gaussian blur, bicubic downsampling by `scale` and back
up to the original size, additive Gaussian noise, and JPEG compression (the classic super-resolution /
restoration degradation chain). It runs on whatever device the clip is on (the trainer applies it on the
accelerator, after loading), except the JPEG step, which round-trips through Pillow on the CPU.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange


@dataclass(frozen=True, kw_only=True, slots=True)
class Degradation:
    """blur_sigma in pixels (0: none); scale: down/up factor (1: none); noise_std in [-1, 1] units;
    jpeg_quality 1-95 (None: none)."""

    blur_sigma: float = 1.0
    scale: int = 4
    noise_std: float = 0.0
    jpeg_quality: int | None = None

    def __post_init__(self) -> None:
        if self.blur_sigma < 0 or self.noise_std < 0:
            raise ValueError(
                f"blur_sigma and noise_std must be >= 0, got {self.blur_sigma}, {self.noise_std}"
            )
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"scale must be an integer >= 1, got {self.scale!r}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in [1, 95] or None, got {self.jpeg_quality}")


def gaussian_kernel(sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1D Gaussian of radius ceil(3 sigma), float32."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def blur(frames: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) frames with reflected borders."""
    kernel = gaussian_kernel(sigma, frames.device)
    channels, radius = frames.shape[1], kernel.numel() // 2
    if min(frames.shape[-2:]) <= radius:
        raise ValueError(
            f"blur_sigma={sigma} needs frames larger than {radius} px, got {tuple(frames.shape[-2:])}"
        )
    h = F.pad(frames, (radius, radius, 0, 0), mode="reflect")
    h = F.conv2d(h, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    h = F.pad(h, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(h, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def jpeg(frames: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip of (N, 3, H, W) frames in [-1, 1] at `quality`, through Pillow on the CPU."""
    from PIL import Image

    pixels = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = rearrange(pixels, "n c h w -> n h w c").cpu().numpy()
    out = []
    for frame in pixels:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    decoded = torch.from_numpy(np.stack(out)).to(frames.device)
    return rearrange(decoded, "n h w c -> n c h w").float() / 127.5 - 1


@torch.no_grad()
def degrade(
    video: torch.Tensor, degradation: Degradation, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, C, T, H, W) clip in [-1, 1] -> its degraded copy, same shape and dtype, in [-1, 1]."""
    batch, _, _, height, width = video.shape
    if height % degradation.scale or width % degradation.scale:
        raise ValueError(
            f"frames {height}x{width} must be divisible by the degradation scale {degradation.scale}"
        )
    # (B, C, T, H, W) -> (B*T, C, H, W)
    frames = rearrange(video.float(), "b c t h w -> (b t) c h w")
    if degradation.blur_sigma > 0:
        frames = blur(frames, degradation.blur_sigma)
    if degradation.scale > 1:
        small = (height // degradation.scale, width // degradation.scale)
        frames = F.interpolate(frames, size=small, mode="bicubic", align_corners=False)
        frames = F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False)
    if degradation.noise_std > 0:
        noise = torch.randn(frames.shape, generator=generator, device=generator.device if generator else None)
        frames = frames + degradation.noise_std * noise.to(frames.device)
    frames = frames.clamp(-1, 1)
    if degradation.jpeg_quality is not None:
        frames = jpeg(frames, degradation.jpeg_quality)
    return rearrange(frames, "(b t) c h w -> b c t h w", b=batch).to(video.dtype)
