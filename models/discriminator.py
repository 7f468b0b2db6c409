"""Fully convolutional 3D (PatchGAN-style) discriminator for videos of 1 or 4k+1 frames.

Normalisation is GroupNorm, never BatchNorm: each sample is judged on its own, which the gradient
penalty (a per-sample gradient) and data-parallel training both need.
"""

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LEAKY_SLOPE = 0.2


def init_discriminator_weights(model: nn.Module) -> None:
    """taming-transformers' PatchGAN init, shared by every discriminator here: conv and linear weights
    ~ N(0, 0.02), biases 0, GroupNorm affine 1 and 0. With GroupNorm before each conv the initial logits
    stay O(1).

    Parameters on the meta device (a config check builds the discriminators there) hold no values, so
    nothing is drawn: `normal_` on a meta tensor goes through torch's Python reference kernels, whose first
    use imports torch._dynamo, 1.5-1.8 s of every command's start-up."""
    if any(p.is_meta for p in model.parameters()):
        return
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Conv3d | nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class DiscriminatorBlock3D(nn.Module):
    """Pre-activation residual block that halves T, H and W: T -> (T-1)//2 + 1, so 4k+1 -> 2k+1 and 1 -> 1.

    Main path: (GroupNorm, LeakyReLU, Conv3d) x 2, the first conv with stride 2. Skip: 3x3x3 average pool
    with the same stride and padding (so shapes agree for any size), then a 1x1x1 conv. The sum is scaled
    by 1/sqrt(2) to keep its variance.
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.skip = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, Cin, T, H, W) -> (B, Cout, (T-1)//2 + 1, (H-1)//2 + 1, (W-1)//2 + 1)
        h = self.conv1(F.leaky_relu(self.norm1(x), LEAKY_SLOPE))
        h = self.conv2(F.leaky_relu(self.norm2(h), LEAKY_SLOPE))
        # Edge-replicating pad (avg_pool3d refuses inputs smaller than its kernel, e.g. T = 1 or 2); the pool
        # runs in fp32 because CPU torch has no bf16 avg_pool3d kernel.
        pooled = F.avg_pool3d(F.pad(x, (1,) * 6, mode="replicate").float(), kernel_size=3, stride=2)
        skip = self.skip(pooled.to(x.dtype))
        return (h + skip) / math.sqrt(2.0)


class Discriminator3D(nn.Module):
    """Video (B, C, T, H, W) -> patch logits (B, 1, T', H', W'), each level halving T (while > 1), H and W.

    With the default 4 widths there are 3 downsampling blocks: 17 frames at 64 px -> (3, 8, 8) logits;
    a 1-frame image stays 1 frame (zero temporal padding around a single frame). Works from 16 px up.

    Init: every conv weight ~ N(0, 0.02) and bias 0, as in taming-transformers' PatchGAN (which CogVideo's
    discriminators follow); with GroupNorm before each conv this keeps the initial logits O(1).
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_multipliers: Sequence[int] = (1, 2, 4, 4),
        num_groups: int = 32,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if in_channels < 1 or base_channels < 1 or num_groups < 1:
            raise ValueError(
                f"in_channels, base_channels and num_groups must be positive, got {in_channels}, "
                f"{base_channels}, {num_groups}"
            )
        if not channel_multipliers or any(m < 1 for m in channel_multipliers):
            raise ValueError(
                f"channel_multipliers must be positive integers, got {tuple(channel_multipliers)}"
            )
        widths = [base_channels * m for m in channel_multipliers]
        bad = [w for w in widths if w % num_groups]
        if bad:
            raise ValueError(
                f"num_groups={num_groups} must divide every width base_channels x channel_multipliers = "
                f"{widths}, but does not divide {bad}: change num_groups or base_channels"
            )
        self.gradient_checkpointing = gradient_checkpointing

        self.stem = nn.Conv3d(in_channels, widths[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(
            DiscriminatorBlock3D(cin, cout, num_groups=num_groups) for cin, cout in itertools.pairwise(widths)
        )
        self.head_norm = nn.GroupNorm(num_groups, widths[-1])
        self.head = nn.Conv3d(widths[-1], 1, kernel_size=3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_discriminator_weights(self)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch logits; with `return_features`, also each block's output (B, C_i, T_i, H_i, W_i)."""
        if x.ndim != 5 or x.shape[1] != self.stem.in_channels:
            raise ValueError(
                f"expected a video of shape (B, {self.stem.in_channels}, T, H, W), got {tuple(x.shape)}"
            )
        h = self.stem(x)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        features = []
        for block in self.blocks:
            # non-reentrant only: the reentrant kind gives these blocks no parameter gradients when the
            # input (a real video) does not require grad
            h = checkpoint(block, h, use_reentrant=False) if use_checkpoint else block(h)
            features.append(h)
        # (B, C, T', H', W') -> (B, 1, T', H', W')
        logits = self.head(F.leaky_relu(self.head_norm(h), LEAKY_SLOPE))
        return (logits, features) if return_features else logits
