"""Loss terms against values computed by hand, disc_start gating, LPIPS frame picks, the adaptive weight."""

import math

import pytest
import torch
from torch import nn

from losses import LPIPS, LastLayerInput, VideoAutoencoderLoss, adaptive_weight, last_layer_weight_grad


def test_reconstruction_l1_and_mse_by_hand():
    inputs = torch.tensor([0.0, 1.0, -1.0, 0.5]).reshape(1, 1, 1, 2, 2)
    recon = torch.tensor([0.5, 0.0, -1.0, 1.0]).reshape(1, 1, 1, 2, 2)
    l1 = VideoAutoencoderLoss(rec_loss="l1", perceptual_weight=0.0).reconstruction_loss(inputs, recon)
    mse = VideoAutoencoderLoss(rec_loss="mse", perceptual_weight=0.0).reconstruction_loss(inputs, recon)
    assert l1.item() == pytest.approx((0.5 + 1.0 + 0.0 + 0.5) / 4)
    assert mse.item() == pytest.approx((0.25 + 1.0 + 0.0 + 0.25) / 4)


def test_kl_by_hand():
    mean = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # (B=2, 2 latent elements)
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # 0.5 * (mu^2 + var - 1 - log var) per element, summed per sample, averaged over the batch
    sample0 = 0.5 * (1.0 + 1 - 1 - 0) + 0.5 * (0.0 + 2 - 1 - math.log(2.0))
    sample1 = 0.5 * (0.0 + 1 - 1 - 0) + 0.5 * (4.0 + 1 - 1 - 0)
    assert VideoAutoencoderLoss.kl_loss(mean, logvar).item() == pytest.approx((sample0 + sample1) / 2)


def test_hinge_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> 2.5/3; relu(1 + fake) = [0, 1, 2] -> 1
    expected = 0.5 * (2.5 / 3 + 1.0)
    loss = VideoAutoencoderLoss(perceptual_weight=0.0)  # hinge is the default GAN loss
    assert loss.discriminator_loss(real, fake, global_step=0)[0].item() == pytest.approx(expected)
    assert loss.generator_adversarial_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.0) / 3)


def test_adversarial_terms_start_at_disc_start():
    loss = VideoAutoencoderLoss(perceptual_weight=0.0, adversarial_loss_weight=0.1, disc_start=100)
    assert not loss.adversarial_active(0)
    assert not loss.adversarial_active(99)
    assert loss.adversarial_active(100)
    assert not VideoAutoencoderLoss(perceptual_weight=0.0, adversarial_loss_weight=0.0).adversarial_active(
        10**6
    )


