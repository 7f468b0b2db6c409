"""Run a function in N real processes (gloo on CPU), the way the deepspeed launcher starts ranks."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from models.layers import cpu_has_bf16_kernels

# bf16 on a CPU without oneDNN's bf16 kernels (AVX2 only) runs on torch's reference kernels, about 60x slower
# than fp32: there the bf16 training runs take 5-frame 16x16 clips (overrides appended after the test's own).
BF16_CLIP_OVERRIDES = [] if cpu_has_bf16_kernels() else ["data.num_frames=5", "data.resolution=16"]


def run_command(
    command: list[str], env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `command` from the repository root, output captured, no standard input, `env` over ours."""
    return subprocess.run(
        command,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        LOCAL_SIZE=str(world_size),  # as the deepspeed launcher sets it (DeepSpeed's CPU shm all-reduce)
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    result = fn(rank, world_size, *args)
    torch.save(result, Path(out_dir) / f"rank_{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.freeze()  # the process exits about 2 s sooner (trainer.distributed.exit_process)


def run_ranks(fn: Callable, out_dir: Path, *args: Any, world_size: int = 2) -> list[Any]:
    """Run fn(rank, world_size, *args) in `world_size` spawned processes; return their results by rank."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), str(out_dir), args),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
    return [torch.load(out_dir / f"rank_{r}.pt", weights_only=False) for r in range(world_size)]


# A small, quick run of configs/tiny.json: 4 demo train shards of 4 clips (2 ranks x 1 worker need >= 2
# shards), 9 frames at 16 px, one clip per rank and step. Tests add their own overrides after these
# (later overrides of the same key win).
SMALL_DEMO_RUN = [
    "data.demo.train_shards=4",
    "data.demo.eval_shards=2",
    "data.demo.clips_per_shard=4",
    "data.resolution=16",
    "data.batch_size=1",
    "data.num_workers=1",
    "data.shuffle_buffer=4",
    "train.progress_bar=false",
    "eval.batch_size=2",
]
