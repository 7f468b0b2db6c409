"""VGG19 feature losses: a perceptual (feature distance) loss and a Gram-matrix style loss.

Both run a frozen VGG19 trunk (torchvision's `vgg19().features` layout, see losses/vgg.py), truncated
after the deepest requested layer, on images in [-1, 1] mapped to [0, 1] and normalised with ImageNet's
mean and std, in fp32 with autocast off. Layers are named conv1_1 .. conv5_4 and relu1_1 .. relu5_4;
a conv layer is its pre-activation output.

Weights (`pretrained=True`) come from the first of:
  1. `weights_path`: torchvision's vgg19 state-dict file (`vgg19-dcbb9e9d.pth`; `classifier.*` ignored);
  2. the torch hub cache: `<torch.hub.get_dir()>/checkpoints/vgg19-dcbb9e9d.pth`;
  3. if `download`, `VGG19_URL`, saved into the hub cache under that name.
Otherwise `PerceptualWeightsUnavailable` is raised, naming each place tried. Random weights only with
`pretrained=False` (tests and demos).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor, nn

from losses.lpips import LPIPSWeightsUnavailable, unit_normalize
from losses.vgg import (
    VGG19_FILENAME,
    VGG19_LAYER_INDICES,
    VGG19_URL,
    vgg19_features,
    vgg19_features_state_dict,
)

logger = logging.getLogger(__name__)

DEFAULT_LAYERS: Mapping[str, float] = MappingProxyType(
    {"conv1_2": 1.0, "conv2_2": 0.75, "conv3_4": 0.5, "conv4_4": 0.25}
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_HOW_TO_FIX = (
    "Fix it in one of these ways:\n"
    f"  - pass `weights_path`: a local copy of torchvision's {VGG19_FILENAME} (from {VGG19_URL});\n"
    f"  - put {VGG19_FILENAME} into the torch hub cache's checkpoints/ folder (set TORCH_HOME to move it);\n"
    "  - allow the download (`download=True`) on a machine with network access;\n"
    "  - set `pretrained=False` for tests and demos only: random weights, not a perceptual distance."
)


class PerceptualWeightsUnavailable(LPIPSWeightsUnavailable):
    """Pretrained VGG19 weights could not be found or downloaded; the message lists where it looked.

    A subclass of `LPIPSWeightsUnavailable` (and so of `FileNotFoundError`): one `except` covers both."""


def load_vgg19_features_state_dict(
    weights_path: str | os.PathLike | None = None, download: bool = True
) -> dict[str, Tensor]:
    """The `features.*` entries of torchvision's ImageNet VGG19, found in the order given in the module
    docstring; raises `PerceptualWeightsUnavailable` listing the places tried."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise PerceptualWeightsUnavailable(f"VGG19 weights_path {path} does not exist.\n{_HOW_TO_FIX}")
        return _features(torch.load(path, map_location="cpu", weights_only=True), str(path))

    tried: list[str] = []
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILENAME
    if cached.is_file():
        logger.info("VGG19 weights: hub cache %s", cached)
        return _features(torch.load(cached, map_location="cpu", weights_only=True), str(cached))
    tried.append(f"hub cache {cached} (not found)")
    if not download:
        tried.append(f"download {VGG19_URL} (skipped: download=False)")
    else:
        try:
            # The file name carries its sha256 prefix, which torch.hub checks.
            state = torch.hub.load_state_dict_from_url(
                VGG19_URL, file_name=VGG19_FILENAME, check_hash=True, map_location="cpu", weights_only=True
            )
        except Exception as error:  # offline, HTTP error, proxy, hash mismatch: all reported below
            tried.append(f"download {VGG19_URL} (failed: {type(error).__name__}: {error})")
        else:
            logger.info("VGG19 weights: downloaded %s -> %s", VGG19_URL, cached)
            return _features(state, VGG19_URL)
    raise PerceptualWeightsUnavailable(
        "Pretrained VGG19 weights are unavailable (it never falls back to random weights). Tried:\n"
        + "\n".join(f"  - {t}" for t in tried)
        + "\n"
        + _HOW_TO_FIX
    )


def _features(state: object, source: str) -> dict[str, Tensor]:
    if not isinstance(state, Mapping):
        raise ValueError(f"VGG19 weights {source} hold a {type(state).__name__}, not a state dict")
    features = vgg19_features_state_dict(state)
    if not features:
        raise ValueError(f"VGG19 weights {source} hold no `features.N.*` entries (torchvision's layout)")
    return features


def _check_layers(layers: Iterable[str]) -> None:
    unknown = [name for name in layers if name not in VGG19_LAYER_INDICES]
    if unknown:
        raise ValueError(
            f"unknown VGG19 layer name(s) {unknown}; valid names: {', '.join(VGG19_LAYER_INDICES)}"
        )


