"""Atomic checkpoints: each one is written into a temporary folder and published by a rename.

Layout under <output_dir>/checkpoints:
    step_00001000/                 one complete checkpoint (a published folder is never modified)
        generator/...              the autoencoder engine (DeepSpeed's files, every rank's partitions)
        discriminator/...          the discriminator engine
        trainer/rank_00000.pt      step, RNG states and data position of each rank
        ema.pt                     the autoencoder's fp32 EMA weights, when train.ema is enabled
    .step_00002000.tmp/            a save in progress (or killed): never read, replaced by the next save
    latest                         the newest published tag, rewritten (atomically) after the rename

A save writes everything into the temporary folder, waits for every rank, renames the folder to its
tag, then rewrites `latest`, then deletes all but the newest `keep` checkpoints. A process killed at any
point leaves `latest` naming a complete checkpoint: before the rename the old one, after it the new one.

The rename and the pruning are done by the first rank of each node, so checkpoints on node-local disks
are published on every node; on a shared filesystem the first node to get there renames and the others
find the temporary folder gone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError
from trainer.distributed import barrier

log = logging.getLogger("trainer")

# The autoencoder's architecture (AutoencoderConfig as JSON), written into every run directory so that
# export and the tools can rebuild it from a checkpoint alone.
AUTOENCODER_CONFIG_NAME = "autoencoder.json"
EMA_FILE = "ema.pt"
ENGINE_NAMES = ("generator", "discriminator")
_TAG = re.compile(r"^step_(\d{8,})$")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def is_checkpoint(path: Path) -> bool:
    """A published checkpoint folder (has both engines' folders)."""
    return all((path / name).is_dir() for name in ENGINE_NAMES)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder for a run directory, its `checkpoints` folder (both: their `latest`), or a
    checkpoint folder itself."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file():
            found = root / latest.read_text().strip()
            if not is_checkpoint(found):
                raise FileNotFoundError(f"{latest} names {found.name}, which is not a complete checkpoint")
            return found
    raise FileNotFoundError(
        f"{path} is neither a run directory, its checkpoints folder, nor a checkpoint "
        f"(<run>/checkpoints/step_XXXXXXXX with generator/ and discriminator/): no 'latest' file under it"
    )


class Checkpointer:
    """Saves and restores everything a run needs to continue."""

    def __init__(self, run_dir: Path, rank: int, *, local_rank: int | None = None, keep: int = 0) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        # the rank that renames and prunes on this node (see the module docstring)
        self.publisher = (rank if local_rank is None else local_rank) == 0
        self.keep = keep  # 0 keeps every checkpoint

    def save(
        self,
        step: int,
        g_engine,
        d_engine,
        state: dict[str, Any],
        ema_state: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write and publish checkpoint `step` (every rank calls it); returns its folder."""
        tag = step_tag(step)
        final, tmp = self.root / tag, self.root / f".{tag}.tmp"
        if is_checkpoint(final):
            # Resumed from this step and stopped before the next one: that checkpoint is this state, and
            # `latest` may name it, so it is never deleted to be written again.
            log.info("checkpoint %s exists; not saving it again", final)
            return final
        if self.publisher:
            shutil.rmtree(tmp, ignore_errors=True)  # a save of this step killed earlier
            tmp.mkdir(parents=True, exist_ok=True)
        barrier()
        g_engine.save_checkpoint(str(tmp), tag="generator", save_latest=False)
        d_engine.save_checkpoint(str(tmp), tag="discriminator", save_latest=False)
        trainer_dir = tmp / "trainer"
        trainer_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(trainer_dir / f"rank_{self.rank:05d}.pt", lambda p: torch.save(state, p))
        if ema_state is not None and self.rank == 0:
            _write_atomically(tmp / EMA_FILE, lambda p: torch.save(ema_state, p))
        barrier()  # every rank's files are in the temporary folder
        if self.publisher:
            self._publish(tmp, final)
        barrier()
        log.info("saved checkpoint %s", final)
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            if not final.exists():  # another node's publisher renamed it on a shared filesystem
                raise
        _write_atomically(self.root / "latest", lambda p: p.write_text(final.name + "\n"))
        self._prune(final.name)

    def _prune(self, latest: str) -> None:
        if self.keep <= 0:
            return
        tags = sorted(p.name for p in self.root.iterdir() if _TAG.match(p.name) and p.is_dir())
        for name in tags[: -self.keep]:
            if name != latest:
                shutil.rmtree(self.root / name, ignore_errors=True)

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint folder `train.resume` names, or None to start fresh."""
        if resume == "none":
            return None
        if resume == "auto":
            latest = self.root / "latest"
            return find_checkpoint(self.root) if latest.is_file() else None
        try:
            return find_checkpoint(resume)
        except FileNotFoundError as err:
            raise ConfigError(f"train.resume={resume!r}: {err}; use 'auto', 'none' or such a path") from err

    def load(self, checkpoint: Path, g_engine, d_engine) -> dict[str, Any]:
        """Load both engines from `checkpoint`; returns this rank's trainer state."""
        for name, engine in (("generator", g_engine), ("discriminator", d_engine)):
            loaded, _ = engine.load_checkpoint(str(checkpoint), tag=name)
            if loaded is None:
                raise FileNotFoundError(f"no {name} checkpoint in {checkpoint}")
        state_file = checkpoint / "trainer" / f"rank_{self.rank:05d}.pt"
        if not state_file.is_file():
            # The world size changed: continue with rank 0's step; RNG streams start anew on this rank.
            log.warning("%s is missing (world size changed?); using rank 0's trainer state", state_file)
            state_file = checkpoint / "trainer" / "rank_00000.pt"
        return torch.load(state_file, map_location="cpu", weights_only=False)

    @staticmethod
    def load_ema(checkpoint: Path) -> dict[str, torch.Tensor] | None:
        path = checkpoint / EMA_FILE
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
