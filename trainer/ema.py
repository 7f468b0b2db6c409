"""An fp32 exponential moving average of the autoencoder's weights (ema.enabled), for evaluation and export.

Every rank holds the full average (the same on every rank), updated after each applied optimizer step
from the engine's module weights: the working copy, which in bf16 runs is the bf16 rounding of the fp32
master weights. Under ZeRO-3 those are partitioned, and the update gathers them (a collective every rank
joins). Buffers are not averaged: they are copied.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.distributed import gathered


class ModelEMA:
    """fp32 averages of `module`'s parameters and copies of its buffers, keyed as its state dict."""

    def __init__(self, module: nn.Module, decay: float, *, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        with gathered(module.parameters()), torch.no_grad():
            self.params = {name: p.detach().float().clone() for name, p in module.named_parameters()}
            self.buffers = {name: b.detach().clone() for name, b in module.named_buffers()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        decay = self.current_decay()
        with gathered(module.parameters()):
            for name, param in module.named_parameters():
                self.params[name].lerp_(param.detach().float(), 1 - decay)
            for name, buffer in module.named_buffers():
                self.buffers[name].copy_(buffer)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights (on the CPU) as the module's state dict, plus `__ema_updates__`."""
        state = {name: t.detach().cpu() for name, t in {**self.params, **self.buffers}.items()}
        state["__ema_updates__"] = torch.tensor(self.updates)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.updates = int(state.pop("__ema_updates__", torch.tensor(0)))
        missing = (set(self.params) | set(self.buffers)) - set(state)
        unexpected = set(state) - set(self.params) - set(self.buffers)
        if missing or unexpected:
            raise ValueError(
                f"EMA weights do not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for name, tensor in self.params.items():
            tensor.copy_(state[name].to(tensor.device, torch.float32))
        for name, tensor in self.buffers.items():
            tensor.copy_(state[name].to(tensor.device, tensor.dtype))

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged state dict without bookkeeping entries (for loading into a plain module)."""
        return {**self.params, **self.buffers}


def weights_without_bookkeeping(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An EMA state dict read from a checkpoint, as a module state dict."""
    return {key: value for key, value in state.items() if not key.startswith("__ema_")}