class VGG19Features(nn.Module):
    """Frozen VGG19 trunk up to the deepest of `layers`; `forward(x, names)` gives {name: fp32 feature}
    for images x (N, 3, H, W) in [-1, 1]. One instance can serve several losses (`backbone=`)."""

    def __init__(
        self,
        layers: Iterable[str] = tuple(DEFAULT_LAYERS),
        pretrained: bool = True,
        weights_path: str | os.PathLike | None = None,
        download: bool = True,
    ) -> None:
        super().__init__()
        layers = tuple(layers)
        if not layers:
            raise ValueError("VGG19Features needs at least one layer name")
        _check_layers(layers)
        num_layers = max(VGG19_LAYER_INDICES[name] for name in layers) + 1
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.pretrained = pretrained
        state = load_vgg19_features_state_dict(weights_path, download) if pretrained else None
        # Pretrained layers are built on the meta device and take the loaded tensors: no throwaway init,
        # and the global RNG (the run's init) is left untouched.
        with torch.device("meta") if pretrained else contextlib.nullcontext():
            self.features = vgg19_features(num_layers)
        # An in-place ReLU would overwrite the output of the conv before it, which a conv tap returns.
        for layer in self.features:
            if isinstance(layer, nn.ReLU):
                layer.inplace = False
        self.requires_grad_(False)
        if state is not None:
            self._load_trunk(state)
        else:
            logger.warning(
                "VGG19Features(pretrained=False): random weights; the perceptual and style losses are not "
                "perceptual (use this for tests and demos only)."
            )
        self.eval()

    def _load_trunk(self, state: Mapping[str, Tensor]) -> None:
        expected = {f"features.{key}": value for key, value in self.features.state_dict().items()}
        # A torchvision vgg16 file has its convs at other indices: shapes and keys tell the two apart.
        wrong = [
            key
            for key, value in expected.items()
            if key not in state or tuple(state[key].shape) != tuple(value.shape)
        ]
        if wrong:
            raise ValueError(
                f"the VGG19 weights do not fit torchvision's vgg19 `features` layout (missing or misshapen: "
                f"{', '.join(wrong[:6])}{' ...' if len(wrong) > 6 else ''}); is it another VGG's file?"
            )
        self.load_state_dict({key: state[key].float() for key in expected}, assign=True)

    @property
    def depth(self) -> int:
        """Index of the last trunk layer built: layers up to this torchvision index can be read."""
        return len(self.features) - 1

    def train(self, mode: bool = True) -> VGG19Features:
        """Stays in eval mode: it is a fixed feature extractor."""
        return super().train(False)

    def check_layers(self, layers: Iterable[str]) -> None:
        """ValueError unless every name is a VGG19 layer within this (truncated) trunk."""
        _check_layers(layers)
        too_deep = [name for name in layers if VGG19_LAYER_INDICES[name] > self.depth]
        if too_deep:
            raise ValueError(
                f"layer(s) {too_deep} lie beyond this backbone, which stops at torchvision index "
                f"{self.depth}; build one VGG19Features with all layers needed and pass it as `backbone=`"
            )

    def forward(self, x: Tensor, layers: Iterable[str]) -> dict[str, Tensor]:
        """{name: activation} (fp32) at each named layer for images x (N, 3, H, W) in [-1, 1]."""
        layers = tuple(layers)
        if not layers:
            raise ValueError("VGG19Features.forward needs at least one layer name")
        self.check_layers(layers)
        pools = sum(isinstance(layer, nn.MaxPool2d) for layer in self.features)
        if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < 2**pools:
            raise ValueError(
                f"VGG19 features want (N, 3, H, W) images with H, W >= {2**pools}; got {tuple(x.shape)}"
            )
        if self.features[0].weight.dtype != torch.float32:
            raise TypeError(
                "VGG19Features must stay in fp32 (was it cast with a bf16 module?); it casts its inputs itself."
            )
        taps = {VGG19_LAYER_INDICES[name]: name for name in layers}
        last = max(taps)
        out: dict[str, Tensor] = {}
        # Autocast off: feature distances and Gram matrices are small differences of large numbers.
        with torch.autocast(x.device.type, enabled=False):
            h = ((x.float() + 1.0) / 2.0 - self.mean) / self.std
            for index, layer in enumerate(self.features[: last + 1]):
                h = layer(h)
                if index in taps:
                    out[taps[index]] = h
        return out


def _check_weights(layers: Mapping[str, float]) -> dict[str, float]:
    if not layers:
        raise ValueError("give at least one layer: {name: weight}")
    _check_layers(layers)
    return {name: float(weight) for name, weight in layers.items()}


def _backbone(
    backbone: VGG19Features | None,
    layers: Iterable[str],
    pretrained: bool,
    weights_path: str | os.PathLike | None,
    download: bool,
) -> VGG19Features:
    if backbone is None:
        return VGG19Features(layers, pretrained=pretrained, weights_path=weights_path, download=download)
    if not isinstance(backbone, VGG19Features):
        raise TypeError(
            f"backbone must be a VGG19Features (e.g. another loss's `.backbone`), got {type(backbone).__name__}"
        )
    backbone.check_layers(layers)
    return backbone


def _check_pair(real: Tensor, fake: Tensor) -> None:
    if real.shape != fake.shape:
        raise ValueError(
            f"real and fake must have the same shape; got {tuple(real.shape)} and {tuple(fake.shape)}"
        )


