"""Tests of `DiscriminatorSet` and `build_discriminator_set`: output keys and shapes, frame picking shared by
image members, multiscale pooling, gradients, weights and spec validation. Tiny sizes, fp32, CPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.discriminator_set import (
    DISCRIMINATOR_SIZES,
    DISCRIMINATOR_TYPES,
    DiscriminatorSet,
    build_discriminator_set,
)

ALL_TYPES = list(DISCRIMINATOR_TYPES)


def video(frames: int = 9, size: int = 32, *, seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_set(types: list[str], **kwargs: object) -> DiscriminatorSet:
    torch.manual_seed(0)
    specs = [{"type": t, "size": "tiny"} for t in types]
    return build_discriminator_set(specs, **{"gradient_checkpointing": False, **kwargs})


def record_inputs(module: nn.Module) -> list[torch.Tensor]:
    """Every input `module` gets from now on, in call order."""
    inputs: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().clone()))
    return inputs


def test_registry_covers_every_type_and_size() -> None:
    assert set(DISCRIMINATOR_SIZES) == set(DISCRIMINATOR_TYPES)
    for name, (cls, kind) in DISCRIMINATOR_TYPES.items():
        assert kind in ("video", "image")
        assert set(DISCRIMINATOR_SIZES[name]) == {"tiny", "default"}
        assert DISCRIMINATOR_SIZES[name]["default"] == {"base_channels": 64, "num_groups": 32}
        assert isinstance(cls(**DISCRIMINATOR_SIZES[name]["tiny"]), nn.Module)


def test_keys_and_logit_shapes_with_every_type() -> None:
    discriminators = tiny_set(ALL_TYPES, image_frames=2).eval()
    x = video()
    with torch.no_grad():
        outputs = discriminators(x)
    assert list(outputs) == discriminators.output_keys == ALL_TYPES
    assert discriminators.member_kinds == {name: kind for name, (_, kind) in DISCRIMINATOR_TYPES.items()}
    assert all(key.startswith("members.") for key in discriminators.state_dict())
    frames = torch.zeros(2 * 2, 3, 32, 32)  # 2 picked frames per clip, folded into the batch
    with torch.no_grad():
        for name, logits in outputs.items():
            member = discriminators.members[name]
            given = x if discriminators.member_kinds[name] == "video" else frames
            assert logits.shape == member(given).shape, name
            assert torch.isfinite(logits).all(), name
    assert outputs["magvit2d"].shape[0] == outputs["patchgan2d"].shape[0] == 4


def test_return_features_gives_the_same_logits_and_features_per_key() -> None:
    discriminators = tiny_set(ALL_TYPES, multiscale_factors=(2,)).eval()
    x = video(5)
    with torch.no_grad():
        torch.manual_seed(3)
        logits = discriminators(x)
        torch.manual_seed(3)
        with_features = discriminators(x, return_features=True)
    assert list(with_features) == list(logits)
    for key, (same_logits, features) in with_features.items():
        torch.testing.assert_close(same_logits, logits[key], rtol=0, atol=0)
        assert features and all(isinstance(f, torch.Tensor) for f in features), key


def test_multiscale_keys_pool_the_picked_frames() -> None:
    discriminators = tiny_set(["3d", "magvit2d"], multiscale_factors=(2,)).eval()
    inputs = record_inputs(discriminators.members["magvit2d"])
    x = video(5)
    with torch.no_grad():
        torch.manual_seed(0)
        outputs = discriminators(x)
        assert [tuple(i.shape) for i in inputs] == [(2, 3, 32, 32), (2, 3, 16, 16)]
        torch.manual_seed(0)
        picked = discriminators.pick_frames(x)  # the same draw as inside forward
        expected = discriminators.members["magvit2d"](F.avg_pool2d(picked, 2))
    assert list(outputs) == discriminators.output_keys == ["3d", "magvit2d", "magvit2d@2x"]
    torch.testing.assert_close(inputs[0], picked, rtol=0, atol=0)
    torch.testing.assert_close(outputs["magvit2d@2x"], expected)


def test_every_image_member_and_scale_sees_the_same_frames() -> None:
    torch.manual_seed(0)
    specs = [
        {"type": "magvit2d", "size": "tiny", "name": "first"},
        {"type": "magvit2d", "size": "tiny", "name": "second"},
    ]
    discriminators = build_discriminator_set(
        specs, gradient_checkpointing=False, image_frames=3, multiscale_factors=(2,)
    ).eval()
    discriminators.members["second"].load_state_dict(discriminators.members["first"].state_dict())
    first, second = (record_inputs(discriminators.members[name]) for name in ("first", "second"))
    with torch.no_grad():
        outputs = discriminators(video())
    assert len(first) == len(second) == 2  # full resolution, then pooled by 2
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(first[1], F.avg_pool2d(first[0], 2))
    for key in ("", "@2x"):
        torch.testing.assert_close(outputs[f"first{key}"], outputs[f"second{key}"], rtol=0, atol=0)


def test_image_frames_zero_uses_every_frame_in_order() -> None:
    discriminators = tiny_set(["patchgan2d"], image_frames=0).eval()
    inputs = record_inputs(discriminators.members["patchgan2d"])
    x = video(5)
    with torch.no_grad():
        discriminators(x)
    torch.testing.assert_close(inputs[0], rearrange(x, "b c t h w -> (b t) c h w"), rtol=0, atol=0)
    # more frames asked for than a clip has: all of them
    discriminators.image_frames = 20
    assert discriminators.pick_frames(x).shape == (2 * 5, 3, 32, 32)


def test_frames_are_picked_per_clip_without_replacement() -> None:
    discriminators = tiny_set(["patchgan2d"], image_frames=3)
    # every pixel of frame t of clip b holds 100 b + t, so a picked frame tells where it came from
    labels = torch.arange(2)[:, None] * 100 + torch.arange(9)[None, :]
    x = rearrange(labels.float(), "b t -> b 1 t 1 1").expand(2, 3, 9, 32, 32)
    draws = set()
    for seed in range(10):
        torch.manual_seed(seed)
        picked = rearrange(discriminators.pick_frames(x)[:, 0, 0, 0], "(b k) -> b k", b=2)
        for clip, frames in enumerate(picked.long().tolist()):
            assert all(f // 100 == clip for f in frames)  # from its own clip
            assert frames == sorted(set(frames))  # distinct, in time order
        draws.add(tuple(picked[0].tolist()))
    assert len(draws) > 1


def test_forward_is_deterministic_under_manual_seed() -> None:
    discriminators = tiny_set(["3d", "magvit2d", "patchgan2d"], image_frames=2).eval()
    x = video()
    with torch.no_grad():
        torch.manual_seed(7)
        first = discriminators(x)
        torch.manual_seed(7)
        second = discriminators(x)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_gradients_reach_every_member_and_the_input() -> None:
    discriminators = tiny_set(ALL_TYPES, image_frames=2, multiscale_factors=(2,)).train()
    x = video().requires_grad_()
    outputs = discriminators(x)
    sum(logits.mean() for logits in outputs.values()).backward()
    for name, parameter in discriminators.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("gradient_checkpointing", [True, False])
def test_gradient_checkpointing_is_passed_to_every_member(gradient_checkpointing: bool) -> None:
    discriminators = tiny_set(ALL_TYPES, gradient_checkpointing=gradient_checkpointing)
    for name, member in discriminators.members.items():
        assert member.gradient_checkpointing is gradient_checkpointing, name


def test_output_weights_scale_the_multiscale_keys() -> None:
    specs = [
        {"type": "3d", "size": "tiny", "weight": 1.0},
        {"type": "patchgan2d", "size": "tiny", "weight": 0.5, "name": "frames"},
    ]
    discriminators = build_discriminator_set(specs, gradient_checkpointing=False, multiscale_factors=(2, 4))
    assert discriminators.output_weights(0.25) == {
        "3d": 1.0,
        "frames": 0.5,
        "frames@2x": 0.125,
        "frames@4x": 0.125,
    }
    assert list(discriminators.output_weights(1.0)) == discriminators.output_keys


def test_options_override_the_size() -> None:
    specs = [{"type": "patchgan3d", "size": "tiny", "options": {"n_layers": 2, "temporal_stride": 1}}]
    member = build_discriminator_set(specs, gradient_checkpointing=False).members["patchgan3d"]
    assert len(member.blocks) == 3  # n_layers + 1
    assert member.blocks[0].conv.stride == (1, 2, 2)
    assert member.blocks[0].conv.out_channels == DISCRIMINATOR_SIZES["patchgan3d"]["tiny"]["base_channels"]


@pytest.mark.parametrize(
    "specs, message",
    [
        ([{"type": "stylegan"}], "valid types: ['3d', 'causal3d', 'hybrid3d', 'magvit2d', 'patchgan2d'"),
        ([{"type": "3d", "size": "tiny"}, {"type": "3d", "size": "tiny"}], 'distinct "name"'),
        ([{"type": "3d", "size": "huge"}], "valid sizes: ['default', 'tiny']"),
        ([{"type": "3d", "options": {"n_layers": 2}}], "unknown options ['n_layers'] for Discriminator3D"),
        ([{"type": "3d", "options": {"gradient_checkpointing": True}}], "build_discriminator_set's argument"),
        (
            [{"type": "3d", "size": "tiny", "options": {"num_groups": 5}}],
            "discriminator '3d' (3d, size 'tiny')",
        ),
        ([{"type": "3d", "wieght": 2.0}], "unknown keys ['wieght']"),
        ([{"type": "3d", "size": "tiny", "weight": -1.0}], "weight must be finite and >= 0"),
        ([], "at least one discriminator spec"),
    ],
)
def test_bad_specs_raise_helpful_errors(specs: list[dict], message: str) -> None:
    with pytest.raises(ValueError) as error:
        build_discriminator_set(specs, gradient_checkpointing=False)
    assert message in str(error.value)


def test_bad_set_arguments_raise() -> None:
    with pytest.raises(ValueError, match="image members only"):
        tiny_set(["3d"], multiscale_factors=(2,))
    with pytest.raises(ValueError, match="distinct integers >= 2"):
        tiny_set(["magvit2d"], multiscale_factors=(1,))
    with pytest.raises(ValueError, match="image_frames must be an integer >= 0"):
        tiny_set(["magvit2d"], image_frames=-1)


def test_too_small_multiscale_frames_raise_with_factor_and_resolution() -> None:
    discriminators = tiny_set(["patchgan2d"], multiscale_factors=(2, 4))
    with pytest.raises(ValueError, match=r"multiscale factor 4 pools 32x32 frames to 8x8.*at least 64 px"):
        discriminators(video(5))


def test_module_imports_no_deepspeed_and_starts_nothing_distributed() -> None:
    code = (
        "import sys, torch.distributed as dist; import models.discriminator_set; "
        "assert 'deepspeed' not in sys.modules; assert not dist.is_initialized()"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)
