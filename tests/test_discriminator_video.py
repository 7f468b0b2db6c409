"""Tests of the video discriminators (hybrid 3D/2D with attention, causal) and the shared contract, which
`Discriminator3D` follows too: shapes, features, GroupNorm only, checkpointing, R1, bf16, causality."""

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from models.discriminator import Discriminator3D
from models.discriminator_video import (
    CausalDiscriminator3D,
    HybridDiscriminator3D,
    downsample_time_keep_first,
)

TINY = {"base_channels": 8, "num_groups": 4}
DISCRIMINATORS = [Discriminator3D, HybridDiscriminator3D, CausalDiscriminator3D]


def halve(size: int) -> int:
    # kernel 3, stride 2, padding 1
    return (size - 1) // 2 + 1


def tiny(cls: type[nn.Module], **overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return cls(**{**TINY, **overrides})


def video(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
@pytest.mark.parametrize("height, width", [(16, 16), (48, 32)])
def test_output_shapes(frames: int, height: int, width: int) -> None:
    x = video(2, 3, frames, height, width)
    with torch.no_grad():
        hybrid = tiny(HybridDiscriminator3D).eval()(x)
        causal = tiny(CausalDiscriminator3D).eval()(x)
    # two 3D stages halve T (while > 1); the 2D stage keeps it
    assert hybrid.shape == (2, 1, halve(halve(frames)), height // 8, width // 8)
    # one verdict per clip and patch
    assert causal.shape == (2, 1, height // 8, width // 8)
    assert torch.isfinite(hybrid).all() and torch.isfinite(causal).all()


@pytest.mark.parametrize("cls", DISCRIMINATORS)
def test_return_features(cls: type[nn.Module]) -> None:
    model = tiny(cls).eval()
    x = video(2, 3, 9, 32, 32)
    with torch.no_grad():
        logits = model(x)
        same_logits, features = model(x, return_features=True)
    torch.testing.assert_close(same_logits, logits, rtol=0, atol=0)
    assert len(features) == 3  # one per block: len(channel_multipliers) - 1
    for feature, width, size in zip(features, (16, 32, 32), (16, 8, 4), strict=True):
        # batch first, time unfolded: (B, C, T_i, H_i, W_i)
        assert feature.shape[:2] == (2, width) and feature.shape[-2:] == (size, size)
        assert feature.ndim == 5


def test_hybrid_num_3d_stages_moves_the_fold() -> None:
    x = video(1, 3, 9, 32, 32)
    with torch.no_grad():
        logits, features = tiny(HybridDiscriminator3D, num_3d_stages=0).eval()(x, return_features=True)
    # all stages 2D: time is never downsampled
    assert logits.shape == (1, 1, 9, 4, 4)
    assert [f.shape[2] for f in features] == [9, 9, 9]


def test_causal_time_downsampling_keeps_the_first_frame() -> None:
    x = video(1, 2, 9, 3, 3)
    y = downsample_time_keep_first(x)
    assert y.shape == (1, 2, 5, 3, 3)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(y[:, :, 2], (x[:, :, 3] + x[:, :, 4]) / 2)
    assert downsample_time_keep_first(x[:, :, :1]).shape[2] == 1


@pytest.mark.parametrize("cls", [HybridDiscriminator3D, CausalDiscriminator3D])
def test_no_batchnorm_and_init(cls: type[nn.Module]) -> None:
    with torch.device("meta"):
        default = cls()
    assert not any(isinstance(m, _BatchNorm) for m in default.modules())
    model = tiny(cls, base_channels=32, num_groups=8)
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    weights = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Conv3d | nn.Linear)]
    assert all((m.bias == 0).all() for m in weights)
    std = torch.cat([m.weight.flatten() for m in weights]).std().item()
    assert std == pytest.approx(0.02, rel=0.05)


def _parameter_gradients(model: nn.Module, x: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    if mode == "real":
        # a real video does not require grad
        model(x).square().mean().backward()
    else:
        x = x.clone().requires_grad_()
        logits = model(x)
        if mode == "input_grad":
            logits.square().mean().backward()
        else:
            # R1: the squared norm of the input gradient, differentiated again (double backward)
            (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
            (logits.mean() + grad.square().flatten(1).sum(1).mean()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["real", "input_grad", "r1"])
@pytest.mark.parametrize("cls", DISCRIMINATORS)
def test_gradient_checkpointing_gives_the_same_gradients(cls: type[nn.Module], mode: str) -> None:
    plain = tiny(cls).train()
    checkpointed = tiny(cls, gradient_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = video(2, 3, 5, 32, 32)
    expected = _parameter_gradients(plain, x, mode)
    actual = _parameter_gradients(checkpointed, x, mode)
    for name, grad in expected.items():
        error = (actual[name] - grad).abs().max() / grad.abs().max()
        assert error < 1e-5, name


@pytest.mark.parametrize("cls", [HybridDiscriminator3D, CausalDiscriminator3D])
def test_checkpointing_only_while_training_with_grad(cls: type[nn.Module]) -> None:
    model = tiny(cls, gradient_checkpointing=True)
    blocks = [m for m in model.modules() if type(m).__name__.endswith(("Block3D", "Stage2D"))]
    calls = []
    for block in blocks:
        # a pre-hook: the recomputation stops early, once it has what the backward needs
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    x = video(1, 3, 5, 16, 16)

    model.eval()
    model(x).mean().backward()
    assert len(calls) == len(blocks)  # eval: no recomputation
    calls.clear()
    model.train()
    with torch.no_grad():
        model(x)
    assert len(calls) == len(blocks)
    calls.clear()
    model(x).mean().backward()
    assert len(calls) == 2 * len(blocks)  # forward, then recomputed in the backward


def test_hybrid_attention_kernel_choice_does_not_change_the_result() -> None:
    # an input that requires grad selects the twice-differentiable math kernel; the values must agree
    model = tiny(HybridDiscriminator3D).eval()
    x = video(2, 3, 5, 32, 32)
    fused = model(x)
    math = model(x.clone().requires_grad_())
    torch.testing.assert_close(math, fused, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", DISCRIMINATORS)
def test_bf16_forward(cls: type[nn.Module]) -> None:
    # bf16 engines cast the whole module; every op must have a bf16 kernel on CPU and CUDA
    model = tiny(cls, gradient_checkpointing=True).to(torch.bfloat16).train()
    logits, features = model(video(2, 3, 9, 32, 32, dtype=torch.bfloat16), return_features=True)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert all(f.dtype == torch.bfloat16 and torch.isfinite(f.float()).all() for f in features)


@pytest.mark.parametrize("last_kept", [0, 4, 9])
def test_causal_features_ignore_later_frames(last_kept: int) -> None:
    model = tiny(CausalDiscriminator3D).eval()
    x = video(1, 3, 17, 32, 32)
    changed = x.clone()
    changed[:, :, last_kept + 1 :] = video(1, 3, 16 - last_kept, 32, 32, seed=2)
    with torch.no_grad():
        _, before = model(x, return_features=True)
        _, after = model(changed, return_features=True)
    for level, (old, new) in enumerate(zip(before, after, strict=True), start=1):
        # frame j of block `level` stands for input frame j * 2**level and sees input frames <= it
        kept = last_kept // 2**level + 1
        torch.testing.assert_close(new[:, :, :kept], old[:, :, :kept], rtol=0, atol=1e-6)
        assert (new[:, :, kept:] - old[:, :, kept:]).abs().amax() > 1e-4


def test_causal_first_frame_alone_matches_an_image() -> None:
    # frame 0 of a clip is judged exactly as the clip's first frame on its own
    model = tiny(CausalDiscriminator3D).eval()
    x = video(1, 3, 9, 32, 32)
    with torch.no_grad():
        _, clip = model(x, return_features=True)
        _, image = model(x[:, :, :1], return_features=True)
    for clip_feature, image_feature in zip(clip, image, strict=True):
        torch.testing.assert_close(clip_feature[:, :, :1], image_feature, rtol=0, atol=1e-6)


@pytest.mark.parametrize("frames", [2, 4, 6, 15])
def test_causal_rejects_frame_counts(frames: int) -> None:
    with pytest.raises(ValueError, match=r"1 or 4k\+1 frames .* got T=" + str(frames)):
        tiny(CausalDiscriminator3D)(video(1, 3, frames, 16, 16))


@pytest.mark.parametrize("cls", [HybridDiscriminator3D, CausalDiscriminator3D])
def test_rejects_non_video_input(cls: type[nn.Module]) -> None:
    model = tiny(cls)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        model(video(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        model(video(1, 4, 5, 16, 16))


@pytest.mark.parametrize(
    "cls, overrides, message",
    [
        (HybridDiscriminator3D, {"num_3d_stages": 3}, r"num_3d_stages must be in \[0, 2\]"),
        (HybridDiscriminator3D, {"num_3d_stages": -1}, r"num_3d_stages must be in \[0, 2\]"),
        (HybridDiscriminator3D, {"attention_heads": 3}, r"attention_heads=3 .* does not divide \[32\]"),
        (HybridDiscriminator3D, {"attention_heads": 0}, r"attention_heads=0 must be positive"),
        (HybridDiscriminator3D, {"num_groups": 3}, r"num_groups=3 must divide"),
        (CausalDiscriminator3D, {"num_groups": 16}, r"num_groups=16 must divide .* \[8\]"),
        (CausalDiscriminator3D, {"channel_multipliers": (1,)}, r"at least 2 positive integers"),
        (CausalDiscriminator3D, {"base_channels": 0}, r"must be positive"),
    ],
)
def test_rejects_bad_arguments(cls: type[nn.Module], overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(cls, **overrides)
