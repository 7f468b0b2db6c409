"""Several discriminators judged together: video members see the clip, image members see frames picked from it.

`build_discriminator_set` makes one from config specs (named types and sizes from small registries);
`DiscriminatorSet.forward` gives a dict of logits per output key, and `output_weights` the weight each key's
loss gets. Image members may also judge the picked frames average-pooled by `multiscale_factors`, under the
keys f"{name}@{factor}x". A plain module: parallelism and losses live elsewhere.
"""

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.discriminator import Discriminator3D
from models.discriminator_2d import MagvitDiscriminator2D
from models.discriminator_video import CausalDiscriminator3D, HybridDiscriminator3D
from models.patchgan import PatchGAN2D, PatchGAN3D

InputKind = Literal["video", "image"]
INPUT_KINDS: tuple[InputKind, ...] = ("video", "image")
# Below this a pooled frame leaves the image discriminators (three halvings) almost nothing to judge.
MIN_POOLED_SIZE = 16
SPEC_KEYS = ("type", "weight", "size", "name", "options")


class DiscriminatorType(NamedTuple):
    cls: type[nn.Module]
    kind: InputKind


DISCRIMINATOR_TYPES: dict[str, DiscriminatorType] = {
    "3d": DiscriminatorType(Discriminator3D, "video"),
    "hybrid3d": DiscriminatorType(HybridDiscriminator3D, "video"),
    "causal3d": DiscriminatorType(CausalDiscriminator3D, "video"),
    "patchgan3d": DiscriminatorType(PatchGAN3D, "video"),
    "magvit2d": DiscriminatorType(MagvitDiscriminator2D, "image"),
    "patchgan2d": DiscriminatorType(PatchGAN2D, "image"),
}

# tiny: 2 channels per group at the first level (1 per group leaves the adaptive weight ill-conditioned:
# the 2-rank vs single-process weights then differ by 0.3% through oneDNN's batch-1 vs batch-2 rounding)
_TINY = {"base_channels": 16, "num_groups": 8}
_DEFAULT = {"base_channels": 64, "num_groups": 32}
# Constructor arguments per type and size; "tiny" is for CPU tests and demos, "default" is the classes' own.
DISCRIMINATOR_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    name: {"tiny": dict(_TINY), "default": dict(_DEFAULT)} for name in DISCRIMINATOR_TYPES
}
# the default 4 heads x 32 dims of attention would be 8x wider than a tiny width-16 stem
DISCRIMINATOR_SIZES["magvit2d"]["tiny"].update(attention_heads=2, attention_dim_head=16)


class DiscriminatorSet(nn.Module):
    """Discriminator members keyed by name (state dict keys `members.<name>.*`), each with an input kind and a
    loss weight; `forward(video)` returns logits per output key.

    Image members get `image_frames` frames per clip picked at random without replacement (0: all frames);
    every image member and scale of one call sees the same frames.
    """

    def __init__(
        self,
        members: Mapping[str, tuple[nn.Module, InputKind, float]],
        *,
        image_frames: int = 1,
        multiscale_factors: Sequence[int] = (),
    ):
        super().__init__()
        if not members:
            raise ValueError("a DiscriminatorSet needs at least one member")
        for name, (module, kind, weight) in members.items():
            if not name or "." in name or "@" in name:
                raise ValueError(
                    f"member name {name!r} must be non-empty and contain neither '.' (state dict separator) "
                    "nor '@' (multiscale key separator)"
                )
            if not isinstance(module, nn.Module):
                raise TypeError(f"member {name!r} must be an nn.Module, got {type(module).__name__}")
            if kind not in INPUT_KINDS:
                raise ValueError(f"member {name!r}: input kind must be one of {INPUT_KINDS}, got {kind!r}")
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"member {name!r}: weight must be finite and >= 0, got {weight}")
        if isinstance(image_frames, bool) or not isinstance(image_frames, int) or image_frames < 0:
            raise ValueError(f"image_frames must be an integer >= 0 (0: every frame), got {image_frames!r}")
        factors = tuple(multiscale_factors)
        if any(isinstance(f, bool) or not isinstance(f, int) or f < 2 for f in factors) or len(
            set(factors)
        ) != len(factors):
            raise ValueError(f"multiscale_factors must be distinct integers >= 2, got {factors}")
        has_image_member = any(kind == "image" for _, kind, _ in members.values())
        if factors and not has_image_member:
            raise ValueError(
                f"multiscale_factors={factors} apply to image members only, and this set has none: add an "
                "image discriminator (e.g. 'magvit2d') or drop multiscale_factors"
            )

        self.members = nn.ModuleDict({name: module for name, (module, _, _) in members.items()})
        self._kinds: dict[str, InputKind] = {name: kind for name, (_, kind, _) in members.items()}
        self._weights: dict[str, float] = {name: float(weight) for name, (_, _, weight) in members.items()}
        self.image_frames = image_frames
        self.multiscale_factors = factors

    @property
    def member_kinds(self) -> dict[str, InputKind]:
        """Each member's input kind, "video" or "image"."""
        return dict(self._kinds)

    @property
    def output_keys(self) -> list[str]:
        """The keys `forward` returns, in order: each member's name, then for image members name@{f}x."""
        keys = []
        for name, kind in self._kinds.items():
            keys.append(name)
            if kind == "image":
                keys += [f"{name}@{factor}x" for factor in self.multiscale_factors]
        return keys

    def output_weights(self, multiscale_weight: float) -> dict[str, float]:
        """The loss weight of each output key: its member's weight, times `multiscale_weight` for pooled keys."""
        weights = {}
        for name, kind in self._kinds.items():
            weights[name] = self._weights[name]
            if kind == "image":
                for factor in self.multiscale_factors:
                    weights[f"{name}@{factor}x"] = self._weights[name] * multiscale_weight
        return weights

    def pick_frames(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B*k, C, H, W): k = min(image_frames, T) frames per clip (0: all), drawn at
        random without replacement and kept in temporal order."""
        batch, _, frames = video.shape[:3]
        count = frames if self.image_frames == 0 else min(self.image_frames, frames)
        # sorted so that k = T is the identity and a clip's picked frames stay in time order
        index = torch.rand(batch, frames, device=video.device).argsort(dim=1)[:, :count].sort(dim=1).values
        # (B, C, T, H, W) -> (B, C, k, H, W)
        picked = torch.take_along_dim(video, rearrange(index, "b k -> b 1 k 1 1"), dim=2)
        return rearrange(picked, "b c k h w -> (b k) c h w")

    def _scaled_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The picked frames at every scale, keyed by output key suffix: "" and "@{f}x" for each factor."""
        height, width = images.shape[-2:]
        scaled = {"": images}
        for factor in self.multiscale_factors:
            if min(height, width) // factor < MIN_POOLED_SIZE:
                raise ValueError(
                    f"multiscale factor {factor} pools {height}x{width} frames to "
                    f"{height // factor}x{width // factor}, below the {MIN_POOLED_SIZE} px the image "
                    f"discriminators need: use frames of at least {MIN_POOLED_SIZE * factor} px or drop "
                    f"factor {factor}"
                )
            # (N, C, H, W) -> (N, C, H // f, W // f); fp32 because CPU torch lacks some bf16 pool kernels
            pooled = F.avg_pool2d(images.float(), kernel_size=factor, stride=factor)
            scaled[f"@{factor}x"] = pooled.to(images.dtype)
        return scaled

    def forward(
        self, video: torch.Tensor, return_features: bool = False
    ) -> dict[str, torch.Tensor] | dict[str, tuple[torch.Tensor, list[torch.Tensor]]]:
        """Logits per output key (`output_keys`), or (logits, features) with `return_features`.

        Video members get `video` (B, C, T, H, W); image members get the picked frames (B*k, C, H, W), so
        their logits are batched (B*k, ...).
        """
        if video.ndim != 5:
            raise ValueError(f"expected a video batch (B, C, T, H, W), got shape {tuple(video.shape)}")
        images = None
        if "image" in self._kinds.values():
            images = self._scaled_images(self.pick_frames(video))
        outputs = {}
        for name, member in self.members.items():
            if self._kinds[name] == "video":
                outputs[name] = member(video, return_features=return_features)
                continue
            for suffix, scaled in images.items():
                outputs[f"{name}{suffix}"] = member(scaled, return_features=return_features)
        return outputs


