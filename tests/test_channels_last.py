"""Channels-last activations for bf16 on the CPU (models/layers.py): the group norm written for them, the
layout each level runs in, and that the layout changes nothing but speed."""

import collections

import pytest
import torch
import torch.nn.functional as F
from einops import reduce
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_autoencoder, layers

CL = torch.channels_last_3d


def channels_last(x: torch.Tensor) -> bool:
    return layers._is_channels_last(x)


def norm_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize(
    "batch, weight_dtype", [(1, torch.bfloat16), (2, torch.float32)], ids=["bf16-weights", "fp32-weights"]
)
def test_group_norm_channels_last_is_as_accurate_as_torchs(batch: int, weight_dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    shape = (batch, 32, 5, 16, 16)
    # an offset (statistics must not cancel) and one constant channel (variance 0)
    x = (100 + 3 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    x[:, 5] = 100.5
    dy = torch.randn(shape, generator=generator).to(torch.bfloat16)
    weight = (1 + 0.5 * torch.randn(32, generator=generator)).to(weight_dtype)
    bias = torch.randn(32, generator=generator).to(weight_dtype)

    def run(norm, x_in: torch.Tensor, dy_in: torch.Tensor):
        x_in = x_in.detach().requires_grad_()
        dtype = torch.float64 if x_in.dtype == torch.float64 else weight.dtype
        w, b = (p.detach().to(dtype).requires_grad_() for p in (weight, bias))
        out = norm(x_in, 8, w, b, 1e-6)
        out.backward(dy_in)
        return out, x_in.grad, w.grad, b.grad

    ours = run(
        layers.group_norm_channels_last, x.contiguous(memory_format=CL), dy.contiguous(memory_format=CL)
    )
    torchs = run(F.group_norm, x, dy)  # torch's kernel on the contiguous input: float32 inside
    exact = run(F.group_norm, x.double(), dy.double())
    assert channels_last(ours[0]) and channels_last(ours[1])
    assert ours[2].dtype == ours[3].dtype == weight_dtype and torchs[2].dtype == weight_dtype
    for name, mine, theirs, reference in zip(
        ("out", "dx", "dweight", "dbias"), ours, torchs, exact, strict=True
    ):
        assert torch.isfinite(mine).all(), name
        # measured (bf16 weights): out 3.1e-3 both; dx 2.2e-3 vs 2.3e-3; dweight 2.4e-3 vs 3.6e-3
        assert norm_error(mine, reference) <= 1.25 * norm_error(theirs, reference) + 1e-6, name


def test_group_norm32_takes_the_channels_last_path_only_where_it_should(monkeypatch) -> None:
    # as on a CPU with oneDNN's bf16 kernels, the only ones where the model makes channels-last activations
    monkeypatch.setattr(layers, "cpu_has_bf16_kernels", lambda: True)
    norm = layers.GroupNorm32(8, 32).to(torch.bfloat16)
    x = torch.randn(1, 32, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x_cl = x.contiguous(memory_format=CL)
    expected = layers.group_norm_channels_last(x_cl, 8, norm.weight, norm.bias, norm.eps)
    out = norm(x_cl)
    assert channels_last(out) and torch.equal(out, expected)
    # contiguous input: torch's kernel, as before
    assert torch.equal(norm(x), F.group_norm(x, 8, norm.weight, norm.bias, norm.eps))
    # under autocast (fp32 weights, the usual way) the layout is left to torch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layers.prefers_channels_last(x_cl)
    # small frames stay contiguous: 16x16 < CHANNELS_LAST_MIN_PIXELS
    assert not layers.prefers_channels_last(x[..., :16, :16])
    assert not layers.prefers_channels_last(x.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_of_frame_pairs_equals_the_reduction(dtype: torch.dtype) -> None:
    x = torch.randn(2, 16, 9, 8, 8, generator=torch.Generator().manual_seed(2)).to(dtype)
    x_cl = x.contiguous(memory_format=CL)
    expected = reduce(x[:, :, 1:], "b c (t pair) h w -> b c t h w", "mean", pair=2)
    pooled = layers._mean_of_frame_pairs(x_cl[:, :, 1:])  # a time slice of a batch of 2: not "dense"
    assert pooled.stride(1) == 1 and torch.equal(pooled, expected)


class ConvLayouts(TorchDispatchMode):
    """Counts the convolutions (forward, and backward by grad_output and input) by shape and layout."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and args[0].dim() == 5:
            self.calls["forward", args[0].shape[-2:].numel(), args[1].shape[1], channels_last(args[0])] += 1
        if func is torch.ops.aten.convolution_backward.default and args[0].dim() == 5:
            layouts = (channels_last(args[0]), channels_last(args[1]))
            self.calls["backward", args[1].shape[-2:].numel(), args[2].shape[1], layouts] += 1
        return func(*args, **(kwargs or {}))


def forward_backward(model, x: torch.Tensor):
    x = x.detach().requires_grad_()
    out = model(x, generator=torch.Generator().manual_seed(3))
    loss = out.recon.float().square().mean() + out.mean.float().square().mean() + out.logvar.float().mean()
    loss.backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters()}
    grads["input"] = x.grad.float()
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("bf16_kernels", [True, False], ids=["onednn-bf16", "no-onednn-bf16"])
def test_bf16_levels_run_channels_last_forward_and_backward(monkeypatch, bf16_kernels: bool) -> None:
    # the tiny preset on 64x64: levels of 64x64 and 32x32 run channels-last, 16x16 and 8x8 contiguous; on a
    # CPU without oneDNN's bf16 kernels every level runs contiguous
    if bf16_kernels and not layers.cpu_has_bf16_kernels():
        pytest.skip(
            "this CPU has no oneDNN bf16 kernels (AVX-512 or AMX): torch's reference kernels return contiguous "
            "outputs whatever the input's layout, so channels-last stays off here"
        )
    monkeypatch.setattr(layers, "cpu_has_bf16_kernels", lambda: bf16_kernels)
    torch.manual_seed(0)
    model = build_autoencoder("tiny", gradient_checkpointing=True).to(torch.bfloat16).train()
    # without the kernels a smaller clip (one level of 32x32) does: bf16 runs about 60x slower there
    frames, size = (9, 64) if bf16_kernels else (5, 32)
    x = (torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(4)) * 2 - 1).to(
        torch.bfloat16
    )
    with ConvLayouts() as spy:
        out, grads = forward_backward(model, x)
    assert out.recon.is_contiguous() and out.recon.dtype == torch.bfloat16
    assert all(torch.isfinite(g).all() for g in grads.values())
    if not bf16_kernels:
        assert spy.calls and all(key[3] in (False, (False, False)) for key in spy.calls)
        return
    big = {key: n for key, n in spy.calls.items() if key[1] >= layers.CHANNELS_LAST_MIN_PIXELS}
    small = {key: n for key, n in spy.calls.items() if key[1] < layers.CHANNELS_LAST_MIN_PIXELS}
    # conv_out (32 -> 3 channels, the reconstruction) is the one plain conv at full resolution
    conv_out = model.decoder.conv_out.conv.weight.shape[1]
    plain_big = {key for key in big if key[3] in (False, (False, False))}
    assert plain_big == {
        ("forward", 64 * 64, conv_out, False),
        ("backward", 64 * 64, conv_out, (False, False)),
    }
    assert big[("forward", 64 * 64, conv_out, False)] == 1
    # every other conv there has channels-last inputs and, in the backward, channels-last gradients
    assert sum(n for key, n in big.items() if key[3] in (True, (True, True))) > 20
    assert set(big) - plain_big <= {key for key in big if key[3] in (True, (True, True))}
    assert small and all(key[3] in (False, (False, False)) for key in small)


def test_channels_last_changes_nothing_but_the_layout(monkeypatch) -> None:
    # The layout plumbing (per-block conversions, the channels-last group and spatial norms, the temporal
    # pooling, gradients converted back) checked in float32, where it can be held to tight tolerances:
    # every level of a 2-chunk clip runs channels-last against the plain contiguous model. Measured: outputs
    # 2.9e-6 and gradients 6.0e-6 apart (norm-wise; float32 convs and norms in another order), asserted at
    # 1e-5 and 1e-4.
    torch.manual_seed(0)
    model = build_autoencoder("tiny", gradient_checkpointing=True).train()
    x = torch.rand(1, 3, 17, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    plain_out, plain_grads = forward_backward(model, x)

    def prefers(t: torch.Tensor) -> bool:
        return t.dim() == 5 and t.shape[1] > 1 and t.shape[3] * t.shape[4] > 1

    monkeypatch.setattr(layers, "prefers_channels_last", prefers)
    with ConvLayouts() as spy:
        out, grads = forward_backward(model, x)
    layouts = collections.Counter(key[3] for key in spy.calls.elements())
    assert layouts[True] + layouts[(True, True)] > 40  # the conversions happened
    assert out.recon.is_contiguous()
    for name in ("recon", "mean", "logvar"):
        actual, expected = getattr(out, name), getattr(plain_out, name)
        assert norm_error(actual, expected) < 1e-5, name
    worst = max(grads, key=lambda name: norm_error(grads[name], plain_grads[name]))
    assert norm_error(grads[worst], plain_grads[worst]) < 1e-4, worst
