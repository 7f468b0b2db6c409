"""Quantizers for the autoencoder's latent: FSQ and LFQ behind one interface, and a registry by name.

A quantizer maps the encoder's latent z (B, dim, t, h, w) (any (B, dim, ...) works, e.g. images as
(B, dim, h, w)) to a `QuantizerOutput`: the quantized latent (same shape and dtype, straight-through
gradient), int64 code indices (B, t, h, w), an fp32 auxiliary loss for the video loss to weight, and
detached metrics. Neither quantizer has parameters or state-dict entries (their buffers are
non-persistent integers), so adding one leaves the autoencoder's state dict, and its diffusers
compatibility, unchanged, and a bf16 cast of the module changes nothing in them.
"""

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# Recommended FSQ levels from Mentzer et al. 2023 (Table 1), keyed by log2 of the target codebook size.
FSQ_RECOMMENDED_LEVELS: dict[int, tuple[int, ...]] = {
    8: (8, 6, 5),
    10: (8, 5, 5, 5),
    12: (7, 5, 5, 5, 5),
    14: (8, 8, 8, 6, 5),
    16: (8, 8, 8, 5, 5, 5),
}

# LFQ computes the entropy of the batch-averaged code distribution exactly up to this many bits
# (2**18 codes, MAGVIT-2's largest codebook): the cost is one (2**9, N) @ (N, 2**9) matmul and 2**18
# floats. Wider codes use a documented upper bound (see LFQ).
LFQ_MAX_EXACT_ENTROPY_DIM = 18
# Indices are int64.
LFQ_MAX_DIM = 63


class QuantizerOutput(NamedTuple):
    quantized: Tensor  # (B, C, t, h, w), input shape and dtype, straight-through gradient to the input
    indices: Tensor  # (B, t, h, w) int64 code index
    aux_loss: Tensor  # scalar fp32, for the video loss to weight by quantizer_aux_loss_weight
    metrics: dict[str, Tensor]  # detached fp32 scalars to log


class Quantizer(nn.Module):
    """Common interface: `forward(z (B, dim, ...)) -> QuantizerOutput`, codes <-> indices, `codebook_size`."""

    dim: int
    codebook_size: int

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Codes on the grid (B, dim, ...) -> int64 indices (B, ...)."""
        raise NotImplementedError

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Int64 indices (B, ...) -> fp32 codes (B, dim, ...), the values `forward` returns."""
        raise NotImplementedError

    def _check_latent(self, z: Tensor) -> None:
        if z.ndim < 2 or z.shape[1] != self.dim:
            raise ValueError(
                f"{type(self).__name__} expects a latent (B, {self.dim}, ...) with the quantizer's dim as "
                f"channels, got shape {tuple(z.shape)}: make the encoder output {self.dim} latent channels"
            )


def _per_channel(values: Tensor, ndim: int) -> Tensor:
    # (C,) -> (C, 1, ..., 1), broadcasting against (B, C, ...) without its batch dim
    return values.view(-1, *([1] * (ndim - 2)))


def _entropy(probs: Tensor) -> Tensor:
    """Entropy in nats over the last dim. Zero probabilities contribute 0 with a finite gradient."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1)


def _usage_metrics(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Fraction of the codebook used in this batch and the perplexity of the hard index histogram.

    Sort-based, so it needs no codebook-sized buffer and no host sync (unlike `unique` or `bincount`).
    """
    with torch.no_grad():
        flat = indices.flatten().sort().values
        starts_run = torch.ones_like(flat, dtype=torch.bool)
        starts_run[1:] = flat[1:] != flat[:-1]
        run_id = starts_run.long().cumsum(0) - 1
        counts = torch.zeros(flat.numel(), device=flat.device).scatter_add_(
            0, run_id, torch.ones(flat.numel(), device=flat.device)
        )
        return {
            "codebook_usage": starts_run.sum().float() / float(codebook_size),
            "perplexity": _entropy(counts / flat.numel()).exp(),
        }


