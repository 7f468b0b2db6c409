"""Building the loss from its config section (the models come from models.build_* presets)."""

from __future__ import annotations

from losses import LPIPS, VideoLoss
from trainer.config import LossConfig


def build_loss(config: LossConfig) -> VideoLoss:
    """The video loss with its LPIPS network (only loaded when the perceptual term is on)."""
    lpips = None
    if config.perceptual_weight > 0:
        lpips = LPIPS(
            pretrained=config.lpips.pretrained,
            weights_path=config.lpips.weights_path,
            backbone_weights_path=config.lpips.backbone_weights_path,
            download=config.lpips.download,
        )
    return VideoLoss(
        rec_loss=config.rec_loss,
        perceptual_weight=config.perceptual_weight,
        perceptual_frames=config.perceptual_frames,
        kl_weight=config.kl_weight,
        quantizer_aux_loss_weight=config.quantizer_aux_loss_weight,
        adversarial_weight=config.adversarial_weight,
        disc_start=config.disc_start,
        lpips=lpips,
    )
