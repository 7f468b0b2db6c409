"""CogVideoX-style causal video autoencoder (KL-regularised), state-dict compatible with diffusers.

`CausalVideoAutoencoder(config).state_dict()` has the same keys and shapes as diffusers'
`AutoencoderKLCogVideoX` built with the same sizes, and loads its weights with `strict=True`
(released CogVideoX VAE weights included).

Numerics against diffusers: encoding is identical whenever diffusers encodes the clip in one piece
(T <= 13, i.e. under 16 frames with its 8-frame batching); decoding is identical whenever it decodes in
one piece (t <= 3 latent frames) and t is odd (T = 1 or 9). Longer clips differ because diffusers runs
them in chunks (GroupNorm statistics per chunk). For an even latent count diffusers' one-piece decode
returns 4t frames; this decoder always keeps the first frame apart and returns 4(t-1)+1, the length
that was encoded (see layers.SpatialNorm3D).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from einops import reduce
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.layers import (
    SPATIAL_NORM_EPS,
    CausalConv3d,
    DownBlock3D,
    MidBlock3D,
    SpatialNorm3D,
    UpBlock3D,
)

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclass(kw_only=True, slots=True)
class AutoencoderConfig:
    """Sizes of the autoencoder; the defaults are the released CogVideoX VAE (diffusers' defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    # residual blocks per encoder level; each decoder level has layers_per_block + 1, as in diffusers
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    temporal_compression_ratio: int = 4
    dropout: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)  # JSON gives lists
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.block_out_channels or any(
            not isinstance(width, int) or width < 1 for width in self.block_out_channels
        ):
            raise ValueError(
                "block_out_channels must be a non-empty sequence of positive integers (one width per "
                f"level), got {self.block_out_channels!r}"
            )
        bad_widths = [width for width in self.block_out_channels if width % self.norm_num_groups]
        if bad_widths:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every width in block_out_channels="
                f"{self.block_out_channels}, but does not divide {bad_widths}: pick a common divisor "
                f"(e.g. {math.gcd(*self.block_out_channels)}) or change the widths"
            )
        levels = len(self.block_out_channels)
        ratio = self.temporal_compression_ratio
        max_ratio = 2 ** (levels - 1)
        if not isinstance(ratio, int) or ratio < 1 or ratio & (ratio - 1) or ratio > max_ratio:
            raise ValueError(
                "temporal_compression_ratio must be a power of 2 between 1 and 2**(levels - 1) = "
                f"{max_ratio} for {levels} levels, got {ratio!r}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class AutoencoderOutput(NamedTuple):
    """What `CausalVideoAutoencoder.forward` returns (tensors only, so DeepSpeed can wrap the module).

    recon: (B, C, T, H, W), exactly the output of `last_layer`; mean, logvar: (B, latent, t, h, w).
    """

    recon: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) per latent element; logvar is clamped to [-30, 20] as in diffusers."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """Split the encoder output (B, 2 * latent, ...) into mean and logvar along channels."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample mean + std * eps (differentiable in mean and logvar)."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(posterior || N(0, I)) summed over all non-batch dims -> (B,), computed in float32."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * reduce(mean.square() + logvar.exp() - 1.0 - logvar, "b ... -> b", "sum")


