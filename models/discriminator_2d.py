"""MAGVIT-2-style image discriminator for frames (N, C, H, W) in [-1, 1].

Per scale: a residual conv block with anti-aliased downsampling, then linear attention and a feed-forward
block, as in magvit2-pytorch's `Discriminator`, but with GroupNorm before each conv, any input size (odd
and non-square included) and a patch or pooled head. GroupNorm only, never BatchNorm: each sample is
judged on its own, which a gradient penalty and data-parallel training both need.
"""

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.discriminator import init_discriminator_weights

LEAKY_SLOPE = 0.2
HEAD_KINDS = ("patch", "pooled")


class Blur2D(nn.Module):
    """Depthwise blur with the normalised [1, 3, 3, 1] outer-product kernel; keeps H and W.

    The kernel is a non-persistent buffer: it is no part of the state dict, so fp32 and bf16 checkpoints
    hold the same keys. Its entries (1, 3 or 9 over 64) are exact in bf16, and the blur runs in fp32
    whatever the input dtype (CPU torch lacks some bf16 kernels), casting back at the end.
    """

    def __init__(self) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
        kernel = torch.outer(taps, taps)
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        weight = repeat(self.kernel.float(), "kh kw -> c 1 kh kw", c=channels)
        # a 4-tap kernel needs 3 extra pixels per dim to keep the size; replicate so a constant stays constant
        padded = F.pad(x.float(), (1, 2, 1, 2), mode="replicate")
        return F.conv2d(padded, weight, groups=channels).to(x.dtype)


