"""Reconstruction quality: PSNR by hand, SSIM against scikit-image on photographs, LPIPS per clip, and the
accumulator's reduction over batches and over two real gloo ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data, img_as_float
from skimage.filters import gaussian
from skimage.metrics import structural_similarity

from distributed_utils import run_ranks
from losses.lpips import LPIPS
from trainer.quality import QualityAccumulator, QualityMetrics, l1, lpips_per_clip, psnr, ssim


def video_from_hwc(frames: list[np.ndarray]) -> torch.Tensor:
    """Frames (H, W, C) in [0, 1] -> one clip (1, C, T, H, W) in [-1, 1], fp64."""
    stacked = torch.from_numpy(np.stack(frames)).double()  # (T, H, W, C)
    return (stacked.permute(3, 0, 1, 2).unsqueeze(0) * 2 - 1).contiguous()


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two [0, 1] images (H, W, C) the way trainer.quality.ssim defines it."""
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1
    )


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Three real RGB photographs as fp64 [0, 1] crops (H, W, 3) of one size."""
    return [
        img_as_float(image)[40:136, 60:188] for image in (data.astronaut(), data.coffee(), data.chelsea())
    ]


def distort(image: np.ndarray, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "noise":
        out = image + rng.normal(0, 0.08, image.shape)
    elif kind == "blur":
        out = gaussian(image, sigma=1.2, channel_axis=-1)
    elif kind == "blur+noise":
        out = gaussian(image, sigma=0.8, channel_axis=-1) + rng.normal(0, 0.03, image.shape)
    elif kind == "darker":
        out = 0.7 * image + 0.05
    else:
        raise AssertionError(kind)
    return np.clip(out, 0, 1)


# --- PSNR and L1 ---------------------------------------------------------------------------------------


def test_psnr_exact_values_per_clip():
    target = torch.zeros(4, 3, 5, 8, 8)
    recon = target.clone()
    recon[0] += 0.2  # MSE 0.04 -> 10 log10(4 / 0.04) = 20 dB
    recon[1] += 2.0  # MSE 4 -> 0 dB
    recon[2, :, :, :4] = 1.0  # half the pixels off by 1: MSE 0.5 -> 10 log10(8)
    # recon[3] identical: MSE floored at 1e-10 -> 10 log10(4e10), finite
    expected = torch.tensor([20.0, 0.0, 10 * math.log10(8.0), 10 * math.log10(4e10)])
    torch.testing.assert_close(psnr(recon, target), expected, rtol=0, atol=1e-4)
    assert psnr(recon, target).dtype == torch.float32
    # Each clip is scored on its own frames only.
    torch.testing.assert_close(psnr(recon[2:3], target[2:3]), expected[2:3], rtol=0, atol=1e-4)


def test_psnr_is_over_all_frames_of_a_clip():
    target = torch.zeros(1, 1, 4, 6, 6)
    recon = target.clone()
    recon[:, :, 0] = 1.0  # one frame of four off by 1: MSE 0.25 -> 10 log10(16)
    torch.testing.assert_close(psnr(recon, target), torch.tensor([10 * math.log10(16.0)]))


def test_l1_per_clip():
    target = torch.zeros(2, 3, 2, 4, 4)
    recon = torch.stack([torch.full((3, 2, 4, 4), -0.5), torch.full((3, 2, 4, 4), 0.25)])
    torch.testing.assert_close(l1(recon, target), torch.tensor([0.5, 0.25]))


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.zeros(1, 3, 1, 16, 16), torch.zeros(1, 3, 2, 16, 16))
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.zeros(1, 3, 1, 10, 16), torch.zeros(1, 3, 1, 10, 16))


# --- SSIM against scikit-image ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["noise", "blur", "blur+noise", "darker"])
def test_ssim_matches_skimage_on_photographs(photos, kind):
    distorted = [distort(photo, kind, seed) for seed, photo in enumerate(photos)]
    ours = ssim(video_from_hwc(distorted), video_from_hwc(photos))
    # A clip's SSIM is the mean of its frames' SSIM, each the mean over channels and valid pixels.
    expected = np.mean([skimage_ssim(d, p) for d, p in zip(distorted, photos, strict=True)])
    assert ours.shape == (1,) and ours.dtype == torch.float32
    assert abs(ours.item() - expected) < 1e-6, (ours.item(), expected)


def test_ssim_per_clip_in_a_batch_matches_skimage(photos):
    kinds = ["noise", "blur", "darker"]
    clips = [[distort(p, kind, i) for i, p in enumerate(photos)] for kind in kinds]
    recon = torch.cat([video_from_hwc(clip) for clip in clips])  # (3, 3, 3, H, W)
    target = video_from_hwc(photos).expand_as(recon)
    expected = [np.mean([skimage_ssim(d, p) for d, p in zip(clip, photos, strict=True)]) for clip in clips]
    ours = ssim(recon, target)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-6)
    # Chunking frames only bounds memory; fp32 inputs give the same values (computed in fp64 inside).
    np.testing.assert_allclose(ssim(recon, target, frames_per_chunk=1).numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ssim(recon.float(), target.float()).numpy(), expected, rtol=0, atol=1e-6)


def test_ssim_grayscale_and_uint8_equivalence():
    photo = data.camera()[100:180, 150:250]  # uint8 grayscale
    rng = np.random.default_rng(3)
    noisy = np.clip(photo.astype(np.int16) + rng.integers(-20, 21, photo.shape), 0, 255).astype(np.uint8)
    # Defined on [0, 1] with L = 1, which equals skimage on the uint8 frames with L = 255.
    expected = structural_similarity(
        noisy, photo, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )

    def to_video(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(image).double().div(255).mul(2).sub(1).view(1, 1, 1, *image.shape)

    assert abs(ssim(to_video(noisy), to_video(photo)).item() - expected) < 1e-6


def test_ssim_identical_is_one_and_symmetric(photos):
    video = video_from_hwc(photos)
    torch.testing.assert_close(ssim(video, video), torch.ones(1))
    other = video_from_hwc([distort(p, "noise", 7) for p in photos])
    torch.testing.assert_close(ssim(video, other), ssim(other, video))


# --- LPIPS per clip ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(pretrained=False)


def test_lpips_per_clip_is_the_frame_mean(lpips):
    torch.manual_seed(1)
    target = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    recon = (target + 0.3 * torch.randn_like(target)).clamp(-1, 1)
    per_clip = lpips_per_clip(lpips, recon, target, frames_per_chunk=3)
    assert per_clip.shape == (2,) and per_clip.dtype == torch.float32
    assert (per_clip > 0).all()
    frames = torch.stack([lpips(recon[:, :, t], target[:, :, t]) for t in range(5)], dim=1)  # (B, T)
    torch.testing.assert_close(per_clip, frames.mean(dim=1))
    torch.testing.assert_close(lpips_per_clip(lpips, recon, target, frames_per_chunk=100), per_clip)
    assert lpips_per_clip(lpips, target, target).abs().max() < 1e-6


def test_quality_metrics_names_and_values(lpips):
    torch.manual_seed(2)
    target = torch.rand(3, 3, 2, 32, 32) * 2 - 1
    recon = target.clone()
    recon[1:] = (recon[1:] + 0.2 * torch.randn_like(recon[1:])).clamp(-1, 1)  # clip 0 stays identical
    values = QualityMetrics(lpips, frames_per_chunk=4)(recon, target)
    assert set(values) == {"psnr", "ssim", "l1", "lpips"}
    assert all(v.shape == (3,) for v in values.values())
    assert values["lpips"][0].abs() < 1e-6 and (values["lpips"][1:] > 0).all()
    torch.testing.assert_close(values["ssim"][0], torch.tensor(1.0))
    assert (values["ssim"][1:] < 1).all() and values["l1"][0] == 0 and (values["l1"][1:] > 0).all()
    assert QualityMetrics().names == ("psnr", "ssim", "l1")
    assert set(QualityMetrics()(recon, target)) == {"psnr", "ssim", "l1"}


# --- the accumulator ----------------------------------------------------------------------------------------


def test_accumulator_means_over_batches():
    totals = QualityAccumulator(["psnr", "ssim"])
    totals.add({"psnr": torch.tensor([10.0, 20.0]), "ssim": torch.tensor([0.5, 0.7])})
    totals.add({"psnr": torch.tensor([30.0]), "ssim": torch.tensor([0.9])})
    result = totals.reduce()
    assert result == pytest.approx({"psnr": 20.0, "ssim": 0.7, "clips": 3})
    assert isinstance(result["clips"], int)
    assert totals.reduce() == result  # reduce does not consume the sums


def test_accumulator_empty_and_errors():
    assert QualityAccumulator(["psnr"]).reduce() == {"clips": 0}
    totals = QualityAccumulator(["psnr", "ssim"])
    with pytest.raises(ValueError, match="expected values"):
        totals.add({"psnr": torch.ones(2)})
    with pytest.raises(ValueError, match="one value per clip"):
        totals.add({"psnr": torch.ones(2), "ssim": torch.ones(3)})
    with pytest.raises(ValueError, match="distinct"):
        QualityAccumulator(["psnr", "clips"])


def _reduce_rank(rank: int, world_size: int) -> tuple[dict[str, float], dict[str, float]]:
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    quality = QualityMetrics()
    # Uneven shares: rank 0 scores 3 clips in two batches, rank 1 one clip.
    torch.manual_seed(0)
    target = torch.rand(4, 3, 2, 16, 16) * 2 - 1
    recon = (target + 0.1 * torch.randn_like(target)).clamp(-1, 1)
    totals = quality.accumulator()
    batches = [slice(0, 2), slice(2, 3)] if rank == 0 else [slice(3, 4)]
    for batch in batches:
        totals.add(quality(recon[batch], target[batch]))
    # Rank 1 scores nothing here (fewer batches than ranks): it still joins the collective.
    lonely = quality.accumulator(device="cpu")
    if rank == 0:
        lonely.add(quality(recon[:1], target[:1]))
    return totals.reduce(), lonely.reduce()


@pytest.mark.distributed
def test_accumulator_reduces_over_two_gloo_ranks(tmp_path):
    results = run_ranks(_reduce_rank, tmp_path, world_size=2)
    torch.manual_seed(0)
    target = torch.rand(4, 3, 2, 16, 16) * 2 - 1
    recon = (target + 0.1 * torch.randn_like(target)).clamp(-1, 1)
    everything = QualityMetrics()(recon, target)
    expected = {name: values.double().mean().item() for name, values in everything.items()}
    first = {name: values[0].item() for name, values in everything.items()}
    for totals, lonely in results:
        assert totals == pytest.approx({**expected, "clips": 4}, rel=1e-6)
        assert lonely == pytest.approx({**first, "clips": 1}, rel=1e-6)
    assert results[0] == results[1]
