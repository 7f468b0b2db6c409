"""Metrics: accumulated locally every step, reduced across ranks on log steps, written by rank 0."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist


class MetricAccumulator:
    """Running sums of scalars since the last log step; `reduce` averages them over steps and ranks."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def add(self, values: dict[str, float | torch.Tensor]) -> None:
        for key, value in values.items():
            self._sums[key] += float(value)
            self._counts[key] += 1

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Means since the last call, averaged across ranks (every rank must call it on the same keys)."""
        keys = sorted(self._sums)
        packed = torch.tensor(
            [self._sums[k] for k in keys] + [float(self._counts[k]) for k in keys],
            dtype=torch.float64,
            device=device,
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        sums, counts = packed[: len(keys)], packed[len(keys) :]
        self._sums.clear()
        self._counts.clear()
        return {k: (s / c).item() for k, s, c in zip(keys, sums, counts, strict=True) if c > 0}


class MetricsLogger:
    """The no-op logger every rank but 0 uses."""

    def log(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(MetricsLogger):
    """Scalars to TensorBoard event files and, one JSON object per log step, to metrics.jsonl."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.jsonl = (run_dir / "metrics.jsonl").open("a")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()
