import copy
import itertools
import math
from pathlib import Path

import pytest
import torch

import models.quantizers as quantizers
from distributed_utils import run_ranks
from models.quantizers import (
    FSQ,
    FSQ_RECOMMENDED_LEVELS,
    LFQ,
    QUANTIZER_DEFAULTS,
    QuantizerOutput,
    build_quantizer,
)


def _latent(*shape: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * scale


# ---------------------------------------------------------------------------------------------- FSQ


def test_fsq_quantized_values_lie_on_the_grid():
    levels = (8, 5, 4, 3, 2)
    fsq = FSQ(levels)
    z = _latent(2, len(levels), 3, 4, 4, scale=3.0)
    out = fsq(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert out.indices.shape == (2, 3, 4, 4) and out.indices.dtype == torch.int64
    for channel, level in enumerate(levels):
        half_width = level // 2
        steps = out.quantized[:, channel] * half_width
        assert torch.equal(steps, steps.round())
        assert steps.min() >= -half_width and steps.max() <= level - 1 - half_width
    assert torch.equal(fsq.indices_to_codes(out.indices), out.quantized)
    assert torch.equal(fsq.codes_to_indices(out.quantized), out.indices)
    assert out.aux_loss.dtype == torch.float32 and out.aux_loss.item() == 0.0


def test_fsq_reaches_every_code_and_no_other():
    levels = (3, 4, 2)
    fsq = FSQ(levels)
    out = fsq(_latent(1, len(levels), 20_000, scale=3.0))
    assert torch.equal(out.indices.unique(), torch.arange(math.prod(levels)))
    assert out.metrics["codebook_usage"].item() == 1.0


def test_fsq_indices_round_trip_for_all_codes():
    levels = (3, 4, 2, 5)
    fsq = FSQ(levels)
    assert fsq.codebook_size == 120 and fsq.dim == 4
    indices = torch.arange(fsq.codebook_size).view(2, 3, 4, 5)  # any (B, ...) layout
    codes = fsq.indices_to_codes(indices)
    assert codes.shape == (2, 4, 3, 4, 5)
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    assert len({tuple(code) for code in codes.movedim(1, -1).reshape(-1, 4).tolist()}) == 120
    # channel 0 is the least significant digit: index 1 moves channel 0 one level up from the bottom
    assert torch.equal(fsq.indices_to_codes(torch.tensor([[1]]))[0, :, 0], torch.tensor([0.0, -1, -1, -1]))


def test_fsq_straight_through_gradient_is_the_bound_derivative():
    fsq = FSQ((8, 5, 4))
    z = _latent(2, 3, 3, 4, 4, scale=2.0).requires_grad_()
    upstream = _latent(2, 3, 3, 4, 4, seed=1)
    fsq(z).quantized.backward(upstream)

    reference = z.detach().clone().requires_grad_()
    half_width = torch.tensor([4.0, 2.0, 2.0]).view(3, 1, 1, 1)
    (fsq.bound(reference) / half_width).backward(upstream)
    torch.testing.assert_close(z.grad, reference.grad, rtol=0, atol=0)
    assert z.grad.abs().min() > 0


@pytest.mark.parametrize("level", [3, 4, 5, 6, 7, 8])
def test_fsq_bound_maps_zero_to_the_middle_level(level):
    assert FSQ([level]).bound(torch.zeros(1, 1)).abs().item() < 1e-3


def test_fsq_bf16_and_4d_input():
    fsq = FSQ((8, 5, 5, 5))
    z = _latent(2, 4, 8, 8, scale=2.0).to(torch.bfloat16)
    out = fsq(z)
    assert out.quantized.dtype == torch.bfloat16 and out.quantized.shape == (2, 4, 8, 8)
    assert out.indices.shape == (2, 8, 8)
    assert torch.equal(fsq.codes_to_indices(out.quantized), out.indices)


def test_fsq_recommended_levels_match_their_codebook_sizes():
    for log2_size, levels in FSQ_RECOMMENDED_LEVELS.items():
        assert 0.9 < FSQ(levels).codebook_size / 2**log2_size < 1.1


@pytest.mark.parametrize("levels", [[], [1, 5], [8.0, 5], "85", [True, 5]])
def test_fsq_rejects_bad_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        FSQ(levels)


# ---------------------------------------------------------------------------------------------- LFQ


def _brute_force_entropies(z: torch.Tensor, inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample and codebook entropy from softmax(-||z - c||^2 * inv_temperature) over every code c."""
    dim = z.shape[1]
    flat = z.movedim(1, -1).reshape(-1, dim).double()  # (N, dim)
    # code with index a has channel i = +1 iff bit i of a is set
    codes = torch.tensor(
        [[1.0 if (index >> i) & 1 else -1.0 for i in range(dim)] for index in range(2**dim)],
        dtype=torch.float64,
    )
    distance = ((flat[:, None, :] - codes[None]) ** 2).sum(-1)  # (N, 2**dim)
    probs = torch.softmax(-distance * inv_temperature, dim=-1)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.clamp_min(1e-300).log()).sum(-1)

    return entropy(probs).mean(), entropy(probs.mean(0))


@pytest.mark.parametrize("dim", [1, 2, 3, 5])
def test_lfq_entropies_match_brute_force(dim):
    inv_temperature = 0.7
    lfq = LFQ(dim, entropy_loss_weight=0.1, commitment_loss_weight=0.25, inv_temperature=inv_temperature)
    z = _latent(2, dim, 3, 2, 2, scale=0.8)
    out = lfq(z)
    per_sample, codebook = _brute_force_entropies(z, inv_temperature)
    torch.testing.assert_close(out.metrics["per_sample_entropy"].double(), per_sample, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.metrics["codebook_entropy"].double(), codebook, rtol=0, atol=1e-5)
    commitment = ((z - z.sign()) ** 2).mean()
    expected = 0.1 * (per_sample - codebook) + 0.25 * commitment
    torch.testing.assert_close(out.aux_loss.double(), expected, rtol=0, atol=1e-5)
    assert lfq.codebook_entropy_is_exact


def test_lfq_grouped_codebook_entropy_above_the_exact_cap(monkeypatch):
    monkeypatch.setattr(quantizers, "LFQ_MAX_EXACT_ENTROPY_DIM", 3)
    lfq = LFQ(5, inv_temperature=0.5)
    assert lfq.entropy_groups == (3, 2) and not lfq.codebook_entropy_is_exact
    z = _latent(4, 5, 3, 3, scale=0.8)
    out = lfq(z)
    expected = _brute_force_entropies(z[:, :3], 0.5)[1] + _brute_force_entropies(z[:, 3:], 0.5)[1]
    torch.testing.assert_close(out.metrics["codebook_entropy"].double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        out.metrics["per_sample_entropy"].double(), _brute_force_entropies(z, 0.5)[0], rtol=0, atol=1e-5
    )


def test_lfq_entropy_subsample_uses_a_random_subset_of_positions():
    lfq = LFQ(3, inv_temperature=0.7, entropy_subsample=10)
    z = _latent(2, 3, 3, 4, 4)  # 96 positions
    torch.manual_seed(0)
    keep = torch.randperm(96)[:10]
    torch.manual_seed(0)
    out = lfq(z)
    subset = z.movedim(1, -1).reshape(-1, 3)[keep].T[None]  # (1, 3, 10)
    per_sample, codebook = _brute_force_entropies(subset, 0.7)
    torch.testing.assert_close(out.metrics["per_sample_entropy"].double(), per_sample, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.metrics["codebook_entropy"].double(), codebook, rtol=0, atol=1e-5)
    assert out.indices.shape == (2, 3, 4, 4)  # quantization still covers every position


def test_lfq_outputs_signs_with_identity_straight_through_gradient():
    lfq = LFQ(6)
    z = _latent(2, 6, 3, 4, 4).requires_grad_()
    out = lfq(z)
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert torch.equal(out.quantized, torch.where(z > 0, 1.0, -1.0))
    upstream = _latent(2, 6, 3, 4, 4, seed=1)
    out.quantized.backward(upstream)
    assert torch.equal(z.grad, upstream)


def test_lfq_index_packing_round_trips():
    lfq = LFQ(4)
    assert lfq.codebook_size == 16
    indices = torch.arange(16).view(2, 8)
    codes = lfq.indices_to_codes(indices)
    assert codes.shape == (2, 4, 8) and set(codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(lfq.codes_to_indices(codes), indices)
    # channel i is bit i
    assert lfq.codes_to_indices(torch.tensor([[1.0, -1.0, 1.0, 1.0]]).view(1, 4, 1)).item() == 1 + 4 + 8
    out = lfq(_latent(2, 4, 3, 4, 4))
    assert torch.equal(lfq.codes_to_indices(out.quantized), out.indices)
    assert torch.equal(lfq.indices_to_codes(out.indices), out.quantized)


def test_lfq_soft_assignment_peaks_at_the_hard_index():
    # the bit order of the soft distribution and of the packed index agree
    lfq = LFQ(3, inv_temperature=5.0)
    z = _latent(1, 3, 1, 1, scale=0.8)
    out = lfq(z)
    probs = quantizers._mean_code_probs(z.reshape(1, 3) * 4 * 5.0)
    assert probs.argmax().item() == out.indices.item()


def test_lfq_aux_loss_rewards_using_many_codes():
    lfq = LFQ(3)  # MAGVIT-2 defaults, inv_temperature 100
    all_codes = lfq.indices_to_codes(torch.arange(8).repeat(4)[None])  # (1, 3, 32): each code 4 times
    spread = lfq(0.9 * all_codes)
    collapsed = lfq(0.9 * all_codes[:, :, :1].expand(-1, -1, 32))
    assert spread.metrics["codebook_usage"].item() == 1.0
    assert collapsed.metrics["codebook_usage"].item() == 1 / 8
    torch.testing.assert_close(spread.metrics["perplexity"], torch.tensor(8.0))
    torch.testing.assert_close(spread.metrics["codebook_entropy"], torch.tensor(math.log(8)))
    assert spread.aux_loss < collapsed.aux_loss - 0.1 * math.log(8) + 1e-4


def test_lfq_bf16_input_gives_fp32_finite_aux_loss():
    lfq = LFQ(16)
    z = _latent(2, 16, 2, 4, 4).to(torch.bfloat16).requires_grad_()
    out = lfq(z)
    assert out.quantized.dtype == torch.bfloat16
    assert set(out.quantized.unique().tolist()) <= {-1.0, 1.0}
    assert out.aux_loss.dtype == torch.float32 and torch.isfinite(out.aux_loss)
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in out.metrics.values())
    (out.quantized.float().sum() + out.aux_loss).backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("quantizer", [FSQ((8, 5, 5, 5)), LFQ(4)], ids=["fsq", "lfq"])
@pytest.mark.parametrize("shape", [(2, 4, 3, 4, 5), (2, 4, 6, 7)], ids=["5d", "4d"])
def test_output_shapes(quantizer, shape):
    out = quantizer(_latent(*shape))
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == shape
    assert out.indices.shape == (shape[0], *shape[2:]) and out.indices.dtype == torch.int64
    assert out.aux_loss.shape == () and out.aux_loss.dtype == torch.float32
    assert all(value.shape == () and not value.requires_grad for value in out.metrics.values())
    assert quantizer.state_dict() == {}  # the autoencoder's state dict stays diffusers-compatible
    copy.deepcopy(quantizer)  # EMA copies the model


def test_wrong_channel_count_is_a_value_error():
    with pytest.raises(ValueError, match="4 latent channels"):
        LFQ(4)(_latent(2, 3, 4, 4))


def test_lfq_rank_mean_of_two_halves_equals_the_whole_batch():
    """A fake two-rank reduce: each half sees the mean of both halves' distributions, like all_reduce."""
    z = _latent(4, 3, 2, 3, 3, scale=0.6).requires_grad_()
    kwargs = {"inv_temperature": 0.7, "entropy_loss_weight": 1.0, "diversity_gamma": 1.5}
    whole = LFQ(3, **kwargs)(z)
    (whole_grad,) = torch.autograd.grad(whole.aux_loss, z)

    captured = []
    LFQ(3, reduce_mean=lambda local: captured.append(local) or local, **kwargs)(z[:2])
    LFQ(3, reduce_mean=lambda local: captured.append(local) or local, **kwargs)(z[2:])
    local_means = captured
    assert not any(local.requires_grad for local in local_means)  # the reduce sees detached tensors

    def fake_all_reduce_mean(local):
        return (local_means[0] + local_means[1]) / 2

    halves = [
        LFQ(3, reduce_mean=fake_all_reduce_mean, **kwargs)(z[rank * 2 : rank * 2 + 2]) for rank in (0, 1)
    ]
    for half in halves:
        torch.testing.assert_close(half.metrics["codebook_entropy"], whole.metrics["codebook_entropy"])
    # data parallel averages the ranks' gradients: that average equals the whole batch's gradient
    mean_loss = (halves[0].aux_loss + halves[1].aux_loss) / 2
    torch.testing.assert_close(mean_loss, whole.aux_loss)
    (mean_grad,) = torch.autograd.grad(mean_loss, z)
    torch.testing.assert_close(mean_grad, whole_grad)


def test_lfq_reduces_only_while_training():
    def fail(local):
        raise AssertionError("reduced in eval mode")

    lfq = LFQ(3, reduce_mean=fail).eval()
    lfq(_latent(2, 3, 4, 4))
    with pytest.raises(AssertionError, match="eval mode"):
        lfq.train()(_latent(2, 3, 4, 4))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dim": 0},
        {"dim": 64},
        {"dim": 4.0},
        {"dim": 4, "inv_temperature": 0},
        {"dim": 4, "entropy_loss_weight": -1},
        {"dim": 4, "diversity_gamma": float("nan")},
        {"dim": 4, "entropy_subsample": 0},
    ],
)
def test_lfq_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="LFQ"):
        LFQ(**kwargs)


