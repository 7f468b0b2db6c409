"""A one-process stand-in for a DeepSpeed engine: what trainer/step.py's AdversarialStep uses of one
(forward, backward, step and the ZeRO-0 fp32 queries its non-finite check asks), over a plain module; and
the error measure the tests comparing two recorded steps use."""

import torch


class LocalEngine:
    """ZeRO-0, fp32, one process, every micro-batch a gradient-accumulation boundary; `step` applies SGD
    at learning rate `lr` (0 by default: the weights stay as they are)."""

    def __init__(self, module: torch.nn.Module, lr: float = 0.0) -> None:
        self.module = module
        self.device = next(module.parameters()).device
        self.optimizer = torch.optim.SGD(module.parameters(), lr=lr)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def is_gradient_accumulation_boundary(self) -> bool:
        return True

    def zero_optimization_stage(self) -> int:
        return 0

    def bfloat16_enabled(self) -> bool:
        return False

    def was_step_applied(self) -> bool:
        return True


class RecordingEngine(LocalEngine):
    """A LocalEngine whose `step` records the gradients (in `grads`, by parameter name) and applies nothing,
    so that two steps' gradients can be compared."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__(module)
        self.grads: dict[str, torch.Tensor] = {}

    def step(self) -> None:
        self.grads = {n: p.grad.clone() for n, p in self.module.named_parameters() if p.grad is not None}
        self.module.zero_grad(set_to_none=True)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest entry of `expected` (in float64)."""
    scale = expected.double().abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()
