"""Adversarial loss terms and discriminator regularisers, in fp32, with the formula of each stated.

- `discriminator_adversarial_loss` / `generator_adversarial_loss`: hinge, vanilla (minimax) and
  non-saturating GAN losses on raw logits.
- `feature_matching_loss`: L1 between the channel means of real and fake discriminator features.
- `gradient_penalty`: R1 on real data (Mescheder et al. 2018), zero- or one-centred;
  `lazy_penalty_scale`: StyleGAN2's lazy regularisation (apply every k steps, scaled by k).
- `LeCamRegularizer`: LeCam regularisation (Tseng et al. 2021) with EMAs shared across ranks.
- `LearnedLogVariance`: the learned-variance reconstruction NLL of taming-transformers / LDM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

GanLossKind = Literal["hinge", "vanilla", "non_saturating"]
GAN_LOSS_KINDS: tuple[str, ...] = get_args(GanLossKind)


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSS_KINDS:
        raise ValueError(f"unknown GAN loss kind {kind!r}; valid kinds: {', '.join(GAN_LOSS_KINDS)}")


def discriminator_adversarial_loss(logits_real: Tensor, logits_fake: Tensor, kind: GanLossKind) -> Tensor:
    """Discriminator loss on raw logits, a scalar in fp32.

    hinge: 0.5 * (mean relu(1 - real) + mean relu(1 + fake)).
    vanilla and non_saturating (the same for D): 0.5 * (mean softplus(-real) + mean softplus(fake)),
    i.e. the binary cross-entropy -0.5 * (mean log sigmoid(real) + mean log(1 - sigmoid(fake))).
    """
    _check_kind(kind)
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def generator_adversarial_loss(logits_fake: Tensor, kind: GanLossKind) -> Tensor:
    """Generator loss on the discriminator's raw logits for fakes, a scalar in fp32.

    hinge: -mean(fake).
    vanilla (minimax, saturating): -mean(softplus(fake)) = mean log(1 - sigmoid(fake)).
    non_saturating: mean(softplus(-fake)) = -mean log sigmoid(fake).
    """
    _check_kind(kind)
    fake = logits_fake.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "vanilla":
        return -F.softplus(fake).mean()
    return F.softplus(-fake).mean()


def feature_matching_loss(real_features: Sequence[Tensor], fake_features: Sequence[Tensor]) -> Tensor:
    """Mean over layers of mean_c |mu_real[c] - mu_fake[c]|, where mu[c] is the mean of channel c over
    the batch and all spatial/temporal dims of a (B, C, ...) feature; real features are detached. fp32."""
    if len(real_features) != len(fake_features) or not real_features:
        raise ValueError(
            "feature_matching_loss wants the same non-zero number of real and fake feature maps; "
            f"got {len(real_features)} real and {len(fake_features)} fake"
        )
    total = real_features[0].new_zeros((), dtype=torch.float32)
    for index, (real, fake) in enumerate(zip(real_features, fake_features, strict=True)):
        if real.shape[1:] != fake.shape[1:] or real.ndim < 2:
            raise ValueError(
                f"feature_matching_loss layer {index}: real {tuple(real.shape)} and fake {tuple(fake.shape)} "
                "must be (B, C, ...) with the same non-batch dims"
            )
        dims = [0, *range(2, real.ndim)]
        mu_real = real.detach().float().mean(dim=dims)  # (B, C, ...) -> (C,)
        mu_fake = fake.float().mean(dim=dims)
        total = total + (mu_real - mu_fake).abs().mean()
    return total / len(real_features)


def gradient_penalty(logits_real: Tensor, real: Tensor, center: Literal[0, 1] = 0) -> Tensor:
    """R1 penalty on real data, fp32 scalar; g = d(sum logits_real)/d(real), kept in the graph.

    center=0: mean_b ||g_b||^2 (zero-centred R1, the default); center=1: mean_b (||g_b|| - 1)^2
    (one-centred, WGAN-GP style but on real data). ||g_b|| is the L2 norm over all non-batch dims.
    Multiply by gamma/2 yourself for StyleGAN's convention.
    """
    if center not in (0, 1):
        raise ValueError(f"gradient_penalty center must be 0 or 1, got {center!r}")
    if not real.requires_grad:
        raise ValueError(
            "gradient_penalty needs the real input to require grad before the discriminator sees it: "
            "call real = real.detach().requires_grad_() and then logits_real = D(real)"
        )
    (grad,) = torch.autograd.grad(logits_real.float().sum(), real, create_graph=True)
    # vector_norm, unlike sqrt(sum(g**2)), has a zero (not NaN) gradient where g is all zero.
    norms = torch.linalg.vector_norm(grad.float().flatten(1), dim=1)  # (B,)
    if center == 0:
        return norms.square().mean()
    return (norms - 1.0).square().mean()


def lazy_penalty_scale(step: int, every: int) -> int:
    """StyleGAN2's lazy regularisation: apply the penalty only when step % every == 0, multiplied by
    `every` so its average strength is unchanged. Returns `every` on those steps, else 0 (skip it)."""
    if every < 1:
        raise ValueError(f"lazy regularisation interval `every` must be >= 1, got {every}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return every if step % every == 0 else 0


class LeCamRegularizer(nn.Module):
    """LeCam regularisation (Tseng et al. 2021, "Regularizing Generative Adversarial Networks under
    Limited Data"): penalty = mean(relu(D(real) - ema_fake)^2) + mean(relu(ema_real - D(fake))^2).

    The EMAs of the mean real and fake logits are fp32 buffers in the state dict (so checkpoints keep
    them). `update` takes the global batch means over the data-parallel ranks, so all ranks hold the
    same EMAs. Use `forward` (update, then penalty, the order of the authors' code) or call both yourself.
    """

    ema_real: Tensor
    ema_fake: Tensor
    initialized: Tensor

    def __init__(self, decay: float = 0.99, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"LeCam EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.process_group = process_group
        self.register_buffer("ema_real", torch.zeros((), dtype=torch.float32))
        self.register_buffer("ema_fake", torch.zeros((), dtype=torch.float32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LeCamRegularizer:
        # `.to(torch.bfloat16)` / `.half()` (e.g. by a bf16 engine) would round the EMAs and their updates
        # (0.99 is 0.98828 in bf16): device moves apply to them, dtype casts do not.
        before = {name: self._buffers[name] for name in ("ema_real", "ema_fake")}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        """Move the EMAs towards the batch means (set them on the first call).

        Under torch.distributed with world size > 1 the means are those of the global batch: sums and
        element counts are all-reduced, which equals the average of the ranks' means when every rank's
        batch has the same size.
        """
        stats = torch.stack(
            [
                logits_real.detach().float().sum(),
                torch.tensor(float(logits_real.numel()), device=logits_real.device),
                logits_fake.detach().float().sum().to(logits_real.device),
                torch.tensor(float(logits_fake.numel()), device=logits_real.device),
            ]
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.process_group)
        stats = stats.to(self.ema_real.device)
        mean_real, mean_fake = stats[0] / stats[1], stats[2] / stats[3]
        # A batch with NaN/Inf logits (a step the trainer skips) leaves the EMAs as they were: the same
        # decision on every rank, since the statistics are the all-reduced ones.
        finite = torch.isfinite(stats).all()
        # torch.where rather than `if initialized`: no device-to-host sync on the GPU.
        for ema, mean in ((self.ema_real, mean_real), (self.ema_fake, mean_fake)):
            updated = torch.where(self.initialized, torch.lerp(mean, ema, self.decay), mean)
            ema.copy_(torch.where(finite, updated, ema))
        self.initialized.logical_or_(finite)

    def penalty(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """mean(relu(logits_real - ema_fake)^2) + mean(relu(ema_real - logits_fake)^2), fp32 scalar;
        gradients flow into the logits, not into the EMAs."""
        ema_real = self.ema_real.to(logits_real.device)
        ema_fake = self.ema_fake.to(logits_real.device)
        return (
            F.relu(logits_real.float() - ema_fake).square().mean()
            + F.relu(ema_real - logits_fake.float()).square().mean()
        )

    def forward(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        """`update` with this batch's logits, then the `penalty` against the updated EMAs."""
        self.update(logits_real, logits_fake)
        return self.penalty(logits_real, logits_fake)

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


class LearnedLogVariance(nn.Module):
    """A learned scalar log-variance for the reconstruction term (taming-transformers / LDM):
    forward(rec) = mean(rec / exp(logvar) + logvar), fp32.

    `rec` is the per-element reconstruction distance, e.g. |x - x_hat| (+ perceptual). taming sums over
    elements and divides by the batch size; the mean here keeps the scale independent of the resolution
    and has the same optimum, logvar = log(mean(rec)).
    """

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        # shape (1,), not a 0-dim tensor: DeepSpeed's parameter broadcast views parameters as bytes
        self.logvar = nn.Parameter(torch.full((1,), float(init), dtype=torch.float32))

    def forward(self, rec: Tensor) -> Tensor:
        logvar = self.logvar.float().squeeze(0)
        return (rec.float() / logvar.exp() + logvar).mean()