# ----------------------------------------------------------------------------------------- registry


def test_build_quantizer_from_defaults_and_overrides():
    fsq = build_quantizer("fsq")
    assert isinstance(fsq, FSQ) and fsq.levels == tuple(QUANTIZER_DEFAULTS["fsq"]["levels"])
    lfq = build_quantizer("lfq", dim=10, entropy_subsample=256)
    assert isinstance(lfq, LFQ) and lfq.dim == 10 and lfq.entropy_subsample == 256
    assert lfq.commitment_loss_weight == QUANTIZER_DEFAULTS["lfq"]["commitment_loss_weight"]
    assert build_quantizer("fsq", levels=[8, 5, 5, 5]).codebook_size == 1000


def test_build_quantizer_rejects_unknown_names_and_arguments():
    with pytest.raises(ValueError, match="valid quantizers"):
        build_quantizer("vq")
    with pytest.raises(ValueError, match="valid arguments"):
        build_quantizer("lfq", codebook_size=1024)


# ------------------------------------------------------------------------------ two real ranks (gloo)


def _lfq_rank(rank: int, world_size: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    scale = torch.ones(1, 3, 1, 1, 1, requires_grad=True)  # a shared parameter in front of the quantizer
    out = LFQ(3, inv_temperature=0.7, entropy_loss_weight=1.0)(x.chunk(world_size)[rank] * scale)
    out.aux_loss.backward()
    torch.distributed.all_reduce(scale.grad)  # data parallel: the mean of the ranks' gradients
    return {"codebook_entropy": out.metrics["codebook_entropy"], "grad": scale.grad / world_size}


@pytest.mark.distributed
def test_lfq_two_ranks_match_one_process(tmp_path):
    x = _latent(4, 3, 2, 3, 3, scale=0.6)
    results = run_ranks(_lfq_rank, tmp_path, x, world_size=2)

    scale = torch.ones(1, 3, 1, 1, 1, requires_grad=True)
    whole = LFQ(3, inv_temperature=0.7, entropy_loss_weight=1.0)(x * scale)
    whole.aux_loss.backward()
    for result in results:
        torch.testing.assert_close(result["codebook_entropy"], whole.metrics["codebook_entropy"])
        torch.testing.assert_close(result["grad"], scale.grad)


def test_no_forbidden_imports():
    source = Path(quantizers.__file__).read_text().splitlines()
    imports = [line for line in source if line.startswith(("import ", "from "))]
    for line, name in itertools.product(imports, ("torchvision", "deepspeed", "vector_quantize_pytorch")):
        assert name not in line
