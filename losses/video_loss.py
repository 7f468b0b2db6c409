"""The composed video loss: reconstruction, LPIPS on sampled frames, KL, and hinge adversarial terms.

The trainer composes these pieces itself (it needs the reconstruction and adversarial losses apart to
compute the adaptive weight, see losses/adaptive.py); nothing here knows about DeepSpeed.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class VideoLoss(nn.Module):
    """Loss terms of the perceptual-adversarial objective for (B, C, T, H, W) clips in [-1, 1]."""

    def __init__(
        self,
        *,
        rec_loss: Literal["l1", "mse"] = "l1",
        perceptual_weight: float = 1.0,
        perceptual_frames: int = 1,
        kl_weight: float = 1e-6,
        quantizer_aux_loss_weight: float = 1.0,
        adversarial_weight: float = 0.1,
        disc_start: int = 0,
        lpips: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if rec_loss not in ("l1", "mse"):
            raise ValueError(f"rec_loss must be 'l1' or 'mse', got {rec_loss!r}")
        if perceptual_weight > 0 and lpips is None:
            raise ValueError(
                "perceptual_weight > 0 needs an LPIPS module; pass lpips=LPIPS(...) or set it to 0"
            )
        self.rec_loss = rec_loss
        self.perceptual_weight = perceptual_weight
        self.perceptual_frames = perceptual_frames
        self.kl_weight = kl_weight
        self.quantizer_aux_loss_weight = quantizer_aux_loss_weight
        self.adversarial_weight = adversarial_weight
        self.disc_start = disc_start
        self.lpips = lpips

    def adversarial_active(self, global_step: int) -> bool:
        """The adversarial terms (generator and discriminator) count from `disc_start` on, not before."""
        return self.adversarial_weight > 0 and global_step >= self.disc_start

    def reconstruction_loss(self, inputs: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Pixel L1 or MSE, mean over every element."""
        if self.rec_loss == "l1":
            return (inputs - recon).abs().mean()
        return F.mse_loss(recon, inputs)

    def perceptual_loss(self, inputs: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """LPIPS on `perceptual_frames` distinct random frames of each clip (all frames when 0)."""
        if self.perceptual_weight == 0 or self.lpips is None:
            return recon.new_zeros(())
        batch, _, frames = inputs.shape[:3]
        k = frames if self.perceptual_frames == 0 else min(self.perceptual_frames, frames)
        picked = torch.rand(batch, frames, device=inputs.device).argsort(dim=1)[:, :k]  # (B, k)
        index = picked[:, None, :, None, None].expand(-1, inputs.shape[1], -1, *inputs.shape[3:])
        # (B, C, T, H, W) -> (B, C, k, H, W) -> (B*k, C, H, W)
        real = rearrange(inputs.gather(2, index), "b c t h w -> (b t) c h w")
        fake = rearrange(recon.gather(2, index), "b c t h w -> (b t) c h w")
        return self.lpips(real, fake).mean()

    def nll_loss(
        self, inputs: torch.Tensor, recon: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction + weighted perceptual loss: the term the adaptive weight balances against."""
        rec = self.reconstruction_loss(inputs, recon)
        perceptual = self.perceptual_loss(inputs, recon)
        return rec + self.perceptual_weight * perceptual, {
            "rec": rec.detach(),
            "perceptual": perceptual.detach(),
        }

    @staticmethod
    def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mean, exp(logvar)) || N(0, 1)), summed over latent elements, averaged over the batch."""
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
        return kl.flatten(1).sum(dim=1).mean()

    @staticmethod
    def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
        """Hinge generator loss: -E[D(G(x))]."""
        return -logits_fake.mean()

    @staticmethod
    def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """Hinge discriminator loss: (E[relu(1 - D(x))] + E[relu(1 + D(G(x)))]) / 2."""
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