class VGGPerceptualLoss(nn.Module):
    """Per-sample VGG19 feature distance: sum over layers of weight * distance(f_real, f_fake), shape (N,).

    distance: "l1" / "l2" = mean |diff| / diff^2 over (C, H, W); "cosine" = mean over positions of
    1 - cos(f_real, f_fake) over channels, computed as 0.5 * ||f/||f|| - g/||g||||^2 (equal for non-zero
    vectors, and 0 rather than undefined where both are all-zero, e.g. dead ReLU positions).
    `backbone`, when given, is used instead of building one (`pretrained`, `weights_path`, `download`
    are then ignored).
    """

    def __init__(
        self,
        layers: Mapping[str, float] = DEFAULT_LAYERS,
        distance: Literal["l1", "l2", "cosine"] = "l1",
        pretrained: bool = True,
        weights_path: str | os.PathLike | None = None,
        download: bool = True,
        backbone: VGG19Features | None = None,
    ) -> None:
        super().__init__()
        if distance not in ("l1", "l2", "cosine"):
            raise ValueError(f"distance must be 'l1', 'l2' or 'cosine', got {distance!r}")
        self.layers = _check_weights(layers)
        self.distance = distance
        self.backbone = _backbone(backbone, self.layers, pretrained, weights_path, download)

    def loss_from_features(self, real: Mapping[str, Tensor], fake: Mapping[str, Tensor]) -> Tensor:
        """The loss (N,) from features already computed (e.g. by a backbone shared with a style loss)."""
        total = None
        for name, weight in self.layers.items():
            f_real, f_fake = real[name].float(), fake[name].float()  # (N, C, H, W)
            if self.distance == "l1":
                d = (f_real - f_fake).abs().mean(dim=(1, 2, 3))
            elif self.distance == "l2":
                d = (f_real - f_fake).square().mean(dim=(1, 2, 3))
            else:
                # 1 - cos(a, b) = 0.5 * ||a/|a| - b/|b|||^2 over channels, then the mean over positions
                unit_diff = unit_normalize(f_real) - unit_normalize(f_fake)
                d = 0.5 * unit_diff.square().sum(dim=1).mean(dim=(1, 2))
            total = weight * d if total is None else total + weight * d
        assert total is not None
        return total

    def forward(self, real: Tensor, fake: Tensor) -> Tensor:
        """Per-sample loss (N,), fp32, for images (N, 3, H, W) in [-1, 1]."""
        _check_pair(real, fake)
        # Two passes rather than one on cat([real, fake]): no graph (memory, backward) for the real half.
        with torch.autocast(real.device.type, enabled=False):
            return self.loss_from_features(self.backbone(real, self.layers), self.backbone(fake, self.layers))


def gram_matrix(features: Tensor) -> Tensor:
    """G = F F^T / (C * H * W) for F = features (N, C, H, W) flattened to (N, C, H*W); (N, C, C), fp32."""
    n, c, h, w = features.shape
    flat = features.float().reshape(n, c, h * w)
    with torch.autocast(features.device.type, enabled=False):
        return torch.bmm(flat, flat.transpose(1, 2)) / (c * h * w)


class GramStyleLoss(nn.Module):
    """Per-sample Gram-matrix style loss: sum over layers of weight * distance(G_real, G_fake), shape (N,),
    with distance "l1" / "l2" = mean |diff| / diff^2 over the C x C entries (see `gram_matrix`).

    Pass `backbone=perceptual.backbone` to share a VGGPerceptualLoss's trunk (then `pretrained`,
    `weights_path`, `download` are ignored).
    """

    def __init__(
        self,
        layers: Mapping[str, float] = DEFAULT_LAYERS,
        distance: Literal["l1", "l2"] = "l1",
        pretrained: bool = True,
        weights_path: str | os.PathLike | None = None,
        download: bool = True,
        backbone: VGG19Features | None = None,
    ) -> None:
        super().__init__()
        if distance not in ("l1", "l2"):
            raise ValueError(f"distance must be 'l1' or 'l2', got {distance!r}")
        self.layers = _check_weights(layers)
        self.distance = distance
        self.backbone = _backbone(backbone, self.layers, pretrained, weights_path, download)

    def loss_from_features(self, real: Mapping[str, Tensor], fake: Mapping[str, Tensor]) -> Tensor:
        """The loss (N,) from features already computed (e.g. by a backbone shared with a perceptual loss)."""
        total = None
        for name, weight in self.layers.items():
            diff = gram_matrix(real[name]) - gram_matrix(fake[name])  # (N, C, C)
            d = diff.abs().mean(dim=(1, 2)) if self.distance == "l1" else diff.square().mean(dim=(1, 2))
            total = weight * d if total is None else total + weight * d
        assert total is not None
        return total

    def forward(self, real: Tensor, fake: Tensor) -> Tensor:
        """Per-sample loss (N,), fp32, for images (N, 3, H, W) in [-1, 1]."""
        _check_pair(real, fake)
        with torch.autocast(real.device.type, enabled=False):
            return self.loss_from_features(self.backbone(real, self.layers), self.backbone(fake, self.layers))
