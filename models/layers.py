"""Building blocks of the CogVideoX causal 3D VAE.

Module and parameter names follow diffusers' `autoencoder_kl_cogvideox.py` one for one, so a state dict
moves between the two with `load_state_dict(..., strict=True)`. The numerics follow it too (same
padding, interpolation and pooling), including its temporal chunking: a clip runs through the network a
few frames at a time, and a `CausalCache` carries each causal conv's last input frames (diffusers'
`conv_cache`) and whether the chunk holds the clip's first frame from one chunk to the next. Without a
cache, a layer treats its input as a whole clip. diffusers' unused time-embedding path is left out.

GroupNorms compute in float32 whatever the input and weight dtypes (`GroupNorm32`).

Memory layout: in bf16 on a CPU with oneDNN's bf16 kernels, the levels with at least CHANNELS_LAST_MIN_PIXELS
pixels per frame run channels-last (NDHWC, what oneDNN computes bf16 convolutions in); everything else is
contiguous. Each residual block puts its input in its level's layout (`preferred_layout`), the ops inside keep
it, and the encoder's and decoder's outputs (the decoder's before conv_out) are contiguous.

Shapes: video tensors are (B, C, T, H, W) throughout.
"""

import functools
import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from einops import reduce
from torch import nn

# diffusers builds the GroupNorm of every SpatialNorm3D, and the encoder's norm_out, with eps=1e-6 whatever
# `norm_eps` says; do the same so that a model exported to diffusers computes exactly what it did here.
SPATIAL_NORM_EPS = 1e-6

# CogVideoX's "safe" conv splits inputs above 2 GiB worth of bf16/fp16 elements (2**30 elements) along
# time, which keeps cuDNN within its 32-bit indexing limits for large clips.
SAFE_CONV_MAX_ELEMENTS = 2**30

# torch's CPU dispatch (aten/src/ATen/native/Convolution.cpp, `use_mkldnn`) sends an fp32 conv with batch 1,
# one group, stride 1 and a kernel of at most 3x3 to its native vol2col kernels when N*C*T*H <= 20480:
# the low-resolution levels of a video VAE. Those run 2-5x slower than oneDNN here (bench/step.py).
_NATIVE_CONV_MAX = 20480


