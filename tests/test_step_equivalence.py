"""The project's training step against the plain one that bench/step.py times as its reference.

Optimised: trainer/step.py's `AdversarialStep` (losses on a detached copy of the reconstruction, the
adaptive weight from the last conv's captured input, one surrogate backward) over our autoencoder (with
models/layers.py's speed-ups), through engine stand-ins that record the gradients. Plain:
`bench.step.ReferenceStep`, the loop bench/step.py times as its reference (textbook `torch.autograd.grad`
of both losses w.r.t. the decoder's last weight, one backward of the total). Tiny preset, fp32, posterior
mode, LPIPS on every frame (nothing random), disc_start 0. Two comparisons, tolerances relative to each
tensor's largest entry, measured on this CPU:

- step logic: the optimised step vs the plain step on our own model: losses, adaptive weight and recon
  equal (0 difference), every gradient within 4.3e-6; asserted at 1e-5.
- model: the plain step on our model vs on diffusers' AutoencoderKLCogVideoX with the same weights: losses
  within 2.6e-5 (the adaptive weight, a ratio of gradient norms), gradients within 4.4e-4; asserted at
  1e-4 and 1e-3. The gradients of this tiny model are ill-conditioned: diffusers' own move by 1.7e-4 when
  only its conv kernels change (oneDNN off), and ours run other kernels at the low-resolution levels.
"""

import copy
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKLCogVideoX
from local_engine import RecordingEngine, relative_error

from bench.step import ReferenceStep
from losses import LPIPS, VideoAutoencoderLoss
from models import build_autoencoder, build_discriminator
from models.convert import diffusers_config
from trainer.step import AdversarialStep

STEP_LOSS_TOLERANCE, STEP_GRAD_TOLERANCE = 1e-5, 1e-5
MODEL_LOSS_TOLERANCE, MODEL_GRAD_TOLERANCE = 1e-4, 1e-3


class DiffusersInterface(torch.nn.Module):
    """Our autoencoder behind diffusers' `encode(x).latent_dist` / `decode(z).sample`, so that the plain
    step runs on it unchanged."""

    def __init__(self, autoencoder: torch.nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latent_dist=self.autoencoder.encode(x))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.autoencoder.decode(z))


def plain_step(vae, last_layer, discriminator, lpips, loss, video) -> dict:
    """One plain generator and discriminator backward; the losses and the gradients (names without a wrapper
    prefix)."""
    plain = ReferenceStep(
        vae,
        discriminator,
        lpips,
        last_layer,
        perceptual_weight=loss.perceptual_weight,
        perceptual_frames=0,
        kl_weight=loss.kl_weight,
        adversarial_weight=loss.adversarial_loss_weight,
        adaptive_eps=loss.adaptive_weight_eps,
        adaptive_max=loss.adaptive_weight_max,
        sample_posterior=False,
    )
    recon, metrics = plain.generator_backward(video)
    g_grads = {n.removeprefix("autoencoder."): p.grad.clone() for n, p in vae.named_parameters()}
    metrics["d_loss"] = plain.discriminator_backward(video, recon)
    metrics["recon"] = recon
    d_grads = {n: p.grad.clone() for n, p in discriminator.named_parameters()}
    return {"metrics": metrics, "g_grads": g_grads, "d_grads": d_grads}


def assert_same(actual: dict, expected: dict, loss_tolerance: float, grad_tolerance: float) -> None:
    for name in ("recon", "nll", "kl", "g_loss", "d_weight", "total", "d_loss"):
        error = relative_error(actual["metrics"][name], expected["metrics"][name])
        assert error < loss_tolerance, (name, error)
    for kind in ("g_grads", "d_grads"):
        assert set(actual[kind]) == set(expected[kind])
        for name, grad in expected[kind].items():
            error = relative_error(actual[kind][name], grad)
            assert error < grad_tolerance, (name, error)


def test_optimised_step_matches_the_plain_step():
    torch.manual_seed(0)
    autoencoder = build_autoencoder("tiny").train()
    with torch.no_grad():  # non-trivial norm affines, so the comparison covers them
        for name, param in autoencoder.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    discriminator = build_discriminator("tiny").train()
    lpips = LPIPS(pretrained=False)
    loss = VideoAutoencoderLoss(
        disc_start=0, perceptual_weight=1.0, adversarial_loss_weight=0.1, lpips=lpips, perceptual_frames=0
    )
    vae = AutoencoderKLCogVideoX.from_config(diffusers_config(autoencoder.config)).train()
    vae.load_state_dict(autoencoder.state_dict(), strict=True)
    ours_plain = copy.deepcopy(autoencoder)
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1

    # the plain step on diffusers' model and on ours, each with its own copy of the discriminator
    diffusers_run = plain_step(
        vae, vae.decoder.conv_out.conv.weight, copy.deepcopy(discriminator), lpips, loss, video
    )
    plain_run = plain_step(
        DiffusersInterface(ours_plain),
        ours_plain.last_layer.weight,
        copy.deepcopy(discriminator),
        lpips,
        loss,
        video,
    )

    # the optimised step on our model
    g_engine, d_engine = RecordingEngine(autoencoder), RecordingEngine(discriminator)
    step = AdversarialStep(g_engine, d_engine, loss, sample_posterior=False)
    metrics, recon = step.generator_step(video, global_step=0)
    d_metrics = step.discriminator_step(video, recon, global_step=0)
    optimised_run = {
        "metrics": {
            "recon": recon,
            "nll": metrics["nll"],
            "kl": metrics["kl"],
            "g_loss": metrics["generator_adversarial"],
            # logged: adaptive weight x adversarial_loss_weight, the weight the adversarial term gets
            "d_weight": metrics["adaptive_weight"] / loss.adversarial_loss_weight,
            "total": metrics["total"],
            "d_loss": d_metrics["discriminator"],
        },
        "g_grads": g_engine.grads,
        "d_grads": d_engine.grads,
    }

    assert_same(optimised_run, plain_run, STEP_LOSS_TOLERANCE, STEP_GRAD_TOLERANCE)
    assert_same(plain_run, diffusers_run, MODEL_LOSS_TOLERANCE, MODEL_GRAD_TOLERANCE)
