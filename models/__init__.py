"""Autoencoder, discriminators and their presets (plain nn.Modules; no DeepSpeed, data or losses here)."""

from models.autoencoder import (
    AutoencoderConfig,
    AutoencoderOutput,
    CausalVideoAutoencoder,
    DiagonalGaussian,
)
from models.discriminator import Discriminator3D
from models.discriminator_2d import MagvitDiscriminator2D
from models.discriminator_set import (
    DISCRIMINATOR_SIZES,
    DISCRIMINATOR_TYPES,
    DiscriminatorSet,
    build_discriminator_set,
)
from models.discriminator_video import CausalDiscriminator3D, HybridDiscriminator3D
from models.patchgan import PatchGAN2D, PatchGAN3D
from models.presets import (
    AUTOENCODER_PRESETS,
    DISCRIMINATOR_PRESETS,
    build_autoencoder,
    build_discriminator,
)

__all__ = [
    "AUTOENCODER_PRESETS",
    "DISCRIMINATOR_PRESETS",
    "DISCRIMINATOR_SIZES",
    "DISCRIMINATOR_TYPES",
    "AutoencoderConfig",
    "AutoencoderOutput",
    "CausalDiscriminator3D",
    "CausalVideoAutoencoder",
    "DiagonalGaussian",
    "Discriminator3D",
    "DiscriminatorSet",
    "HybridDiscriminator3D",
    "MagvitDiscriminator2D",
    "PatchGAN2D",
    "PatchGAN3D",
    "build_autoencoder",
    "build_discriminator",
    "build_discriminator_set",
]
