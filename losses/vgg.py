"""VGG16's and VGG19's convolutional trunks, built without torchvision but with torchvision's layer indices.

`vgg16_features()` is torchvision's `vgg16().features` (Simonyan & Zisserman 2015, configuration "D")
up to relu5_3, so the `features.N.weight` / `features.N.bias` entries of torchvision's ImageNet file
`vgg16-397923af.pth` load into it unchanged. `vgg19_features()` is the same for `vgg19().features`
(configuration "E", up to relu5_4) and `vgg19-dcbb9e9d.pth`; `VGG19_LAYER_INDICES` names its layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILENAME = "vgg16-397923af.pth"  # torchvision's name; "397923af" is the sha256 prefix torch.hub checks

# torchvision's cfgs["D"] as blocks: output channels of each 3x3 conv (each followed by a ReLU), with a
# 2x2 max-pool between blocks. torchvision's trailing max-pool (index 30) is left out: LPIPS stops at relu5_3.
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG19_FILENAME = "vgg19-dcbb9e9d.pth"

# torchvision's cfgs["E"], laid out like VGG16_BLOCKS (trailing max-pool, index 36, left out).
VGG19_BLOCKS: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256, 256),
    (512, 512, 512, 512),
    (512, 512, 512, 512),
)


def vgg_layer_indices(blocks: tuple[tuple[int, ...], ...]) -> dict[str, int]:
    """{"conv1_1": 0, "relu1_1": 1, "conv1_2": 2, ...}: torchvision's `features` index of each conv and
    ReLU of a trunk built from `blocks` (block b, conv i -> convb_i), counting the max-pools between blocks."""
    indices: dict[str, int] = {}
    index = 0
    for block_index, block in enumerate(blocks, start=1):
        if block_index > 1:
            index += 1  # the max-pool before this block
        for conv_index in range(1, len(block) + 1):
            indices[f"conv{block_index}_{conv_index}"] = index
            indices[f"relu{block_index}_{conv_index}"] = index + 1
            index += 2
    return indices


VGG19_LAYER_INDICES: dict[str, int] = vgg_layer_indices(VGG19_BLOCKS)


def vgg16_features() -> nn.Sequential:
    """VGG16 trunk, layers 0..29 of torchvision's `vgg16().features`, with torchvision's random init."""
    return _vgg_features(VGG16_BLOCKS)


def vgg19_features(num_layers: int | None = None) -> nn.Sequential:
    """VGG19 trunk, layers 0..35 of torchvision's `vgg19().features` (or the first `num_layers` of them),
    with torchvision's random init; a truncated trunk's weights equal the full one's for the same seed."""
    return _vgg_features(VGG19_BLOCKS, num_layers)


def vgg19_features_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The `features.N.*` entries of a torchvision vgg19 state dict (its `classifier.*` entries dropped)."""
    return {key: value for key, value in state_dict.items() if key.startswith("features.")}


def _vgg_features(blocks: tuple[tuple[int, ...], ...], num_layers: int | None = None) -> nn.Sequential:
    # torchvision's layer order: each conv's output channels, "relu" after each conv, "pool" between blocks.
    layout: list[int | str] = []
    for block_index, block in enumerate(blocks):
        if block_index > 0:
            layout.append("pool")
        for channels in block:
            layout += [channels, "relu"]
    if num_layers is None:
        num_layers = len(layout)
    if not 1 <= num_layers <= len(layout):
        raise ValueError(f"num_layers must be in 1..{len(layout)} for this trunk, got {num_layers}")
    layers: list[nn.Module] = []
    in_channels = 3
    for spec in layout[:num_layers]:  # only the layers kept are built: no init work for the rest
        if spec == "pool":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif spec == "relu":
            layers.append(nn.ReLU(inplace=True))
        else:
            assert isinstance(spec, int)
            conv = nn.Conv2d(in_channels, spec, kernel_size=3, padding=1)
            # torchvision's VGG init; torch's default conv init cuts the activation variance ~6x per
            # layer, which would leave a random trunk's deep layers close to constant.
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers.append(conv)
            in_channels = spec
    return nn.Sequential(*layers)


def vgg16_features_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The `features.N.*` entries of a torchvision vgg16 state dict (its `classifier.*` entries dropped).

    Also accepts the `lpips` package's own state dict, whose trunk is stored as `net.sliceK.N.*` with
    torchvision's indices N.
    """
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^net\.slice\d\.", "features.", key)
        if key.startswith("features."):
            out[key] = value
    return out