def _native_cpu_conv(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, ...]) -> bool:
    """Whether torch would run this one-group conv with its slow native CPU kernels although oneDNN could."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.shape[0] == 1
        and all(s == 1 for s in stride)
        and weight.shape[0] % 2 == 0
        and weight.shape[-1] > 1  # 1x1 kernels: the native GEMM is as fast (measured)
        and x.shape[0] * x.shape[1] * x.shape[2] * x.shape[3] <= _NATIVE_CONV_MAX
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | tuple[int, int, int] = 1,
    padding: int | tuple[int, int, int] = 0,
) -> torch.Tensor:
    """`F.conv3d` (dilation 1, one group), steered to oneDNN on the CPU where torch would pick its slow
    native kernels: the same convolution written with two groups, each group seeing the whole input
    (repeated on the channel axis) and producing half of the output channels."""
    stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
    # under torch.compile the compiler picks the convolution's kernels itself
    if not torch.compiler.is_compiling() and _native_cpu_conv(x, weight, stride):
        # (B, C, T, H, W) -> (B, 2C, T, H, W); weight (Cout, C, ...) is already the 2-group weight
        return F.conv3d(torch.cat([x, x], dim=1), weight, bias, stride, padding, groups=2)
    return F.conv3d(x, weight, bias, stride, padding)


# Channels-last (NDHWC) activations for bf16 on the CPU, from this many pixels per frame up. oneDNN runs its
# bf16 convolutions in channels-last; given contiguous (NCDHW) tensors it converts inputs, outputs and
# gradients on every call. A 3x3x3 conv forward+backward at 1x64x11x64x64 takes 12.7 ms in channels-last
# against 25 ms contiguous, a 1x1x1 128->64 one at 64x64 3 ms against 30 ms, at 32x32 1.2x faster; at 16x16
# about even and at 8x8 slower (1.25x), so smaller levels stay contiguous (bench/RESULTS.md).
CHANNELS_LAST_MIN_PIXELS = 32 * 32

_CHANNELS_LAST = torch.channels_last_3d
# elements per float32 temporary in group_norm_channels_last's backward
_COMBINE_ELEMENTS = 2**20


def _is_channels_last(x: torch.Tensor) -> bool:
    """x is laid out NDHWC as torch's kernels tell it (and is not also plainly contiguous, as with one
    channel or one pixel). They go by every stride, the batch's too: a batch of one whose stride is less
    than C*T*H*W (as elementwise ops may leave it) counts as contiguous there, and they would copy."""
    if x.dim() != 5 or x.is_contiguous() or not x.is_contiguous(memory_format=_CHANNELS_LAST):
        return False
    return x.stride(0) >= x.shape[1] * x.shape[2] * x.shape[3] * x.shape[4]


def _as_channels_last(x: torch.Tensor) -> torch.Tensor:
    """x itself if `_is_channels_last`, else a channels-last copy (`Tensor.contiguous(memory_format=...)`
    would keep a tensor whose batch stride torch does not recognise)."""
    return x if _is_channels_last(x) else x.clone(memory_format=_CHANNELS_LAST)


@functools.cache
def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN runs bf16 on this CPU (it needs AVX-512 or AMX). Without it torch falls back to its
    reference kernels, which return contiguous outputs whatever the input's layout: a 64-channel bf16 conv3d
    forward+backward ran at 1.3 GFLOP/s against 81 in fp32 on a 2-core AVX2 AMD EPYC (torch 2.13), so a bf16
    step takes about 60x longer than an fp32 one there."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None:  # a torch without the probe: oneDNN's bf16 needs at least AVX-512
        return torch.backends.mkldnn.is_available() and torch.cpu._is_avx512_supported()
    return bool(check())


def prefers_channels_last(x: torch.Tensor) -> bool:
    """Whether a (B, C, T, H, W) activation runs faster channels-last: bf16 on a CPU with oneDNN's bf16
    kernels (no autocast, no torch.compile, which plans layouts itself) with at least
    CHANNELS_LAST_MIN_PIXELS pixels per frame."""
    return (
        x.dim() == 5
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.shape[3] * x.shape[4] >= CHANNELS_LAST_MIN_PIXELS
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and cpu_has_bf16_kernels()
    )


def preferred_layout(x: torch.Tensor) -> torch.Tensor:
    """x in the memory layout `prefers_channels_last` picks for it (no copy when it already is)."""
    return relayout(x, channels_last=prefers_channels_last(x))


def relayout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x channels-last or contiguous (no copy when it already is); its gradient goes back in x's layout.

    (`Tensor.contiguous` passes gradients through in whatever layout they come, and a backward that mixes
    layouts copies at every op: SiLU's backward takes 3.6 ms instead of 0.7 ms at 1x64x9x64x64.)"""
    if x.dim() != 5 or (_is_channels_last(x) if channels_last else x.is_contiguous()):
        return x
    return _Relayout.apply(x, channels_last)


