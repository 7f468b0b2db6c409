"""Wrapping the autoencoder and the discriminator in two DeepSpeed engines (DESIGN.md decision 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainer.config import OptimizerConfig, RunConfig
from trainer.schedule import scheduler_factory


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
    if config.deepspeed.zero_stage == 0 and engine.dp_world_size == 1:
        # ZeRO-0 all-reduces the gradients through flat buffers after every backward: a copy of every
        # gradient, the collective and a copy back (250 ms a step in bench/step.py). Over one rank that is
        # the identity, so it is skipped. (ZeRO 1-3 keep theirs: their optimizers' bookkeeping is in it.)
        engine.enable_backward_allreduce = False
    return engine


def build_engines(autoencoder: nn.Module, discriminator: nn.Module, config: RunConfig, device: torch.device):
    """(generator engine, discriminator engine), each with its optimizer settings from `optim`."""
    max_steps = config.train.max_steps
    g_engine = build_engine(autoencoder.to(device), config.optim.generator, config, device, max_steps)
    # the discriminator steps from loss.disc_start on
    d_steps = max(max_steps - config.loss.disc_start, 1)
    d_engine = build_engine(discriminator.to(device), config.optim.discriminator, config, device, d_steps)
    return g_engine, d_engine


def restore_fp32_weights(engine, state: dict[str, torch.Tensor]) -> None:
    """Put full-precision weights into the engine's fp32 master copy.

    In bf16 mode DeepSpeed casts the module to bf16 before it builds the fp32 master weights, so weights
    loaded in fp32 (model.init_from) would otherwise start training rounded to bf16.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in engine.module.named_parameters():
        if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
            safe_set_full_fp32_param(param, state[name].to(param.device, torch.float32))
