"""Consolidate the autoencoder of a checkpoint (any ZeRO stage) into a diffusers folder, and measure the
latent scaling factor that goes into its config."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch

from models import AutoencoderConfig, CausalVideoAutoencoder
from models.convert import load_state_dict_checked, save_diffusers_folder
from trainer.checkpoint import AUTOENCODER_CONFIG_NAME, Checkpointer, find_checkpoint
from trainer.ema import weights_without_bookkeeping

log = logging.getLogger("trainer")


def consolidated_state_dict(checkpoint: Path, engine: str) -> dict[str, torch.Tensor]:
    """fp32 module weights of one engine (`generator`, `discriminator`) of a checkpoint folder, gathered
    from every rank's partition."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = checkpoint / engine
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"no {engine} engine in {checkpoint}")
    if list(tag_dir.glob("*optim_states.pt")):
        # ZeRO 1-3 and bf16 runs keep the fp32 master weights in the optimizer partitions.
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per file
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=engine)
        return {key: value.float() for key, value in state.items()}
    # ZeRO-0 in fp32: the module states are the full-precision weights.
    model_states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {key: value.float() for key, value in model_states["module"].items()}


def autoencoder_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder's entries of a generator engine's state dict (without a learned loss log-variance,
    whose GeneratorModule prefixes them with `autoencoder.`)."""
    prefix = "autoencoder."
    if not any(key.startswith(prefix) for key in state):
        return state
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def checkpoint_autoencoder_state(
    checkpoint: Path, *, ema: bool = True
) -> tuple[dict[str, torch.Tensor], str]:
    """fp32 autoencoder weights of a checkpoint folder and where they came from: its EMA weights when it
    has them and `ema`, else the generator engine's (consolidated from any ZeRO stage)."""
    if ema:
        ema_state = Checkpointer.load_ema(checkpoint)
        if ema_state is not None:
            return {
                key: value.float() for key, value in weights_without_bookkeeping(ema_state).items()
            }, "ema"
    return autoencoder_state_dict(consolidated_state_dict(checkpoint, "generator")), "generator"


class CheckpointAutoencoder(NamedTuple):
    """A checkpoint's autoencoder: its architecture, fp32 weights, their source ("ema" or "generator")
    and the checkpoint folder they came from."""

    config: AutoencoderConfig
    state: dict[str, torch.Tensor]
    source: str
    folder: Path

    def build(self) -> CausalVideoAutoencoder:
        """The autoencoder with these weights (fp32, CPU, eval mode)."""
        model = CausalVideoAutoencoder(self.config)
        load_state_dict_checked(model, self.state, source=f"the {self.source} weights of {self.folder}")
        return model.eval()


def load_checkpoint_autoencoder(checkpoint: str | Path, *, ema: bool = True) -> CheckpointAutoencoder:
    """The autoencoder of a run directory (its latest checkpoint), its checkpoints/ folder or one checkpoint
    folder: EMA weights when present and `ema`, else the generator engine's."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    folder = find_checkpoint(path)
    run_dir = folder.parent.parent  # <run>/checkpoints/step_XXXXXXXX
    architecture_file = run_dir / AUTOENCODER_CONFIG_NAME
    if not architecture_file.is_file():
        raise FileNotFoundError(f"{architecture_file} is missing: it is written by launch/train.py at start")
    config = AutoencoderConfig(**json.loads(architecture_file.read_text()))
    state, source = checkpoint_autoencoder_state(folder, ema=ema)
    return CheckpointAutoencoder(config, state, source, folder)


@torch.no_grad()
def measure_scaling_factor(
    model: CausalVideoAutoencoder, clips: Iterable[torch.Tensor], device: torch.device | str = "cpu"
) -> tuple[float, int]:
    """(1 / std of the latents, clips seen) over `clips` (B, C, T, H, W) in [-1, 1], diffusers' convention
    (`latents = latent_dist.sample() * scaling_factor` has unit variance).

    The std is that of posterior samples z ~ N(mean, std^2) over every latent element, computed exactly
    from the posterior instead of from one noise draw: Var z = E[mean^2 + std^2] - E[mean]^2 (fp64 sums).
    """
    if model.quantizer is not None:
        raise ValueError("the scaling factor is for KL autoencoders (diffusers' format); this one quantizes")
    first = second = count = 0.0  # sums of the means and of the second moments, element count (fp64)
    clip_count = 0
    for video in clips:
        posterior = model.encode(video.to(device))
        mean, std = posterior.mean.double(), posterior.std.double()
        first += mean.sum().item()
        second += (mean.square() + std.square()).sum().item()
        count += mean.numel()
        clip_count += video.shape[0]
    if clip_count == 0:
        raise ValueError("no clips to measure the scaling factor on")
    variance = second / count - (first / count) ** 2
    if not variance > 0:
        raise ValueError(f"the latents have variance {variance}: cannot scale them to unit variance")
    return 1.0 / math.sqrt(variance), clip_count


def export_autoencoder(
    checkpoint: str | Path, output: str | Path, *, scaling_factor: float | None = None, ema: bool = True
) -> Path:
    """Write the checkpoint's autoencoder (its EMA weights when present and `ema`) as a diffusers
    AutoencoderKLCogVideoX folder; returns the folder."""
    return export_weights(
        load_checkpoint_autoencoder(checkpoint, ema=ema), output, scaling_factor=scaling_factor
    )


def export_weights(
    weights: CheckpointAutoencoder, output: str | Path, *, scaling_factor: float | None = None
) -> Path:
    """Write already loaded checkpoint weights as a diffusers AutoencoderKLCogVideoX folder."""
    log.info(
        "exporting the %s weights of %s (%d tensors) to %s",
        weights.source,
        weights.folder,
        len(weights.state),
        output,
    )
    return save_diffusers_folder(weights.state, weights.config, output, scaling_factor=scaling_factor)
