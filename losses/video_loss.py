"""The perceptual-adversarial objective for video autoencoders, in one module with two clean entry points.

- `generator_loss(...)` returns the generator's terms apart (`GeneratorTerms`): the reconstruction side
  `nll` (pixel L1/MSE, optionally through a learned log-variance, plus LPIPS, VGG19 perceptual and Gram
  style losses on sampled frames), the adversarial term (weighted over every discriminator output), GAN
  feature matching, and the latent terms (KL, quantizer aux). The trainer needs them apart: the adaptive
  weight balances the adversarial term against `nll` (DESIGN.md decision 2, losses/adaptive.py).
- `discriminator_loss(...)` returns the discriminator's loss: the GAN loss over every output, a lazy R1
  gradient penalty (zero- or one-centred) and LeCam regularisation, with the EMAs shared across ranks.
- `forward(inputs, reconstructions, optimizer_idx, global_step, aux_losses=None, last_layer=None,
  split="train")` is the seed-compatible adapter (CogVideo's `VideoAutoencoderLoss`) over those two, for
  hand-written loops in one process. What it fixes compared with the seed, by design:
  * disc_start gates the generator's adversarial term and the discriminator's loss alike, with an
    optional linear warm-up of the adversarial weight after it;
  * the adaptive weight is computed against the reconstruction+perceptual loss only, in fp32, clamped to
    [adaptive_weight_min, adaptive_weight_max], and averaged over data-parallel ranks when
    torch.distributed is initialised (so every rank uses the same one);
  * the discriminator's loss before disc_start is an exact zero, not a loss times 0 that still runs D.

Discriminator outputs are dicts of logits by output key (see models.discriminator_set); a module that
returns a single tensor is treated as {"discriminator": logits}. Every key has a weight
(`discriminator_weights`, default 1.0); keys "<name>@<f>x" (multiscale copies of a 2D discriminator) are
further multiplied by `multiscale_adversarial_loss_weight`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from losses.adaptive import adaptive_weight
from losses.gan import (
    GAN_LOSS_KINDS,
    LearnedLogVariance,
    LeCamRegularizer,
    discriminator_adversarial_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    gradient_penalty,
    lazy_penalty_scale,
)

SINGLE_DISCRIMINATOR_KEY = "discriminator"
DiscriminatorOutput = Tensor | Mapping[str, Tensor]


class GeneratorTerms(NamedTuple):
    """The generator's loss, term by term (fp32 scalars), and detached values to log.

    total = nll + feature_matching_weight * feature_matching + latent + adversarial_factor x adaptive
    weight x adversarial; see `VideoAutoencoderLoss.generator_total`.
    """

    nll: Tensor  # reconstruction + perceptual terms: what the adaptive weight balances against
    adversarial: Tensor  # weighted generator GAN loss over the discriminator outputs (0 when inactive)
    feature_matching: Tensor  # unweighted mean over outputs (0 when off or inactive)
    latent: Tensor  # kl_weight * KL / (C*T*H*W) + quantizer_aux_loss_weight * aux, already weighted
    log: dict[str, Tensor]


def as_logits_dict(output: DiscriminatorOutput) -> dict[str, Tensor]:
    """A discriminator's output as {key: logits}: dicts as they are, a tensor under "discriminator"."""
    if isinstance(output, Tensor):
        return {SINGLE_DISCRIMINATOR_KEY: output}
    return dict(output)


def split_features(output: Mapping[str, Any] | tuple) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
    """The output of a `return_features=True` call -> ({key: logits}, {key: features})."""
    if isinstance(output, tuple):  # a single discriminator: (logits, features)
        output = {SINGLE_DISCRIMINATOR_KEY: output}
    logits = {key: value[0] for key, value in output.items()}
    features = {key: list(value[1]) for key, value in output.items()}
    return logits, features


