"""Consolidate the autoencoder of a checkpoint (any ZeRO stage) into a diffusers folder."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import torch

from models import AutoencoderConfig
from models.convert import save_diffusers_folder
from trainer.checkpoint import AUTOENCODER_CONFIG_NAME, Checkpointer

log = logging.getLogger("trainer")


def find_checkpoint(path: str | Path) -> tuple[Path, Path, str]:
    """(run directory, checkpoints root, tag) for a run directory, its checkpoints folder, or one checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    found = Checkpointer(path, rank=0).resolve(str(path))
    assert found is not None  # resolve() returns None only for "none"
    root, tag = found
    return root.parent, root, tag


def consolidated_state_dict(engine_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 module weights of one engine's checkpoint, gathered from every rank's partition."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = engine_dir / tag
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"no checkpoint {tag} in {engine_dir}")
    if list(tag_dir.glob("*optim_states.pt")):
        # ZeRO 1-3 and bf16 runs keep the fp32 master weights in the optimizer partitions.
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per file
            state = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=tag)
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


def export_autoencoder(
    checkpoint: str | Path, output: str | Path, *, scaling_factor: float | None = None
) -> Path:
    """Write the checkpoint's autoencoder as a diffusers AutoencoderKLCogVideoX folder; returns the folder."""
    run_dir, root, tag = find_checkpoint(checkpoint)
    architecture_file = run_dir / AUTOENCODER_CONFIG_NAME
    if not architecture_file.is_file():
        raise FileNotFoundError(f"{architecture_file} is missing: it is written by launch/train.py at start")
    config = AutoencoderConfig(**json.loads(architecture_file.read_text()))
    state = autoencoder_state_dict(consolidated_state_dict(root / "generator", tag))
    log.info("exporting %s/%s (%d tensors) to %s", root, tag, len(state), output)
    return save_diffusers_folder(state, config, output, scaling_factor=scaling_factor)
