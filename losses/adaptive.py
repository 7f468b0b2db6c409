"""The adaptive GAN weight, computed without a second backward through the decoder (DESIGN.md decision 2).

w = ||g_nll|| / (||g_adv|| + eps), clamped to [0, max], where g_* are the gradients of the
reconstruction(+perceptual) loss and of the generator's adversarial loss with respect to the decoder's
last conv weight. Both gradients are averaged over the data-parallel ranks before the norms are taken,
so every rank uses the same weight: the one a single process computes on the global batch.

The weight gradients follow from the last conv's input `h` (captured by a forward hook) and the loss
gradients with respect to its output `y`: dL/dW = conv3d_weight(h, dL/dy). That works inside any ZeRO
stage, where `torch.autograd.grad` through the engine's graph does not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class LastLayerInput:
    """Captures (detached) the input of a conv on forwards made while `capture` is set."""

    def __init__(self, conv: nn.Conv3d) -> None:
        if conv.padding_mode != "zeros":
            raise ValueError(f"the adaptive weight needs a zero-padded last conv, got {conv.padding_mode!r}")
        self.conv = conv
        self.capture = False
        self.input: torch.Tensor | None = None
        self._handle = conv.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self.capture:
            self.input = args[0].detach()

    def pop(self) -> torch.Tensor:
        if self.input is None:
            raise RuntimeError(
                "the last layer's input was not captured: was the forward run with capture=True?"
            )
        layer_input, self.input = self.input, None
        return layer_input

    def remove(self) -> None:
        self._handle.remove()


def last_layer_weight_grad(
    conv: nn.Conv3d, layer_input: torch.Tensor, grad_output: torch.Tensor
) -> torch.Tensor:
    """dL/dW of `conv` (fp32) from its input and dL/d(output)."""
    # Under ZeRO-3 the local weight is a partition; ds_shape is the full shape.
    weight_shape = tuple(getattr(conv.weight, "ds_shape", conv.weight.shape))
    return torch.nn.grad.conv3d_weight(
        layer_input.float(),
        weight_shape,
        grad_output.float(),
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
    )


def adaptive_weight(
    grad_nll: torch.Tensor,
    grad_adv: torch.Tensor,
    *,
    eps: float = 1e-4,
    max_weight: float = 1e4,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """||mean_ranks g_nll|| / (||mean_ranks g_adv|| + eps), clamped to [0, max_weight]; fp32, detached."""
    grads = torch.stack([grad_nll.detach().float(), grad_adv.detach().float()])
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(group)
        if world > 1:
            dist.all_reduce(grads, op=dist.ReduceOp.SUM, group=group)
            grads /= world
    weight = grads[0].norm() / (grads[1].norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
