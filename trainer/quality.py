"""Reconstruction quality of videos (B, C, T, H, W) in [-1, 1]: per-clip PSNR, SSIM, L1 and LPIPS, and an
accumulator that sums them over batches and ranks.

Free of trainer state, so `Trainer.evaluate`, `launch/reconstruct.py` and `launch/evaluate.py` share it:

    quality = QualityMetrics(lpips)          # lpips: a losses.lpips.LPIPS on the videos' device, or None
    totals = quality.accumulator(device)
    for recon, target in batches:
        totals.add(quality(recon, target))   # every value (B,): one per clip
    results = totals.reduce()                # collective: {"psnr": .., "ssim": .., "l1": .., "lpips": .., "clips": n}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# Wang et al. 2004: an 11x11 Gaussian window with sigma 1.5 (skimage's radius int(3.5 * 1.5 + 0.5) = 5).
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
MSE_FLOOR = 1e-10  # identical clips get a finite PSNR of 10 log10(4e10) ~ 106 dB instead of inf


def _check_videos(recon: Tensor, target: Tensor, what: str) -> None:
    if recon.shape != target.shape or recon.ndim != 5:
        raise ValueError(
            f"{what} wants two videos (B, C, T, H, W) of the same shape; got {tuple(recon.shape)} and "
            f"{tuple(target.shape)} (an image is a 1-frame video: unsqueeze(2))"
        )


def psnr(recon: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB per clip, shape (B,), fp32: 10 log10(2^2 / MSE) over all frames (peak-to-peak of [-1, 1] is 2)."""
    _check_videos(recon, target, "psnr")
    mse = (recon.float() - target.float()).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(4.0 / mse.clamp_min(MSE_FLOOR))


def l1(recon: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error per clip, shape (B,), fp32, in the units of [-1, 1]."""
    _check_videos(recon, target, "l1")
    return (recon.float() - target.float()).abs().flatten(1).mean(dim=1)


def _gaussian_window(device: torch.device) -> Tensor:
    """The normalised 1D taps of skimage's (scipy.ndimage's) Gaussian filter, fp64, shape (11,)."""
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return taps / taps.sum()


def _blur_valid(images: Tensor, taps: Tensor) -> Tensor:
    """Separable Gaussian blur of (N, K, H, W) per channel, 'valid' only: (N, K, H - 10, W - 10)."""
    channels = images.shape[1]
    rows = taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    cols = taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    return F.conv2d(F.conv2d(images, rows, groups=channels), cols, groups=channels)


def _per_frame(
    score: Callable[[Tensor, Tensor], Tensor], recon: Tensor, target: Tensor, frames_per_chunk: int
) -> Tensor:
    """score(x, y) -> (N,) applied to the frames (N, C, H, W) of each clip, `frames_per_chunk` frames at a
    time (no copy of the whole video), collected as (B, T)."""
    if frames_per_chunk < 1:
        raise ValueError(f"frames_per_chunk must be >= 1; got {frames_per_chunk}")
    per_clip = []
    for x_clip, y_clip in zip(recon, target, strict=True):
        chunks = [
            # (C, t, H, W) -> (t, C, H, W)
            score(rearrange(x, "c t h w -> t c h w"), rearrange(y, "c t h w -> t c h w"))
            for x, y in zip(
                x_clip.split(frames_per_chunk, dim=1), y_clip.split(frames_per_chunk, dim=1), strict=True
            )
        ]
        per_clip.append(torch.cat(chunks))
    return torch.stack(per_clip)  # (B, T)


def _ssim_frames(x: Tensor, y: Tensor) -> Tensor:
    """Mean SSIM of frames (N, C, H, W) in [-1, 1] over channels and valid pixels, (N,) fp64."""
    x = (x.double() + 1) / 2  # [-1, 1] -> [0, 1], scored with L = 1
    y = (y.double() + 1) / 2
    taps = _gaussian_window(x.device)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_x, mu_y = _blur_valid(x, taps), _blur_valid(y, taps)
    var_x = _blur_valid(x * x, taps) - mu_x * mu_x
    var_y = _blur_valid(y * y, taps) - mu_y * mu_y
    cov = _blur_valid(x * y, taps) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return ssim_map.mean(dim=(1, 2, 3))


def ssim(recon: Tensor, target: Tensor, frames_per_chunk: int = 16) -> Tensor:
    """Mean SSIM per clip, shape (B,), fp32: Wang et al. 2004 per frame and channel, averaged over channels,
    frames and the valid pixels (those at least 5 px from an edge).

    Videos in [-1, 1] are mapped to [0, 1] and scored with data range L = 1 (C1 = 0.01^2, C2 = 0.03^2),
    which equals SSIM on the uint8 frames with L = 255; SSIM's luminance term is not shift-invariant, so
    this is not the same as L = 2 on the raw [-1, 1] values. It matches skimage's
    `structural_similarity(a01, b01, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1, channel_axis=...)`. Computed in fp64 (E[x^2] - E[x]^2 cancels badly in fp32),
    `frames_per_chunk` frames at a time to bound memory.
    """
    _check_videos(recon, target, "ssim")
    height, width = recon.shape[-2:]
    if min(height, width) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"ssim needs frames of at least 11x11 pixels; got {height}x{width}")
    return _per_frame(_ssim_frames, recon, target, frames_per_chunk).mean(dim=1).float()


@torch.no_grad()
def lpips_per_clip(lpips: nn.Module, recon: Tensor, target: Tensor, frames_per_chunk: int = 16) -> Tensor:
    """LPIPS per clip averaged over its frames, shape (B,), fp32; `frames_per_chunk` frames per forward.

    `lpips` is a `losses.lpips.LPIPS` (3-channel frames of at least 16x16); frames move to its device.
    """
    _check_videos(recon, target, "lpips_per_clip")
    device = next(lpips.parameters()).device

    def score(x: Tensor, y: Tensor) -> Tensor:
        return lpips(x.to(device), y.to(device)).float()

    return _per_frame(score, recon, target, frames_per_chunk).mean(dim=1).to(recon.device)


class QualityMetrics:
    """Per-clip PSNR, SSIM, L1 and, given an LPIPS module, LPIPS of reconstructions against their targets."""

    def __init__(self, lpips: nn.Module | None = None, frames_per_chunk: int = 16) -> None:
        if frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be >= 1; got {frames_per_chunk}")
        self.lpips = lpips
        self.frames_per_chunk = frames_per_chunk

    @property
    def names(self) -> tuple[str, ...]:
        return ("psnr", "ssim", "l1") + (("lpips",) if self.lpips is not None else ())

    @torch.no_grad()
    def __call__(self, recon: Tensor, target: Tensor) -> dict[str, Tensor]:
        """{name: (B,) fp32 tensor} for two videos (B, C, T, H, W) in [-1, 1] (clamp recon first)."""
        values = {
            "psnr": psnr(recon, target),
            "ssim": ssim(recon, target, self.frames_per_chunk),
            "l1": l1(recon, target),
        }
        if self.lpips is not None:
            values["lpips"] = lpips_per_clip(self.lpips, recon, target, self.frames_per_chunk)
        return values

    def accumulator(self, device: torch.device | str | None = None) -> QualityAccumulator:
        """An empty accumulator for these metrics' names (see `QualityAccumulator` for `device`)."""
        return QualityAccumulator(self.names, device)


