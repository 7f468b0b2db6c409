"""Wrapping the autoencoder and the discriminator in two DeepSpeed engines (DESIGN.md decision 1)."""

from __future__ import annotations

import math
import types
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import nn

from trainer.config import OptimizerConfig, RunConfig
from trainer.schedule import apply_schedule, scheduler_factory


class GeneratorModule(nn.Module):
    """What the generator engine trains when the loss learns a log-variance: the autoencoder and that
    scalar. State-dict keys `autoencoder.*` and `loss_logvar.logvar` (export keeps the former)."""

    def __init__(self, autoencoder: nn.Module, loss_logvar: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.loss_logvar = loss_logvar

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.autoencoder(*args, **kwargs)


def compile_autoencoder(autoencoder: nn.Module) -> None:
    """train.compile: torch.compile the module's forward in place (its state dict keeps its keys, and the
    engine and the trainer's hooks see the same module), static shapes.

    Random ops inside (the posterior sample) run torch's eager kernels, so a compiled run draws the same
    noise from the same generator state as an eager one, and resumes exactly as it does."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    # einops registers a backend for each array type on its first use, and dynamo guards the compiled
    # forward on how many are registered: numpy's, first used after the first compiled call (the trainer's
    # TensorBoard media strip), made dynamo trace the whole forward again. Both registered here.
    rearrange(np.zeros(1), "a -> a")
    rearrange(torch.zeros(1), "a -> a")
    autoencoder.compile(dynamic=False)


def deepspeed_config(config: RunConfig, optim: OptimizerConfig) -> dict[str, Any]:
    """The DeepSpeed config of one engine; both engines share batch sizes, precision and ZeRO stage."""
    return {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": config.train.gradient_accumulation_steps,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": config.deepspeed.bf16},
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        # A torch AdamW object (see build_engine): no JIT-compiled DeepSpeed optimizer op.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(
    module: nn.Module, optim: OptimizerConfig, config: RunConfig, device: torch.device, total_steps: int
):
    """One DeepSpeed engine with its own AdamW over the module's trainable parameters and its own
    learning-rate schedule over `total_steps` optimizer steps."""
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=optim.lr,
        betas=optim.betas,
        weight_decay=optim.weight_decay,
        # torch's fused kernels (CUDA, and CPU: 3x the foreach step there); other accelerators: foreach
        fused=device.type in ("cuda", "cpu"),
    )
    engine, *_ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler_factory(optim, total_steps),
        config=deepspeed_config(config, optim),
        dist_init_required=False,
    )
    use_foreach_bf16_step(engine)  # bf16 at ZeRO-0 only; checks for itself
    if config.deepspeed.zero_stage == 0 and engine.dp_world_size == 1:
        # ZeRO-0 all-reduces the gradients through flat buffers after every backward: a copy of every
        # gradient, the collective and a copy back (250 ms a step in bench/step.py). Over one rank that is
        # the identity, so it is skipped. (ZeRO 1-3 keep theirs: their optimizers' bookkeeping is in it.)
        engine.enable_backward_allreduce = False
    return engine


def use_foreach_bf16_step(engine) -> bool:
    """bf16 at ZeRO-0: DeepSpeed's unfused optimizer step with its per-parameter loops made list-wise.

    DeepSpeed wraps the optimizer of a bf16 ZeRO-0 engine in `FP16_UnfusedOptimizer`, whose step walks the
    parameters one by one: an inf/NaN check (amax and amin of each gradient, and the truth value of each
    result: a host sync per parameter on a GPU), a float32 copy of each gradient to take its norm, then
    the cast, unscale and copy back: 207 ms a step for the 28 M parameters of bench/step.py's autoencoder
    (bf16, CPU), of which AdamW itself is 42 ms. `_foreach_bf16_step` computes the same update: the cast
    into float32 gradient buffers kept between steps, the gradient norm with one foreach kernel and one
    sync, a non-finite norm skipping the step as DeepSpeed does for an overflow (a gradient with an inf or
    NaN has a non-finite norm), the clip factor from DeepSpeed's own `unscale_and_clip_grads`, the float32
    master update, one list-wise copy back to the bf16 weights. tests/test_engines_bf16.py: weights bit-equal to DeepSpeed's step without clipping
    and around a skipped NaN step, within 1e-6 with clipping (the norm is summed in float64, DeepSpeed
    sums it in float32). Other configurations (fp16 loss scaling, model parallelism, MoE, fused LAMB)
    keep DeepSpeed's step; returns whether the engine's step was replaced."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = engine.optimizer
    if not (
        type(optimizer) is FP16_UnfusedOptimizer
        and engine.bfloat16_enabled()
        and not optimizer.fused_lamb_legacy
        and optimizer.mpu is None
        and not engine.has_moe_layers
        and optimizer.loss_scale_config.cur_scale == 1.0
        and not optimizer.loss_scale_config.dynamic_loss_scale
    ):
        return False
    optimizer.step = types.MethodType(_foreach_bf16_step, optimizer)
    return True


def _foreach_bf16_step(self, closure=None) -> bool:
    """`FP16_UnfusedOptimizer.step` for bf16 (loss scale 1), list-wise; returns whether it overflowed."""
    low = [p for group in self.fp16_groups for p in group]
    master = [p for group in self.fp32_groups for p in group]
    buffers = _float32_gradients(self, master)
    present = [(p.grad, buffer) for p, buffer in zip(low, buffers, strict=True) if p.grad is not None]
    if present:
        grads, copies = (list(side) for side in zip(*present, strict=True))
        torch._foreach_copy_(copies, grads)  # the cast, into buffers kept from step to step
        # each gradient's norm in float32 (DeepSpeed: p.grad.float().norm()), summed in float64
        norms = torch._foreach_norm(copies, 2)
        total = float(torch.stack(norms).double().square().sum().sqrt())
    else:
        total = 0.0
    if not math.isfinite(total):
        return self._skip_invalid_grad_norm()
    self._global_grad_norm = total
    self._update_scale(False)
    for low_param, master_param, buffer in zip(low, master, buffers, strict=True):
        # as DeepSpeed: a parameter without a gradient steps with a zero one (AdamW still decays it)
        if low_param.grad is None:
            buffer.zero_()
        master_param.grad = buffer
    scale = self.unscale_and_clip_grads(total, apply_scale=False)
    if scale != 1.0:
        torch._foreach_mul_(buffers, 1.0 / scale)
    self.optimizer.step()
    for master_param in master:
        master_param.grad = None
    with torch.no_grad():
        torch._foreach_copy_(low, master)
    self.overflow = False
    return self.overflow


def _float32_gradients(optimizer, master: list[torch.Tensor]) -> list[torch.Tensor]:
    """One float32 gradient buffer per master weight, made once and kept on the optimizer.

    A fresh float32 copy of every gradient at each step cost more than the copy itself: the 7 MB
    buffers of bench/step.py's 256-channel convs come fresh from the OS each time (page faults), and the
    autoencoder engine's step took 150-165 ms, of which AdamW is about 40. DeepSpeed's ZeRO-1/2 bf16
    optimizers keep such buffers too (4 bytes per parameter)."""
    buffers = getattr(optimizer, "_float32_gradient_buffers", None)
    if buffers is None or [b.shape for b in buffers] != [p.shape for p in master]:
        buffers = [torch.empty_like(p, dtype=torch.float32) for p in master]
        optimizer._float32_gradient_buffers = buffers
    return buffers


def schedule_steps(config: RunConfig) -> dict[str, int]:
    """The optimizer steps each engine's learning-rate schedule spans (the discriminator steps from
    loss.disc_start on)."""
    max_steps = config.train.max_steps
    return {"generator": max_steps, "discriminator": max(max_steps - config.loss.disc_start, 1)}


def build_engines(autoencoder: nn.Module, discriminator: nn.Module, config: RunConfig, device: torch.device):
    """(generator engine, discriminator engine), each with its optimizer settings from `optim`."""
    steps = schedule_steps(config)
    g_engine = build_engine(
        autoencoder.to(device), config.optim.generator, config, device, steps["generator"]
    )
    d_engine = build_engine(
        discriminator.to(device), config.optim.discriminator, config, device, steps["discriminator"]
    )
    return g_engine, d_engine


def apply_configured_schedules(g_engine, d_engine, config: RunConfig) -> dict[str, list[str]]:
    """After a checkpoint load: both engines' learning-rate schedules from `config` again (DeepSpeed
    restores the saved ones), at the step the checkpoint reached. Returns the changed settings by engine."""
    steps = schedule_steps(config)
    return {
        name: apply_schedule(engine.lr_scheduler, getattr(config.optim, name), steps[name])
        for name, engine in (("generator", g_engine), ("discriminator", d_engine))
    }


def restore_fp32_weights(engine, state: dict[str, torch.Tensor]) -> None:
    """Put full-precision weights into the engine's fp32 master copy.

    In bf16 mode DeepSpeed casts the module to bf16 before it builds the fp32 master weights, so weights
    loaded in fp32 (model.init_from) would otherwise start training rounded to bf16.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in engine.module.named_parameters():
        if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
            safe_set_full_fp32_param(param, state[name].to(param.device, torch.float32))
