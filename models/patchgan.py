"""N-layer PatchGAN discriminators (pix2pix / taming-transformers' `NLayerDiscriminator`), 2D and 3D.

The layout is taming's: conv k4 s2 + LeakyReLU, then n_layers - 1 blocks of conv k4 s2, norm, LeakyReLU
(width doubling up to 8x), one such block with stride 1, and a final k4 s1 conv to one channel. The norm
is GroupNorm instead of BatchNorm, so each sample is judged on its own (gradient penalty, data parallel).
Convs followed by a norm have no bias, as in taming. A dimension too small for a kernel-4 conv (a single
frame, or a 16 px image after three halvings) is zero-padded at its end just enough to give one output,
so 1-frame images and 4k+1-frame videos from 16 px up all work.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.discriminator import init_discriminator_weights

LEAKY_SLOPE = 0.2
KERNEL_SIZE = 4
PADDING = 1
MAX_WIDTH_MULTIPLIER = 8


def pad_to_kernel(x: torch.Tensor, conv: nn.Conv2d | nn.Conv3d) -> torch.Tensor:
    """Zero-pad the end of every spatial dim whose size plus the conv's padding is below its kernel."""
    extra = [
        max(0, kernel - 2 * padding - size)
        for size, kernel, padding in zip(x.shape[2:], conv.kernel_size, conv.padding, strict=True)
    ]
    if not any(extra):
        return x
    # F.pad lists (before, after) pairs from the last dim backwards
    pads = [amount for e in reversed(extra) for amount in (0, e)]
    return F.pad(x, pads)


class PatchGANBlock(nn.Module):
    """Conv (kernel 4, padding 1), optional GroupNorm, LeakyReLU(0.2)."""

    def __init__(self, conv: nn.Conv2d | nn.Conv3d, norm: nn.GroupNorm | None):
        super().__init__()
        self.conv = conv
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each dim: size -> (size + 2 - 4) // stride + 1, at least 1
        h = self.conv(pad_to_kernel(x, self.conv))
        if self.norm is not None:
            h = self.norm(h)
        return F.leaky_relu(h, LEAKY_SLOPE)


class _NLayerPatchGAN(nn.Module):
    """The shared N-layer stack; subclasses choose the conv class, the strides and the input rank."""

    conv_class: type[nn.Conv2d] | type[nn.Conv3d]
    input_ndim: int
    layout: str  # the expected input layout, for error messages

    def __init__(
        self,
        *,
        in_channels: int,
        base_channels: int,
        n_layers: int,
        num_groups: int,
        gradient_checkpointing: bool,
        downsample_stride: int | tuple[int, ...],
    ):
        super().__init__()
        sizes = {
            "in_channels": in_channels,
            "base_channels": base_channels,
            "n_layers": n_layers,
            "num_groups": num_groups,
        }
        not_positive = {name: value for name, value in sizes.items() if value < 1}
        if not_positive:
            raise ValueError(f"these arguments must be positive integers: {not_positive}")
        # widths[i] is the output width of block i; block 0 has no norm
        widths = [base_channels * min(2**n, MAX_WIDTH_MULTIPLIER) for n in range(n_layers + 1)]
        bad = [w for w in widths[1:] if w % num_groups]
        if bad:
            raise ValueError(
                f"num_groups={num_groups} must divide every normalised width {widths[1:]} (base_channels "
                f"x min(2^n, {MAX_WIDTH_MULTIPLIER}) for n = 1..n_layers), but does not divide {bad}: "
                "change num_groups or base_channels"
            )
        self.gradient_checkpointing = gradient_checkpointing

        def conv(cin: int, cout: int, stride: int | tuple[int, ...], bias: bool) -> nn.Conv2d | nn.Conv3d:
            return self.conv_class(cin, cout, KERNEL_SIZE, stride=stride, padding=PADDING, bias=bias)

        blocks = [PatchGANBlock(conv(in_channels, widths[0], downsample_stride, bias=True), norm=None)]
        for n in range(1, n_layers + 1):
            stride = downsample_stride if n < n_layers else 1
            blocks.append(
                PatchGANBlock(
                    conv(widths[n - 1], widths[n], stride, bias=False), nn.GroupNorm(num_groups, widths[n])
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.head = conv(widths[-1], 1, 1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_discriminator_weights(self)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch logits (B, 1, ...), or (logits, features) with one activation per block (n_layers + 1)."""
        in_channels = self.blocks[0].conv.in_channels
        if x.ndim != self.input_ndim or x.shape[1] != in_channels:
            raise ValueError(
                f"expected input of shape {self.layout.format(c=in_channels)}, got {tuple(x.shape)}"
            )
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        h = x
        features = []
        for block in self.blocks:
            # non-reentrant only: the reentrant kind gives these blocks no parameter gradients when the
            # input (real data) does not require grad
            h = checkpoint(block, h, use_reentrant=False) if use_checkpoint else block(h)
            features.append(h)
        logits = self.head(pad_to_kernel(h, self.head))  # (B, C, ...) -> (B, 1, ...)
        return (logits, features) if return_features else logits


class PatchGAN2D(_NLayerPatchGAN):
    """Images (B, C, H, W) -> patch logits (B, 1, h, w); n_layers=3 at 256 px gives 30 x 30 (as taming)."""

    conv_class = nn.Conv2d
    input_ndim = 4
    layout = "(B, {c}, H, W)"

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        n_layers: int = 3,
        num_groups: int = 32,
        gradient_checkpointing: bool = False,
    ):
        super().__init__(
            in_channels=in_channels,
            base_channels=base_channels,
            n_layers=n_layers,
            num_groups=num_groups,
            gradient_checkpointing=gradient_checkpointing,
            downsample_stride=2,
        )


class PatchGAN3D(_NLayerPatchGAN):
    """Videos (B, C, T, H, W) -> patch logits (B, 1, t, h, w), kernel 4 in time and space.

    The downsampling convs have stride (temporal_stride, 2, 2); temporal_stride=1 keeps time nearly whole
    (each kernel-4 conv takes one frame off). Any T >= 1 works, e.g. 1, 5, 9, 17 frames.
    """

    conv_class = nn.Conv3d
    input_ndim = 5
    layout = "(B, {c}, T, H, W)"

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        n_layers: int = 3,
        num_groups: int = 32,
        gradient_checkpointing: bool = False,
        temporal_stride: int = 2,
    ):
        if temporal_stride not in (1, 2):
            raise ValueError(f"temporal_stride must be 1 or 2, got {temporal_stride}")
        super().__init__(
            in_channels=in_channels,
            base_channels=base_channels,
            n_layers=n_layers,
            num_groups=num_groups,
            gradient_checkpointing=gradient_checkpointing,
            downsample_stride=(temporal_stride, 2, 2),
        )