def gradient_in_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself, whose gradient is converted to x's layout in the backward if it comes in another one (as
    from a resize's or a residual sum's backward); channels-last tensors only, otherwise x as it is."""
    return _GradientChannelsLast.apply(x) if _is_channels_last(x) else x


class _GradientChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        # an alias with x's strides (view_as would give a batch of one an odd stride)
        return x[:]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _as_channels_last(grad)


class _Relayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        ctx.source_channels_last = _is_channels_last(x)
        return _as_channels_last(x) if channels_last else x.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (_as_channels_last(grad) if ctx.source_channels_last else grad.contiguous()), None


def group_norm_channels_last(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """`F.group_norm` of a channels-last bf16 (B, C, T, H, W) tensor, returned channels-last, statistics and
    affine in float32 (rounded once, as torch's kernel does for contiguous inputs).

    torch's CPU group norm handles channels-last inputs too, but its bf16 backward there is about 20x slower
    than for contiguous ones (26 ms against 1.3 ms at 1x64x9x64x64). This one is built from torch's
    channels-last batch-norm kernels, one sample at a time: per-channel mean and variance (float32), pooled
    per group; the normalization is an inference batch norm with the group's statistics as the running
    ones; the backward takes the per-channel sums of dy and dy * x-hat from the inference batch norm's
    backward and forms the input's gradient in float32 from them (as accurate as torch's kernel or more:
    tests/test_channels_last.py)."""
    return _GroupNormChannelsLast.apply(x, groups, weight, bias, eps)


class _GroupNormChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps):
        channels = x.shape[1]
        ones = x.new_ones(channels, dtype=torch.float32)
        gamma = ones if weight is None else weight.float()
        beta = torch.zeros_like(ones) if bias is None else bias.float()
        out = torch.empty_like(x)
        running_mean, running_var = torch.zeros_like(ones), torch.ones_like(ones)
        per_channel = channels // groups
        means, variances = [], []
        for i in range(x.shape[0]):
            sample = x[i : i + 1]
            # per-channel mean and (biased) variance, in float32 because the running statistics handed in
            # are float32 (momentum 0: they stay as they are)
            mean_c, var_c = torch.batch_norm_update_stats(sample, running_mean, running_var, 0.0)
            # pooled over each group's channels: its mean, and its variance about that mean
            mean_c, var_c = mean_c.view(groups, -1), var_c.view(groups, -1)
            mean = mean_c.mean(1)
            var = var_c.mean(1) + (mean_c - mean[:, None]).square().mean(1)
            torch.ops.aten.native_batch_norm.out(
                sample,
                gamma,
                beta,
                mean.repeat_interleave(per_channel),
                var.repeat_interleave(per_channel),
                False,
                0.0,
                eps,
                out=out[i : i + 1],
                save_mean=torch.empty(0),
                save_invstd=torch.empty(0),
            )
            means.append(mean)
            variances.append(var)
        ctx.save_for_backward(x, gamma, torch.stack(means), torch.stack(variances))
        ctx.groups, ctx.eps = groups, eps
        ctx.parameter_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gamma, means, variances = ctx.saved_tensors
        groups, eps = ctx.groups, ctx.eps
        channels = x.shape[1]
        per_channel = channels // groups
        count = per_channel * x[0, 0].numel()  # elements per group and sample
        grad_out = _as_channels_last(grad_out)
        grad_x = torch.empty_like(x)
        grad_gamma = torch.zeros_like(gamma)
        grad_beta = torch.zeros_like(gamma)

        def per_channel_view(v: torch.Tensor) -> torch.Tensor:
            # one value per group -> (1, C, 1, 1, 1)
            return v.repeat_interleave(per_channel).view(1, channels, 1, 1, 1)

        for i in range(x.shape[0]):
            sample, dy = x[i : i + 1], grad_out[i : i + 1]
            mean = means[i].repeat_interleave(per_channel)
            var = variances[i].repeat_interleave(per_channel)
            rstd = (variances[i] + eps).rsqrt()
            # per channel: sum(dy * x_hat) (gamma's gradient) and sum(dy) (beta's)
            _, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
                dy, sample, gamma, mean, var, None, None, False, eps, [False, True, True]
            )
            grad_gamma += dgamma
            grad_beta += dbeta
            # dx = gamma rstd dy - rstd / n * (sum_g(gamma dy) + x_hat * sum_g(gamma dy x_hat)): per channel
            # dy * gain + x * scale + shift, summed in float32 and rounded once (as torch's own kernel)
            sum_dy = (gamma * dbeta).view(groups, per_channel).sum(1)
            sum_dy_xhat = (gamma * dgamma).view(groups, per_channel).sum(1)
            scale = -rstd * rstd * sum_dy_xhat / count
            shift = -rstd * sum_dy / count - means[i] * scale
            shift, scale = per_channel_view(shift), per_channel_view(scale)
            gain = gamma.view(1, channels, 1, 1, 1) * per_channel_view(rstd)
            # a few frames at a time: the float32 temporary stays small (a full-size one of 19 MB, fresh
            # from the OS at every call, made this 4x slower at 1x128x9x64x64)
            frames = max(1, _COMBINE_ELEMENTS // sample[0, :, 0].numel())
            for start in range(0, sample.shape[2], frames):
                part = slice(start, start + frames)
                total = torch.addcmul(shift, sample[:, :, part], scale)
                total.addcmul_(dy[:, :, part], gain)
                grad_x[i : i + 1, :, part].copy_(total)
        weight_dtype, bias_dtype = ctx.parameter_dtypes
        return (
            grad_x,
            None,
            None if weight_dtype is None else grad_gamma.to(weight_dtype),
            None if bias_dtype is None else grad_beta.to(bias_dtype),
            None,
        )


def temporal_chunks(length: int, chunk: int) -> Iterator[tuple[int, int]]:
    """[start, end) of the temporal chunks diffusers uses: the first takes `chunk` plus the remainder.

    With `chunk` a multiple of the temporal compression and a valid length (1 + 4k), the first chunk
    holds 1 + 4j frames (9 or 13 for 8-frame chunks), every later one exactly `chunk`.
    """
    num_chunks = max(length // chunk, 1)
    remainder = length % chunk
    start = 0
    for index in range(num_chunks):
        end = min(chunk * (index + 1) + remainder, length)
        yield start, end
        start = end


class CausalCache:
    """What one temporal chunk passes to the next: every causal conv's last `kernel_t - 1` input frames.

    Chunk 0 gets `CausalCache()`, chunk i + 1 gets `cache.next_chunk()` of chunk i's cache. A conv reads
    the frames stored by the previous chunk and stores its own into a fresh dict, so re-running a chunk
    (as gradient checkpointing does in the backward) reads and changes nothing that another chunk sees.
    """

    def __init__(self, previous: dict[nn.Module, torch.Tensor] | None = None, *, first_chunk: bool = True):
        self.first_chunk = first_chunk  # the chunk holds the clip's first frame (kept apart in time)
        self._previous = previous or {}
        self._current: dict[nn.Module, torch.Tensor] = {}

    def past_frames(self, conv: nn.Module) -> torch.Tensor | None:
        """The frames `conv` stored in the previous chunk; None in the first chunk."""
        return self._previous.get(conv)

    def store(self, conv: nn.Module, frames: torch.Tensor) -> None:
        # a copy, so the chunk's full-size input is not kept alive by a slice of it
        self._current[conv] = frames.clone()

    def next_chunk(self) -> "CausalCache":
        return CausalCache(dict(self._current), first_chunk=False)


def _holds_first_frame(cache: CausalCache | None) -> bool:
    return cache is None or cache.first_chunk


class GroupNorm32(nn.GroupNorm):
    """`nn.GroupNorm` computed in float32 (statistics over large groups lose too much in bf16), returned
    in the input's dtype; also with bf16 weights (DeepSpeed's bf16 mode) and under autocast.

    torch's own kernels already do that for bf16/fp16 inputs with weights of the same dtype (CPU and CUDA:
    float accumulation, one rounding of the output), and on the CPU with float32 weights too: those run
    as they are, bit-equal to an explicit float32 computation and without its two full-size casts (5-16x
    faster here). Other dtype mixes are cast to float32 explicitly. Channels-last bf16 inputs on the CPU
    take `group_norm_channels_last` (float32 statistics too; torch's own backward is slow there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_channels_last(x) and prefers_channels_last(x):
            return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps)
        params = [p for p in (self.weight, self.bias) if p is not None]
        same_dtype = all(p.dtype == x.dtype for p in params)
        cpu_mixed = x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
        if same_dtype or (cpu_mixed and all(p.dtype == torch.float32 for p in params)):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


