"""The composed objective (VideoAutoencoderLoss) against values computed by hand, and the seed-compatible
`forward` driving a hand-written training loop with several discriminators."""

import math

import pytest
import torch
from torch import nn

from losses import LPIPS, VideoAutoencoderLoss
from losses.gan import LearnedLogVariance
from losses.video_loss import GeneratorTerms
from models import DiagonalGaussian, build_autoencoder
from models.discriminator_set import build_discriminator_set

LN2 = math.log(2.0)


def test_adversarial_weight_warms_up_linearly_after_disc_start():
    loss = VideoAutoencoderLoss(
        perceptual_weight=0.0, adversarial_loss_weight=0.2, disc_start=10, adversarial_warmup_steps=4
    )
    factors = [loss.adversarial_factor(step) for step in (0, 9, 10, 11, 13, 20)]
    assert factors == pytest.approx([0.0, 0.0, 0.05, 0.1, 0.2, 0.2])
    assert (
        VideoAutoencoderLoss(perceptual_weight=0.0, adversarial_loss_weight=0.2).adversarial_factor(0) == 0.2
    )


def multi_loss(**kwargs) -> VideoAutoencoderLoss:
    return VideoAutoencoderLoss(
        perceptual_weight=0.0,
        multiscale_adversarial_loss_weight=0.1,
        discriminator_weights={"3d": 1.0, "magvit2d": 0.5, "magvit2d@2x": 0.5},
        **kwargs,
    )


def test_every_discriminator_output_is_weighted_and_multiscale_outputs_twice():
    loss = multi_loss()
    fake = {
        "3d": torch.tensor([1.0, -1.0, 2.0]),
        "magvit2d": torch.tensor([0.5]),
        "magvit2d@2x": torch.tensor([-4.0]),
    }
    # hinge generator losses -mean: -2/3, -0.5, 4.0, weighted 1, 0.5, 0.5 x 0.1
    expected = -2 / 3 + 0.5 * -0.5 + 0.05 * 4.0
    assert loss.generator_adversarial_loss(fake).item() == pytest.approx(expected)

    real = {
        "3d": torch.tensor([2.0, 0.0]),
        "magvit2d": torch.tensor([0.5]),
        "magvit2d@2x": torch.tensor([-1.0]),
    }
    fake = {
        "3d": torch.tensor([-2.0, 0.5]),
        "magvit2d": torch.tensor([0.0]),
        "magvit2d@2x": torch.tensor([1.0]),
    }
    # 3d: 0.5 * (mean[0, 1] + mean[0, 1.5]) = 0.625; magvit2d: 0.5 * (0.5 + 1) = 0.75; @2x: 0.5 * (2 + 2) = 2
    d_loss, log = loss.discriminator_loss(real, fake, global_step=0)
    assert d_loss.item() == pytest.approx(0.625 + 0.5 * 0.75 + 0.05 * 2.0)
    assert log["discriminator/3d"].item() == pytest.approx(0.625)
    assert log["discriminator/magvit2d@2x"].item() == pytest.approx(0.05 * 2.0)


@pytest.mark.parametrize(
    ("kind", "generator", "discriminator"),
    [
        ("hinge", -0.0, 0.5 * (1.0 + 1.0)),
        ("vanilla", -LN2, LN2),  # minimax: -softplus(0); D: 0.5 * (softplus(0) + softplus(0))
        ("non_saturating", LN2, LN2),  # softplus(-0)
    ],
)
def test_each_gan_loss_kind_through_the_composed_loss(kind, generator, discriminator):
    loss = VideoAutoencoderLoss(perceptual_weight=0.0, gan_loss=kind)
    zero = torch.zeros(3)
    assert loss.generator_adversarial_loss(zero).item() == pytest.approx(generator)
    assert loss.discriminator_loss(zero, zero, global_step=0)[0].item() == pytest.approx(discriminator)


class ConstantPerceptual(nn.Module):
    """Stands in for LPIPS: 0.5 for every frame pair."""

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return torch.full((real.shape[0],), 0.5)


