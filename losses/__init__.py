"""LPIPS, the composed video loss, and the adaptive GAN weight (no DeepSpeed or data here)."""

from losses.adaptive import LastLayerInput, adaptive_weight, last_layer_weight_grad
from losses.lpips import LPIPS, LPIPSWeightsUnavailable, bake_lpips_weights
from losses.video_loss import VideoLoss

__all__ = [
    "LPIPS",
    "LPIPSWeightsUnavailable",
    "LastLayerInput",
    "VideoLoss",
    "adaptive_weight",
    "bake_lpips_weights",
    "last_layer_weight_grad",
]
