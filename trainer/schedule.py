"""Learning-rate schedules: linear warm-up, then constant or cosine decay, as a LambdaLR per engine.

A checkpoint restores the LambdaLR's position and, with it, the schedule it was saved with (its
multiplier's settings and base learning rates); `apply_schedule` puts the configured ones back, so a run
resumed with a longer train.max_steps or another learning rate follows its config from the resumed step.
"""

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

    def settings(self) -> dict[str, float | int | str]:
        return {
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
        }


def scheduler_factory(optim: OptimizerConfig, total_steps: int):
    """What deepspeed.initialize takes as `lr_scheduler`: a callable building the LambdaLR on the engine's
    optimizer (DeepSpeed steps it once per optimizer step, and saves and loads it with the checkpoint)."""
    multiplier = WarmupSchedule(optim.schedule, optim.warmup_steps, total_steps, optim.min_lr_ratio)

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)

    return build


def apply_schedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR, optim: OptimizerConfig, total_steps: int
) -> list[str]:
    """Give a LambdaLR loaded from a checkpoint the configured schedule and base learning rate, keeping its
    position (last_epoch: the optimizer steps taken); its optimizer's lr is then the configured schedule's
    for the next step. Returns what differed from the restored settings, as "name old -> new"."""
    multiplier = WarmupSchedule(optim.schedule, optim.warmup_steps, total_steps, optim.min_lr_ratio)
    groups = scheduler.optimizer.param_groups
    restored = scheduler.lr_lambdas[0]
    before = restored.settings() if isinstance(restored, WarmupSchedule) else {}
    changes = [
        f"{name} {before[name]} -> {value}"
        for name, value in multiplier.settings().items()
        if name in before and before[name] != value
    ]
    changes += [f"lr {old:g} -> {optim.lr:g}" for old in sorted(set(scheduler.base_lrs)) if old != optim.lr]
    scheduler.lr_lambdas = [multiplier] * len(groups)
    scheduler.base_lrs = [optim.lr] * len(groups)
    lr = optim.lr * multiplier(scheduler.last_epoch)
    for group in groups:
        group["initial_lr"] = optim.lr
        group["lr"] = lr
    scheduler._last_lr = [lr] * len(groups)  # what get_last_lr() reports
    return changes
