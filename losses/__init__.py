"""LPIPS and VGG losses, GAN terms and regularisers, the adaptive weight, and the composed video loss
(no DeepSpeed or data here)."""

from losses.adaptive import LastLayerInput, adaptive_weight, last_layer_weight_grad
from losses.lpips import LPIPS, LPIPSWeightsUnavailable, bake_lpips_weights
from losses.video_loss import GeneratorTerms, VideoAutoencoderLoss

__all__ = [
    "LPIPS",
    "GeneratorTerms",
    "LPIPSWeightsUnavailable",
    "LastLayerInput",
    "VideoAutoencoderLoss",
    "adaptive_weight",
    "bake_lpips_weights",
    "last_layer_weight_grad",
]
