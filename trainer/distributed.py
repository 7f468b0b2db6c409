"""Process-group setup from the launcher's environment (deepspeed, torchrun, SLURM, or none), and how a
process ends."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import secrets
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from models.layers import cpu_has_bf16_kernels
from trainer.config import ConfigError

log = logging.getLogger("trainer")


@dataclass(frozen=True, slots=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def exit_process(status: int | None = 0) -> NoReturn:
    """sys.exit(status) without the interpreter's last garbage collection over every object still alive.

    With torch, DeepSpeed and inductor imported, that collection kept a process alive about 2 s after its
    work was done (measured on a 2-core AMD EPYC: 2.45 s -> 0.29 s from the last atexit handler to the exit),
    on every rank and for every command-line tool. Nothing it would free matters at exit: the trainer and
    the tools close their files and writers themselves, and atexit handlers (logging's flush, the
    DataLoader workers' shutdown) still run."""
    gc.freeze()  # the remaining objects move to the permanent generation, which no collection visits
    sys.exit(status)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fill_environment() -> None:
    """Map SLURM's variables to torch's, or describe a single process when no launcher set anything."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        per_node = env.get("SLURM_NTASKS_PER_NODE", "")
        if per_node.isdigit():  # "8"; heterogeneous layouts ("8(x2),4") leave it to the world size
            env.setdefault("LOCAL_WORLD_SIZE", per_node)
        if "MASTER_ADDR" not in env:
            nodes = env.get("SLURM_JOB_NODELIST", "127.0.0.1")
            # "node[001-004],other" -> "node001": the first host of a compressed list.
            first = nodes.split(",")[0]
            if "[" in first:
                stem, ranges = first.split("[", 1)
                first = stem + ranges.rstrip("]").split("-")[0].split(",")[0]
            env["MASTER_ADDR"] = first
        env.setdefault("MASTER_PORT", "29500")
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")


def init_distributed() -> DistInfo:
    """Start the process group with the accelerator's backend (gloo on CPU, nccl on CUDA) and pick the device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _fill_environment()
    accelerator = get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
        if accelerator.device_name() == "cpu":
            _release_shm_buffer_name()
    accelerator.set_device(local_rank)
    device = torch.device(accelerator.device_name(local_rank))
    world_size = dist.get_world_size()
    if device.type == "cpu":
        # Ranks sharing a CPU node split its cores instead of each starting one thread per core.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return DistInfo(rank=dist.get_rank(), world_size=world_size, local_rank=local_rank, device=device)


def shm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce (its shm comm op, ranks of one node) puts `rank`'s buffer."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _release_shm_buffer_name() -> None:
    """Unlink this rank's DeepSpeed shm buffer once every rank has mapped every other's.

    DeepSpeed never unlinks them (shm.cpp's shared_close is never called), so every CPU run, killed or not,
    left 69 MB per rank of memory in /dev/shm until a reboot. Its initialisation maps all the local ranks'
    buffers; after the barrier no rank opens one by name again, and the mappings stay valid until exit.
    """
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):  # none when the ranks span nodes (no shm all-reduce)
        shm_buffer_path(dist.get_rank()).unlink()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is true on every rank; every rank gets the same answer."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


def require_shared_directory(path: Path, info: DistInfo) -> None:
    """Raise ConfigError on every rank unless every rank sees what rank 0 writes into `path` (every rank calls
    this; `path` exists).

    Checkpoints need one run folder that every rank reads and writes: DeepSpeed writes the model states
    from global rank 0 only, the EMA is rank 0's, and a resume reads both on every rank. A run folder on
    node-local disks used to train and save, then fail at the first resume on every other node.
    """
    if info.world_size == 1:
        return
    token = [secrets.token_hex(16) if info.is_main else None]
    dist.broadcast_object_list(token, src=0, device=info.device)
    probe = path / ".ranks_see_this"
    if info.is_main:
        probe.write_text(token[0])
    barrier()
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    if not seen:
        log.error("rank %d on %s does not see %s, which rank 0 wrote", info.rank, socket.gethostname(), probe)
    everyone = all_ranks_true(seen, info.device)
    barrier()  # every rank has read it
    if info.is_main:
        probe.unlink(missing_ok=True)
    if not everyone:
        raise ConfigError(
            f"train.output_dir {path} is not one folder shared by every rank: some rank does not see the "
            "file rank 0 wrote there (its error is in the log). Checkpoints are written by some ranks and "
            "read by all; put the run on a filesystem every node mounts at that path"
        )


def all_reduce_max(value: float, device: torch.device) -> float:
    """Largest value of a scalar over ranks."""
    total = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return total.item()


def peak_memory_bytes(device: torch.device) -> float:
    """Peak memory of this process so far: the accelerator's allocator peak on a GPU, else the peak
    resident set size of the process (on Linux ru_maxrss is in KiB)."""
    if device.type != "cpu":
        from deepspeed.accelerator import get_accelerator

        return float(get_accelerator().max_memory_allocated(device))
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def cpu_bf16_warning() -> str:
    """What a run with deepspeed.bf16=true on a CPU device is told at start-up."""
    text = (
        "deepspeed.bf16=true on a CPU device: torch 2.13's oneDNN bf16 conv3d backward returns garbage "
        "weight gradients for small inputs (e.g. 2x4x4 feature maps) in some runs, which DeepSpeed then skips "
        "as overflow or, if finite, trains on. Use deepspeed.bf16=false on CPU."
    )
    if not cpu_has_bf16_kernels():
        text += (
            " This CPU has no oneDNN bf16 kernels (they need AVX-512 or AMX): bf16 convolutions run on "
            "torch's reference kernels, about 60x slower than fp32."
        )
    return text


def gathered(params: Iterable[torch.nn.Parameter | None]) -> contextlib.AbstractContextManager:
    """The whole parameters inside the block when ZeRO-3 partitions them (each rank holds an empty
    tensor outside its module's forward): a read-only gather, a collective every rank must join. Does
    nothing for parameters ZeRO-3 does not manage (stages 0-2) and for None."""
    partitioned = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
