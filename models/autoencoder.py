"""CogVideoX-style causal video autoencoder, state-dict compatible with diffusers.

The latent is regularised by a KL term (a diagonal Gaussian posterior, the default and diffusers' format)
or quantized by FSQ or LFQ (`AutoencoderConfig.regularizer`; the quantizers have no parameters, so only
the encoder's conv_out differs: it outputs the latent instead of mean and log-variance).

`CausalVideoAutoencoder(config).state_dict()` has the same keys and shapes as diffusers'
`AutoencoderKLCogVideoX` built with the same sizes, and loads its weights with `strict=True`
(released CogVideoX VAE weights included).

Encode and decode are diffusers' `_encode` / `_decode` (without tiling): the clip runs through the
encoder `encode_frame_chunk` (8) frames at a time and through the decoder `decode_latent_chunk` (2)
latent frames at a time, the first chunk taking the remainder (frames [0, 9), [9, 17), ... and latents
[0, 3), [3, 5), ... for T = 8k+1), with every causal conv continuing from the previous chunk's last
frames. GroupNorm statistics are therefore per chunk, and the latents are causal at chunk granularity:
latents [0, 3) depend on frames [0, 9) only, frames [0, 9) of the output on latents [0, 3) only. That is
the model's definition, in training too. Under no_grad only one chunk's activations are alive at a time,
whatever the clip length; in training with gradient checkpointing the blocks' insides are recomputed
one chunk at a time, while block outputs (and what conv_in, norm_out and conv_out save) are kept for
the whole clip. The numbers equal diffusers' for every valid T whose latent count is odd
(T = 8k+1); for an even count (T = 8k+5) encoding still matches, while diffusers' decode returns 4t
frames where this one returns 4(t-1)+1, the length that was encoded (see layers.SpatialNorm3D).

`tiled_encode` / `tiled_decode` / `reconstruct(tiled=True)` also split space into overlapping tiles,
blended with linear ramps, for inference on frames far larger than the training clips.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from einops import reduce
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.layers import (
    SPATIAL_NORM_EPS,
    CausalCache,
    CausalConv3d,
    DownBlock3D,
    GroupNorm32,
    MidBlock3D,
    SpatialNorm3D,
    UpBlock3D,
    preferred_layout,
    relayout,
    temporal_chunks,
)
from models.quantizers import FSQ_RECOMMENDED_LEVELS, Quantizer, QuantizerOutput, build_quantizer

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
REGULARIZERS = ("kl", "fsq", "lfq")


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
    # temporal chunks of encode and decode (diffusers' num_sample_frames_batch_size and
    # num_latent_frames_batch_size): part of the model's definition, since GroupNorm statistics are per chunk
    encode_frame_chunk: int = 8
    decode_latent_chunk: int = 2
    # The latent's regulariser: "kl" (a diagonal Gaussian posterior, diffusers' format) or a quantizer
    # ("fsq", "lfq"), whose constructor arguments are `quantizer` (see models.quantizers); with a quantizer
    # the encoder outputs `latent_channels` channels, which must equal the quantizer's dim.
    regularizer: Literal["kl", "fsq", "lfq"] = "kl"
    quantizer: dict[str, Any] = field(default_factory=dict)

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
        chunk = self.encode_frame_chunk
        if not isinstance(chunk, int) or chunk < 1 or chunk % ratio:
            raise ValueError(
                "encode_frame_chunk must be a positive multiple of temporal_compression_ratio="
                f"{ratio} (so every chunk after the first compresses evenly), got {chunk!r}; "
                f"e.g. {max(8, ratio)}"
            )
        if not isinstance(self.decode_latent_chunk, int) or self.decode_latent_chunk < 1:
            raise ValueError(
                f"decode_latent_chunk must be a positive integer, got {self.decode_latent_chunk!r}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self._check_regularizer()

    def _check_regularizer(self) -> None:
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}")
        if not isinstance(self.quantizer, dict):
            raise ValueError(f"quantizer must be a dict of quantizer arguments, got {self.quantizer!r}")
        if self.regularizer == "kl":
            if self.quantizer:
                raise ValueError(
                    f"quantizer arguments {self.quantizer} given with regularizer='kl': set regularizer to "
                    "'fsq' or 'lfq', or drop them"
                )
            return
        self.build_quantizer()  # raises on unknown or bad arguments

    def quantizer_arguments(self) -> dict[str, Any]:
        """Constructor arguments of the quantizer: `quantizer`, with its dim taken from latent_channels."""
        args = dict(self.quantizer)
        channels = self.latent_channels
        if self.regularizer == "lfq":
            args.setdefault("dim", channels)
            if args["dim"] != channels:
                raise ValueError(
                    f"LFQ dim={args['dim']} must equal latent_channels={channels} (one bit per latent "
                    f"channel): drop quantizer.dim or set latent_channels to {args['dim']}"
                )
        elif self.regularizer == "fsq":
            if "levels" not in args:
                by_dim = {len(levels): levels for levels in FSQ_RECOMMENDED_LEVELS.values()}
                if channels not in by_dim:
                    raise ValueError(
                        f"regularizer='fsq' with latent_channels={channels} needs quantizer.levels, a list of "
                        f"{channels} levels (values per channel); recommended sets by codebook size: "
                        f"{FSQ_RECOMMENDED_LEVELS}"
                    )
                args["levels"] = by_dim[channels]
            if not isinstance(args["levels"], Sequence) or len(args["levels"]) != channels:
                raise ValueError(
                    f"FSQ levels {args['levels']!r} must have one entry per latent channel "
                    f"(latent_channels={channels})"
                )
        return args

    def build_quantizer(self) -> Quantizer:
        return build_quantizer(self.regularizer, **self.quantizer_arguments())

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class AutoencoderOutput(NamedTuple):
    """What `CausalVideoAutoencoder.forward` returns (tensors, None and a dict of tensors: DeepSpeed wraps it).

    recon: (B, C, T, H, W), exactly the output of `last_layer`. mean: (B, latent, t, h, w), the posterior
    mean (KL) or the encoder's latent before quantization; logvar: the posterior log-variance, None with a
    quantizer. aux_loss: the quantizer's auxiliary loss (fp32 scalar, 0 for KL); metrics: the quantizer's
    detached scalars (codebook usage, perplexity, entropies), empty for KL.
    """

    recon: torch.Tensor
    mean: torch.Tensor
    logvar: torch.Tensor | None
    aux_loss: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] | None = None


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) per latent element; logvar is clamped to [-30, 20] as in diffusers.

    Held and computed in float32 (sampling, KL) whatever dtype the encoder ran in.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean.float()
        self.logvar = logvar.float().clamp(LOGVAR_MIN, LOGVAR_MAX)
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
        return 0.5 * reduce(self.mean.square() + self.logvar.exp() - 1.0 - self.logvar, "b ... -> b", "sum")


class QuantizedLatent:
    """The quantized latent of an FSQ/LFQ autoencoder, with the interface of `DiagonalGaussian` that the
    tools use (`sample()` and `mode()` are the quantized latent) plus the indices and the auxiliary loss.

    mean: the encoder's latent before quantization (float32); logvar: None.
    """

    logvar = None

    def __init__(self, latent: torch.Tensor, output: QuantizerOutput):
        self.mean = latent.float()
        self.quantized = output.quantized
        self.indices = output.indices
        self.aux_loss = output.aux_loss
        self.metrics = output.metrics

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.quantized

    def mode(self) -> torch.Tensor:
        return self.quantized


def _maybe_checkpoint(
    module: nn.Module, enabled: bool, *args: torch.Tensor | CausalCache | None
) -> torch.Tensor:
    # Only the non-reentrant kind: the reentrant one gives no parameter gradients when no input requires
    # grad, and it breaks under DeepSpeed (see DESIGN.md). Re-running a block in the backward is safe with
    # the cache: it reads the previous chunk's frames, which nothing changes (see layers.CausalCache).
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class Encoder3D(nn.Module):
    """Video (B, C, T, H, W) -> posterior moments (B, 2 * latent, 1 + (T-1)/rt, H/s, W/s), in temporal
    chunks of `encode_frame_chunk` frames (see the module docstring)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = config.block_out_channels
        temporal_levels = int(math.log2(config.temporal_compression_ratio))
        self.gradient_checkpointing = config.gradient_checkpointing
        self.frame_chunk = config.encode_frame_chunk

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
        self.norm_out = GroupNorm32(config.norm_num_groups, widths[-1], eps=SPATIAL_NORM_EPS)
        self.conv_act = nn.SiLU()
        # KL: mean and log-variance per latent channel; a quantizer: the latent itself
        out_channels = config.latent_channels * (2 if config.regularizer == "kl" else 1)
        self.conv_out = CausalConv3d(widths[-1], out_channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = CausalCache()
        moments = []
        for start, end in temporal_chunks(x.shape[2], self.frame_chunk):
            moments.append(self._forward_chunk(x[:, :, start:end], cache))
            cache = cache.next_chunk()
        return torch.cat(moments, dim=2)

    def _forward_chunk(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        h = self.conv_in(preferred_layout(x), cache)
        for block in self.down_blocks:
            h = _maybe_checkpoint(block, self.gradient_checkpointing, h, cache)
        h = _maybe_checkpoint(self.mid_block, self.gradient_checkpointing, h, None, cache)
        return relayout(self.conv_out(self.conv_act(self.norm_out(h)), cache), channels_last=False)


class Decoder3D(nn.Module):
    """Latent (B, latent, t, h, w) -> video (B, C, 1 + (t-1)*rt, h*s, w*s), in temporal chunks of
    `decode_latent_chunk` latent frames; every norm is conditioned on the chunk's latents."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = tuple(reversed(config.block_out_channels))
        temporal_levels = int(math.log2(config.temporal_compression_ratio))
        z_channels = config.latent_channels
        self.gradient_checkpointing = config.gradient_checkpointing
        self.latent_chunk = config.decode_latent_chunk

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
        # With gradients, conv_out runs once, over all chunks' features together: its cache would only
        # hand each chunk the previous chunk's last two frames, so one causal conv over the concatenation
        # computes the same numbers, and the output is then a single call of `conv_out.conv` (the
        # trainer's last-layer hook sees one input whose conv IS the reconstruction). The features are
        # kept for its backward anyway. Without gradients it runs per chunk, keeping memory per chunk.
        whole_conv_out = torch.is_grad_enabled()
        cache = CausalCache()
        pieces = []
        for start, end in temporal_chunks(z.shape[2], self.latent_chunk):
            h = self._features(z[:, :, start:end], cache)
            pieces.append(h if whole_conv_out else self.conv_out(h, cache))
            cache = cache.next_chunk()
        # nothing may follow conv_out: the trainer's adaptive GAN weight assumes the output IS its output
        # (one chunk: no copy)
        features = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
        return self.conv_out(features) if whole_conv_out else features

    def _features(self, z: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """One latent chunk -> the input of conv_out, (B, widths[0], frames, H, W)."""
        h = self.conv_in(z, cache)
        h = _maybe_checkpoint(self.mid_block, self.gradient_checkpointing, h, z, cache)
        for block in self.up_blocks:
            h = _maybe_checkpoint(block, self.gradient_checkpointing, h, z, cache)
        # conv_out (its output is the reconstruction) takes and gives plain contiguous tensors
        return relayout(self.conv_act(self.norm_out(h, z, cache)), channels_last=False)


class CausalVideoAutoencoder(nn.Module):
    """Causal 3D VAE: (B, C, T, H, W) video in [-1, 1], T = 1 or 1 + 4k, H and W divisible by 8
    (for the default 4 levels) -> latent (B, 16, 1 + k, H/8, W/8) -> reconstruction of the input's shape.

    The first frame is encoded on its own (causal padding), so a 1-frame video is an image. Encode and
    decode run in temporal chunks (see the module docstring); `tiled_encode`, `tiled_decode` and
    `reconstruct` add spatial tiles for inference on large frames.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.spatial_compression = config.spatial_compression
        self.temporal_compression = config.temporal_compression_ratio
        self.encoder = Encoder3D(config)
        self.decoder = Decoder3D(config)
        # no parameters or persistent buffers: the state dict is the same with or without it
        self.quantizer = None if config.regularizer == "kl" else config.build_quantizer()

    @property
    def last_layer(self) -> nn.Conv3d:
        """The decoder's final conv (`decoder.conv_out.conv`); `recon` is exactly its output.

        Its input, captured with a forward hook, gives its weight gradient for any output gradient `gy`:
        `torch.nn.grad.conv3d_weight(input, last_layer.weight.shape, gy, **last_layer_conv_args())`.
        With gradients enabled it runs once per decode, over all temporal chunks together (same numbers as
        chunk by chunk); under no_grad it runs once per chunk, so a hook then sees one call per chunk.
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

    def encode(self, x: torch.Tensor) -> DiagonalGaussian | QuantizedLatent:
        """Video (B, C, T, H, W) -> posterior over latents (B, latent, 1 + (T-1)/4, H/8, W/8), float32
        (KL), or the quantized latent (FSQ/LFQ)."""
        self._check_video_shape(tuple(x.shape))
        return self._latent(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent, t, h, w) -> video (B, C, 1 + 4(t-1), 8h, 8w), in the decoder's dtype."""
        return self.decoder(self._decoder_input(z))

    @torch.no_grad()
    def tiled_encode(
        self,
        x: torch.Tensor,
        tile_size: int | tuple[int, int] = 256,
        tile_overlap: int | tuple[int, int] = 64,
    ) -> DiagonalGaussian | QuantizedLatent:
        """`encode` over overlapping spatial tiles of `tile_size` pixels (H, W), blended over `tile_overlap`
        pixels' worth of latents (before quantization); for inference (no_grad). Memory per tile and
        temporal chunk."""
        self._check_video_shape(tuple(x.shape))
        moments = self._tiled(self.encoder, x, tile_size, tile_overlap, in_scale=self.spatial_compression)
        return self._latent(moments)

    @torch.no_grad()
    def tiled_decode(
        self,
        z: torch.Tensor,
        tile_size: int | tuple[int, int] = 256,
        tile_overlap: int | tuple[int, int] = 64,
    ) -> torch.Tensor:
        """`decode` over overlapping latent tiles that decode to `tile_size` pixels (H, W), blended over
        `tile_overlap` pixels; for inference (no_grad). Memory per tile and temporal chunk."""
        z = self._decoder_input(z)
        return self._tiled(self.decoder, z, tile_size, tile_overlap, out_scale=self.spatial_compression)

    @torch.no_grad()
    def reconstruct(
        self,
        x: torch.Tensor,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = 256,
        tile_overlap: int | tuple[int, int] = 64,
    ) -> torch.Tensor:
        """Decode the posterior mode of `x` (no_grad), optionally tiled; for tools and evaluation (call
        `.eval()` first if the model has dropout)."""
        if not tiled:
            return self.decode(self.encode(x).mode())
        z = self.tiled_encode(x, tile_size, tile_overlap).mode()
        return self.tiled_decode(z, tile_size, tile_overlap)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> AutoencoderOutput:
        """Encode, sample the posterior (or take its mean) or quantize, decode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        recon = self.decode(z)
        if isinstance(posterior, QuantizedLatent):
            return AutoencoderOutput(recon, posterior.mean, None, posterior.aux_loss, posterior.metrics)
        return AutoencoderOutput(
            recon, posterior.mean, posterior.logvar, recon.new_zeros((), dtype=torch.float32), {}
        )

    def _latent(self, encoder_output: torch.Tensor) -> DiagonalGaussian | QuantizedLatent:
        if self.quantizer is None:
            return DiagonalGaussian.from_moments(encoder_output)
        return QuantizedLatent(encoder_output, self.quantizer(encoder_output))

    def _decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"decode expects latents of shape (B, {self.config.latent_channels}, t, h, w), "
                f"got {tuple(z.shape)}"
            )
        # the posterior is float32; with bf16 weights (DeepSpeed's bf16 mode) the decoder runs in bf16
        return z.to(self.decoder.conv_in.conv.weight.dtype)

    def _tiled(
        self,
        network: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        tile_size: int | tuple[int, int],
        tile_overlap: int | tuple[int, int],
        *,
        in_scale: int = 1,
        out_scale: int = 1,
    ) -> torch.Tensor:
        """Run `network` on overlapping (H, W) tiles of x and blend the outputs with linear ramps.

        Tiles are laid out on the latent grid (x's pixels / in_scale, the output's / out_scale), spread
        evenly with neighbours overlapping by at least `tile_overlap` pixels; the last tile ends at the
        edge, so any size works. Each output pixel is the weighted mean of the tiles covering it, every
        tile's weight ramping linearly across its overlap with each neighbour (diffusers' blend_v/blend_h
        ramps, extended to overlaps that differ between tiles).
        """
        s = self.spatial_compression
        tiles, overlaps = _pair(tile_size, "tile_size"), _pair(tile_overlap, "tile_overlap")
        for tile, overlap in zip(tiles, overlaps, strict=True):
            if tile < s or tile % s or overlap < 0 or overlap % s or overlap * 2 > tile:
                raise ValueError(
                    f"tile_size={tile_size} must be positive multiples of {s} and tile_overlap={tile_overlap} "
                    f"non-negative multiples of {s}, at most half the tile"
                )
        grid = (x.shape[-2] // in_scale, x.shape[-1] // in_scale)
        spans_h, spans_w = (
            _tile_spans(size, tile // s, overlap // s)
            for size, tile, overlap in zip(grid, tiles, overlaps, strict=True)
        )
        ramps_h, ramps_w = (_blend_ramps(spans, out_scale, x.device) for spans in (spans_h, spans_w))
        out = total = None
        for (top, bottom), ramp_h in zip(spans_h, ramps_h, strict=True):
            for (left, right), ramp_w in zip(spans_w, ramps_w, strict=True):
                piece = network(
                    x[..., top * in_scale : bottom * in_scale, left * in_scale : right * in_scale]
                )
                if out is None:
                    dtype = piece.dtype
                    out_shape = (*piece.shape[:-2], grid[0] * out_scale, grid[1] * out_scale)
                    out = torch.zeros(out_shape, dtype=torch.float32, device=piece.device)
                    total = torch.zeros(out_shape[-2:], dtype=torch.float32, device=piece.device)
                weight = ramp_h[:, None] * ramp_w[None, :]
                rows = slice(top * out_scale, bottom * out_scale)
                cols = slice(left * out_scale, right * out_scale)
                out[..., rows, cols] += piece.float() * weight
                total[rows, cols] += weight
                del piece  # free the tile before the next one runs
        return (out / total).to(dtype)

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


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints (H, W), got {value!r}")
    return pair


def _tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of the fewest tiles of length `tile` covering [0, size) with neighbours overlapping by
    at least `overlap`, spread evenly (the last one ends at `size`)."""
    if size <= tile:
        return [(0, size)]
    count = math.ceil((size - overlap) / (tile - overlap))
    starts = [round(i * (size - tile) / (count - 1)) for i in range(count)]
    return [(start, start + tile) for start in starts]


def _blend_ramps(spans: list[tuple[int, int]], scale: int, device: torch.device) -> list[torch.Tensor]:
    """Per tile, a 1D weight over its `scale`-times-larger output: 1 inside, a linear ramp across its
    overlap with each neighbour, where the two ramps sum to 1."""
    ramps = []
    for index, (start, end) in enumerate(spans):
        start, end = start * scale, end * scale
        centers = torch.arange(start, end, device=device, dtype=torch.float32) + 0.5
        ramp = torch.ones_like(centers)
        if index > 0 and (overlap := spans[index - 1][1] * scale - start) > 0:
            ramp = torch.minimum(ramp, (centers - start) / overlap)
        if index < len(spans) - 1 and (overlap := end - spans[index + 1][0] * scale) > 0:
            ramp = torch.minimum(ramp, (end - centers) / overlap)
        ramps.append(ramp)
    return ramps