def _maybe_checkpoint(module: nn.Module, enabled: bool, *args: torch.Tensor) -> torch.Tensor:
    # Only the non-reentrant kind: the reentrant one gives no parameter gradients when no input requires
    # grad, and it breaks under DeepSpeed (see DESIGN.md).
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class Encoder3D(nn.Module):
    """Video (B, C, T, H, W) -> posterior moments (B, 2 * latent, 1 + (T-1)/rt, H/s, W/s)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = config.block_out_channels
        temporal_levels = int(math.log2(config.temporal_compression_ratio))
        self.gradient_checkpointing = config.gradient_checkpointing

        self.conv_in = CausalConv3d(config.in_channels, widths[0], kernel_size=3)
        self.down_blocks = nn.ModuleList(
            DownBlock3D(
                widths[max(i - 1, 0)],
                width,
                num_layers=config.layers_per_block,
                groups=config.norm_num_groups,
                eps=config.norm_eps,
                dropout=config.dropout,
                add_downsample=i < len(widths) - 1,
                compress_time=i < temporal_levels,
            )
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock3D(
            widths[-1],
            num_layers=2,
            groups=config.norm_num_groups,
            eps=config.norm_eps,
            dropout=config.dropout,
        )
        self.norm_out = nn.GroupNorm(config.norm_num_groups, widths[-1], eps=SPATIAL_NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = CausalConv3d(widths[-1], 2 * config.latent_channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = _maybe_checkpoint(block, self.gradient_checkpointing, h)
        h = _maybe_checkpoint(self.mid_block, self.gradient_checkpointing, h)
        return self.conv_out(self.conv_act(self.norm_out(h)))


class Decoder3D(nn.Module):
    """Latent (B, latent, t, h, w) -> video (B, C, 1 + (t-1)*rt, h*s, w*s); every norm is conditioned on z."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = tuple(reversed(config.block_out_channels))
        temporal_levels = int(math.log2(config.temporal_compression_ratio))
        z_channels = config.latent_channels
        self.gradient_checkpointing = config.gradient_checkpointing

        self.conv_in = CausalConv3d(z_channels, widths[0], kernel_size=3)
        self.mid_block = MidBlock3D(
            widths[0],
            num_layers=2,
            groups=config.norm_num_groups,
            eps=config.norm_eps,
            dropout=0.0,  # diffusers builds the decoder's mid block without dropout
            spatial_norm_dim=z_channels,
        )
        self.up_blocks = nn.ModuleList(
            UpBlock3D(
                widths[max(i - 1, 0)],
                width,
                num_layers=config.layers_per_block + 1,
                groups=config.norm_num_groups,
                eps=config.norm_eps,
                dropout=config.dropout,
                spatial_norm_dim=z_channels,
                add_upsample=i < len(widths) - 1,
                compress_time=i < temporal_levels,
            )
            for i, width in enumerate(widths)
        )
        self.norm_out = SpatialNorm3D(widths[-1], z_channels, groups=config.norm_num_groups)
        self.conv_act = nn.SiLU()
        self.conv_out = CausalConv3d(widths[-1], config.out_channels, kernel_size=3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = _maybe_checkpoint(self.mid_block, self.gradient_checkpointing, h, z)
        for block in self.up_blocks:
            h = _maybe_checkpoint(block, self.gradient_checkpointing, h, z)
        # nothing may follow conv_out: the trainer's adaptive GAN weight assumes the output IS its output
        return self.conv_out(self.conv_act(self.norm_out(h, z)))


class CausalVideoAutoencoder(nn.Module):
    """Causal 3D VAE: (B, C, T, H, W) video in [-1, 1], T = 1 or 1 + 4k, H and W divisible by 8
    (for the default 4 levels) -> latent (B, 16, 1 + k, H/8, W/8) -> reconstruction of the input's shape.

    The first frame is encoded on its own (causal padding), so a 1-frame video is an image.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.spatial_compression = config.spatial_compression
        self.temporal_compression = config.temporal_compression_ratio
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)

    @property
    def last_layer(self) -> nn.Conv3d:
        """The decoder's final conv (`decoder.conv_out.conv`); `recon` is exactly its output.

        Its input, captured with a forward hook, gives its weight gradient for any output gradient `gy`:
        `torch.nn.grad.conv3d_weight(input, last_layer.weight.shape, gy, **last_layer_conv_args())`.
        """
        return self.decoder.conv_out.conv

    def last_layer_conv_args(self) -> dict[str, tuple[int, ...] | int]:
        """stride, padding, dilation and groups of `last_layer`, for `torch.nn.grad.conv3d_weight`."""
        conv = self.last_layer
        return {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
        }

    def latent_shape(self, input_shape: Sequence[int]) -> tuple[int, int, int, int, int]:
        """(B, C, T, H, W) of a video -> (B, latent_channels, t, h, w) of its latent; checks the shape."""
        self._check_video_shape(tuple(input_shape))
        batch, _, frames, height, width = input_shape
        return (
            batch,
            self.config.latent_channels,
            (frames - 1) // self.temporal_compression + 1,
            height // self.spatial_compression,
            width // self.spatial_compression,
        )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Video (B, C, T, H, W) -> posterior over latents (B, latent, 1 + (T-1)/4, H/8, W/8)."""
        self._check_video_shape(tuple(x.shape))
        return DiagonalGaussian.from_moments(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent, t, h, w) -> video (B, C, 1 + 4(t-1), 8h, 8w)."""
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"decode expects latents of shape (B, {self.config.latent_channels}, t, h, w), "
                f"got {tuple(z.shape)}"
            )
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> AutoencoderOutput:
        """Encode, sample the posterior (or take its mean), decode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return AutoencoderOutput(recon=self.decode(z), mean=posterior.mean, logvar=posterior.logvar)

    def _check_video_shape(self, shape: tuple[int, ...]) -> None:
        channels = self.config.in_channels
        rt, s = self.temporal_compression, self.spatial_compression
        if len(shape) != 5 or shape[1] != channels:
            raise ValueError(f"expected a video of shape (B, {channels}, T, H, W), got {shape}")
        _, _, frames, height, width = shape
        problems = []
        if frames < 1 or (frames - 1) % rt:
            below = (frames - 1) // rt * rt + 1 if frames > 1 else 1
            problems.append(
                f"T={frames} must be 1 or {rt}k+1 (the first frame is kept, then {rt}x temporal "
                f"compression): crop to {below} or pad to {below + rt} frames"
            )
        if height < s or width < s or height % s or width % s:
            problems.append(
                f"H={height} and W={width} must be positive multiples of {s} (spatial compression): "
                f"crop or resize to {max(height // s, 1) * s}x{max(width // s, 1) * s}"
            )
        if problems:
            raise ValueError(f"bad video shape {shape}: " + "; ".join(problems))