class SafeConv3d(nn.Conv3d):
    """`nn.Conv3d` that runs very large inputs in overlapping time chunks (same result, bounded workspace).

    The chunks overlap by `kernel_size[0] - 1` input frames, so the output equals a single convolution.
    Only used with temporal stride 1, dilation 1 and no temporal padding (causal padding is applied outside).
    """

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        plain = self.groups == 1 and self.padding_mode == "zeros" and all(d == 1 for d in self.dilation)
        if plain and not isinstance(self.padding, str):
            return conv3d(input, weight, bias, self.stride, self.padding)
        return super()._conv_forward(input, weight, bias)

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


class FrameConv2d(nn.Conv2d):
    """A `nn.Conv2d` (same weights and state dict) applied to every frame of a (B, C, T, H, W) tensor, run
    as a 1xKxK conv3d on the 5D tensor: no (B, C, T, H, W) <-> (B*T, C, H, W) copies.

    The conv is this module's own forward, so ZeRO-3 gathers its partitioned weight around it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # - inductor (torch 2.13) fails to lower a strided 1xKxK conv3d (ValueRangeError); a conv2d over
        #   (B*T, C, H, W) it lowers, and it plans the layout changes itself;
        # - CPU bf16/fp16: oneDNN's backward of the stride-2 1x3x3 conv3d (Downsample3D) returns non-finite
        #   weight and bias gradients with one thread (torch 2.13, Intel AMX; tests/test_models.py); its
        #   conv2d is correct, and a low-precision CPU conv copies to channels-last internally anyway.
        if torch.compiler.is_compiling() or (x.device.type == "cpu" and x.dtype != torch.float32):
            frames = x.shape[2]
            out = super().forward(x.transpose(1, 2).flatten(0, 1))
            return out.unflatten(0, (-1, frames)).transpose(1, 2)
        return conv3d(
            x, self.weight[:, :, None], self.bias, stride=(1, *self.stride), padding=(0, *self.padding)
        )


class CausalConv3d(nn.Module):
    """3D conv that is causal in time: the first frame is repeated `kernel_t - 1` times in front, or, in
    a later temporal chunk, the previous chunk's last `kernel_t - 1` input frames (from the cache).

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

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.time_pad > 0:
            past = cache.past_frames(self) if cache is not None else None
            # (B, C, T, H, W) -> (B, C, T + kernel_t - 1, H, W)
            if past is None:
                x = replicate_first_frame(x, self.time_pad)
            else:
                x = torch.cat([past, x], dim=2)
            if cache is not None:
                cache.store(self, x[:, :, -self.time_pad :])
        return self.conv(x)