class FSQ(Quantizer):
    """Finite Scalar Quantization (Mentzer et al. 2023): each channel bounded to `levels[i]` values, rounded.

    Channel i takes `levels[i]` values in [-1, 1] (odd levels: symmetric, including 0; even levels: one
    more below 0 than above, e.g. 4 -> {-1, -0.5, 0, 0.5}). The index is mixed radix with channel 0 the
    least significant digit. No auxiliary loss.
    """

    def __init__(self, levels: Sequence[int]):
        super().__init__()
        levels = tuple(levels) if isinstance(levels, Sequence) and not isinstance(levels, str) else levels
        if (
            not isinstance(levels, tuple)
            or not levels
            or any(isinstance(level, bool) or not isinstance(level, int) or level < 2 for level in levels)
        ):
            raise ValueError(
                "FSQ levels must be a non-empty sequence of integers >= 2 (values per latent channel), got "
                f"{levels!r}; e.g. one of the recommended sets {FSQ_RECOMMENDED_LEVELS}"
            )
        if math.prod(levels) > torch.iinfo(torch.int64).max:
            raise ValueError(
                f"FSQ codebook size prod(levels) = {math.prod(levels)} does not fit int64 indices: use fewer "
                f"or smaller levels than {list(levels)}"
            )
        self.levels = levels
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        basis = (1, *(math.prod(levels[:i]) for i in range(1, len(levels))))
        # Integer buffers: they follow .to(device) and are left alone by a bf16 cast of the model.
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int64), persistent=False)
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)
        self.register_buffer("_half_width", torch.tensor(levels, dtype=torch.int64) // 2, persistent=False)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, codebook_size={self.codebook_size}"

    def bound(self, z: Tensor) -> Tensor:
        """The paper's `bound`: tanh into (-L/2, L/2) per channel, shifted half a level for even L. fp32."""
        levels = _per_channel(self._levels, z.ndim).float()
        eps = 1e-3  # keeps the range strictly inside, so rounding gives exactly L values
        half_l = (levels - 1) * (1 - eps) / 2
        offset = torch.where(levels % 2 == 1, 0.0, 0.5)
        # As in the paper's reference code (tan, not atanh): for L = 2, offset / half_l > 1 and atanh
        # would be NaN; for L >= 4 the two agree to 1e-4, so bound(0) rounds to the middle level.
        shift = torch.tan(offset / half_l)
        return torch.tanh(z.float() + shift) * half_l - offset

    def forward(self, z: Tensor) -> QuantizerOutput:
        self._check_latent(z)
        bounded = self.bound(z)
        # round with a straight-through gradient; written so the value is exactly the rounded one
        rounded = bounded.round().detach() + (bounded - bounded.detach())
        quantized = rounded / _per_channel(self._half_width, z.ndim)
        indices = self.codes_to_indices(quantized.detach())
        return QuantizerOutput(
            quantized=quantized.to(z.dtype),
            indices=indices,
            aux_loss=torch.zeros((), dtype=torch.float32, device=z.device),
            metrics=_usage_metrics(indices, self.codebook_size),
        )

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        half_width = _per_channel(self._half_width, codes.ndim)
        digits = (codes.float() * half_width + half_width).round().long()  # (B, C, ...) in [0, L)
        return (digits * _per_channel(self._basis, codes.ndim)).sum(1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        indices = indices.unsqueeze(1)  # (B, ...) -> (B, 1, ...)
        ndim = indices.ndim
        digits = (indices // _per_channel(self._basis, ndim)) % _per_channel(self._levels, ndim)
        half_width = _per_channel(self._half_width, ndim)
        return (digits - half_width).float() / half_width


def all_reduce_mean(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Mean of `tensor` over the ranks of `group` (a new tensor, no gradient; gloo has no ReduceOp.AVG)."""
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced / dist.get_world_size(group)


def _code_probs(logits: Tensor) -> Tensor:
    """Per-position distribution over the 2**k codes of k bits: (N, k) bit logits -> (N, 2**k).

    softmax over codes a of sum_i x_i * bit_i(a), the code's logit built by exact fp32 additions (a matmul
    with the bit table would round these large logits to TF32 where the trainer allows TF32 matmuls).
    """
    code_logits = logits.new_zeros(logits.shape[0], 1)
    for bit in range(logits.shape[-1]):
        # codes [0, 2**bit) have this bit clear, codes [2**bit, 2**(bit + 1)) have it set
        code_logits = torch.cat([code_logits, code_logits + logits[:, bit : bit + 1]], dim=1)
    return torch.softmax(code_logits, dim=-1)


def _mean_code_probs(logits: Tensor) -> Tensor:
    """Batch mean of the per-position code distributions, exactly: (N, k) bit logits -> (2**k,).

    Each position's distribution is a product of independent per-bit Bernoullis, so with the bits split
    into a low and a high half, mean_n P_low[n, a] * P_high[n, b] is one (2**k_low, N) @ (N, 2**k_high)
    matmul: N * 2**k multiply-adds, and memory N * 2**(k/2) instead of N * 2**k. (With TF32 matmuls
    enabled on the GPU this product carries TF32 rounding, about 1e-3 relative; the logits do not.)
    """
    num_positions, bits = logits.shape
    low_bits = (bits + 1) // 2
    probs_low = _code_probs(logits[:, :low_bits])
    if low_bits == bits:
        return probs_low.mean(0)
    probs_high = _code_probs(logits[:, low_bits:])
    joint = probs_low.T @ probs_high / num_positions  # (2**low, 2**high)
    return rearrange(joint, "low high -> (high low)")  # index = low + 2**low_bits * high


def _split_bits(dim: int, max_bits: int) -> tuple[int, ...]:
    groups = -(-dim // max_bits)
    return tuple(dim // groups + (i < dim % groups) for i in range(groups))


class LFQ(Quantizer):
    """Lookup-Free Quantization (MAGVIT-2, Yu et al. 2023): each channel -> sign in {-1, +1}, 2**dim codes.

    The index packs the bits, channel i as bit i (channel 0 least significant, the digit order of FSQ).
    Auxiliary loss: `entropy_loss_weight * (mean per-sample entropy - diversity_gamma * codebook entropy)
    + commitment_loss_weight * MSE(z, sg(quantized))`, in fp32 (autocast off), with the soft assignment
    `softmax(-||z - c||^2 * inv_temperature)` over all codes c. That distribution is exactly a product of
    per-bit Bernoullis p(bit i = 1) = sigmoid(4 * inv_temperature * z_i), so the per-sample entropy is the
    sum of per-bit entropies (exact, any dim), and the batch-averaged distribution is computed exactly with
    one matmul (see `_mean_code_probs`) for dim <= LFQ_MAX_EXACT_ENTROPY_DIM. Above that the bits are
    split into near-equal contiguous groups of at most that many bits and the codebook entropy is the sum
    of the groups' exact entropies: an upper bound on the true one (equal when the groups are independent
    in the batch), maximal at the same uniform distribution. `codebook_entropy_is_exact` tells which.
    `entropy_subsample` computes the entropy terms on that many random positions (without replacement).

    Data parallel: while training, the batch-averaged distribution is averaged over the ranks (equal local
    batch sizes assumed) so the codebook entropy is the global batch's. The mean is taken without
    gradient and used as `global + (local - local.detach())`: its value is the global mean, its gradient
    w.r.t. the local mean is the identity (not 1/world_size). Every rank's loss holds the same
    `H(global)`; after the data-parallel average of the parameter gradients (DDP, DeepSpeed) the result
    is (1/W) * sum_r dH/dglobal * dlocal_r/dtheta, exactly the single-process gradient of H over the global
    batch, with no collective in backward. (A differentiable all_reduce-sum does the same: its backward
    sums the W identical upstream gradients, each scaled by 1/W.) `reduce_mean` replaces the
    torch.distributed mean (tests inject one); by default `all_reduce_mean` runs over `process_group`
    (None: the default group) when torch.distributed is initialised with more than one rank. In eval mode
    nothing is reduced, so a forward on one rank alone never waits on the others.
    """

    def __init__(
        self,
        dim: int,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.25,
        diversity_gamma: float = 1.0,
        inv_temperature: float = 100.0,
        entropy_subsample: int | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        reduce_mean: Callable[[Tensor], Tensor] | None = None,
    ):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= LFQ_MAX_DIM:
            raise ValueError(
                f"LFQ dim (bits per code = latent channels) must be an integer in [1, {LFQ_MAX_DIM}] so "
                f"indices fit int64, got {dim!r}; MAGVIT-2 uses 18 (2**18 codes)"
            )
        for name, value in (
            ("entropy_loss_weight", entropy_loss_weight),
            ("commitment_loss_weight", commitment_loss_weight),
            ("diversity_gamma", diversity_gamma),
        ):
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"LFQ {name} must be a finite number >= 0 (0 disables it), got {value!r}")
        if (
            not isinstance(inv_temperature, int | float)
            or not math.isfinite(inv_temperature)
            or inv_temperature <= 0
        ):
            raise ValueError(
                f"LFQ inv_temperature must be a finite number > 0 (e.g. 100), got {inv_temperature!r}"
            )
        if entropy_subsample is not None and (
            isinstance(entropy_subsample, bool)
            or not isinstance(entropy_subsample, int)
            or entropy_subsample < 1
        ):
            raise ValueError(
                "LFQ entropy_subsample must be None (use every position) or a positive number of positions, "
                f"got {entropy_subsample!r}"
            )
        self.dim = dim
        self.codebook_size = 2**dim
        self.entropy_loss_weight = float(entropy_loss_weight)
        self.commitment_loss_weight = float(commitment_loss_weight)
        self.diversity_gamma = float(diversity_gamma)
        self.inv_temperature = float(inv_temperature)
        self.entropy_subsample = entropy_subsample
        self.process_group = process_group
        self.reduce_mean = reduce_mean
        self.entropy_groups = _split_bits(dim, LFQ_MAX_EXACT_ENTROPY_DIM)
        self.codebook_entropy_is_exact = len(self.entropy_groups) == 1
        self.register_buffer("_bit_values", 2 ** torch.arange(dim, dtype=torch.int64), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, entropy_loss_weight={self.entropy_loss_weight}, "
            f"commitment_loss_weight={self.commitment_loss_weight}, diversity_gamma={self.diversity_gamma}, "
            f"inv_temperature={self.inv_temperature}, entropy_subsample={self.entropy_subsample}"
        )

    def forward(self, z: Tensor) -> QuantizerOutput:
        self._check_latent(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()
            codes = torch.where(z32 > 0, 1.0, -1.0)
            # sign with a straight-through gradient; the value is exactly +-1
            quantized = codes + (z32 - z32.detach())
            indices = self.codes_to_indices(codes)

            logits = rearrange(z32, "b c ... -> (b ...) c") * (4.0 * self.inv_temperature)
            if self.entropy_subsample is not None and logits.shape[0] > self.entropy_subsample:
                keep = torch.randperm(logits.shape[0], device=logits.device)[: self.entropy_subsample]
                logits = logits[keep]
            per_sample_entropy = self._bit_entropy(logits).sum(-1).mean()
            group_probs = [_mean_code_probs(group) for group in logits.split(self.entropy_groups, dim=-1)]
            mean_probs = self._mean_across_ranks(torch.cat(group_probs))
            codebook_entropy = sum(
                _entropy(probs) for probs in mean_probs.split([2**bits for bits in self.entropy_groups])
            )
            entropy_loss = per_sample_entropy - self.diversity_gamma * codebook_entropy
            commitment_loss = F.mse_loss(z32, codes)
            aux_loss = self.entropy_loss_weight * entropy_loss + self.commitment_loss_weight * commitment_loss

        metrics = {
            "per_sample_entropy": per_sample_entropy,
            "codebook_entropy": codebook_entropy,
            "entropy_loss": entropy_loss,
            "commitment_loss": commitment_loss,
        }
        metrics = {name: value.detach() for name, value in metrics.items()}
        metrics.update(_usage_metrics(indices, self.codebook_size))
        return QuantizerOutput(quantized.to(z.dtype), indices, aux_loss, metrics)

    @staticmethod
    def _bit_entropy(logits: Tensor) -> Tensor:
        # entropy of Bernoulli(sigmoid(x)) from the logit: -log p = softplus(-x), -log(1 - p) = softplus(x)
        p = torch.sigmoid(logits)
        return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)

    def _mean_across_ranks(self, local: Tensor) -> Tensor:
        if not self.training:
            return local
        reduce = self.reduce_mean
        if reduce is None:
            if not (dist.is_available() and dist.is_initialized()):
                return local
            if dist.get_world_size(self.process_group) == 1:
                return local
            group = self.process_group

            def reduce(tensor: Tensor) -> Tensor:
                return all_reduce_mean(tensor, group)

        with torch.no_grad():
            global_mean = reduce(local.detach())
        # value: the global mean; gradient: the local term's, unscaled (see the class docstring)
        return global_mean + (local - local.detach())

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        return ((codes > 0).long() * _per_channel(self._bit_values, codes.ndim)).sum(1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        bits = (indices.unsqueeze(1) // _per_channel(self._bit_values, indices.ndim + 1)) % 2
        return bits.float() * 2 - 1


QUANTIZERS: dict[str, type[Quantizer]] = {"fsq": FSQ, "lfq": LFQ}

# Constructor arguments `build_quantizer` starts from; keyword arguments override them.
QUANTIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "fsq": {"levels": FSQ_RECOMMENDED_LEVELS[16]},  # 64,000 codes, 6 latent channels
    "lfq": {  # 65,536 codes, 16 latent channels (CogVideoX's latent width); MAGVIT-2's loss weights
        "dim": 16,
        "entropy_loss_weight": 0.1,
        "commitment_loss_weight": 0.25,
        "diversity_gamma": 1.0,
        "inv_temperature": 100.0,
        "entropy_subsample": None,
    },
}


def build_quantizer(name: Literal["fsq", "lfq"], **kwargs: Any) -> Quantizer:
    """Build a quantizer by name from `QUANTIZER_DEFAULTS[name]`, overridden by keyword arguments."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; valid quantizers: {sorted(QUANTIZERS)}")
    cls = QUANTIZERS[name]
    valid = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(
            f"unknown arguments {unknown} for quantizer {name!r}; valid arguments: {sorted(valid)}"
        )
    return cls(**{**QUANTIZER_DEFAULTS[name], **kwargs})
