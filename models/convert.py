"""Conversion between the project's autoencoder and a diffusers `AutoencoderKLCogVideoX` folder.

A diffusers folder holds `config.json` and `diffusion_pytorch_model.safetensors`. The module tree of
`CausalVideoAutoencoder` mirrors diffusers', so the state dicts share keys and shapes and conversion is
a matter of translating the config and checking that the tensors line up. diffusers itself is not
needed here (only safetensors): its `from_pretrained` loads what `save_diffusers` writes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from models.autoencoder import AutoencoderConfig, CausalVideoAutoencoder

log = logging.getLogger("models")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
DIFFUSERS_CLASS = "AutoencoderKLCogVideoX"
# The released CogVideoX VAE's latent scale (diffusers' default), written when none is given.
DEFAULT_SCALING_FACTOR = 1.15258426

# diffusers config keys that map one-to-one onto AutoencoderConfig fields.
_SHARED_KEYS = (
    "in_channels",
    "out_channels",
    "latent_channels",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "norm_eps",
    "temporal_compression_ratio",
)
# diffusers settings this architecture does not have; anything else there is refused.
_REQUIRED = {"act_fn": "silu", "use_quant_conv": False, "use_post_quant_conv": False}


def diffusers_config(config: AutoencoderConfig, scaling_factor: float | None = None) -> dict[str, Any]:
    """The diffusers `config.json` content describing `config` (a KL autoencoder)."""
    if config.regularizer != "kl":
        raise ValueError(
            f"an autoencoder with regularizer={config.regularizer!r} has no diffusers equivalent "
            "(AutoencoderKLCogVideoX is KL only: its encoder outputs mean and log-variance); train with "
            "model.regularizer='kl' to export to diffusers, or load the run's checkpoint with this project"
        )
    levels = len(config.block_out_channels)
    return {
        "_class_name": DIFFUSERS_CLASS,
        "_diffusers_version": "0.32.0",
        **{key: getattr(config, key) for key in _SHARED_KEYS},
        "block_out_channels": list(config.block_out_channels),
        "down_block_types": ["CogVideoXDownBlock3D"] * levels,
        "up_block_types": ["CogVideoXUpBlock3D"] * levels,
        **_REQUIRED,
        "scaling_factor": DEFAULT_SCALING_FACTOR if scaling_factor is None else float(scaling_factor),
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "invert_scale_latents": False,
        "sample_height": 480,
        "sample_width": 720,
    }


def autoencoder_config_from_diffusers(raw: dict[str, Any], **overrides: Any) -> AutoencoderConfig:
    """AutoencoderConfig for a diffusers AutoencoderKLCogVideoX config dict (any widths, depths, groups)."""
    name = raw.get("_class_name", DIFFUSERS_CLASS)
    if name != DIFFUSERS_CLASS:
        raise ValueError(f"expected a diffusers {DIFFUSERS_CLASS} config, got _class_name={name!r}")
    for key, wanted in _REQUIRED.items():
        if key in raw and raw[key] != wanted:
            raise ValueError(f"{key}={raw[key]!r} is not supported (this architecture has {key}={wanted!r})")
    levels = len(raw.get("block_out_channels", AutoencoderConfig().block_out_channels))
    for key, block in (
        ("down_block_types", "CogVideoXDownBlock3D"),
        ("up_block_types", "CogVideoXUpBlock3D"),
    ):
        if key in raw and list(raw[key]) != [block] * levels:
            raise ValueError(f"{key} must be {levels} x {block!r}, got {raw[key]!r}")
    known = {f.name for f in fields(AutoencoderConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown autoencoder settings {sorted(unknown)}; valid: {sorted(known)}")
    values = {key: raw[key] for key in _SHARED_KEYS if key in raw}
    return AutoencoderConfig(**{**values, **overrides})


def load_diffusers_folder(folder: str | os.PathLike, **overrides: Any) -> CausalVideoAutoencoder:
    """Build the autoencoder described by a diffusers folder and load its weights (fp32, strict)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_file, weights_file):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a diffusers AutoencoderKLCogVideoX folder holds {CONFIG_NAME} and "
                f"{WEIGHTS_NAME} (for a pipeline, point at its 'vae' subfolder)"
            )
    config = autoencoder_config_from_diffusers(json.loads(config_file.read_text()), **overrides)
    model = CausalVideoAutoencoder(config)
    state = {key: value.float() for key, value in load_file(weights_file).items()}
    load_state_dict_checked(model, state, source=f"weights in {weights_file}")
    return model


def load_state_dict_checked(
    model: CausalVideoAutoencoder, state: dict[str, torch.Tensor], source: str
) -> None:
    """load_state_dict(strict) with a message that names the missing, unexpected and misshapen keys."""
    _check_keys_and_shapes(model.state_dict(), state, source=source)
    model.load_state_dict(state, strict=True)


def _check_keys_and_shapes(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or misshapen:

        def head(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        raise ValueError(
            f"{source} does not fit the autoencoder config: missing [{head(missing)}], "
            f"unexpected [{head(unexpected)}], shape mismatch [{head(misshapen)}]"
        )


def save_diffusers_folder(
    state_dict: dict[str, torch.Tensor],
    config: AutoencoderConfig,
    folder: str | os.PathLike,
    *,
    scaling_factor: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write config.json + safetensors weights that diffusers' AutoencoderKLCogVideoX.from_pretrained loads."""
    from safetensors.torch import save_file

    config_json = diffusers_config(config, scaling_factor)  # refuses what diffusers cannot load, first
    with torch.device("meta"):  # keys and shapes only, no memory
        expected = CausalVideoAutoencoder(config).state_dict()
    _check_keys_and_shapes(expected, state_dict, source="the state dict to export")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu", dtype).contiguous() for key, value in state_dict.items()}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config_json, indent=2) + "\n")
    log.info("wrote diffusers AutoencoderKLCogVideoX folder %s (%d tensors)", folder, len(tensors))
    return folder