class FrameRecorder(nn.Module):
    """Stands in for LPIPS: records which frames it was given, returns their mean absolute value."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen.append(x[:, 0, 0, 0].clone())
        return (x - y).abs().flatten(1).mean(dim=1)


def test_perceptual_loss_uses_k_distinct_frames_per_clip():
    recorder = FrameRecorder()
    loss = VideoAutoencoderLoss(perceptual_weight=1.0, perceptual_frames=3, lpips=recorder)
    # Each frame is filled with its own id: clip b, frame t -> 10*b + t.
    ids = torch.arange(2)[:, None] * 10 + torch.arange(9)[None, :]  # (B=2, T=9)
    inputs = ids[:, None, :, None, None].float().expand(2, 3, 9, 4, 4).contiguous()
    torch.manual_seed(0)
    loss.perceptual_terms(inputs, torch.zeros_like(inputs))
    seen = recorder.seen[0].long().reshape(2, 3)  # (B, k)
    for clip in range(2):
        frames = seen[clip].tolist()
        assert len(set(frames)) == 3  # distinct
        assert all(10 * clip <= f < 10 * clip + 9 for f in frames)  # from the same clip
    everything = VideoAutoencoderLoss(perceptual_weight=1.0, perceptual_frames=0, lpips=FrameRecorder())
    everything.perceptual_terms(inputs, torch.zeros_like(inputs))
    assert sorted(everything.lpips.seen[0].long().tolist()) == sorted(ids.flatten().tolist())


def test_nll_combines_rec_and_weighted_lpips():
    torch.manual_seed(0)
    lpips = LPIPS(pretrained=False)
    loss = VideoAutoencoderLoss(perceptual_weight=0.5, perceptual_frames=0, lpips=lpips)
    inputs = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    recon = inputs + 0.1 * torch.randn_like(inputs)
    nll, parts = loss.nll_loss(inputs, recon)
    frames = lambda v: v.permute(0, 2, 1, 3, 4).reshape(-1, 3, 16, 16)  # noqa: E731
    expected_lpips = lpips(frames(inputs), frames(recon)).mean()
    assert parts["perceptual"].item() == pytest.approx(expected_lpips.item(), rel=1e-6)
    assert nll.item() == pytest.approx(
        (inputs - recon).abs().mean().item() + 0.5 * expected_lpips.item(), rel=1e-6
    )


def test_perceptual_weight_without_lpips_is_an_error():
    with pytest.raises(ValueError, match="needs the lpips module"):
        VideoAutoencoderLoss(perceptual_weight=1.0, lpips=None)


def test_adaptive_weight_formula_eps_and_clamp():
    g_nll = torch.tensor([3.0, 4.0])  # norm 5
    g_adv = torch.tensor([0.0, 2.0])  # norm 2
    assert adaptive_weight(g_nll, g_adv, eps=0.5).item() == pytest.approx(5 / 2.5)
    assert adaptive_weight(g_nll, g_adv, eps=1e-4, max_weight=1.5).item() == 1.5
    assert (
        adaptive_weight(g_nll, torch.zeros(2), eps=1e-4).item() == 1e4
    )  # 5 / 1e-4, clamped to the default max
    weight = adaptive_weight(g_nll.requires_grad_(), g_adv)
    assert not weight.requires_grad and weight.dtype == torch.float32


def test_last_layer_weight_grad_equals_autograd():
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 3, kernel_size=3, padding=(0, 1, 1))
    hook = LastLayerInput(conv)
    x = torch.randn(2, 4, 7, 8, 8)
    hook.capture = True
    out = conv(x)
    hook.capture = False
    target = torch.randn_like(out)
    loss = (out - target).pow(2).mean()
    (expected,) = torch.autograd.grad(loss, conv.weight, retain_graph=True)
    (grad_out,) = torch.autograd.grad(loss, out)
    assert torch.allclose(last_layer_weight_grad(conv, hook.pop(), grad_out), expected, atol=1e-6)
    with pytest.raises(RuntimeError, match="not captured"):
        hook.pop()
    hook.remove()


@pytest.mark.parametrize("shape", [(2, 3, 9, 16, 16), (1, 3, 17, 32, 24)])
def test_kl_weight_means_what_it_means_in_ldm_at_any_clip_size(shape):
    """taming/LDM/SGM sum the reconstruction error over each clip's elements and the KL over the latent's,
    both averaged over the batch, with kl_weight 1e-6. This loss averages the reconstruction over elements,
    so its whole generator loss must be LDM's divided by the elements per clip: the same balance between
    reconstruction and KL, whatever the clip size. (Summing the KL here made it C*T*H*W times stronger.)"""
    torch.manual_seed(0)
    inputs = torch.rand(shape) * 2 - 1
    recon = inputs + 0.1 * torch.randn(shape)
    mean, logvar = torch.randn(shape[0], 16, 3, 4, 4), torch.randn(shape[0], 16, 3, 4, 4) - 4
    kl_weight = 1e-6
    loss = VideoAutoencoderLoss(disc_start=1, perceptual_weight=0.0, kl_weight=kl_weight)
    kl = VideoAutoencoderLoss.kl_loss(mean, logvar)
    terms = loss.generator_loss(inputs, recon, global_step=0, kl=kl)
    ours = terms.nll + terms.latent

    batch, elements = shape[0], inputs[0].numel()
    rec_sum = (inputs - recon).abs().sum() / batch
    kl_sum = (0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar)).sum() / batch
    ldm = rec_sum + kl_weight * kl_sum
    assert ours.item() == pytest.approx(ldm.item() / elements, rel=1e-5)
    assert terms.log["kl"].item() == pytest.approx(kl_sum.item(), rel=1e-5)  # logged as LDM logs it
