"""Two more video discriminators beside `Discriminator3D`: a 3D-then-2D hybrid with spatial self-attention,
and a causal one that treats the first frame apart (CogVideoX-style clips of 1 or 4k+1 frames).

Shared contract: `forward(x, return_features=False)` gives patch logits, or `(logits, features)` with
each block's output batch first; GroupNorm only; conv and linear weights ~ N(0, 0.02), biases 0;
`gradient_checkpointing` wraps each block in non-reentrant `torch.utils.checkpoint` while training with
grad enabled; twice differentiable in the input (R1 penalty); bf16 forward on CPU and CUDA.
"""

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from models.discriminator import LEAKY_SLOPE, DiscriminatorBlock3D, init_discriminator_weights
from models.layers import replicate_first_frame


def _widths(
    owner: str, in_channels: int, base_channels: int, channel_multipliers: Sequence[int], num_groups: int
) -> list[int]:
    """Check the constructor arguments every discriminator shares; return the width of each level."""
    if in_channels < 1 or base_channels < 1 or num_groups < 1:
        raise ValueError(
            f"{owner}: in_channels, base_channels and num_groups must be positive, got {in_channels}, "
            f"{base_channels}, {num_groups}"
        )
    if len(channel_multipliers) < 2 or any(m < 1 for m in channel_multipliers):
        raise ValueError(
            f"{owner}: channel_multipliers must be at least 2 positive integers (one downsampling block per "
            f"pair of levels), got {tuple(channel_multipliers)}"
        )
    widths = [base_channels * m for m in channel_multipliers]
    bad = [w for w in widths if w % num_groups]
    if bad:
        raise ValueError(
            f"{owner}: num_groups={num_groups} must divide every width base_channels x channel_multipliers = "
            f"{widths}, but does not divide {bad}: change num_groups or base_channels"
        )
    return widths


def _check_video(x: torch.Tensor, in_channels: int) -> None:
    if x.ndim != 5 or x.shape[1] != in_channels:
        raise ValueError(f"expected a video of shape (B, {in_channels}, T, H, W), got {tuple(x.shape)}")


