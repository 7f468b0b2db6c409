"""bf16 on a CPU device: the probe for oneDNN's bf16 kernels (models/layers.py) and the start-up warning built
on it.

Without those kernels (CPUs without AVX-512 or AMX) torch runs bf16 convolutions on its reference kernels,
about 60x slower than fp32, so the trainer says so and bench/step.py refuses to time bf16 there."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import trainer.distributed
from models.layers import cpu_has_bf16_kernels
from trainer.distributed import cpu_bf16_warning


def test_the_probe_agrees_with_the_kernel_torch_picks_for_a_bf16_conv3d() -> None:
    x = torch.randn(1, 8, 5, 16, 16, dtype=torch.bfloat16)
    conv = torch.nn.Conv3d(8, 8, 3, padding=1).to(torch.bfloat16)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        conv(x)
    kernels = {event.name for event in prof.events()}
    assert ("aten::mkldnn_convolution" in kernels) == cpu_has_bf16_kernels()
    if not cpu_has_bf16_kernels():
        assert "aten::slow_conv3d_forward" in kernels


@pytest.mark.parametrize("has_kernels", [True, False])
def test_the_warning_names_missing_kernels_only_when_they_are_missing(monkeypatch, has_kernels) -> None:
    monkeypatch.setattr(trainer.distributed, "cpu_has_bf16_kernels", lambda: has_kernels)
    warning = cpu_bf16_warning()
    assert warning.startswith("deepspeed.bf16=true on a CPU device")
    assert "Use deepspeed.bf16=false on CPU." in warning
    assert ("no oneDNN bf16 kernels" in warning) is not has_kernels
    assert ("about 60x slower than fp32" in warning) is not has_kernels
