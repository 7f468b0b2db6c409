"""bench/step.py's own bookkeeping: the FLOP count it divides by, its tally of non-finite steps, and what it
refuses to time."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import models.layers
from bench.step import CEILING_LAYOUTS, StepHealth, conv_ceiling, count_flops, main


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_count_flops_conv3d_forward_backward(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 8, 5, 6, 6, dtype=dtype, requires_grad=True)
    weight = torch.randn(8, 8, 3, 3, 3, dtype=dtype, requires_grad=True)
    onednn_enabled = []

    def step() -> None:
        onednn_enabled.append(torch.backends.mkldnn.enabled)
        F.conv3d(x, weight, padding=(0, 1, 1)).sum().backward()

    # forward: 2 * Cout * Cin * 27 per output element (3 x 6 x 6 of them); backward: twice that (input and
    # weight gradients)
    forward = 2 * 8 * 8 * 27 * 3 * 6 * 6
    assert count_flops(step, dtype) == 3 * forward
    # fp32 counts with oneDNN off (no two-group detour to miscount); bf16 keeps it, since CPU bf16 convs
    # without oneDNN run ~40x slower and the bf16 benchmark never got past its count
    assert onednn_enabled == [dtype != torch.float32]
    assert torch.backends.mkldnn.enabled  # restored


def test_step_health_counts_skipped_updates() -> None:
    health = StepHealth()
    health.count("project", True, True)
    assert health.clean()
    health.count("project", True, False)  # discriminator update skipped
    health.count("project", None, True)  # between accumulation boundaries: not a skip
    health.count("reference", False, False)
    assert not health.clean()
    assert health.steps == {"project": 3, "reference": 1}
    assert health.bad == {"project": [0, 1], "reference": [1, 1]}
    assert "project skipped 0 generator and 1 discriminator updates of 3 steps" in health.report()
    assert "reference 1 non-finite steps of 1" in health.report()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_ceiling_runs_in_both_layouts_with_the_same_flops(dtype: torch.dtype) -> None:
    # the ceiling is the faster of the two layouts' convs (bf16 on a CPU: channels-last, about 2x)
    class ConvInputs(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.inputs: list[torch.Tensor] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                self.inputs.append(args[0])
            return func(*args, **(kwargs or {}))

    for memory_format in CEILING_LAYOUTS.values():
        run, flops = conv_ceiling(8, 3, 6, 1, dtype, torch.device("cpu"), memory_format)
        assert flops == 3 * 2 * 8 * 8 * 27 * 3 * 6 * 6
        with ConvInputs() as spy:
            run()
        (x,) = spy.inputs
        assert x.shape == (1, 8, 5, 6, 6) and x.is_contiguous(memory_format=memory_format)


def test_bf16_is_refused_on_a_cpu_without_bf16_kernels(monkeypatch, capsys) -> None:
    # there bf16 convs run on torch's reference kernels (~60x slower than fp32): minutes per step, no figure
    monkeypatch.setattr(models.layers, "cpu_has_bf16_kernels", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--dtype", "bf16", "--device", "cpu"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--dtype bf16: this CPU has no oneDNN bf16 kernels" in error and "Use --dtype fp32 here" in error
