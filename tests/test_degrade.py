"""Restoration mode: the degradation chain, and the step comparing the output with the clean target."""

import math
from pathlib import Path

import pytest
import torch
from local_engine import LocalEngine

from data.degrade import Degradation, blur, degrade, gaussian_kernel
from losses import VideoAutoencoderLoss
from models import build_autoencoder, build_discriminator_set
from trainer.config import ConfigError, load_config
from trainer.step import AdversarialStep

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


def smooth_clip(size: int = 32, frames: int = 5) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    frame = torch.stack([0.6 * x, 0.6 * y, 0.3 * x * y])  # (3, H, W), smooth
    return frame[None, :, None].expand(2, 3, frames, size, size).contiguous()


def test_gaussian_kernel_and_blur_keep_constants():
    kernel = gaussian_kernel(1.5)
    assert kernel.numel() == 2 * math.ceil(4.5) + 1 and kernel.sum().item() == pytest.approx(1.0)
    assert torch.argmax(kernel).item() == kernel.numel() // 2
    constant = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(blur(constant, 1.5), constant)


def test_nothing_to_degrade_is_the_identity():
    clip = smooth_clip()
    nothing = Degradation(blur_sigma=0.0, scale=1, noise_std=0.0, jpeg_quality=None)
    assert torch.equal(degrade(clip, nothing), clip)


def test_downscaling_removes_detail_finer_than_the_scale_and_keeps_smooth_content():
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float() * 2 - 1  # 1 px period
    clip = checker[None, None, None].expand(1, 3, 1, 32, 32).contiguous()
    out = degrade(clip, Degradation(blur_sigma=1.0, scale=4))
    assert out.shape == clip.shape and out.dtype == clip.dtype
    assert out.std().item() < 0.05 * clip.std().item()  # the pattern is gone
    smooth = smooth_clip()
    assert (degrade(smooth, Degradation(blur_sigma=0.5, scale=2)) - smooth).abs().mean().item() < 0.02


def test_noise_is_seeded_and_jpeg_stays_in_range():
    clip = smooth_clip()
    noisy = Degradation(blur_sigma=0.0, scale=1, noise_std=0.1)
    a = degrade(clip, noisy, torch.Generator().manual_seed(3))
    b = degrade(clip, noisy, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert (a - clip).std().item() == pytest.approx(0.1, rel=0.1)
    compressed = degrade(clip, Degradation(blur_sigma=0.0, scale=1, jpeg_quality=90))
    assert compressed.min() >= -1 and compressed.max() <= 1
    assert 0 < (compressed - clip).abs().mean().item() < 0.03  # lossy, but close on smooth content


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": 0}, "scale must be"),
        ({"jpeg_quality": 100}, "jpeg_quality"),
        ({"blur_sigma": -1.0}, ">= 0"),
    ],
)
def test_bad_degradations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Degradation(**kwargs)


def test_restoration_config_is_checked_at_load():
    config = load_config(TINY, ["data.restoration.enabled=true", "data.restoration.scale=2"])
    assert config.data.restoration.degradation() == Degradation(scale=2)
    with pytest.raises(ConfigError, match=r"divisible by data\.restoration\.scale"):
        load_config(TINY, ["data.restoration.enabled=true", "data.restoration.scale=3"])


def test_generator_step_compares_the_output_with_the_clean_target():
    torch.manual_seed(0)
    autoencoder = build_autoencoder("tiny")
    discriminator = build_discriminator_set([{"type": "3d", "size": "tiny"}], gradient_checkpointing=False)
    loss = VideoAutoencoderLoss(perceptual_weight=0.0, disc_start=100)
    step = AdversarialStep(LocalEngine(autoencoder), LocalEngine(discriminator), loss, sample_posterior=False)
    clean = smooth_clip()
    degraded = degrade(clean, Degradation(scale=4))
    metrics, recon = step.generator_step(degraded, global_step=0, target=clean)
    with torch.no_grad():
        expected_recon = autoencoder(degraded, sample_posterior=False).recon
    torch.testing.assert_close(recon, expected_recon)  # the model saw the degraded clip
    assert metrics["rec"].item() == pytest.approx((recon - clean).abs().mean().item(), rel=1e-6)
    assert metrics["rec"].item() != pytest.approx((recon - degraded).abs().mean().item(), rel=1e-3)