class VideoAutoencoderLoss(nn.Module):
    """Reconstruction, perceptual, adversarial and regularisation terms for (B, C, T, H, W) clips in [-1, 1].

    The first six arguments are the seed's (CogVideo's VideoAutoencoderLoss); the rest are keyword-only.
    Perceptual modules are called as `module(real_frames, fake_frames) -> (N,)` on `perceptual_frames`
    random frames per clip (0: all), the same frames for every perceptual term.
    """

    def __init__(
        self,
        disc_start: int = 0,
        perceptual_weight: float = 1.0,
        adversarial_loss_weight: float = 0.1,
        multiscale_adversarial_loss_weight: float = 0.0,
        grad_penalty_loss_weight: float = 0.0,
        quantizer_aux_loss_weight: float = 1.0,
        *,
        rec_loss: Literal["l1", "mse"] = "l1",
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        kl_weight: float = 1e-6,
        lpips: nn.Module | None = None,
        perceptual_frames: int = 1,
        vgg_perceptual: nn.Module | None = None,
        vgg_perceptual_weight: float = 0.0,
        style: nn.Module | None = None,
        style_weight: float = 0.0,
        feature_matching_weight: float = 0.0,
        gan_loss: Literal["hinge", "vanilla", "non_saturating"] = "hinge",
        adaptive_weight: bool = True,
        adaptive_weight_eps: float = 1e-4,
        adaptive_weight_min: float = 0.0,
        adaptive_weight_max: float = 1e4,
        adversarial_warmup_steps: int = 0,
        discriminator: nn.Module | None = None,
        discriminator_weights: Mapping[str, float] | None = None,
        grad_penalty_center: Literal[0, 1] = 0,
        grad_penalty_every: int = 1,
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.99,
    ) -> None:
        super().__init__()
        if rec_loss not in ("l1", "mse"):
            raise ValueError(f"rec_loss must be 'l1' or 'mse', got {rec_loss!r}")
        if gan_loss not in GAN_LOSS_KINDS:
            raise ValueError(f"gan_loss must be one of {GAN_LOSS_KINDS}, got {gan_loss!r}")
        for name, module, weight in (
            ("lpips", lpips, perceptual_weight),
            ("vgg_perceptual", vgg_perceptual, vgg_perceptual_weight),
            ("style", style, style_weight),
        ):
            if weight > 0 and module is None:
                raise ValueError(
                    f"a {name} weight > 0 needs the {name} module; pass {name}=... or set it to 0"
                )
        weights = {
            "perceptual_weight": perceptual_weight,
            "adversarial_loss_weight": adversarial_loss_weight,
            "multiscale_adversarial_loss_weight": multiscale_adversarial_loss_weight,
            "grad_penalty_loss_weight": grad_penalty_loss_weight,
            "quantizer_aux_loss_weight": quantizer_aux_loss_weight,
            "kl_weight": kl_weight,
            "vgg_perceptual_weight": vgg_perceptual_weight,
            "style_weight": style_weight,
            "feature_matching_weight": feature_matching_weight,
            "lecam_weight": lecam_weight,
            "adaptive_weight_eps": adaptive_weight_eps,
        }
        negative = {name: value for name, value in weights.items() if value < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        if not 0 <= adaptive_weight_min <= adaptive_weight_max:
            raise ValueError(
                f"need 0 <= adaptive_weight_min <= adaptive_weight_max, got {adaptive_weight_min}, "
                f"{adaptive_weight_max}"
            )
        if disc_start < 0 or adversarial_warmup_steps < 0 or perceptual_frames < 0:
            raise ValueError("disc_start, adversarial_warmup_steps and perceptual_frames must be >= 0")
        if grad_penalty_center not in (0, 1) or grad_penalty_every < 1:
            raise ValueError(
                f"grad_penalty_center must be 0 or 1 and grad_penalty_every >= 1, got {grad_penalty_center}, "
                f"{grad_penalty_every}"
            )
        self.disc_start = disc_start
        self.perceptual_weight = perceptual_weight
        self.adversarial_loss_weight = adversarial_loss_weight
        self.multiscale_adversarial_loss_weight = multiscale_adversarial_loss_weight
        self.grad_penalty_loss_weight = grad_penalty_loss_weight
        self.quantizer_aux_loss_weight = quantizer_aux_loss_weight
        self.rec_loss = rec_loss
        self.kl_weight = kl_weight
        self.lpips = lpips
        self.perceptual_frames = perceptual_frames
        self.vgg_perceptual = vgg_perceptual
        self.vgg_perceptual_weight = vgg_perceptual_weight
        self.style = style
        self.style_weight = style_weight
        self.feature_matching_weight = feature_matching_weight
        self.gan_loss = gan_loss
        self.use_adaptive_weight = adaptive_weight
        self.adaptive_weight_eps = adaptive_weight_eps
        self.adaptive_weight_min = adaptive_weight_min
        self.adaptive_weight_max = adaptive_weight_max
        self.adversarial_warmup_steps = adversarial_warmup_steps
        self.grad_penalty_center = grad_penalty_center
        self.grad_penalty_every = grad_penalty_every
        self.lecam_weight = lecam_weight
        # Only used by the seed-compatible `forward`; the trainer keeps D in its own engine.
        self.discriminator = discriminator
        self.discriminator_weights = dict(discriminator_weights or {})
        # The trainer moves this module into the generator's engine (it trains with the autoencoder).
        self.logvar = LearnedLogVariance(logvar_init) if learn_logvar else None
        keys = list(self.discriminator_weights) or [SINGLE_DISCRIMINATOR_KEY]
        self.lecam = nn.ModuleDict(
            {key: LeCamRegularizer(decay=lecam_decay) for key in keys} if lecam_weight > 0 else {}
        )

    # ------------------------------------------------------------------------------------ schedules

    def adversarial_active(self, global_step: int) -> bool:
        """The adversarial terms (generator and discriminator) count from `disc_start` on, not before."""
        return self.adversarial_loss_weight > 0 and global_step >= self.disc_start

    def adversarial_factor(self, global_step: int) -> float:
        """adversarial_loss_weight, ramped linearly over `adversarial_warmup_steps` after disc_start."""
        if not self.adversarial_active(global_step):
            return 0.0
        if self.adversarial_warmup_steps == 0:
            return self.adversarial_loss_weight
        ramp = min(1.0, (global_step - self.disc_start + 1) / self.adversarial_warmup_steps)
        return self.adversarial_loss_weight * ramp

    def output_weight(self, key: str) -> float:
        """The weight of one discriminator output key (multiscale keys times the multiscale weight)."""
        name, at, _ = key.partition("@")
        weight = self.discriminator_weights.get(key, self.discriminator_weights.get(name, 1.0))
        return weight * self.multiscale_adversarial_loss_weight if at else weight

    # ------------------------------------------------------------------------- reconstruction side

    def reconstruction_loss(self, inputs: Tensor, recon: Tensor) -> Tensor:
        """Pixel L1 or MSE, mean over every element."""
        return self._pixel_distance(inputs, recon).mean()

    def _pixel_distance(self, inputs: Tensor, recon: Tensor) -> Tensor:
        if self.rec_loss == "l1":
            return (inputs.float() - recon.float()).abs()
        return (inputs.float() - recon.float()).square()

    def pick_frames(self, inputs: Tensor, recon: Tensor) -> tuple[Tensor, Tensor]:
        """`perceptual_frames` distinct random frames per clip (all when 0) -> two (B*k, C, H, W) batches."""
        batch, channels, frames = inputs.shape[:3]
        k = frames if self.perceptual_frames == 0 else min(self.perceptual_frames, frames)
        picked = torch.rand(batch, frames, device=inputs.device).argsort(dim=1)[:, :k]  # (B, k)
        index = picked[:, None, :, None, None].expand(-1, channels, -1, *inputs.shape[3:])
        # (B, C, T, H, W) -> (B, C, k, H, W) -> (B*k, C, H, W)
        real = rearrange(inputs.gather(2, index), "b c t h w -> (b t) c h w")
        fake = rearrange(recon.gather(2, index), "b c t h w -> (b t) c h w")
        return real, fake

    def perceptual_terms(self, inputs: Tensor, recon: Tensor) -> dict[str, Tensor]:
        """Unweighted LPIPS, VGG19 perceptual and Gram style losses (those with a weight > 0) on the same
        sampled frames, each the mean over frames; fp32 scalars."""
        active = [
            (name, module)
            for name, module, weight in (
                ("perceptual", self.lpips, self.perceptual_weight),
                ("vgg_perceptual", self.vgg_perceptual, self.vgg_perceptual_weight),
                ("style", self.style, self.style_weight),
            )
            if module is not None and weight > 0
        ]
        if not active:
            return {}
        real, fake = self.pick_frames(inputs, recon)
        terms = {}
        # VGG losses that share one trunk (the trainer builds them so) take one pass over each batch of
        # frames for all their layers, instead of one pass per loss.
        by_trunk: dict[int, list[tuple[str, nn.Module]]] = {}
        for name, module in active:
            if hasattr(module, "loss_from_features"):
                by_trunk.setdefault(id(module.backbone), []).append((name, module))
            else:
                terms[name] = module(real, fake).float().mean()
        for sharing in by_trunk.values():
            trunk = sharing[0][1].backbone
            layers = list(dict.fromkeys(layer for _, module in sharing for layer in module.layers))
            with torch.autocast(real.device.type, enabled=False):
                real_features, fake_features = trunk(real, layers), trunk(fake, layers)
                for name, module in sharing:
                    terms[name] = module.loss_from_features(real_features, fake_features).float().mean()
        return terms

    def nll_loss(self, inputs: Tensor, recon: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Reconstruction + weighted perceptual terms: what the adaptive weight balances against.

        With a learned log-variance: mean((d + p) / exp(logvar) + logvar) for the per-element pixel
        distance d and the weighted perceptual sum p (taming's NLL, averaged over elements).
        """
        distance = self._pixel_distance(inputs, recon)
        terms = self.perceptual_terms(inputs, recon)
        weights = {
            "perceptual": self.perceptual_weight,
            "vgg_perceptual": self.vgg_perceptual_weight,
            "style": self.style_weight,
        }
        perceptual = sum((weights[name] * value for name, value in terms.items()), distance.new_zeros(()))
        rec = distance.mean()
        log = {"rec": rec.detach(), "perceptual": terms.get("perceptual", rec.new_zeros(())).detach()}
        log.update({name: value.detach() for name, value in terms.items() if name != "perceptual"})
        if self.logvar is None:
            return rec + perceptual, log
        nll = self.logvar(distance + perceptual)
        log["logvar"] = self.logvar.logvar.detach().float().squeeze(0)
        return nll, log

    @staticmethod
    def kl_loss(mean: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(mean, exp(logvar)) || N(0, 1)), summed over latent elements, averaged over the batch."""
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())
        return kl.flatten(1).sum(dim=1).mean()

    # ------------------------------------------------------------------------------ adversarial side

    def generator_adversarial_loss(self, logits_fake: DiscriminatorOutput) -> Tensor:
        """Sum over discriminator outputs of weight x generator GAN loss (`gan_loss` kind)."""
        return sum(self.generator_adversarial_terms(logits_fake).values())

    def generator_adversarial_terms(self, logits_fake: DiscriminatorOutput) -> dict[str, Tensor]:
        """{key: weight x generator GAN loss} per discriminator output."""
        return {
            key: self.output_weight(key) * generator_adversarial_loss(value, self.gan_loss)
            for key, value in as_logits_dict(logits_fake).items()
        }

    def feature_matching(
        self, real_features: Mapping[str, Sequence[Tensor]], fake_features: Mapping[str, Sequence[Tensor]]
    ) -> Tensor:
        """Mean over discriminator outputs of the L1 between batch-and-space feature means (real detached)."""
        keys = sorted(fake_features)
        if sorted(real_features) != keys:
            raise ValueError(f"feature keys differ: {sorted(real_features)} vs {keys}")
        losses = [feature_matching_loss(real_features[k], fake_features[k]) for k in keys]
        return torch.stack(losses).mean()

    def adaptive_weight(self, grad_nll: Tensor, grad_adv: Tensor) -> Tensor:
        """||g_nll|| / (||g_adv|| + eps), clamped, fp32, detached; averaged over ranks (DESIGN.md 2)."""
        weight = adaptive_weight(
            grad_nll, grad_adv, eps=self.adaptive_weight_eps, max_weight=self.adaptive_weight_max
        )
        return weight.clamp_min(self.adaptive_weight_min)

    def generator_loss(
        self,
        inputs: Tensor,
        recon: Tensor,
        global_step: int,
        *,
        logits_fake: DiscriminatorOutput | None = None,
        real_features: Mapping[str, Sequence[Tensor]] | None = None,
        fake_features: Mapping[str, Sequence[Tensor]] | None = None,
        kl: Tensor | None = None,
        aux_loss: Tensor | None = None,
    ) -> GeneratorTerms:
        """The generator's terms apart. Adversarial ones need `logits_fake` (and the features for feature
        matching) once `adversarial_active(global_step)`; they are 0 before."""
        nll, log = self.nll_loss(inputs, recon)
        zero = nll.new_zeros(())
        adversarial = feature_matching = zero
        if self.adversarial_active(global_step):
            if logits_fake is None:
                raise ValueError(f"step {global_step} >= disc_start={self.disc_start} needs logits_fake")
            per_output = self.generator_adversarial_terms(logits_fake)
            adversarial = sum(per_output.values())
            if len(per_output) > 1:
                log.update({f"generator_adversarial/{k}": v.detach() for k, v in per_output.items()})
            if self.feature_matching_weight > 0:
                if real_features is None or fake_features is None:
                    raise ValueError("feature_matching_weight > 0 needs real_features and fake_features")
                feature_matching = self.feature_matching(real_features, fake_features)
        latent = zero
        if kl is not None:
            # kl_weight as in taming/LDM/SGM, whose reconstruction term is summed over each clip's elements:
            # here it is their mean, so the KL (summed over latent elements) is divided by the clip's
            # element count. Otherwise 1e-6 would weigh the KL C*T*H*W times more than there (3.3e6 times
            # for 3x17x256x256 clips) and the balance would move with the clip size.
            latent = latent + self.kl_weight * kl.float() / inputs[0].numel()
            log["kl"] = kl.detach().float()
        if aux_loss is not None:
            latent = latent + self.quantizer_aux_loss_weight * aux_loss.float()
            log["quantizer_aux"] = aux_loss.detach().float()
        log.update(
            nll=nll.detach(),
            generator_adversarial=adversarial.detach(),
            feature_matching=feature_matching.detach(),
        )
        return GeneratorTerms(nll, adversarial, feature_matching, latent, log)

    def generator_total(self, terms: GeneratorTerms, adaptive: Tensor | float, global_step: int) -> Tensor:
        """nll + fm_weight * fm + latent + adversarial_factor(step) * adaptive * adversarial."""
        factor = self.adversarial_factor(global_step)
        return (
            terms.nll
            + self.feature_matching_weight * terms.feature_matching
            + terms.latent
            + factor * adaptive * terms.adversarial
        )

    def discriminator_loss(
        self,
        logits_real: DiscriminatorOutput,
        logits_fake: DiscriminatorOutput,
        global_step: int,
        *,
        real: Tensor | None = None,
        penalty_logits: DiscriminatorOutput | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted GAN loss over outputs + lazy R1 + LeCam (updates the EMAs, all-reduced across ranks);
        0 before disc_start. R1 differentiates `penalty_logits` (default: `logits_real`) w.r.t. `real`,
        the input they were computed from, which must require grad."""
        real_logits, fake_logits = as_logits_dict(logits_real), as_logits_dict(logits_fake)
        if sorted(real_logits) != sorted(fake_logits):
            raise ValueError(
                f"real and fake logits keys differ: {sorted(real_logits)} vs {sorted(fake_logits)}"
            )
        first = next(iter(real_logits.values()))
        if not self.adversarial_active(global_step):
            zero = first.new_zeros((), dtype=torch.float32)
            return zero, {"discriminator": zero}
        per_output = {
            key: self.output_weight(key)
            * discriminator_adversarial_loss(real_logits[key], fake_logits[key], self.gan_loss)
            for key in real_logits
        }
        gan = sum(per_output.values())
        loss = gan
        log = {
            "discriminator_gan": gan.detach(),
            **{
                f"discriminator/{key}": value.detach()
                for key, value in per_output.items()
                if len(per_output) > 1
            },
            "logits_real": torch.stack([v.detach().float().mean() for v in real_logits.values()]).mean(),
            "logits_fake": torch.stack([v.detach().float().mean() for v in fake_logits.values()]).mean(),
        }
        scale = lazy_penalty_scale(global_step, self.grad_penalty_every)
        if self.grad_penalty_loss_weight > 0 and scale:
            if real is None:
                raise ValueError("grad_penalty_loss_weight > 0 needs `real`, the input of the real logits")
            source = real_logits if penalty_logits is None else as_logits_dict(penalty_logits)
            penalty = sum(
                self.output_weight(key) * gradient_penalty(value, real, center=self.grad_penalty_center)
                for key, value in source.items()
            )
            loss = loss + self.grad_penalty_loss_weight * scale * penalty
            log["gradient_penalty"] = penalty.detach()
        if self.lecam_weight > 0:
            missing = sorted(set(real_logits) - set(self.lecam))
            if missing:
                raise ValueError(
                    f"no LeCam state for discriminator outputs {missing}: pass discriminator_weights with every "
                    f"output key ({sorted(real_logits)}) when building the loss"
                )
            lecam = sum(
                self.output_weight(key) * self.lecam[key](real_logits[key], fake_logits[key])
                for key in real_logits
            )
            loss = loss + self.lecam_weight * lecam
            log["lecam"] = lecam.detach()
        log["discriminator"] = loss.detach()
        return loss, log

    # ------------------------------------------------------------------- seed-compatible adapter

    def forward(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        optimizer_idx: int,
        global_step: int,
        aux_losses: Tensor | None = None,
        last_layer: Tensor | None = None,
        split: str = "train",
        *,
        posterior: Any = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """CogVideo's signature: optimizer_idx 0 -> the autoencoder's loss, 1 -> the discriminator's.

        `aux_losses` is the quantizer's auxiliary loss; `posterior` (ours) a DiagonalGaussian whose KL is
        added. The adaptive weight needs `last_layer` (the decoder's last weight, in the graph of
        `reconstructions`); without it the weight is 1. Returns (loss, {f"{split}/<name>": detached}).

        As in the seed, optimizer_idx 0 calls the discriminator as it is: its parameters get gradients from
        the autoencoder's loss unless the caller freezes them (as Lightning's optimizer toggling does) or
        zeroes them before the discriminator's backward. trainer/step.py freezes them.
        """
        discriminator = self._require_discriminator(global_step)
        if optimizer_idx == 0:
            return self._forward_generator(
                inputs, reconstructions, global_step, aux_losses, last_layer, split, posterior, discriminator
            )
        if optimizer_idx == 1:
            real = inputs.detach().requires_grad_(self.grad_penalty_loss_weight > 0)
            if not self.adversarial_active(global_step):
                zero = torch.zeros((), device=inputs.device, requires_grad=True)
                return zero, {f"{split}/discriminator": zero.detach()}
            loss, log = self.discriminator_loss(
                discriminator(real), discriminator(reconstructions.detach()), global_step, real=real
            )
            return loss, {f"{split}/{name}": value for name, value in log.items()}
        raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx!r}")

    def _forward_generator(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        global_step: int,
        aux_losses: Tensor | None,
        last_layer: Tensor | None,
        split: str,
        posterior: Any,
        discriminator: Callable[..., Any] | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        kl = posterior.kl().mean() if posterior is not None else None
        kwargs: dict[str, Any] = {"kl": kl, "aux_loss": aux_losses}
        if self.adversarial_active(global_step):
            if self.feature_matching_weight > 0:
                with torch.no_grad():
                    _, kwargs["real_features"] = split_features(discriminator(inputs, return_features=True))
                kwargs["logits_fake"], kwargs["fake_features"] = split_features(
                    discriminator(reconstructions, return_features=True)
                )
            else:
                kwargs["logits_fake"] = discriminator(reconstructions)
        terms = self.generator_loss(inputs, reconstructions, global_step, **kwargs)
        weight = torch.ones((), device=inputs.device)
        if self.adversarial_active(global_step) and self.use_adaptive_weight and last_layer is not None:
            (grad_nll,) = torch.autograd.grad(terms.nll, last_layer, retain_graph=True)
            (grad_adv,) = torch.autograd.grad(terms.adversarial, last_layer, retain_graph=True)
            weight = self.adaptive_weight(grad_nll, grad_adv)
        total = self.generator_total(terms, weight, global_step)
        log = dict(terms.log)
        log.update(
            total=total.detach(),
            adaptive_weight=torch.as_tensor(weight).detach().float(),
            adversarial_factor=torch.tensor(self.adversarial_factor(global_step)),
        )
        return total, {f"{split}/{name}": value for name, value in log.items()}

    def _require_discriminator(self, global_step: int) -> Callable[..., Any] | None:
        if self.adversarial_active(global_step) and self.discriminator is None:
            raise ValueError(
                "the seed-compatible forward needs `discriminator=` (a module returning logits, or a "
                "DiscriminatorSet) once global_step >= disc_start"
            )
        return self.discriminator