def test_learned_log_variance_nll_by_hand():
    inputs = torch.zeros(1, 1, 1, 1, 2)
    recon = torch.tensor([1.0, 3.0]).reshape(1, 1, 1, 1, 2)  # |x - x_hat| = [1, 3]
    loss = VideoAutoencoderLoss(perceptual_weight=0.0, learn_logvar=True, logvar_init=LN2)
    nll, log = loss.nll_loss(inputs, recon)
    # mean([1, 3] / 2 + ln 2) = 1 + ln 2; d/dlogvar = 1 - mean([1, 3]) / 2 = 0
    assert nll.item() == pytest.approx(1.0 + LN2)
    assert log["logvar"].item() == pytest.approx(LN2)
    (grad,) = torch.autograd.grad(nll, loss.logvar.logvar)
    assert grad.item() == pytest.approx(0.0, abs=1e-7)

    # logvar 0 and a perceptual term 2 x 0.5 = 1 added to every element: mean([2, 4]) = 3; d/dlogvar = 1 - 3
    loss = VideoAutoencoderLoss(
        perceptual_weight=2.0, perceptual_frames=0, lpips=ConstantPerceptual(), learn_logvar=True
    )
    nll, log = loss.nll_loss(inputs, recon)
    assert nll.item() == pytest.approx(3.0)
    (grad,) = torch.autograd.grad(nll, loss.logvar.logvar)
    assert grad.item() == pytest.approx(-2.0)
    assert isinstance(loss.logvar, LearnedLogVariance)