def replicate_first_frame(x: torch.Tensor, pad: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C, pad + T, H, W): causal padding in time, the first frame repeated in front."""
    return _ReplicateFirstFrame.apply(x, pad)


class _ReplicateFirstFrame(torch.autograd.Function):
    """(B, C, T, H, W) -> (B, C, pad + T, H, W), the first frame repeated `pad` times in front.

    The same as `cat([x[:, :, :1].expand(..., pad, ...), x])`, whose backward builds a zero tensor of x's
    size for the slice, copies into it and adds it to the rest; this one copies the gradient once.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, pad: int) -> torch.Tensor:
        ctx.pad = pad
        # a list of slices, not an expanded slice: cat's copy of a stride-0 input is 2-8x slower (CPU)
        return torch.cat([x[:, :, :1]] * pad + [x], dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        pad = ctx.pad
        grad_x = grad[:, :, pad:].clone()
        grad_x[:, :, :1] += grad[:, :, :pad].sum(dim=2, keepdim=True)
        return grad_x, None


class SpatialNorm3D(nn.Module):
    """GroupNorm modulated by the latent: `norm(f) * conv_y(zq) + conv_b(zq)` (arXiv:2209.09002).

    `zq` is resized (nearest) to `f`'s frames and pixels. In the chunk that holds the clip's first frame,
    that frame is resized on its own so it only ever conditions the first output frame (the causal
    first-frame convention).
    """

    # diffusers splits off the first frame when the chunk's frame count is odd, its way of saying "this
    # chunk holds the first frame": true for its default chunks whenever the latent has an odd frame
    # count (T = 8k+1 videos). We ask the cache instead, so an even latent count (T = 8k+5) decodes to
    # 4(t-1)+1 frames, the length that was encoded, where diffusers returns 4t.

    def __init__(self, f_channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm_layer = GroupNorm32(num_groups=groups, num_channels=f_channels, eps=SPATIAL_NORM_EPS)
        self.conv_y = CausalConv3d(zq_channels, f_channels, kernel_size=1)
        self.conv_b = CausalConv3d(zq_channels, f_channels, kernel_size=1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        frames = f.shape[2]
        split_first = frames > 1 and _holds_first_frame(cache)
        factors = _nearest_factors(zq.shape[2:], f.shape[2:], split_first)
        if factors is not None:
            return self._modulate_broadcast(f, zq, cache, split_first, *factors)
        if split_first:
            # (B, Cz, t, h, w) -> (B, Cz, 1, H, W) ++ (B, Cz, T - 1, H, W)
            first = F.interpolate(zq[:, :, :1], size=(1, *f.shape[-2:]))
            rest = F.interpolate(zq[:, :, 1:], size=(frames - 1, *f.shape[-2:]))
            zq = torch.cat([first, rest], dim=2)
        else:
            zq = F.interpolate(zq, size=f.shape[-3:])
        return self.norm_layer(f) * self.conv_y(zq, cache) + self.conv_b(zq, cache)

    def _modulate_broadcast(
        self,
        f: torch.Tensor,
        zq: torch.Tensor,
        cache: CausalCache | None,
        split_first: bool,
        time_factor: int,
        height_factor: int,
        width_factor: int,
    ) -> torch.Tensor:
        """The same numbers without resizing zq to f's size: a 1x1x1 conv commutes with nearest
        resizing, so conv_y and conv_b run at the latent's resolution, are repeated in time and width
        there (1/height_factor of f's size), and broadcast over rows in one fused multiply-add."""

        def repeat(x: torch.Tensor) -> torch.Tensor:
            # (B, C, t, h, w) -> (B, C, T, h, W); T = 1 + (t - 1) * factor with the first frame apart
            if time_factor > 1 and split_first:
                x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(time_factor, dim=2)], dim=2)
            elif time_factor > 1:
                x = x.repeat_interleave(time_factor, dim=2)
            return x.repeat_interleave(width_factor, dim=4) if width_factor > 1 else x

        y, b = repeat(self.conv_y(zq, cache)), repeat(self.conv_b(zq, cache))
        if _is_channels_last(f):
            return self._modulate_channels_last(f, y, b, height_factor)
        # (B, C, T, H, W) -> (B, C, T, h, sh, W) against (B, C, T, h, 1, W): rows broadcast, W contiguous
        normed = self.norm_layer(f).unflatten(3, (y.shape[3], height_factor))
        return torch.addcmul(b.unsqueeze(4), normed, y.unsqueeze(4)).flatten(3, 4)

    def _modulate_channels_last(
        self, f: torch.Tensor, y: torch.Tensor, b: torch.Tensor, height_factor: int
    ) -> torch.Tensor:
        """`_modulate_broadcast`'s multiply-add for a channels-last f, in (B*T, H, W, C) order, where all
        three operands are contiguous (y and b are small: converted), so the result is channels-last with
        strides torch's kernels recognise (in (B, C, T, h, sh, W) order the batch stride can come out odd)."""
        batch, frames = f.shape[0], f.shape[2]

        def rows(x: torch.Tensor) -> torch.Tensor:
            # (B, C, T, H, W) channels-last -> (B*T, H, W, C), a view
            return relayout(x, channels_last=True).permute(0, 2, 3, 4, 1).flatten(0, 1)

        # (B*T, H, W, C) -> (B*T, h, sh, W, C) against (B*T, h, 1, W, C)
        normed = rows(self.norm_layer(f)).unflatten(1, (y.shape[3], height_factor))
        out = torch.addcmul(rows(b).unsqueeze(2), normed, rows(y).unsqueeze(2))
        return out.flatten(1, 2).unflatten(0, (batch, frames)).permute(0, 4, 1, 2, 3)


def _power_of_two_ratio(out_size: int, in_size: int) -> int | None:
    if in_size < 1 or out_size % in_size:
        return None
    ratio = out_size // in_size
    return ratio if ratio & (ratio - 1) == 0 else None


def _nearest_factors(
    zq_size: torch.Size, f_size: torch.Size, split_first: bool
) -> tuple[int, int, int] | None:
    """(time, height, width) repeat factors that equal F.interpolate(mode="nearest") from zq's (t, h, w) to
    f's (T, H, W) (with the first frame resized on its own when `split_first`); None when a ratio is not a
    power of two (torch's float scale then need not pick every ratio-th source pixel exactly)."""
    t, h, w = zq_size
    frames, height, width = f_size
    time = _power_of_two_ratio(frames - 1, t - 1) if split_first else _power_of_two_ratio(frames, t)
    factors = (time, _power_of_two_ratio(height, h), _power_of_two_ratio(width, w))
    return None if None in factors else factors


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
            self.norm1 = GroupNorm32(num_groups=groups, num_channels=in_channels, eps=eps)
            self.norm2 = GroupNorm32(num_groups=groups, num_channels=out_channels, eps=eps)
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

    def _norm(
        self, norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None, cache: CausalCache | None
    ) -> torch.Tensor:
        return norm(x) if zq is None else norm(x, zq, cache)

    def forward(
        self, x: torch.Tensor, zq: torch.Tensor | None = None, cache: CausalCache | None = None
    ) -> torch.Tensor:
        x = preferred_layout(x)  # the block's convs, norms and activations keep it
        h = self.conv1(self.nonlinearity(self._norm(self.norm1, x, zq, cache)), cache)
        h = self.conv2(self.dropout(self.nonlinearity(self._norm(self.norm2, h, zq, cache))), cache)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return gradient_in_layout(x + h)


class Downsample3D(nn.Module):
    """Halve H and W with a stride-2 3x3 conv per frame; with `compress_time`, first halve T by averaging
    frame pairs, keeping the clip's first frame as is (T = 2k+1 -> k+1; a later chunk: 2k -> k)."""

    def __init__(self, in_channels: int, out_channels: int, *, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = FrameConv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.compress_time and x.shape[2] > 1:
            # the chunk with the first frame has 1 + 2k frames at every level, later chunks 2k (diffusers
            # tells the two apart by parity, which agrees for valid clips and chunk sizes)
            if _holds_first_frame(cache):
                # (B, C, 2k+1, H, W) -> (B, C, k+1, H, W)
                x = torch.cat([x[:, :, :1], _mean_of_frame_pairs(x[:, :, 1:])], dim=2)
            else:
                # (B, C, 2k, H, W) -> (B, C, k, H, W)
                x = _mean_of_frame_pairs(x)
        # pad right/bottom only, so an even size halves exactly: (.., H, W) -> (.., H/2, W/2)
        x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # per frame: (.., T, H + 1, W + 1) -> (.., T, H/2, W/2)


def _mean_of_frame_pairs(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 2k, H, W) -> (B, C, k, H, W), the mean of frames 2i and 2i + 1."""
    if x.shape[1] > 1 and x.stride(1) == 1:
        # channels-last (a time slice of it with B > 1 included): the reduction below would return a
        # contiguous tensor. The same numbers: both round the pair's sum once, and halving is exact.
        return (x[:, :, 0::2] + x[:, :, 1::2]) * 0.5
    return reduce(x, "b c (t pair) h w -> b c t h w", "mean", pair=2)


class Upsample3D(nn.Module):
    """Double H and W (nearest) and apply a 3x3 conv per frame; with `compress_time`, also double T while
    the clip's first frame stays single (T = k+1 -> 2k+1; a later chunk: k -> 2k; see SpatialNorm3D on
    how this differs from diffusers for an even latent count)."""

    def __init__(self, in_channels: int, out_channels: int, *, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = FrameConv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        frames = x.shape[2]
        if self.compress_time and not _holds_first_frame(cache):
            # (B, C, k, H, W) -> (B, C, 2k, 2H, 2W)
            x = F.interpolate(x, scale_factor=2.0)
        elif self.compress_time and frames > 1:
            # (B, C, k+1, H, W) -> (B, C, 1 + 2k, 2H, 2W)
            first = F.interpolate(x[:, :, :1], scale_factor=(1.0, 2.0, 2.0))
            rest = F.interpolate(x[:, :, 1:], scale_factor=2.0)
            x = torch.cat([first, rest], dim=2)
        else:
            # (B, C, T, H, W) -> (B, C, T, 2H, 2W)
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0))
        return self.conv(x)  # per frame


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

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, None, cache)
        for downsampler in self.downsamplers or ():
            x = downsampler(x, cache)
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

    def forward(
        self, x: torch.Tensor, zq: torch.Tensor | None = None, cache: CausalCache | None = None
    ) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, zq, cache)
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

    def forward(self, x: torch.Tensor, zq: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, zq, cache)
        for upsampler in self.upsamplers or ():
            x = upsampler(x, cache)
        return x