def build_discriminator_set(
    specs: Sequence[Mapping[str, Any]],
    *,
    gradient_checkpointing: bool,
    image_frames: int = 1,
    multiscale_factors: Sequence[int] = (),
) -> DiscriminatorSet:
    """Build a `DiscriminatorSet` from specs {"type", "weight" (1.0), "size" ("default"), "name" (the type),
    "options" (constructor overrides)}; every member gets `gradient_checkpointing`."""
    if not specs:
        raise ValueError(f"give at least one discriminator spec; valid types: {sorted(DISCRIMINATOR_TYPES)}")
    members: dict[str, tuple[nn.Module, InputKind, float]] = {}
    for position, spec in enumerate(specs):
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(
                f"discriminator spec {position}: unknown keys {unknown}; valid keys: {SPEC_KEYS}"
            )
        type_name = spec.get("type")
        if type_name not in DISCRIMINATOR_TYPES:
            raise ValueError(
                f"discriminator spec {position}: unknown type {type_name!r}; valid types: "
                f"{sorted(DISCRIMINATOR_TYPES)}"
            )
        name = spec.get("name", type_name)
        if name in members:
            raise ValueError(
                f"discriminator spec {position}: name {name!r} is already taken; give each member of the same "
                f'type a distinct "name" (e.g. "name": "{type_name}_2")'
            )
        size = spec.get("size", "default")
        sizes = DISCRIMINATOR_SIZES[type_name]
        if size not in sizes:
            raise ValueError(
                f"discriminator {name!r}: unknown size {size!r} for type {type_name!r}; valid sizes: "
                f"{sorted(sizes)}"
            )
        cls, kind = DISCRIMINATOR_TYPES[type_name]
        options = dict(spec.get("options") or {})
        valid = sorted(set(inspect.signature(cls).parameters) - {"gradient_checkpointing"})
        if "gradient_checkpointing" in options:
            raise ValueError(
                f"discriminator {name!r}: gradient_checkpointing is set for every member by "
                "build_discriminator_set's argument, not per spec; remove it from options"
            )
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"discriminator {name!r}: unknown options {unknown} for {cls.__name__}; valid options: {valid}"
            )
        try:
            module = cls(**{**sizes[size], **options}, gradient_checkpointing=gradient_checkpointing)
        except ValueError as error:
            raise ValueError(f"discriminator {name!r} ({type_name}, size {size!r}): {error}") from error
        members[name] = (module, kind, float(spec.get("weight", 1.0)))
    return DiscriminatorSet(members, image_frames=image_frames, multiscale_factors=multiscale_factors)