class LinearCritic(nn.Module):
    """D(x) = sum(w * x) per clip, so dD/dx = w for every clip: ||w|| = 5."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([3.0, 4.0]).reshape(1, 1, 1, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).flatten(1).sum(1)


@pytest.mark.parametrize(("center", "penalty"), [(0, 25.0), (1, 16.0)])  # ||g||^2 = 25; (||g|| - 1)^2 = 16
def test_lazy_r1_penalty_in_the_discriminator_loss_by_hand(center, penalty):
    critic = LinearCritic()
    loss = VideoAutoencoderLoss(
        perceptual_weight=0.0, grad_penalty_loss_weight=0.1, grad_penalty_every=2, grad_penalty_center=center
    )
    real = torch.ones(2, 1, 1, 1, 2, requires_grad=True)  # D = 7 on each clip
    fake = torch.zeros(2, 1, 1, 1, 2)  # D = 0
    gan = 0.5 * (0.0 + 1.0)  # hinge: relu(1 - 7) = 0, relu(1 + 0) = 1
    on, log = loss.discriminator_loss(critic(real), critic(fake), global_step=2, real=real)
    assert log["gradient_penalty"].item() == pytest.approx(penalty)
    assert on.item() == pytest.approx(gan + 0.1 * 2 * penalty)  # lazy: every 2 steps, scaled by 2
    off, log = loss.discriminator_loss(critic(real), critic(fake), global_step=3, real=real)
    assert off.item() == pytest.approx(gan) and "gradient_penalty" not in log
    # the penalty trains D: d(0.2 * ||w||^2)/dw = 0.4 w; the hinge adds nothing here (relu(1 - 7) is flat
    # and the fake clips are zeros)
    on, _ = loss.discriminator_loss(critic(real), critic(fake), global_step=4, real=real)
    (grad,) = torch.autograd.grad(on, critic.w)
    if center == 0:
        assert grad.flatten().tolist() == pytest.approx([0.4 * 3.0, 0.4 * 4.0])
    else:  # d(0.2 * (||w|| - 1)^2)/dw = 0.4 (||w|| - 1) w / ||w|| = 0.32 w
        assert grad.flatten().tolist() == pytest.approx([0.32 * 3.0, 0.32 * 4.0])


def test_lecam_in_the_discriminator_loss_by_hand_and_in_the_state_dict():
    loss = VideoAutoencoderLoss(perceptual_weight=0.0, lecam_weight=0.5, lecam_decay=0.9)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    d_loss, log = loss.discriminator_loss(real, fake, global_step=0)
    # first update: ema_real = 2, ema_fake = -0.5
    # penalty: mean(relu([1, 3] + 0.5)^2) + mean(relu(2 - [-1, 0])^2) = 7.25 + 6.5 = 13.75
    # hinge: 0.5 * (mean relu(1 - [1, 3]) + mean relu(1 + [-1, 0])) = 0.5 * (0 + 0.5) = 0.25
    assert log["lecam"].item() == pytest.approx(13.75)
    assert d_loss.item() == pytest.approx(0.25 + 0.5 * 13.75)
    state = loss.lecam.state_dict()
    assert state["discriminator.ema_real"].item() == 2.0 and state["discriminator.ema_fake"].item() == -0.5
    loss.discriminator_loss(torch.tensor([4.0]), torch.tensor([0.5]), global_step=1)
    assert loss.lecam["discriminator"].ema_real.item() == pytest.approx(0.9 * 2 + 0.1 * 4)
    assert loss.lecam["discriminator"].ema_fake.item() == pytest.approx(0.9 * -0.5 + 0.1 * 0.5)


def test_discriminator_loss_is_exactly_zero_before_disc_start():
    loss = VideoAutoencoderLoss(perceptual_weight=0.0, disc_start=5, lecam_weight=1.0)
    d_loss, _ = loss.discriminator_loss(torch.ones(2), torch.ones(2), global_step=4)
    assert d_loss.item() == 0.0
    assert loss.lecam["discriminator"].initialized.item() is False  # nothing updated before disc_start


def test_generator_terms_and_total_by_hand():
    loss = VideoAutoencoderLoss(
        perceptual_weight=0.0,
        adversarial_loss_weight=0.5,
        feature_matching_weight=2.0,
        kl_weight=0.1,
        quantizer_aux_loss_weight=3.0,
    )
    inputs = torch.zeros(1, 1, 1, 1, 2)
    recon = torch.tensor([1.0, 3.0]).reshape(1, 1, 1, 1, 2)
    # channel means over batch and space: real [2, 3], fake [1, 1] -> mean |diff| = 1.5
    real_features = {"discriminator": [torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)]}
    fake_features = {"discriminator": [torch.tensor([[0.0, 0.0], [2.0, 2.0]]).reshape(2, 2, 1, 1)]}
    terms = loss.generator_loss(
        inputs,
        recon,
        global_step=0,
        logits_fake=torch.tensor([1.0, 3.0]),
        real_features=real_features,
        fake_features=fake_features,
        kl=torch.tensor(4.0),
        aux_loss=torch.tensor(0.5),
    )
    assert terms.nll.item() == pytest.approx(2.0)  # mean |[1, 3]|
    assert terms.adversarial.item() == pytest.approx(-2.0)  # hinge: -mean([1, 3])
    assert terms.feature_matching.item() == pytest.approx(1.5)
    # kl_weight * KL / (2 elements per clip: LDM's kl_weight, see test_video_loss) + aux weight * aux
    assert terms.latent.item() == pytest.approx(0.1 * 4.0 / 2 + 3.0 * 0.5)
    # nll + 2 * fm + latent + 0.5 (adversarial_loss_weight) * 0.25 (adaptive) * adversarial
    total = loss.generator_total(terms, 0.25, global_step=0)
    assert total.item() == pytest.approx(2.0 + 3.0 + 1.7 + 0.5 * 0.25 * -2.0)
    assert isinstance(terms, GeneratorTerms)


def test_adaptive_weight_bounds():
    loss = VideoAutoencoderLoss(perceptual_weight=0.0, adaptive_weight_eps=0.5, adaptive_weight_min=3.0)
    g_nll, g_adv = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])
    assert loss.adaptive_weight(g_nll, g_adv).item() == pytest.approx(3.0)  # 5 / 2.5 = 2, raised to 3
    loss = VideoAutoencoderLoss(perceptual_weight=0.0, adaptive_weight_max=1.5)
    assert loss.adaptive_weight(g_nll, g_adv).item() == 1.5


def _clips(batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, 1, 32, 32, generator=generator) * 2 - 1
    frames = [torch.roll(base, shifts=(t, t), dims=(3, 4)) for t in range(9)]
    return torch.cat(frames, dim=2)  # (B, 3, 9, 32, 32): a diagonal pan


def test_seed_compatible_forward_in_a_hand_written_loop():
    torch.manual_seed(0)
    autoencoder = build_autoencoder("tiny")
    discriminators = build_discriminator_set(
        [{"type": "3d", "size": "tiny"}, {"type": "magvit2d", "size": "tiny", "weight": 0.5}],
        gradient_checkpointing=True,
        image_frames=0,  # every frame: no random picks, so the check below can recompute the logits
        multiscale_factors=(2,),
    )
    loss = VideoAutoencoderLoss(
        disc_start=2,
        perceptual_weight=0.1,
        adversarial_loss_weight=0.5,
        multiscale_adversarial_loss_weight=0.5,
        grad_penalty_loss_weight=1.0,
        quantizer_aux_loss_weight=1.0,
        lpips=LPIPS(pretrained=False),
        perceptual_frames=0,
        feature_matching_weight=0.5,
        learn_logvar=True,
        lecam_weight=0.1,
        discriminator=discriminators,
        discriminator_weights=discriminators.output_weights(1.0),
    )
    g_optimizer = torch.optim.AdamW([*autoencoder.parameters(), *loss.logvar.parameters()], lr=1e-3)
    d_optimizer = torch.optim.AdamW(discriminators.parameters(), lr=1e-3)
    logs = []
    for step in range(4):
        x = _clips(2, seed=step)
        out = autoencoder(x)
        posterior = DiagonalGaussian(out.mean, out.logvar)
        last = autoencoder.last_layer.weight
        g_loss, g_log = loss(x, out.recon, 0, step, last_layer=last, posterior=posterior)
        if step == 3:  # the adaptive weight is the textbook one: autograd w.r.t. the last layer
            nll, _ = loss.nll_loss(x, out.recon)
            adversarial = loss.generator_adversarial_loss(discriminators(out.recon))
            (g_nll,) = torch.autograd.grad(nll, last, retain_graph=True)
            (g_adv,) = torch.autograd.grad(adversarial, last, retain_graph=True)
            expected = g_nll.norm() / (g_adv.norm() + loss.adaptive_weight_eps)
            assert g_log["train/adaptive_weight"].item() == pytest.approx(expected.item(), rel=1e-5)
        g_optimizer.zero_grad()
        g_loss.backward()
        g_optimizer.step()

        d_before = [p.detach().clone() for p in discriminators.parameters()]
        d_loss, d_log = loss(x, out.recon, 1, step)
        d_optimizer.zero_grad()
        d_loss.backward()
        d_optimizer.step()
        d_moved = any(
            not torch.equal(b, p) for b, p in zip(d_before, discriminators.parameters(), strict=True)
        )
        logs.append((g_loss.item(), g_log, d_loss.item(), d_log, d_moved))

    for step, (g_value, g_log, d_value, d_log, d_moved) in enumerate(logs):
        assert math.isfinite(g_value) and math.isfinite(d_value)
        assert all(key.startswith("train/") for key in [*g_log, *d_log])
        assert not any(value.requires_grad for value in [*g_log.values(), *d_log.values()])
        if step < 2:  # before disc_start: no adversarial terms, D untouched
            assert d_value == 0.0 and not d_moved
            assert g_log["train/generator_adversarial"].item() == 0.0
        else:
            assert d_moved
            for key in ("gradient_penalty", "lecam", "discriminator/3d", "discriminator/magvit2d@2x"):
                assert math.isfinite(d_log[f"train/{key}"].item()), key
            assert g_log["train/feature_matching"].item() > 0
            assert g_log["train/adaptive_weight"].item() > 0
    assert loss.logvar.logvar.item() != 0.0  # the log-variance trained with the autoencoder
    assert loss.lecam["magvit2d@2x"].initialized.item()


def test_forward_needs_a_discriminator_once_adversarial():
    loss = VideoAutoencoderLoss(perceptual_weight=0.0, disc_start=0)
    x = torch.zeros(1, 3, 1, 8, 8)
    with pytest.raises(ValueError, match="needs `discriminator=`"):
        loss(x, x, 0, 0)
    with pytest.raises(ValueError, match="optimizer_idx must be 0"):
        VideoAutoencoderLoss(perceptual_weight=0.0, disc_start=10)(x, x, 2, 0)


def test_vgg_perceptual_and_style_losses_sharing_a_trunk_take_one_pass_per_batch():
    from losses.perceptual import GramStyleLoss, VGG19Features, VGGPerceptualLoss

    torch.manual_seed(0)
    trunk = VGG19Features({"relu1_2": 1.0, "relu2_2": 1.0}, pretrained=False)
    perceptual = VGGPerceptualLoss({"relu1_2": 1.0, "relu2_2": 0.5}, distance="cosine", backbone=trunk)
    style = GramStyleLoss({"relu2_2": 1.0}, backbone=trunk)
    loss = VideoAutoencoderLoss(
        perceptual_weight=0.0,
        perceptual_frames=0,
        vgg_perceptual=perceptual,
        vgg_perceptual_weight=1.0,
        style=style,
        style_weight=1.0,
    )
    calls = []
    trunk.register_forward_hook(lambda *_: calls.append(1))
    inputs = _clips(1, seed=0)[:, :, :3]
    recon = inputs + 0.1 * torch.randn_like(inputs)
    terms = loss.perceptual_terms(inputs, recon)
    assert len(calls) == 2  # real and reconstructed frames, once each for both losses
    real, fake = loss.pick_frames(inputs, recon)  # every frame (perceptual_frames=0), in a random order
    assert terms["vgg_perceptual"].item() == pytest.approx(perceptual(real, fake).mean().item(), rel=1e-6)
    assert terms["style"].item() == pytest.approx(style(real, fake).mean().item(), rel=1e-6)
