"""VGG16's convolutional trunk, built without torchvision but with torchvision's layer indices.

`vgg16_features()` is torchvision's `vgg16().features` (Simonyan & Zisserman 2015, configuration "D")
up to relu5_3, so the `features.N.weight` / `features.N.bias` entries of torchvision's ImageNet file
`vgg16-397923af.pth` load into it unchanged.
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


def vgg16_features() -> nn.Sequential:
    """VGG16 trunk, layers 0..29 of torchvision's `vgg16().features`, with torchvision's random init."""
    layers: list[nn.Module] = []
    in_channels = 3
    for block_index, block in enumerate(VGG16_BLOCKS):
        if block_index > 0:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        for channels in block:
            conv = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
            # torchvision's VGG init; torch's default conv init cuts the activation variance ~6x per
            # layer, which would leave a random trunk's deep layers close to constant.
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            in_channels = channels
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
