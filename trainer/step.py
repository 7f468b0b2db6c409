"""One adversarial training step over two DeepSpeed engines.

Per micro-batch: one autoencoder forward through the generator engine; the generator step (losses on a
detached fp32 copy of the reconstruction, the discriminator called through its raw module with frozen
parameters, the adaptive weight from the last decoder conv, one backward through the engine); then the
discriminator step on the same reconstruction, detached.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from losses.adaptive import LastLayerInput, last_layer_weight_grad
from losses.gan import lazy_penalty_scale
from losses.video_loss import VideoAutoencoderLoss, as_logits_dict, split_features
from trainer.distributed import all_ranks_true, gathered


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters of `module` stop requiring grad inside the block (gradients still reach its inputs)."""
    was_trainable = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for param, trainable in zip(module.parameters(), was_trainable, strict=True):
            param.requires_grad_(trainable)


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _float_logits(output) -> dict[str, torch.Tensor]:
    return {key: value.float() for key, value in as_logits_dict(output).items()}


class AdversarialStep:
    """The generator step and the discriminator step for one micro-batch."""

    def __init__(
        self, g_engine, d_engine, loss: VideoAutoencoderLoss, *, sample_posterior: bool = True
    ) -> None:
        self.g_engine = g_engine
        self.d_engine = d_engine
        self.loss = loss
        self.sample_posterior = sample_posterior
        # The generator engine trains the autoencoder, and the loss's log-variance when it learns one.
        self.autoencoder = getattr(g_engine.module, "autoencoder", g_engine.module)
        self.logvar = loss.logvar.logvar if loss.logvar is not None else None
        # The raw discriminator: calling d_engine(...) inside the generator's backward would run the D
        # engine's gradient hooks there and break ZeRO (DESIGN.md decision 1).
        self.discriminator = d_engine.module
        self.last_layer = LastLayerInput(self.autoencoder.last_layer)
        self.g_dtype = _dtype_of(self.autoencoder)
        self.d_dtype = _dtype_of(self.discriminator)
        # Whether the last generator / discriminator micro-step's optimizer update was applied: None
        # between accumulation boundaries, False when a non-finite gradient made it skip (`_optimizer_step`).
        self.generator_applied: bool | None = None
        self.discriminator_applied: bool | None = None

    def generator_step(
        self, video: torch.Tensor, global_step: int, target: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Update the autoencoder; returns its metrics and the detached reconstruction (B, C, T, H, W).

        `target`: what the output is compared with, when it is not the input (restoration training)."""
        loss = self.loss
        adversarial = loss.adversarial_active(global_step)
        adaptive = adversarial and loss.use_adaptive_weight
        self.last_layer.capture = adaptive
        out = self.g_engine(video.to(self.g_dtype), sample_posterior=self.sample_posterior)
        self.last_layer.capture = False
        recon = out.recon

        # Loss gradients w.r.t. the reconstruction are taken on a detached fp32 copy; one backward through
        # the engine then carries them into the autoencoder.
        y = recon.detach().float().requires_grad_()
        real = (video if target is None else target).float()
        # KL for a Gaussian posterior; a quantizer's auxiliary loss (LFQ entropy + commitment) instead
        kl = None if out.logvar is None else loss.kl_loss(out.mean, out.logvar)
        aux = out.aux_loss if out.logvar is None else None
        # D stays frozen until its gradients w.r.t. y are taken: a checkpointed block recomputes its
        # forward then, and must see the same requires_grad flags as in the forward.
        with frozen(self.discriminator):
            discriminator_out: dict = {}
            if adversarial:
                discriminator_out = self._discriminate(real, y, features=loss.feature_matching_weight > 0)
            terms = loss.generator_loss(real, y, global_step, kl=kl, aux_loss=aux, **discriminator_out)

            # d(nll)/d(y), and d(nll)/d(logvar) when the loss learns its log-variance
            wrt = [y] if self.logvar is None else [y, self.logvar]
            grad_nll, *grad_logvar = torch.autograd.grad(terms.nll, wrt)
            grad_y = grad_nll
            weight = torch.zeros((), device=y.device)
            adaptive_value = torch.zeros((), device=y.device)
            if adversarial:
                fm_weight = loss.feature_matching_weight
                if fm_weight > 0:
                    (grad_adv,) = torch.autograd.grad(terms.adversarial, y, retain_graph=True)
                    (grad_fm,) = torch.autograd.grad(terms.feature_matching, y)
                    grad_y = grad_y + fm_weight * grad_fm
                else:
                    (grad_adv,) = torch.autograd.grad(terms.adversarial, y)
                adaptive_value = torch.ones((), device=y.device)
                if adaptive:
                    conv, layer_input = self.last_layer.conv, self.last_layer.pop()
                    adaptive_value = loss.adaptive_weight(
                        last_layer_weight_grad(conv, layer_input, grad_nll),
                        last_layer_weight_grad(conv, layer_input, grad_adv),
                    )
                # the weight the adversarial gradient gets: adaptive x adversarial_loss_weight (x warm-up)
                weight = adaptive_value * loss.adversarial_factor(global_step)
                grad_y = grad_y + weight * grad_adv

        detached = terms._replace(
            nll=terms.nll.detach(),
            adversarial=terms.adversarial.detach(),
            feature_matching=terms.feature_matching.detach(),
            latent=terms.latent.detach(),
        )
        total = loss.generator_total(detached, adaptive_value, global_step)
        # d(surrogate)/d(recon) = grad_y: the generator gradient without a second decoder backward.
        surrogate = (recon.float() * grad_y).sum() + terms.latent
        # ZeRO-3 keeps the learned log-variance partitioned (empty) outside a forward of its own module: the
        # loss's call gathered it and released it after. Whole again here, it takes its gradient into the
        # engine, and is logged as a copy (the loss's entry is a view of the parameter: empty under ZeRO-3,
        # and at any stage it would show the value after this step's update).
        with gathered([self.logvar]):
            if grad_logvar:
                surrogate = surrogate + (self.logvar.float() * grad_logvar[0].float()).sum()
                terms.log["logvar"] = self.logvar.detach().float().squeeze(0).clone()
            # A NaN/Inf loss makes NaN gradients: the optimizer step below skips them (see `_optimizer_step`).
            self.g_engine.backward(surrogate)
        self.generator_applied = _optimizer_step(self.g_engine)

        metrics = dict(terms.log)
        metrics.update(total=total, adaptive_weight=weight.detach())
        metrics.update({f"quantizer/{name}": value.float() for name, value in (out.metrics or {}).items()})
        return metrics, recon.detach()

    def _discriminate(self, real: torch.Tensor, fake: torch.Tensor, *, features: bool) -> dict:
        """The discriminator (frozen by the caller) on the reconstruction; with features, also its features
        on the real clip for feature matching."""
        if not features:
            return {"logits_fake": _float_logits(self.discriminator(fake.to(self.d_dtype)))}
        with torch.no_grad():
            _, real_features = split_features(self.discriminator(real.to(self.d_dtype), return_features=True))
        logits, fake_features = split_features(
            self.discriminator(fake.to(self.d_dtype), return_features=True)
        )
        return {
            "logits_fake": _float_logits(logits),
            "real_features": real_features,
            "fake_features": fake_features,
        }

    def discriminator_step(
        self, real: torch.Tensor, fake: torch.Tensor, global_step: int
    ) -> dict[str, torch.Tensor]:
        """Update the discriminator(s) on real clips and detached reconstructions: GAN loss, lazy R1 on
        the real clips, LeCam."""
        loss = self.loss
        real, fake = real.to(self.d_dtype).detach(), fake.to(self.d_dtype).detach()
        # (2B, C, T, H, W): one forward for both halves; GroupNorm keeps the samples independent.
        logits = as_logits_dict(self.d_engine(torch.cat([real, fake])))
        halves = {key: value.float().chunk(2) for key, value in logits.items()}
        logits_real = {key: pair[0] for key, pair in halves.items()}
        logits_fake = {key: pair[1] for key, pair in halves.items()}
        penalty = {}
        if loss.grad_penalty_loss_weight > 0 and lazy_penalty_scale(global_step, loss.grad_penalty_every):
            # R1 needs d(logits)/d(real) inside the graph. torch.autograd.grad through the engine's output
            # would run the engine's end-of-backward gradient reduction (ZeRO-2: IndexError in
            # reduce_ipg_grads), so the penalty takes its own forward through the raw module; its
            # parameter gradients still reach the engine in the backward below.
            penalty_input = real.clone().requires_grad_()
            penalty = {
                "real": penalty_input,
                "penalty_logits": _float_logits(self.discriminator(penalty_input)),
            }
        d_loss, metrics = loss.discriminator_loss(logits_real, logits_fake, global_step, **penalty)
        self.d_engine.backward(d_loss)
        self.discriminator_applied = _optimizer_step(self.d_engine)
        return metrics


def _optimizer_step(engine) -> bool | None:
    """engine.step(); at a gradient-accumulation boundary, whether the update was applied, the same on
    every rank; None between boundaries.

    A non-finite loss on any rank makes the reduced gradients non-finite on every rank. DeepSpeed then skips
    the update (ZeRO 1-3, and bf16 at any stage: its optimizer finds the non-finite gradient norm and
    reports `overflow`, and the engine clears the gradients, leaves the learning-rate schedule where it
    was, counts the step in `skipped_steps` and still advances `global_steps` and `global_samples`). At
    ZeRO-0 in fp32 the engine steps the torch optimizer itself, which has no such check: it is done here,
    and a non-finite step goes through `_skipped_update`.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    if boundary and engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        # one norm over all gradients (non-finite when an entry is), one device sync
        finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        # ZeRO-0 all-reduces the gradients at the boundary (on more than one rank), so every rank sees the
        # same; the vote only guards against a rank disagreeing.
        if not all_ranks_true(finite, grads[0].device if grads else engine.device):
            _skipped_update(engine, grads)
            return False
    engine.step()
    if not boundary:
        return None
    return engine.was_step_applied()


class _OverflowedOptimizer:
    """Stands in for a torch optimizer for one engine.step(): `step` updates nothing, and `overflow` tells
    the engine that it skipped, as DeepSpeed's own optimizers do; everything else is the optimizer's."""

    overflow = True

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer

    def __getattr__(self, name: str):
        return getattr(self._optimizer, name)

    def step(self, closure=None) -> None:
        return None


def _skipped_update(engine, grads: list[torch.Tensor]) -> None:
    """engine.step() at ZeRO-0 fp32 with non-finite gradients, skipped the way DeepSpeed skips an overflow.

    The engine's own step runs, so its bookkeeping is DeepSpeed's: with an optimizer that reports
    `overflow`, `_take_model_step` clears the gradients, marks the step not applied, counts it in
    `skipped_steps`, does not step the learning-rate schedule, and advances `global_steps`, `global_samples`
    and `micro_steps` as for any step (ZeRO-1/2 do the same on an overflow). Only the torch optimizer is
    swapped, for that call, for one that updates nothing: AdamW given zero gradients would still move the
    weights (momentum, weight decay). The gradients are zeroed first rather than dropped: the engine clips
    fp32 gradients before the optimizer step, an all-reduce that every rank joins, and with no gradients
    left it fails (IndexError in deepspeed.runtime.utils.clip_grad_norm_). tests/test_nan_skip_zero0.py
    checks all of this against ZeRO-2 on the installed DeepSpeed.
    """
    for grad in grads:
        grad.zero_()
    optimizer = engine.optimizer
    engine.optimizer = _OverflowedOptimizer(optimizer)
    try:
        engine.step()
    finally:
        engine.optimizer = optimizer
