"""Learning-rate schedules: linear warm-up, then constant or cosine decay, as a LambdaLR per engine."""

from __future__ import annotations

import math

import torch

from trainer.config import OptimizerConfig


class WarmupSchedule:
    """The lr multiplier after `step` optimizer steps (a picklable callable, so LambdaLR saves its state).

    Warm-up: (step + 1) / warmup_steps for the first warmup_steps steps. Then 1 (`constant`), or
    `cosine`: min_lr_ratio + (1 - min_lr_ratio) x (1 + cos(pi x progress)) / 2, where progress runs from
    0 at the end of warm-up to 1 at `total_steps` and stays at 1 after.
    """

    def __init__(self, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.total_steps = max(total_steps, 1)
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler_factory(optim: OptimizerConfig, total_steps: int):
    """What deepspeed.initialize takes as `lr_scheduler`: a callable building the LambdaLR on the engine's
    optimizer (DeepSpeed steps it once per optimizer step, and saves and loads it with the checkpoint)."""
    multiplier = WarmupSchedule(optim.schedule, optim.warmup_steps, total_steps, optim.min_lr_ratio)

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)

    return build