class QualityAccumulator:
    """Sums of per-clip values and the clip count over batches; `reduce` averages them over all ranks.

    The sums are fp64 on `device`, which defaults to the device of the first values added. A rank that
    may add nothing (fewer batches than ranks) must pass `device` (e.g. cuda under NCCL), since
    `reduce` is a collective that every rank calls with the same names.
    """

    def __init__(self, names: Sequence[str], device: torch.device | str | None = None) -> None:
        if not names or len(set(names)) != len(names) or "clips" in names:
            raise ValueError(
                f"QualityAccumulator wants distinct metric names other than 'clips'; got {names}"
            )
        self.names = tuple(names)
        self._device = torch.device(device) if device is not None else None
        self._totals: Tensor | None = None  # (len(names) + 1,): one sum per name, then the clip count

    def add(self, per_clip: Mapping[str, Tensor]) -> None:
        """Add one batch: `per_clip[name]` has one value per clip, shape (B,), for every name."""
        if set(per_clip) != set(self.names):
            raise ValueError(f"expected values for {sorted(self.names)}; got {sorted(per_clip)}")
        sizes = {name: per_clip[name].numel() for name in self.names}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"every metric needs one value per clip; got counts {sizes}")
        if self._totals is None:
            device = self._device or per_clip[self.names[0]].device
            self._totals = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=device)
        batch = torch.stack(
            [per_clip[name].detach().to(self._totals.device, torch.float64).sum() for name in self.names]
        )
        self._totals[:-1] += batch
        self._totals[-1] += sizes[self.names[0]]

    def reduce(self) -> dict[str, float]:
        """{name: mean over every clip of every rank, ..., "clips": total clips}; a collective when
        torch.distributed is initialised. With no clips anywhere it returns {"clips": 0}."""
        totals = self._totals
        if totals is None:
            totals = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=self._device or "cpu")
        totals = totals.clone()  # reduce leaves the local sums as they are, so it can be called again
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        values = totals.tolist()
        clips = round(values[-1])
        if clips == 0:
            return {"clips": 0}
        means = {name: total / clips for name, total in zip(self.names, values[:-1], strict=True)}
        return {**means, "clips": clips}
