"""LPIPS v0.1, 'vgg' variant (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric"), without torchvision or the `lpips` package.

The numbers follow richzhang/PerceptualSimilarity (`lpips/lpips.py`, `lpips/pretrained_networks.py`):
inputs in [-1, 1] are shifted by [-.030, -.088, -.188] and divided by [.458, .448, .450] (the v0.1
`ScalingLayer`), VGG16 features are taken after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, each is
unit-normalised over channels (x / (||x||_2 + 1e-10)), the squared difference goes through a learned
1x1 conv without bias (`lin0..lin4`), is averaged over space and summed over the five layers.

Weights: the trunk is torchvision's ImageNet VGG16 (`vgg16-397923af.pth`), the heads are lpips'
`weights/v0.1/vgg.pth`. `LPIPS(pretrained=True)` takes each from the first of:
  1. `weights_path`: a combined file written by `LPIPS.save_pretrained` / `bake_lpips_weights`, or lpips'
     `vgg.pth` heads file; `backbone_weights_path`, when given, supplies the trunk (torchvision's vgg16
     state-dict file);
  2. the torch hub cache: `<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth` and
     `.../checkpoints/lpips_vgg_v0.1.pth` (the heads, under a name of ours);
  3. if `download`, `VGG16_URL` and `LPIPS_HEADS_URL`, saved into the hub cache under those names.
Otherwise it raises `LPIPSWeightsUnavailable`; it never falls back to random weights by itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from losses.vgg import VGG16_FILENAME, VGG16_URL, vgg16_features, vgg16_features_state_dict

logger = logging.getLogger(__name__)

LPIPS_HEADS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
LPIPS_HEADS_FILENAME = "lpips_vgg_v0.1.pth"  # our name for lpips' v0.1/vgg.pth in the torch hub cache

INPUT_SHIFT = (-0.030, -0.088, -0.188)  # lpips' v0.1 ScalingLayer (v0.0 had none)
INPUT_SCALE = (0.458, 0.448, 0.450)
LAYER_ENDS = (4, 9, 16, 23, 30)  # features[0:4] -> relu1_2, [4:9] -> relu2_2, ... [23:30] -> relu5_3
LAYER_CHANNELS = (64, 128, 256, 512, 512)
HEAD_KEYS = tuple(f"lin{i}.model.1.weight" for i in range(len(LAYER_CHANNELS)))

_HOW_TO_FIX = (
    "Fix it in one of these ways:\n"
    "  - pass a local file via the config key `loss.lpips.weights_path`: a combined file written by\n"
    "    `losses.lpips.bake_lpips_weights(path)`, or lpips' v0.1 `vgg.pth` heads together with\n"
    f"    `loss.lpips.backbone_weights_path` pointing to torchvision's {VGG16_FILENAME};\n"
    f"  - put {VGG16_FILENAME} (from {VGG16_URL}) and {LPIPS_HEADS_FILENAME} (from {LPIPS_HEADS_URL})\n"
    "    into the torch hub cache's checkpoints/ folder (set TORCH_HOME to move the cache);\n"
    "  - set `loss.lpips.pretrained: false` for tests and demos only: random weights, not a perceptual distance."
)


class LPIPSWeightsUnavailable(FileNotFoundError):
    """Pretrained LPIPS weights could not be found or downloaded; the message lists where it looked."""


class LinearHead(nn.Module):
    """lpips' `NetLinLayer`: dropout then a 1x1 conv to one channel, so keys read `linK.model.1.weight`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def unit_normalize(features: Tensor, eps: float = 1e-10) -> Tensor:
    """lpips' `normalize_tensor`: x / (||x||_2 over channels + eps)."""
    # vector_norm has the same value as sqrt(sum(x**2)) but a zero (not NaN) gradient at an all-zero vector.
    return features / (torch.linalg.vector_norm(features, dim=1, keepdim=True) + eps)