class ResidualDownBlock2D(nn.Module):
    """Pre-activation residual block that halves H and W (rounding up: H -> ceil(H / 2)).

    Main path: GroupNorm, LeakyReLU, 3x3 conv, GroupNorm, LeakyReLU, blur, 3x3 conv with stride 2.
    Skip: blur, 2x2 average pool, 1x1 conv. The sum is scaled by 1/sqrt(2) to keep its variance.
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.blur = Blur2D()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, Cin, H, W) -> (N, Cout, ceil(H/2), ceil(W/2))
        h = self.conv1(F.leaky_relu(self.norm1(x), LEAKY_SLOPE))
        h = self.conv2(self.blur(F.leaky_relu(self.norm2(h), LEAKY_SLOPE)))
        # Pool in fp32 (no bf16 avg_pool2d on CPU); an odd size gets its last row/column repeated, so the
        # pool gives ceil(H/2) like the strided conv.
        blurred = self.blur(x.float())
        blurred = F.pad(blurred, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), mode="replicate")
        pooled = F.avg_pool2d(blurred, kernel_size=2, stride=2)
        return (h + self.skip(pooled.to(x.dtype))) / math.sqrt(2.0)


class LinearAttention2D(nn.Module):
    """Pre-norm residual linear attention over positions (lucidrains' `LinearAttention`).

    q is softmaxed over features and k over positions, so context = k v^T is (heads, d, d) and the cost is
    linear in H x W.
    """

    def __init__(self, channels: int, *, num_groups: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        hidden = heads * dim_head
        self.norm = nn.GroupNorm(num_groups, channels)
        self.to_qkv = nn.Conv2d(channels, 3 * hidden, kernel_size=1, bias=False)
        self.to_out = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=1)
        # (N, heads * d, H, W) -> (N, heads, d, H * W)
        q, k, v = (rearrange(t, "n (g d) h w -> n g d (h w)", g=self.heads) for t in (q, k, v))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("n g d p, n g e p -> n g d e", k, v)
        out = torch.einsum("n g d e, n g d p -> n g e p", context, q)
        # (N, heads, d, H * W) -> (N, heads * d, H, W)
        out = rearrange(out, "n g e (h w) -> n (g e) h w", h=height, w=width)
        return x + self.to_out(out)


class FeedForward2D(nn.Module):
    """Pre-norm residual feed-forward: GroupNorm, 1x1 conv to `mult` x width, GELU, 1x1 conv back."""

    def __init__(self, channels: int, *, num_groups: int, mult: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels)
        self.expand = nn.Conv2d(channels, mult * channels, kernel_size=1)
        self.project = nn.Conv2d(mult * channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(F.gelu(self.expand(self.norm(x))))


class MagvitDiscriminator2D(nn.Module):
    """Frames (N, C, H, W) -> patch logits (N, 1, h, w) or pooled logits (N, 1).

    A 3x3 stem at width base_channels x channel_multipliers[0], then one scale per further multiplier:
    `ResidualDownBlock2D`, `LinearAttention2D`, `FeedForward2D`. Each scale halves H and W (rounding up),
    so the defaults give h = ceil(ceil(ceil(H/2)/2)/2), e.g. 64 -> 8, like `Discriminator3D`. Init: conv
    and linear weights ~ N(0, 0.02), biases 0.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_multipliers: Sequence[int] = (1, 2, 4, 4),
        num_groups: int = 32,
        attention_heads: int = 4,
        attention_dim_head: int = 32,
        head: Literal["patch", "pooled"] = "patch",
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        sizes = {
            "in_channels": in_channels,
            "base_channels": base_channels,
            "num_groups": num_groups,
            "attention_heads": attention_heads,
            "attention_dim_head": attention_dim_head,
        }
        not_positive = {name: value for name, value in sizes.items() if value < 1}
        if not_positive:
            raise ValueError(f"these arguments must be positive integers: {not_positive}")
        if len(channel_multipliers) < 2 or any(m < 1 for m in channel_multipliers):
            raise ValueError(
                "channel_multipliers must hold at least 2 positive integers (the stem's, then one per "
                f"downsampling scale), got {tuple(channel_multipliers)}"
            )
        if head not in HEAD_KINDS:
            raise ValueError(f"head must be one of {HEAD_KINDS}, got {head!r}")
        widths = [base_channels * m for m in channel_multipliers]
        bad = [w for w in widths if w % num_groups]
        if bad:
            raise ValueError(
                f"num_groups={num_groups} must divide every width base_channels x channel_multipliers = "
                f"{widths}, but does not divide {bad}: change num_groups or base_channels"
            )
        self.head_kind = head
        self.gradient_checkpointing = gradient_checkpointing

        self.stem = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1)
        self.scales = nn.ModuleList(
            nn.ModuleDict(
                {
                    "down": ResidualDownBlock2D(cin, cout, num_groups=num_groups),
                    "attention": LinearAttention2D(
                        cout, num_groups=num_groups, heads=attention_heads, dim_head=attention_dim_head
                    ),
                    "feed_forward": FeedForward2D(cout, num_groups=num_groups),
                }
            )
            for cin, cout in itertools.pairwise(widths)
        )
        self.head_norm = nn.GroupNorm(num_groups, widths[-1])
        if head == "patch":
            self.head = nn.Conv2d(widths[-1], 1, kernel_size=3, padding=1)
        else:
            self.head = nn.Linear(widths[-1], 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_discriminator_weights(self)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits, or (logits, features) with one (N, C_i, H_i, W_i) activation per scale."""
        if x.ndim != 4 or x.shape[1] != self.stem.in_channels:
            raise ValueError(
                f"expected frames of shape (N, {self.stem.in_channels}, H, W), got {tuple(x.shape)}; fold a "
                "video's frames into the batch first: rearrange(x, 'b c t h w -> (b t) c h w')"
            )
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        h = self.stem(x)
        features = []
        for scale in self.scales:
            for block in scale.values():
                # non-reentrant only: the reentrant kind gives these blocks no parameter gradients when the
                # input (a real image) does not require grad
                h = checkpoint(block, h, use_reentrant=False) if use_checkpoint else block(h)
            features.append(h)
        h = F.leaky_relu(self.head_norm(h), LEAKY_SLOPE)
        if self.head_kind == "patch":
            logits = self.head(h)  # (N, C, h, w) -> (N, 1, h, w)
        else:
            pooled = reduce(h.float(), "n c h w -> n c", "mean").to(h.dtype)
            logits = self.head(pooled)  # (N, C) -> (N, 1)
        return (logits, features) if return_features else logits
