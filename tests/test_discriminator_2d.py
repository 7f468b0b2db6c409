"""Tests of the MAGVIT-2-style 2D discriminator and the N-layer PatchGANs: shapes, features, checkpointing."""

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from models.discriminator_2d import Blur2D, MagvitDiscriminator2D
from models.patchgan import PatchGAN2D, PatchGAN3D

TINY_MAGVIT = {
    "base_channels": 8,
    "channel_multipliers": (1, 2, 4),
    "num_groups": 4,
    "attention_heads": 2,
    "attention_dim_head": 8,
}
TINY_PATCHGAN = {"base_channels": 8, "num_groups": 4}

# name -> (build(**extra), input shape)
MODELS: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "magvit_patch": (lambda **kw: MagvitDiscriminator2D(**TINY_MAGVIT, **kw), (2, 3, 24, 20)),
    "magvit_pooled": (lambda **kw: MagvitDiscriminator2D(**TINY_MAGVIT, head="pooled", **kw), (2, 3, 17, 16)),
    "patchgan_2d": (lambda **kw: PatchGAN2D(**TINY_PATCHGAN, **kw), (2, 3, 32, 24)),
    "patchgan_3d": (lambda **kw: PatchGAN3D(**TINY_PATCHGAN, **kw), (2, 3, 5, 32, 32)),
}


def halve_up(size: int, times: int) -> int:
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


def patchgan_size(size: int, n_layers: int, stride: int) -> int:
    # kernel 4, padding 1; a size of 1 is zero-padded to 2 so that every conv gives at least one output
    for _ in range(n_layers):
        size = (max(size, 2) - 2) // stride + 1
    for _ in range(2):  # the stride-1 block and the final conv
        size = max(size, 2) - 1
    return size


