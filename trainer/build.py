"""Building the loss and the discriminators from their config sections."""

from __future__ import annotations

from collections.abc import Mapping

from losses import LPIPS, VideoAutoencoderLoss
from losses.perceptual import GramStyleLoss, VGG19Features, VGGPerceptualLoss
from trainer.config import LossConfig


def build_loss(
    config: LossConfig, discriminator_weights: Mapping[str, float] | None = None
) -> VideoAutoencoderLoss:
    """The loss with the perceptual networks it needs (each loaded only when its weight is > 0).

    `discriminator_weights`: the weight of every discriminator output key (DiscriminatorSet.output_weights
    before the multiscale factor), which also sizes the per-output LeCam state.
    """
    lpips = None
    if config.perceptual_weight > 0:
        lpips = LPIPS(
            pretrained=config.lpips.pretrained,
            weights_path=config.lpips.weights_path,
            backbone_weights_path=config.lpips.backbone_weights_path,
            download=config.lpips.download,
        )
    vgg_perceptual = style = None
    if config.vgg_perceptual_weight > 0 or config.style_weight > 0:
        vgg = config.vgg
        # one frozen VGG19 trunk shared by both losses
        backbone = VGG19Features(
            vgg.layers, pretrained=vgg.pretrained, weights_path=vgg.weights_path, download=vgg.download
        )
        if config.vgg_perceptual_weight > 0:
            vgg_perceptual = VGGPerceptualLoss(vgg.layers, distance=vgg.distance, backbone=backbone)
        if config.style_weight > 0:
            style = GramStyleLoss(vgg.layers, distance=vgg.style_distance, backbone=backbone)
    return VideoAutoencoderLoss(
        disc_start=config.disc_start,
        perceptual_weight=config.perceptual_weight,
        adversarial_loss_weight=config.adversarial_loss_weight,
        multiscale_adversarial_loss_weight=config.multiscale_adversarial_loss_weight,
        grad_penalty_loss_weight=config.grad_penalty_loss_weight,
        quantizer_aux_loss_weight=config.quantizer_aux_loss_weight,
        rec_loss=config.rec_loss,
        learn_logvar=config.learn_logvar,
        logvar_init=config.logvar_init,
        kl_weight=config.kl_weight,
        lpips=lpips,
        perceptual_frames=config.perceptual_frames,
        vgg_perceptual=vgg_perceptual,
        vgg_perceptual_weight=config.vgg_perceptual_weight,
        style=style,
        style_weight=config.style_weight,
        feature_matching_weight=config.feature_matching_weight,
        gan_loss=config.gan_loss,
        adaptive_weight=config.adaptive_weight,
        adaptive_weight_eps=config.adaptive_weight_eps,
        adaptive_weight_min=config.adaptive_weight_min,
        adaptive_weight_max=config.adaptive_weight_max,
        adversarial_warmup_steps=config.adversarial_warmup_steps,
        discriminator_weights=discriminator_weights,
        grad_penalty_center=config.grad_penalty_center,
        grad_penalty_every=config.grad_penalty_every,
        lecam_weight=config.lecam_weight,
        lecam_decay=config.lecam_decay,
    )
