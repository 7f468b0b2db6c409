"""Atomic checkpoints: each one is written into a temporary folder and published by a rename.

Layout under <output_dir>/checkpoints:
    step_00001000/                 one complete checkpoint (a published folder is never modified)
        generator/...              the autoencoder engine (DeepSpeed's files, every rank's partitions)
        discriminator/...          the discriminator engine
        trainer/rank_00000.pt      step, RNG states and data position of each rank
        ema.pt                     the autoencoder's fp32 EMA weights, when train.ema is enabled
    .step_00002000.tmp/            a save in progress (or killed): never read, removed by the next save
    .step_00001000.replaced/       a checkpoint being replaced (see below)
    latest                         the newest published tag, rewritten (atomically) after the rename

A save writes everything into the temporary folder, waits for every rank, renames the folder to its
tag, then rewrites `latest`, then deletes all but the newest `keep` checkpoints. A process killed at any
point leaves `latest` naming a complete checkpoint: before the rename the old one, after it the new one.

A run resumed from an earlier step of the same folder (train.resume=<run>/checkpoints/step_N) reaches
steps whose checkpoints an earlier run left, holding another state. Such a checkpoint is replaced: the
old folder is renamed aside to `.step_M.replaced`, the new one renamed in, `latest` rewritten, the old
folder deleted. Killed between the two renames, `latest` may name a step_M that is missing:
find_checkpoint then takes `.step_M.replaced` (the old state, complete), and the next save renames it
back. Only the checkpoint this run resumed from, and those it saved itself, are never written again:
they are this run's states. Pruning counts the checkpoints up to the one just saved; newer ones, left by
the run this one branched from, are kept until this run replaces them.

The run folder is one folder every rank sees (trainer.distributed.require_shared_directory checks it at
start-up): DeepSpeed writes the model states from global rank 0 only and the EMA is rank 0's, so a
checkpoint on node-local disks could not be resumed. Publishing is done by the first rank of each node
(global rank 0 first, then the others, which find the temporary folder gone).
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
_KILLED_SAVE = re.compile(r"^\.(step_\d{8,}|latest\.\d+)\.tmp$")
# the trainer state entries that belong to one rank: its random streams and its data position
RANK_STATE_KEYS = ("torch_rng", "device_rng", "python_rng", "numpy_rng", "data", "image_data")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _aside(final: Path) -> Path:
    """Where a published checkpoint waits while a new one of the same step replaces it."""
    return final.with_name(f".{final.name}.replaced")


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
            if not found.exists() and is_checkpoint(_aside(found)):
                return _aside(found)  # a replace killed between its renames: the old one, set aside
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
        # the checkpoint this run resumed from and those it saved (resolved paths): this run's states
        self.own: set[Path] = set()
        self._warned_newer = False

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
        if final.resolve() in self.own and is_checkpoint(final):
            # Resumed from this step (or saved it already) and stopped before the next one: that
            # checkpoint is this state, and `latest` may name it, so it is never deleted to be written again.
            log.info("checkpoint %s is this run's state; not saving it again", final)
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
        # Rank 0 first: on a shared filesystem the other nodes then find the temporary folder gone, so no
        # two publishers replace the same checkpoint at once.
        if self.publisher and self.rank == 0:
            self._publish(tmp, final)
        barrier()
        if self.publisher and self.rank != 0 and tmp.is_dir():  # this node's own disk
            self._publish(tmp, final)
        barrier()
        self.own.add(final.resolve())
        log.info("saved checkpoint %s", final)
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        self._restore_interrupted_replaces()
        aside = None
        if final.exists():
            log.info(
                "replacing checkpoint %s: an earlier run left it, from another state (this run resumed "
                "from an earlier step, or started anew)",
                final,
            )
            # A kill between these two renames leaves `latest` naming a missing folder: find_checkpoint then
            # takes the one set aside, and the next save puts it back (_restore_interrupted_replaces).
            aside = _aside(final)
            os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            if not final.exists():  # another node's publisher renamed it on a shared filesystem
                raise
        _write_atomically(self.root / "latest", lambda p: p.write_text(final.name + "\n"))
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        self._remove_killed_saves()
        self._prune(final.name)

    def _restore_interrupted_replaces(self) -> None:
        """A replace killed between its renames left `.step_N.replaced`: put it back where step_N is
        missing (the folder as it was before), else delete it (the new step_N was published)."""
        for aside in self.root.glob(".step_*.replaced"):
            final = aside.with_name(aside.name[1 : -len(".replaced")])
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(aside, final)

    def _remove_killed_saves(self) -> None:
        """What saves killed before their rename left: temporary folders, and `latest` files being written
        (every rank has finished writing this save, and no other save runs at the same time)."""
        for path in self.root.iterdir():
            if _KILLED_SAVE.match(path.name):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def _prune(self, latest: str) -> None:
        """Delete all but the newest `keep` checkpoints up to `latest` (the one just published). Newer ones
        were left by a run this one branched from (resumed at an earlier step): kept, not counted."""
        if self.keep <= 0:
            return
        steps = {}
        for path in self.root.iterdir():
            if (match := _TAG.match(path.name)) and path.is_dir():
                steps[path.name] = int(match.group(1))
        newest = int(_TAG.match(latest).group(1))
        newer = sorted((name for name, step in steps.items() if step > newest), key=steps.get)
        if newer and not self._warned_newer:
            self._warned_newer = True
            log.warning(
                "%s: newer than %s, left by an earlier run; kept (not counted by train.keep_checkpoints) "
                "until this run replaces them",
                ", ".join(newer),
                latest,
            )
        older = sorted((name for name, step in steps.items() if step < newest), key=steps.get)
        for name in older[: max(len(older) - (self.keep - 1), 0)]:
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
        """Load both engines from `checkpoint`; returns this rank's trainer state (without the entries of
        RANK_STATE_KEYS when the checkpoint has none for this rank: a run on more ranks)."""
        check_zero_world_size(checkpoint, g_engine)
        for name, engine in (("generator", g_engine), ("discriminator", d_engine)):
            loaded, _ = engine.load_checkpoint(str(checkpoint), tag=name)
            if loaded is None:
                raise FileNotFoundError(f"no {name} checkpoint in {checkpoint}")
        self.own.add(checkpoint.resolve())
        state_file = checkpoint / "trainer" / f"rank_{self.rank:05d}.pt"
        if state_file.is_file():
            return torch.load(state_file, map_location="cpu", weights_only=False)
        # More ranks than the run that saved it: rank 0's step and shared state, not its random streams or
        # data position (every new rank would draw the same noise as rank 0 and read its clips).
        state = torch.load(checkpoint / "trainer" / "rank_00000.pt", map_location="cpu", weights_only=False)
        log.warning(
            "%s is missing (saved by %d rank(s)): this rank continues with rank 0's step, random streams "
            "seeded from (train.seed, rank, step), and a new pass over the data",
            state_file,
            saved_world_size(checkpoint),
        )
        return {key: value for key, value in state.items() if key not in RANK_STATE_KEYS}

    @staticmethod
    def load_ema(checkpoint: Path) -> dict[str, torch.Tensor] | None:
        path = checkpoint / EMA_FILE
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def saved_world_size(checkpoint: Path) -> int:
    """How many ranks saved `checkpoint` (one trainer state each)."""
    return len(list((checkpoint / "trainer").glob("rank_*.pt")))


def check_zero_world_size(checkpoint: Path, engine) -> None:
    """ConfigError when ZeRO-1/2/3 would have to load optimizer partitions saved by another number of ranks
    (DeepSpeed refuses it with a ZeRORuntimeException deep in load_checkpoint)."""
    saved = saved_world_size(checkpoint)
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    if stage == 0 or saved in (0, engine.dp_world_size):
        return
    raise ConfigError(
        f"{checkpoint} was saved by {saved} rank(s) at ZeRO-{stage}, this run has {engine.dp_world_size}: "
        f"ZeRO partitions the optimizer state by rank, so DeepSpeed cannot load it on another number of "
        f"ranks. Resume with {saved} rank(s); or convert the checkpoint's engines with DeepSpeed's universal "
        f"checkpoint tool (python -m deepspeed.checkpoint.ds_to_universal), which this trainer does not "
        f"load yet; or start a new run from its weights (launch/export.py, then model.init_from)"
    )