class LPIPS(nn.Module):
    """Frozen LPIPS v0.1 'vgg' distance; `forward(x, y)` gives one fp32 value per image.

    `pretrained=False` builds random weights from the global torch RNG (trunk with torchvision's VGG init,
    heads |N(0, 1)| / C so they stay non-negative like trained ones): for tests and CPU demos only.
    """

    def __init__(
        self,
        pretrained: bool = True,
        weights_path: str | os.PathLike | None = None,
        backbone_weights_path: str | os.PathLike | None = None,
        download: bool = True,
    ) -> None:
        super().__init__()
        # Non-persistent: the state dict holds exactly torchvision's trunk keys and lpips' head keys.
        self.register_buffer("shift", torch.tensor(INPUT_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(INPUT_SCALE).view(1, 3, 1, 1), persistent=False)
        self.pretrained = pretrained
        state = load_lpips_state_dict(weights_path, backbone_weights_path, download) if pretrained else None
        # Pretrained layers are built on the meta device and then take the loaded tensors: no throwaway
        # random init, so building the loss leaves the global RNG (and thus the run's init) untouched.
        with torch.device("meta") if pretrained else contextlib.nullcontext():
            self.features = vgg16_features()
            self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (LinearHead(c) for c in LAYER_CHANNELS)
        self.requires_grad_(False)
        if state is not None:
            self.load_state_dict(state, assign=True)
        else:
            for head, channels in zip(self.heads, LAYER_CHANNELS, strict=True):
                nn.init.normal_(head.model[1].weight).abs_().div_(channels)
            logger.warning(
                "LPIPS(pretrained=False): random weights; its values are not perceptual distances "
                "(use this for tests and demos only)."
            )
        self.eval()

    @property
    def heads(self) -> tuple[LinearHead, ...]:
        return (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)

    def train(self, mode: bool = True) -> LPIPS:
        """Stays in eval mode: it is a fixed metric (the heads' dropout must stay off)."""
        return super().train(False)

    def layer_features(self, x: Tensor) -> list[Tensor]:
        """VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of already scaled input."""
        outputs, start = [], 0
        for end in LAYER_ENDS:
            x = self.features[start:end](x)
            outputs.append(x)
            start = end
        return outputs

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS distance, shape (N,), fp32, between images x and y of shape (N, 3, H, W) in [-1, 1]."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < 16:
            raise ValueError(
                f"LPIPS wants two (N, 3, H, W) images of the same shape with H, W >= 16; "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if self.shift.dtype != torch.float32 or self.features[0].weight.dtype != torch.float32:
            raise TypeError(
                "LPIPS must stay in fp32 (was it cast, e.g. as part of a bf16 DeepSpeed engine's module?); "
                "it casts its inputs itself."
            )
        # Autocast off: the metric is defined on fp32 features, and bf16 would round away small differences.
        with torch.autocast(x.device.type, enabled=False):
            both = (torch.cat([x, y]).float() - self.shift) / self.scale  # (2N, 3, H, W)
            distance = x.new_zeros(x.shape[0], dtype=torch.float32)
            for features, head in zip(self.layer_features(both), self.heads, strict=True):
                fx, fy = unit_normalize(features).chunk(2)
                distance = distance + head((fx - fy).square()).mean(dim=(1, 2, 3))
        return distance

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write trunk + heads as one state-dict file that `LPIPS(weights_path=path)` loads."""
        if not self.pretrained:
            logger.warning("LPIPS.save_pretrained: writing random weights to %s", path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(
            {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}, tmp
        )
        os.replace(tmp, path)  # atomic: a crashed build never leaves a truncated weights file
        return path


def bake_lpips_weights(
    output_path: str | os.PathLike,
    backbone_path: str | os.PathLike | None = None,
    heads_path: str | os.PathLike | None = None,
) -> Path:
    """Build a pretrained LPIPS (from the given files, else the hub cache, else a download) and write the
    single combined weights file, e.g. at Docker image build time."""
    return LPIPS(weights_path=heads_path, backbone_weights_path=backbone_path).save_pretrained(output_path)


def load_lpips_state_dict(
    weights_path: str | os.PathLike | None = None,
    backbone_weights_path: str | os.PathLike | None = None,
    download: bool = True,
) -> dict[str, Tensor]:
    """Find the pretrained trunk + heads in the order given in the module docstring, as one state dict.

    Raises `LPIPSWeightsUnavailable` (naming every place tried) when a part is found nowhere, and
    `ValueError` when a given file holds neither part.
    """
    trunk: dict[str, Tensor] = {}
    heads: dict[str, Tensor] = {}
    tried: list[str] = []
    if weights_path is not None:
        state = _load_file(weights_path, "weights_path")
        trunk, heads = vgg16_features_state_dict(state), _heads(state)
        if not heads:
            raise ValueError(
                f"LPIPS weights_path {weights_path} holds no heads ({', '.join(HEAD_KEYS)}); if it is "
                "torchvision's vgg16 file, pass it as backbone_weights_path together with lpips' vgg.pth."
            )
        tried.append(f"heads{' + backbone' if trunk else ''}: {weights_path} (loaded)")
    if backbone_weights_path is not None:
        trunk = vgg16_features_state_dict(_load_file(backbone_weights_path, "backbone_weights_path"))
        if not trunk:
            raise ValueError(
                f"LPIPS backbone_weights_path {backbone_weights_path} holds no `features.N.*` entries"
            )
        tried.append(f"backbone: {backbone_weights_path} (loaded)")

    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if not trunk:
        trunk = vgg16_features_state_dict(
            _from_hub(checkpoints, VGG16_FILENAME, VGG16_URL, download, "backbone", tried)
        )
    if not heads:
        heads = _heads(
            _from_hub(checkpoints, LPIPS_HEADS_FILENAME, LPIPS_HEADS_URL, download, "heads", tried)
        )
    if not trunk or not heads:
        missing = " and ".join(name for name, part in (("backbone", trunk), ("heads", heads)) if not part)
        raise LPIPSWeightsUnavailable(
            f"LPIPS 'vgg' v0.1 {missing} weights are unavailable (it never falls back to random weights). "
            "Tried:\n" + "\n".join(f"  - {t}" for t in tried) + "\n" + _HOW_TO_FIX
        )
    logger.info("LPIPS weights: %s", "; ".join(tried))
    return {k: v.float() for k, v in {**trunk, **heads}.items()}


def _heads(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: state[k] for k in HEAD_KEYS if k in state}


def _load_file(path: str | os.PathLike, what: str) -> dict[str, Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise LPIPSWeightsUnavailable(f"LPIPS {what} {path} does not exist.\n{_HOW_TO_FIX}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"LPIPS {what} {path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _from_hub(
    checkpoints: Path, filename: str, url: str, download: bool, part: str, tried: list[str]
) -> dict[str, Tensor]:
    """One part from the hub cache, else from its URL (saved into the cache); {} and a note in `tried`."""
    cached = checkpoints / filename
    if cached.is_file():
        tried.append(f"{part}: hub cache {cached} (loaded)")
        return _load_file(cached, f"{part} in the hub cache")
    tried.append(f"{part}: hub cache {cached} (not found)")
    if not download:
        tried.append(f"{part}: download {url} (skipped: download=False)")
        return {}
    try:
        # The trunk's file name carries its sha256 prefix, which torch.hub checks; lpips' file has none.
        state = torch.hub.load_state_dict_from_url(
            url, file_name=filename, check_hash=part == "backbone", map_location="cpu", weights_only=True
        )
    except Exception as error:  # offline, HTTP error, proxy, hash mismatch: all reported below
        tried.append(f"{part}: download {url} (failed: {type(error).__name__}: {error})")
        return {}
    tried.append(f"{part}: download {url} -> {cached} (loaded)")
    return dict(state)
