"""Checkpoints: both engines (each in its own folder), per-rank trainer state, and a `latest` pointer.

Layout under <output_dir>/checkpoints:
    generator/<tag>/...        the autoencoder engine (DeepSpeed's own files)
    discriminator/<tag>/...    the discriminator engine
    trainer/<tag>/rank_00000.pt  step, RNG states and data position of each rank
    latest                     the newest complete tag, written last
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError
from trainer.distributed import barrier

log = logging.getLogger("trainer")

# The autoencoder's architecture (AutoencoderConfig as JSON), written into every run directory so that
# export and the tools can rebuild it from a checkpoint alone.
AUTOENCODER_CONFIG_NAME = "autoencoder.json"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores everything a run needs to continue."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank

    def save(self, step: int, g_engine, d_engine, state: dict[str, Any]) -> Path:
        tag = step_tag(step)
        g_engine.save_checkpoint(str(self.root / "generator"), tag=tag)
        d_engine.save_checkpoint(str(self.root / "discriminator"), tag=tag)
        state_dir = self.root / "trainer" / tag
        state_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(state_dir / f"rank_{self.rank:05d}.pt", lambda p: torch.save(state, p))
        barrier()  # every rank's files are on disk before `latest` points at them
        if self.rank == 0:
            _write_atomically(self.root / "latest", lambda p: p.write_text(tag + "\n"))
        barrier()
        log.info("saved checkpoint %s", self.root / tag)
        return self.root / tag

    def resolve(self, resume: str) -> tuple[Path, str] | None:
        """(checkpoints root, tag) for `train.resume`, or None to start fresh."""
        if resume == "none":
            return None
        if resume == "auto":
            return self._latest_in(self.root)
        path = Path(resume)
        for root in (path / "checkpoints", path):
            found = self._latest_in(root)
            if found is not None:
                return found
        if (path.parent / "generator" / path.name).is_dir():
            return path.parent, path.name
        raise ConfigError(
            f"train.resume={resume!r} is neither 'auto', 'none', a run directory, nor a checkpoint "
            f"(<run>/checkpoints/step_XXXXXXXX); no 'latest' file was found under it"
        )

    @staticmethod
    def _latest_in(root: Path) -> tuple[Path, str] | None:
        latest = root / "latest"
        if not latest.is_file():
            return None
        return root, latest.read_text().strip()

    def load(self, root: Path, tag: str, g_engine, d_engine) -> dict[str, Any]:
        for name, engine in (("generator", g_engine), ("discriminator", d_engine)):
            loaded, _ = engine.load_checkpoint(str(root / name), tag=tag)
            if loaded is None:
                raise FileNotFoundError(f"no {name} checkpoint {tag} under {root / name}")
        state_file = root / "trainer" / tag / f"rank_{self.rank:05d}.pt"
        if not state_file.is_file():
            # The world size changed: continue with rank 0's step; RNG streams start anew on this rank.
            log.warning("%s is missing (world size changed?); using rank 0's trainer state", state_file)
            state_file = root / "trainer" / tag / "rank_00000.pt"
        return torch.load(state_file, map_location="cpu", weights_only=False)
