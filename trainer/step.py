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

from losses.adaptive import LastLayerInput, adaptive_weight, last_layer_weight_grad
from losses.video_loss import VideoLoss
from trainer.distributed import all_ranks_true


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


class AdversarialStep:
    """The generator step and the discriminator step for one micro-batch."""

    def __init__(
        self,
        g_engine,
        d_engine,
        loss: VideoLoss,
        *,
        adaptive: bool = True,
        adaptive_eps: float = 1e-4,
        adaptive_max: float = 1e4,
        sample_posterior: bool = True,
    ) -> None:
        self.g_engine = g_engine
        self.d_engine = d_engine
        self.loss = loss
        self.adaptive = adaptive
        self.adaptive_eps = adaptive_eps
        self.adaptive_max = adaptive_max
        self.sample_posterior = sample_posterior
        self.autoencoder = g_engine.module
        # The raw discriminator: calling d_engine(...) inside the generator's backward would run the D
        # engine's gradient hooks there and break ZeRO (DESIGN.md decision 1).
        self.discriminator = d_engine.module
        self.last_layer = LastLayerInput(self.autoencoder.last_layer)
        self.g_dtype = _dtype_of(self.autoencoder)
        self.d_dtype = _dtype_of(self.discriminator)

    def generator_step(
        self, video: torch.Tensor, global_step: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Update the autoencoder; returns its metrics and the detached reconstruction (B, C, T, H, W)."""
        adversarial = self.loss.adversarial_active(global_step)
        self.last_layer.capture = adversarial and self.adaptive
        out = self.g_engine(video.to(self.g_dtype), sample_posterior=self.sample_posterior)
        self.last_layer.capture = False
        recon = out.recon

        # Loss gradients w.r.t. the reconstruction are taken on a detached fp32 copy; one backward through
        # the engine then carries them into the autoencoder.
        y = recon.detach().float().requires_grad_()
        real = video.float()
        nll, metrics = self.loss.nll_loss(real, y)
        # KL for a Gaussian posterior; a quantizer's auxiliary loss (LFQ entropy + commitment) instead
        if out.logvar is None:
            kl = torch.zeros((), device=y.device)
        else:
            kl = self.loss.kl_loss(out.mean.float(), out.logvar.float())
        aux = out.aux_loss.float() if out.aux_loss is not None else torch.zeros((), device=y.device)
        # terms whose gradient reaches the encoder directly, not through the reconstruction
        latent_loss = self.loss.kl_weight * kl + self.loss.quantizer_aux_loss_weight * aux
        (grad_nll,) = torch.autograd.grad(nll, y)

        g_adv = torch.zeros((), device=y.device)
        weight = torch.zeros((), device=y.device)
        grad_y = grad_nll
        if adversarial:
            with frozen(self.discriminator):
                logits_fake = self.discriminator(y.to(self.d_dtype)).float()
            g_adv = self.loss.generator_adversarial_loss(logits_fake)
            (grad_adv,) = torch.autograd.grad(g_adv, y)
            if self.adaptive:
                conv, layer_input = self.last_layer.conv, self.last_layer.pop()
                weight = adaptive_weight(
                    last_layer_weight_grad(conv, layer_input, grad_nll),
                    last_layer_weight_grad(conv, layer_input, grad_adv),
                    eps=self.adaptive_eps,
                    max_weight=self.adaptive_max,
                )
            else:
                weight = torch.ones((), device=y.device)
            weight = weight * self.loss.adversarial_weight
            grad_y = grad_nll + weight * grad_adv

        total = nll.detach() + latent_loss.detach() + weight * g_adv.detach()
        self._check_finite(total, "generator")
        # d(surrogate)/d(recon) = grad_y: the generator gradient without a second decoder backward.
        surrogate = (recon.float() * grad_y).sum() + latent_loss
        self.g_engine.backward(surrogate)
        self.g_engine.step()

        metrics.update(
            {
                "total": total,
                "nll": nll.detach(),
                "kl": kl.detach(),
                "quantizer_aux": aux.detach(),
                **{
                    f"quantizer/{name}": value.detach().float() for name, value in (out.metrics or {}).items()
                },
                "generator_adversarial": g_adv.detach(),
                "adaptive_weight": weight.detach(),
            }
        )
        if out.logvar is None:  # a quantized latent: its auxiliary loss and codebook statistics
            metrics["quantizer_aux"] = aux.detach()
            metrics.update(
                {f"quantizer/{name}": value.float() for name, value in (out.metrics or {}).items()}
            )
            del metrics["kl"]
        return metrics, recon.detach()

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """Update the discriminator on real clips and detached reconstructions (hinge loss)."""
        # (2B, C, T, H, W): one forward for both halves; GroupNorm keeps the samples independent.
        logits = self.d_engine(torch.cat([real.to(self.d_dtype), fake.to(self.d_dtype)])).float()
        logits_real, logits_fake = logits.chunk(2)
        d_loss = self.loss.discriminator_loss(logits_real, logits_fake)
        self._check_finite(d_loss.detach(), "discriminator")
        self.d_engine.backward(d_loss)
        self.d_engine.step()
        return {
            "discriminator": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }

    def _check_finite(self, value: torch.Tensor, which: str) -> None:
        # Every rank takes the same decision, so no rank is left waiting in a collective.
        if not all_ranks_true(bool(torch.isfinite(value).all()), value.device):
            raise FloatingPointError(
                f"non-finite {which} loss on at least one rank; lower the learning rate, check the data, or "
                f"resume from the last checkpoint"
            )