def _run_blocks(
    blocks: Sequence[Callable[..., torch.Tensor]],
    h: torch.Tensor,
    *args: object,
    use_checkpoint: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run `blocks` in turn on `h` (each also given `args`); return the last output and every output."""
    outputs = []
    for block in blocks:
        # non-reentrant only: the reentrant kind gives these blocks no parameter gradients when the input
        # (a real video) does not require grad
        h = checkpoint(block, h, *args, use_reentrant=False) if use_checkpoint else block(h, *args)
        outputs.append(h)
    return h, outputs


def _spatial_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 average pool with stride 2 over H, W of (N, C, H, W) or (N, C, T, H, W): H -> (H-1)//2 + 1."""
    # Edge-replicating pad, so the size matches a stride-2 padding-1 conv for any H, W (also 1 px); the pool
    # runs in fp32 because CPU torch has no bf16 avg_pool3d kernel.
    if x.ndim == 4:
        pooled = F.avg_pool2d(F.pad(x, (1,) * 4, mode="replicate").float(), kernel_size=3, stride=2)
    else:
        padded = F.pad(x, (1, 1, 1, 1, 0, 0), mode="replicate").float()
        pooled = F.avg_pool3d(padded, kernel_size=(1, 3, 3), stride=(1, 2, 2))
    return pooled.to(x.dtype)


# --------------------------------------------------------------------------------------------------------
# Hybrid: 3D residual blocks, then 2D residual blocks with spatial self-attention on every frame
# --------------------------------------------------------------------------------------------------------


class DiscriminatorBlock2D(nn.Module):
    """2D counterpart of `DiscriminatorBlock3D`: residual block halving H and W, H -> (H-1)//2 + 1."""

    def __init__(self, in_channels: int, out_channels: int, *, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, Cin, H, W) -> (N, Cout, (H-1)//2 + 1, (W-1)//2 + 1)
        h = self.conv1(F.leaky_relu(self.norm1(x), LEAKY_SLOPE))
        h = self.conv2(F.leaky_relu(self.norm2(h), LEAKY_SLOPE))
        return (h + self.skip(_spatial_avg_pool(x))) / math.sqrt(2.0)


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over the H x W positions of each image, pre-GroupNorm, residual."""

    def __init__(self, channels: int, *, heads: int, num_groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(num_groups, channels)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, double_backward: bool = False) -> torch.Tensor:
        """`double_backward`: use the math kernel, the only one that can be differentiated twice (R1)."""
        height = x.shape[2]
        # (N, C, H, W) -> (N, H*W, C): channels last, so q, k, v have unit stride in the head dim as the
        # fused kernels want
        tokens = rearrange(self.norm(x), "n c h w -> n (h w) c")
        q, k, v = rearrange(
            self.to_qkv(tokens), "n l (three heads d) -> three n heads l d", three=3, heads=self.heads
        )
        if double_backward:
            # the fused kernels (CPU flash, CUDA flash / memory-efficient / cuDNN) have no double backward
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        # (N, heads, H*W, d) -> (N, C, H, W)
        out = self.to_out(rearrange(out, "n heads l d -> n l (heads d)"))
        return x + rearrange(out, "n (h w) c -> n c h w", h=height)


class AttentionStage2D(nn.Module):
    """A `DiscriminatorBlock2D` followed by `SpatialSelfAttention` at its output resolution."""

    def __init__(self, in_channels: int, out_channels: int, *, heads: int, num_groups: int):
        super().__init__()
        self.block = DiscriminatorBlock2D(in_channels, out_channels, num_groups=num_groups)
        self.attention = SpatialSelfAttention(out_channels, heads=heads, num_groups=num_groups)

    def forward(self, x: torch.Tensor, double_backward: bool = False) -> torch.Tensor:
        return self.attention(self.block(x), double_backward)


class HybridDiscriminator3D(nn.Module):
    """Video (B, C, T, H, W) -> patch logits (B, 1, T', H', W'): `num_3d_stages` 3D residual blocks (halving
    T while > 1, H and W), then 2D residual blocks with spatial self-attention on each frame (time folded
    into the batch), then a 2D patch head. Defaults: 17 x 128 px -> (5, 16, 16) logits, attention at 16 px.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_multipliers: Sequence[int] = (1, 2, 4, 4),
        num_3d_stages: int = 2,
        attention_heads: int = 4,
        num_groups: int = 32,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        widths = _widths("HybridDiscriminator3D", in_channels, base_channels, channel_multipliers, num_groups)
        num_stages = len(widths) - 1
        if not 0 <= num_3d_stages < num_stages:
            raise ValueError(
                f"HybridDiscriminator3D: num_3d_stages must be in [0, {num_stages - 1}] so that at least "
                f"one of the {num_stages} stages (len(channel_multipliers) - 1) is a 2D attention stage, "
                f"got {num_3d_stages}: lower num_3d_stages or add a channel multiplier"
            )
        attention_widths = widths[num_3d_stages + 1 :]
        bad = [w for w in attention_widths if attention_heads < 1 or w % attention_heads]
        if bad:
            raise ValueError(
                f"HybridDiscriminator3D: attention_heads={attention_heads} must be positive and divide the "
                f"attention widths {attention_widths}, but does not divide {bad}: change attention_heads"
            )
        self.gradient_checkpointing = gradient_checkpointing

        self.stem = nn.Conv3d(in_channels, widths[0], kernel_size=3, padding=1)
        pairs = list(itertools.pairwise(widths))
        self.blocks_3d = nn.ModuleList(
            DiscriminatorBlock3D(cin, cout, num_groups=num_groups) for cin, cout in pairs[:num_3d_stages]
        )
        self.blocks_2d = nn.ModuleList(
            AttentionStage2D(cin, cout, heads=attention_heads, num_groups=num_groups)
            for cin, cout in pairs[num_3d_stages:]
        )
        self.head_norm = nn.GroupNorm(num_groups, widths[-1])
        self.head = nn.Conv2d(widths[-1], 1, kernel_size=3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_discriminator_weights(self)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch logits (B, 1, T', H', W'); with `return_features`, also each block's output, unfolded
        to (B, C_i, T_i, H_i, W_i)."""
        _check_video(x, self.stem.in_channels)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        # An input that requires grad may be differentiated twice (R1); the flag is a block argument, so a
        # checkpointed block's recomputation picks the same attention kernel.
        double_backward = x.requires_grad and torch.is_grad_enabled()
        h, features = _run_blocks(self.blocks_3d, self.stem(x), use_checkpoint=use_checkpoint)
        frames = h.shape[2]
        # (B, C, T', H, W) -> (B*T', C, H, W)
        h = rearrange(h, "b c t h w -> (b t) c h w")
        h, features_2d = _run_blocks(self.blocks_2d, h, double_backward, use_checkpoint=use_checkpoint)
        # (B*T', C, H', W') -> (B, 1, T', H', W')
        logits = self.head(F.leaky_relu(self.head_norm(h), LEAKY_SLOPE))
        logits = rearrange(logits, "(b t) c h w -> b c t h w", t=frames)
        if not return_features:
            return logits
        features += [rearrange(f, "(b t) c h w -> b c t h w", t=frames) for f in features_2d]
        return logits, features


# --------------------------------------------------------------------------------------------------------
# Causal: causal 3D convolutions, first frame kept apart, one verdict per clip
# --------------------------------------------------------------------------------------------------------


def downsample_time_keep_first(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 1 + 2k, H, W) -> (B, C, 1 + k, H, W): frame 0 alone, later frames averaged in pairs.

    Any other T (1, or an odd number of frames after the first, only reached deep in short clips) is kept.
    """
    frames = x.shape[2]
    if frames == 1 or (frames - 1) % 2:
        return x
    # (B, C, 2k, H, W) -> (B, C, k, H, W); output frame j >= 1 averages input frames 2j - 1 and 2j
    pairs = reduce(x[:, :, 1:], "b c (t pair) h w -> b c t h w", "mean", pair=2)
    return torch.cat([x[:, :, :1], pairs], dim=2)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm of each frame of (B, C, T, H, W) on its own: statistics over the whole clip would let later
    frames change earlier frames' features and break causality."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        # (B, C, T, H, W) -> (B*T, C, H, W) -> back
        out = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(out, "(b t) c h w -> b c t h w", t=frames)


class CausalConv3dStrided(nn.Module):
    """Conv3d causal in time: the first frame repeated `kernel_size - 1` times in front, as in CogVideoX's
    CausalConv3d, so output frame t sees input frames <= t; space zero-padded, optionally strided by 2."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3, spatial_stride: int = 1):
        super().__init__()
        self.time_pad = kernel_size - 1
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=(1, spatial_stride, spatial_stride),
            padding=(0, kernel_size // 2, kernel_size // 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, T, H, W) -> (B, C, T + kernel_size - 1, H, W) -> (B, Cout, T, H / stride, W / stride)
        return self.conv(replicate_first_frame(x, self.time_pad))


class CausalDiscriminatorBlock3D(nn.Module):
    """Pre-activation causal residual block: H, W -> (H-1)//2 + 1 and T = 1 + 2k -> 1 + k, the first frame
    kept apart (`downsample_time_keep_first`); output frame j depends on input frames <= 2j only.

    Main path: causal conv with spatial stride 2, temporal downsampling, causal conv; norms per frame. Skip:
    spatial 3x3 average pool, the same temporal downsampling, a 1x1x1 conv. The sum is scaled by 1/sqrt(2).
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_groups: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3dStrided(in_channels, out_channels, spatial_stride=2)
        self.norm2 = FrameGroupNorm(num_groups, out_channels)
        self.conv2 = CausalConv3dStrided(out_channels, out_channels)
        self.skip = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, Cin, 1 + 2k, H, W) -> (B, Cout, 1 + k, (H-1)//2 + 1, (W-1)//2 + 1)
        h = downsample_time_keep_first(self.conv1(F.leaky_relu(self.norm1(x), LEAKY_SLOPE)))
        h = self.conv2(F.leaky_relu(self.norm2(h), LEAKY_SLOPE))
        skip = self.skip(downsample_time_keep_first(_spatial_avg_pool(x)))
        return (h + skip) / math.sqrt(2.0)


class CausalDiscriminator3D(nn.Module):
    """Video (B, C, T, H, W) with T = 1 or 4k+1 -> per-clip patch logits (B, 1, H', W').

    Causal 3D blocks (first frame kept apart, T = 4k+1 -> 2k+1 -> ..., H and W halved), then the mean over
    time and a 2D patch head. Defaults: 128 px -> (16, 16) logits; images (T = 1) work as 1-frame clips.
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
        widths = _widths("CausalDiscriminator3D", in_channels, base_channels, channel_multipliers, num_groups)
        self.gradient_checkpointing = gradient_checkpointing
        self.stem = CausalConv3dStrided(in_channels, widths[0])
        self.blocks = nn.ModuleList(
            CausalDiscriminatorBlock3D(cin, cout, num_groups=num_groups)
            for cin, cout in itertools.pairwise(widths)
        )
        self.head_norm = nn.GroupNorm(num_groups, widths[-1])
        self.head = nn.Conv2d(widths[-1], 1, kernel_size=3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_discriminator_weights(self)

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch logits (B, 1, H', W'); with `return_features`, also each block's output
        (B, C_i, T_i, H_i, W_i), before the time pooling."""
        _check_video(x, self.stem.conv.in_channels)
        frames = x.shape[2]
        if frames != 1 and (frames - 1) % 4:
            raise ValueError(
                f"CausalDiscriminator3D takes 1 or 4k+1 frames (1, 5, 9, 13, 17, ...), got T={frames}: "
                f"trim the clip to {max(1, frames - (frames - 1) % 4)} frames"
            )
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        h, features = _run_blocks(self.blocks, self.stem(x), use_checkpoint=use_checkpoint)
        # (B, C, T', H', W') -> (B, C, H', W') -> (B, 1, H', W')
        h = reduce(h, "b c t h w -> b c h w", "mean")
        logits = self.head(F.leaky_relu(self.head_norm(h), LEAKY_SLOPE))
        return (logits, features) if return_features else logits
