"""Building blocks of the CogVideoX causal 3D VAE.

Module and parameter names follow diffusers' `autoencoder_kl_cogvideox.py` one for one, so a state dict
moves between the two with `load_state_dict(..., strict=True)`. The numerics follow it too (same
padding, interpolation and pooling), for whole clips. diffusers' `conv_cache` (the previous chunk's
last frames, used when a long clip is encoded chunk by chunk) and its unused time-embedding path are
left out here: every forward sees the whole clip.

Shapes: video tensors are (B, C, T, H, W) throughout.
"""

import itertools

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

# diffusers builds the GroupNorm of every SpatialNorm3D, and the encoder's norm_out, with eps=1e-6 whatever
# `norm_eps` says; do the same so that a model exported to diffusers computes exactly what it did here.
SPATIAL_NORM_EPS = 1e-6

# CogVideoX's "safe" conv splits inputs above 2 GiB worth of bf16/fp16 elements (2**30 elements) along
# time, which keeps cuDNN within its 32-bit indexing limits for large clips.
SAFE_CONV_MAX_ELEMENTS = 2**30


class SafeConv3d(nn.Conv3d):
    """`nn.Conv3d` that runs very large inputs in overlapping time chunks (same result, bounded workspace).

    The chunks overlap by `kernel_size[0] - 1` input frames, so the output equals a single convolution.
    Only used with temporal stride 1, dilation 1 and no temporal padding (causal padding is applied outside).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_parts = x.numel() // SAFE_CONV_MAX_ELEMENTS + 1
        chunkable = self.stride[0] == 1 and self.dilation[0] == 1 and self.padding[0] == 0
        if num_parts == 1 or not chunkable:
            return super().forward(x)
        overlap = self.kernel_size[0] - 1
        out_frames = x.shape[2] - overlap
        bounds = [round(i * out_frames / num_parts) for i in range(num_parts + 1)]
        parts = []
        for start, end in itertools.pairwise(bounds):
            if end > start:
                # output frames [start, end) read input frames [start, end + overlap)
                parts.append(super().forward(x[:, :, start : end + overlap]))
        return torch.cat(parts, dim=2)


class CausalConv3d(nn.Module):
    """3D conv that is causal in time: the first frame is repeated `kernel_t - 1` times in front.

    Space is zero-padded by the convolution itself ("same" size for odd kernels). The weights live in
    `.conv` (a `SafeConv3d`), as in diffusers' `CogVideoXCausalConv3d`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]):
        super().__init__()
        if isinstance(kernel_size, int):
            kernel_size = (kernel_size,) * 3
        kernel_t, kernel_h, kernel_w = kernel_size
        self.time_pad = kernel_t - 1
        self.conv = SafeConv3d(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            padding=(0, (kernel_h - 1) // 2, (kernel_w - 1) // 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad > 0:
            # (B, C, T, H, W) -> (B, C, T + kernel_t - 1, H, W)
            first = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([first, x], dim=2)
        return self.conv(x)


class SpatialNorm3D(nn.Module):
    """GroupNorm modulated by the latent: `norm(f) * conv_y(zq) + conv_b(zq)` (arXiv:2209.09002).

    `zq` is resized (nearest) to `f`'s frames and pixels, with the first frame resized on its own so it
    only ever conditions the first output frame (the causal first-frame convention).
    """

    # diffusers splits off the first frame only when T is odd: it decodes in chunks of 2 latent frames and
    # takes "odd" to mean "this chunk holds the clip's first frame". A whole clip always holds it, so we
    # always split. Same numbers whenever the latent has an odd frame count (T = 8k+1 videos); for an even
    # count (T = 8k+5) diffusers' one-piece decode returns 4n frames, where this returns 4(n-1)+1.

    def __init__(self, f_channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(num_groups=groups, num_channels=f_channels, eps=SPATIAL_NORM_EPS)
        self.conv_y = CausalConv3d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = CausalConv3d(zq_channels, f_channels, kernel_size=1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        frames = f.shape[2]
        if frames > 1:
            # (B, Cz, t, h, w) -> (B, Cz, 1, H, W) ++ (B, Cz, T - 1, H, W)
            first = F.interpolate(zq[:, :, :1], size=(1, *f.shape[-2:]))
            rest = F.interpolate(zq[:, :, 1:], size=(frames - 1, *f.shape[-2:]))
            zq = torch.cat([first, rest], dim=2)
        else:
            zq = F.interpolate(zq, size=f.shape[-3:])
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class ResnetBlock3D(nn.Module):
    """Pre-activation residual block: (norm, SiLU, causal conv) x 2, plus a 1x1x1 shortcut on width change.

    With `spatial_norm_dim` set (decoder), both norms are `SpatialNorm3D` conditioned on the latent.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        groups: int,
        eps: float,
        dropout: float = 0.0,
        spatial_norm_dim: int | None = None,
    ):
        super().__init__()
        if spatial_norm_dim is None:
            self.norm1 = nn.GroupNorm(num_groups=groups, num_channels=in_channels, eps=eps)
            self.norm2 = nn.GroupNorm(num_groups=groups, num_channels=out_channels, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(in_channels, spatial_norm_dim, groups=groups)
            self.norm2 = SpatialNorm3D(out_channels, spatial_norm_dim, groups=groups)
        self.nonlinearity = nn.SiLU()
        self.conv1 = CausalConv3d(in_channels, out_channels, kernel_size=3)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, kernel_size=3)
        self.conv_shortcut = (
            SafeConv3d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def _norm(self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
        return norm(x) if zq is None else norm(x, zq)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self._norm(self.norm1, x, zq)))
        h = self.conv2(self.dropout(self.nonlinearity(self._norm(self.norm2, h, zq))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample3D(nn.Module):
    """Halve H and W with a stride-2 3x3 conv per frame; with `compress_time`, first halve T by averaging
    frame pairs while the first frame of an odd-length clip is kept as is (T = 2k+1 -> k+1)."""

    def __init__(self, in_channels: int, out_channels: int, *, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time and x.shape[2] > 1:
            # a valid clip (1 + 4k frames) has an odd frame count at every level; the even case is what
            # diffusers does for its later chunks, which hold no first frame
            if x.shape[2] % 2 == 1:
                # (B, C, 2k+1, H, W) -> (B, C, k+1, H, W)
                pooled = reduce(x[:, :, 1:], "b c (t pair) h w -> b c t h w", "mean", pair=2)
                x = torch.cat([x[:, :, :1], pooled], dim=2)
            else:
                # (B, C, 2k, H, W) -> (B, C, k, H, W)
                x = reduce(x, "b c (t pair) h w -> b c t h w", "mean", pair=2)
        frames = x.shape[2]
        # pad right/bottom only, so an even size halves exactly: (.., H, W) -> (.., H/2, W/2)
        x = F.pad(x, (0, 1, 0, 1))
        x = self.conv(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(x, "(b t) c h w -> b c t h w", t=frames)


class Upsample3D(nn.Module):
    """Double H and W (nearest) and apply a 3x3 conv per frame; with `compress_time`, also double T while
    the first frame stays single (T = k+1 -> 2k+1; see SpatialNorm3D on how this differs from diffusers)."""

    def __init__(self, in_channels: int, out_channels: int, *, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        if self.compress_time and frames > 1:
            # (B, C, k+1, H, W) -> (B, C, 1 + 2k, 2H, 2W)
            first = F.interpolate(x[:, :, :1], scale_factor=(1.0, 2.0, 2.0))
            rest = F.interpolate(x[:, :, 1:], scale_factor=2.0)
            x = torch.cat([first, rest], dim=2)
        else:
            # (B, C, T, H, W) -> (B, C, T, 2H, 2W)
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0))
        frames = x.shape[2]
        x = self.conv(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(x, "(b t) c h w -> b c t h w", t=frames)


class DownBlock3D(nn.Module):
    """Encoder level: `num_layers` residual blocks, then an optional `Downsample3D`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        eps: float,
        dropout: float,
        add_downsample: bool,
        compress_time: bool,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(
                in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=eps, dropout=dropout
            )
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample3D(out_channels, out_channels, compress_time=compress_time)])
            if add_downsample
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for downsampler in self.downsamplers or ():
            x = downsampler(x)
        return x


class MidBlock3D(nn.Module):
    """Bottleneck: `num_layers` residual blocks at constant width (latent-conditioned in the decoder)."""

    def __init__(
        self,
        channels: int,
        *,
        num_layers: int,
        groups: int,
        eps: float,
        dropout: float,
        spatial_norm_dim: int | None = None,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(
                channels, channels, groups=groups, eps=eps, dropout=dropout, spatial_norm_dim=spatial_norm_dim
            )
            for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, zq)
        return x


class UpBlock3D(nn.Module):
    """Decoder level: `num_layers` latent-conditioned residual blocks, then an optional `Upsample3D`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        eps: float,
        dropout: float,
        spatial_norm_dim: int,
        add_upsample: bool,
        compress_time: bool,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(
                in_channels if i == 0 else out_channels,
                out_channels,
                groups=groups,
                eps=eps,
                dropout=dropout,
                spatial_norm_dim=spatial_norm_dim,
            )
            for i in range(num_layers)
        )
        self.upsamplers = (
            nn.ModuleList([Upsample3D(out_channels, out_channels, compress_time=compress_time)])
            if add_upsample
            else None
        )

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, zq)
        for upsampler in self.upsamplers or ():
            x = upsampler(x)
        return x