def sample(shape: tuple[int, ...], seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) * 2 - 1).to(dtype)


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (48, 48), (17, 17), (33, 20), (16, 47)])
def test_magvit_patch_shapes(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = MagvitDiscriminator2D(**TINY_MAGVIT).eval()
    with torch.no_grad():
        logits = model(sample((2, 3, *size)))
    assert logits.shape == (2, 1, halve_up(size[0], 2), halve_up(size[1], 2))
    assert torch.isfinite(logits).all()


def test_magvit_default_depth_and_pooled_head() -> None:
    torch.manual_seed(0)
    default_depth = MagvitDiscriminator2D(base_channels=8, num_groups=4, attention_dim_head=8).eval()
    pooled = MagvitDiscriminator2D(**TINY_MAGVIT, head="pooled").eval()
    with torch.no_grad():
        # (1, 2, 4, 4): three scales, 64 -> 8 like Discriminator3D
        assert default_depth(sample((1, 3, 64, 40))).shape == (1, 1, 8, 5)
        for size in [(16, 16), (31, 45)]:
            assert pooled(sample((3, 3, *size))).shape == (3, 1)
    assert isinstance(pooled.head, nn.Linear)


def test_return_features() -> None:
    torch.manual_seed(0)
    magvit = MagvitDiscriminator2D(**TINY_MAGVIT).eval()
    logits, features = magvit(sample((2, 3, 33, 20)), return_features=True)
    assert logits.shape == (2, 1, 9, 5)
    assert [f.shape for f in features] == [(2, 16, 17, 10), (2, 32, 9, 5)]

    patchgan_2d = PatchGAN2D(**TINY_PATCHGAN, n_layers=3).eval()
    logits, features = patchgan_2d(sample((2, 3, 64, 64)), return_features=True)
    assert logits.shape == (2, 1, 6, 6)
    assert [f.shape for f in features] == [(2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 7, 7)]

    patchgan_3d = PatchGAN3D(**TINY_PATCHGAN, n_layers=2).eval()
    logits, features = patchgan_3d(sample((2, 3, 9, 32, 32)), return_features=True)
    assert logits.shape == (2, 1, 1, 6, 6)
    assert [f.shape for f in features] == [(2, 8, 4, 16, 16), (2, 16, 2, 8, 8), (2, 32, 1, 7, 7)]


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
@pytest.mark.parametrize("temporal_stride", [1, 2])
def test_patchgan_3d_frames(frames: int, temporal_stride: int) -> None:
    torch.manual_seed(0)
    model = PatchGAN3D(**TINY_PATCHGAN, temporal_stride=temporal_stride).eval()
    with torch.no_grad():
        logits = model(sample((1, 3, frames, 16, 24)))
    expected = (patchgan_size(frames, 3, temporal_stride), patchgan_size(16, 3, 2), patchgan_size(24, 3, 2))
    assert logits.shape == (1, 1, *expected)
    assert min(expected) >= 1 and torch.isfinite(logits).all()


@pytest.mark.parametrize("size", [(16, 16), (17, 23), (64, 48)])
def test_patchgan_2d_shapes(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = PatchGAN2D(**TINY_PATCHGAN).eval()
    with torch.no_grad():
        logits = model(sample((1, 3, *size)))
    assert logits.shape == (1, 1, patchgan_size(size[0], 3, 2), patchgan_size(size[1], 3, 2))


def test_no_batchnorm() -> None:
    with torch.device("meta"):
        models = [
            MagvitDiscriminator2D(),
            MagvitDiscriminator2D(head="pooled"),
            PatchGAN2D(),
            PatchGAN3D(),
            PatchGAN3D(n_layers=5, temporal_stride=1),
        ]
    for model in models:
        assert not any(isinstance(m, _BatchNorm) for m in model.modules())
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


def compare_gradients(
    plain: nn.Module, checkpointed: nn.Module, *, unused: frozenset[str] = frozenset()
) -> None:
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        if name in unused:
            assert p.grad is None and q.grad is None, name
            continue
        assert p.grad is not None and q.grad is not None, name
        error = (q.grad - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)
        assert error < 1e-5, (name, error.item())


def plain_and_checkpointed(name: str) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    plain = build().train()
    checkpointed = build(gradient_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    return plain, checkpointed, shape


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(name: str, input_requires_grad: bool) -> None:
    plain, checkpointed, shape = plain_and_checkpointed(name)
    real = sample(shape)
    for model in (plain, checkpointed):
        # a real image does not require grad; a gradient penalty's input does
        logits, features = model(real.clone().requires_grad_(input_requires_grad), return_features=True)
        (logits.square().mean() + sum(f.square().mean() for f in features)).backward()
    compare_gradients(plain, checkpointed)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_r1_penalty_double_backward_with_checkpointing(name: str) -> None:
    plain, checkpointed, shape = plain_and_checkpointed(name)
    real = sample(shape)
    for model in (plain, checkpointed):
        x = real.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        penalty = grad.square().flatten(1).sum(1).mean()
        penalty.backward()
    # the logits' gradient with respect to the input does not depend on the last bias
    compare_gradients(plain, checkpointed, unused=frozenset({"head.bias"}))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_forward(name: str) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build(gradient_checkpointing=True).to(torch.bfloat16).train()
    logits, features = model(sample(shape, dtype=torch.bfloat16), return_features=True)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert all(f.dtype == torch.bfloat16 and torch.isfinite(f.float()).all() for f in features)


def test_bf16_cast_keeps_state_dict_keys_and_blur_kernel() -> None:
    torch.manual_seed(0)
    model = MagvitDiscriminator2D(**TINY_MAGVIT)
    fp32_keys = list(model.state_dict())
    blur = model.scales[0]["down"].blur
    kernel = blur.kernel.clone()
    model.to(torch.bfloat16)
    assert list(model.state_dict()) == fp32_keys
    assert not any("kernel" in key for key in fp32_keys)
    # 1, 3 and 9 over 64 are exact in bf16
    assert torch.equal(blur.kernel.float(), kernel)


def test_blur_kernel() -> None:
    blur = Blur2D()
    assert blur.kernel.shape == (4, 4) and torch.isclose(blur.kernel.sum(), torch.tensor(1.0))
    assert torch.allclose(blur.kernel, blur.kernel.T)
    constant = torch.full((2, 3, 17, 20), 0.7)
    blurred = blur(constant)
    assert blurred.shape == constant.shape
    torch.testing.assert_close(blurred[..., 2:-2, 2:-2], constant[..., 2:-2, 2:-2])
    # [1, 3, 3, 1] has a zero at the Nyquist frequency: a checkerboard (the worst aliasing) is removed
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checkerboard = ((rows + cols) % 2 * 2 - 1).float().expand(1, 2, 16, 16)
    torch.testing.assert_close(blur(checkerboard)[..., 2:-2, 2:-2], torch.zeros(1, 2, 12, 12))
    assert blur(constant.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MagvitDiscriminator2D(base_channels=8, num_groups=3), r"num_groups=3 must divide.*\[8, 16"),
        (lambda: MagvitDiscriminator2D(head="global"), r"head must be one of \('patch', 'pooled'\)"),
        (lambda: MagvitDiscriminator2D(channel_multipliers=(1,)), r"at least 2 positive integers"),
        (lambda: MagvitDiscriminator2D(channel_multipliers=(1, 0)), r"at least 2 positive integers"),
        (lambda: MagvitDiscriminator2D(attention_heads=0), r"positive integers: \{'attention_heads': 0\}"),
        (
            lambda: PatchGAN2D(base_channels=12, num_groups=16),
            r"num_groups=16 must divide.*\[24, 48, 96\].*does not divide \[24\]",
        ),
        (lambda: PatchGAN2D(n_layers=0), r"positive integers: \{'n_layers': 0\}"),
        (lambda: PatchGAN3D(temporal_stride=3), r"temporal_stride must be 1 or 2, got 3"),
    ],
)
def test_bad_arguments_raise(build: Callable[[], nn.Module], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_rejects_wrong_input_rank() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*rearrange"):
        MagvitDiscriminator2D(**TINY_MAGVIT)(torch.zeros(1, 3, 5, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        PatchGAN2D(**TINY_PATCHGAN)(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        PatchGAN3D(**TINY_PATCHGAN)(torch.zeros(1, 3, 16, 16))


def test_init_gives_order_one_logits() -> None:
    torch.manual_seed(0)
    for name in sorted(MODELS):
        build, shape = MODELS[name]
        with torch.no_grad():
            logits = build().eval()(sample((4, *shape[1:])))
        assert 1e-4 < logits.std().item() < 10, name
