"""Autoencoder, discriminators and their presets (plain nn.Modules; no DeepSpeed, data or losses here)."""

from models.autoencoder import (
    AutoencoderConfig,
    AutoencoderOutput,
    CausalVideoAutoencoder,
    DiagonalGaussian,
)
from models.discriminator import Discriminator3D
from models.presets import (
    AUTOENCODER_PRESETS,
    DISCRIMINATOR_PRESETS,
    build_autoencoder,
    build_discriminator,
)

__all__ = [
    "AUTOENCODER_PRESETS",
    "DISCRIMINATOR_PRESETS",
    "AutoencoderConfig",
    "AutoencoderOutput",
    "CausalVideoAutoencoder",
    "DiagonalGaussian",
    "Discriminator3D",
    "build_autoencoder",
    "build_discriminator",
]
