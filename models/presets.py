"""Named model sizes: the registry that configs refer to by name."""

import dataclasses
import inspect
from typing import Any

from models.autoencoder import AutoencoderConfig, CausalVideoAutoencoder
from models.discriminator import Discriminator3D
from models.discriminator_set import DISCRIMINATOR_SIZES

AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    # CPU tests and demos: still 4 levels, so 8x spatial and 4x temporal compression hold.
    "tiny": AutoencoderConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
    # The released CogVideoX VAE (diffusers' AutoencoderKLCogVideoX defaults), 215,583,907 parameters.
    "cogvideox": AutoencoderConfig(),
}

# Constructor arguments of Discriminator3D: the "3d" sizes of the discriminator set.
DISCRIMINATOR_PRESETS: dict[str, dict[str, Any]] = DISCRIMINATOR_SIZES["3d"]


def _preset(presets: dict[str, Any], kind: str, name: str) -> Any:
    if name not in presets:
        raise ValueError(f"unknown {kind} preset {name!r}; valid presets: {sorted(presets)}")
    return presets[name]


def build_autoencoder(preset: str, **overrides: Any) -> CausalVideoAutoencoder:
    """Build a `CausalVideoAutoencoder` from a named preset, with config fields overridden by keyword."""
    config = _preset(AUTOENCODER_PRESETS, "autoencoder", preset)
    valid = {field.name for field in dataclasses.fields(AutoencoderConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown AutoencoderConfig fields {unknown}; valid fields: {sorted(valid)}")
    return CausalVideoAutoencoder(dataclasses.replace(config, **overrides))


def build_discriminator(preset: str, **overrides: Any) -> Discriminator3D:
    """Build a `Discriminator3D` from a named preset, with constructor arguments overridden by keyword."""
    kwargs = _preset(DISCRIMINATOR_PRESETS, "discriminator", preset)
    valid = set(inspect.signature(Discriminator3D).parameters)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown Discriminator3D arguments {unknown}; valid arguments: {sorted(valid)}")
    return Discriminator3D(**{**kwargs, **overrides})
