"""train.compile: the autoencoder's forward compiled with torch.compile gives the same training step.

One adversarial step (tiny preset with gradient checkpointing as the recipe trains it, a 3D discriminator, the
adaptive weight, a sampled posterior) eager and with `compile_autoencoder`, from the same weights and RNG
state. Measured on an AMD Zen 4 CPU: losses within 6e-7 relative, autoencoder gradients within 1.6e-5 and
discriminator gradients within 7e-6 of each tensor's largest entry (inductor fuses and reorders float sums).
Asserted at 1e-5 (losses) and 1e-4 (gradients) against three eager steps, one of which must match: torch's two
CPU convolution back-ends, and float64. The discriminator's gradients are not smooth in the reconstruction
(leaky-ReLU kinks), so which kernels eager itself runs moves them more than compiling does on some CPUs. On an
Intel Xeon with AMX, eager with oneDNN and eager with torch's native kernels differ by 1.6e-4 in the adaptive
weight and 2e-2 in a discriminator bias gradient (oneDNN's is the one within 7e-6 of a float64 run); the
compiled step is within 1.5e-6 (losses) and 6.9e-6 (gradients) of the native-kernel eager step there. On a
2-core AMD EPYC with AVX2 only, both eager back-ends differ from the same step run in float64 by 1.6e-4 in the
adaptive weight, 1.2e-3 in the autoencoder's and 2e-2 in the discriminator's gradients, and the compiled step
is within 3.1e-7 (adaptive weight) and 6.6e-6 (gradients) of the float64 one: so the float64 step is a third
reference, and the compiled step must match one of the three within the tolerances. The posterior's noise is
torch's eager kernels in both (`fallback_random`): equal samples, not merely equal distributions.
"""

import copy
from pathlib import Path

import pytest
import torch
from local_engine import RecordingEngine, relative_error

from losses import VideoAutoencoderLoss
from models import build_autoencoder, build_discriminator_set
from trainer.config import ConfigError, load_config
from trainer.engines import compile_autoencoder
from trainer.step import AdversarialStep

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"

LOSS_TOLERANCE, GRAD_TOLERANCE = 1e-5, 1e-4


def _one_step(autoencoder, discriminator, video):
    loss = VideoAutoencoderLoss(perceptual_weight=0.0, disc_start=0)
    step = AdversarialStep(RecordingEngine(autoencoder), RecordingEngine(discriminator), loss)
    torch.manual_seed(1)  # the posterior sample
    metrics, recon = step.generator_step(video, global_step=0)
    d_metrics = step.discriminator_step(video, recon, global_step=0)
    return {**metrics, **d_metrics}, step.g_engine.grads, step.d_engine.grads


def _differences(eager, compiled) -> list[str]:
    """What differs between two steps beyond the tolerances (empty: the same step)."""
    (eager_metrics, eager_g, eager_d), (metrics, g_grads, d_grads) = eager, compiled
    assert eager_metrics.keys() == metrics.keys()
    assert g_grads.keys() == eager_g.keys() and d_grads.keys() == eager_d.keys()
    differences = [
        f"{name}: {metrics[name].item()} vs {expected.item()}"
        for name, expected in eager_metrics.items()
        if metrics[name].item() != pytest.approx(expected.item(), rel=LOSS_TOLERANCE, abs=1e-7)
    ]
    for grads, expected_grads in ((g_grads, eager_g), (d_grads, eager_d)):
        for name, expected in expected_grads.items():
            error = relative_error(grads[name], expected)
            if not error < GRAD_TOLERANCE:
                differences.append(f"{name}: gradient {error:.2e}")
    return differences


def test_compiled_autoencoder_gives_the_same_losses_and_gradients():
    torch.manual_seed(0)
    autoencoder = build_autoencoder("tiny", gradient_checkpointing=True)
    discriminator = build_discriminator_set([{"type": "3d", "size": "tiny"}], gradient_checkpointing=False)
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1

    # eager with each of torch's CPU convolution back-ends (oneDNN, and the native kernels it falls back to),
    # and eager in float64: the step itself, which float32 rounding of any kind only approaches
    eager = {}
    for onednn in (True, False):
        with torch.backends.mkldnn.flags(enabled=onednn):
            eager[onednn] = _one_step(copy.deepcopy(autoencoder), copy.deepcopy(discriminator), video)
    eager["float64"] = _one_step(
        copy.deepcopy(autoencoder).double(), copy.deepcopy(discriminator).double(), video.double()
    )
    compiled_model = copy.deepcopy(autoencoder)
    compile_autoencoder(compiled_model)
    compiled = _one_step(compiled_model, copy.deepcopy(discriminator), video)

    assert compiled_model._compiled_call_impl is not None  # the step really ran the compiled forward
    assert compiled_model.state_dict().keys() == autoencoder.state_dict().keys()
    assert eager[True][0]["adaptive_weight"] > 0 and eager[True][0]["kl"] > 0
    differences = {reference: _differences(expected, compiled) for reference, expected in eager.items()}
    assert any(not found for found in differences.values()), differences


def test_compile_with_zero_3_is_refused_at_load():
    assert load_config(TINY, ["train.compile=true"]).train.compile
    with pytest.raises(ConfigError, match=r"train\.compile=true .* not 3"):
        load_config(TINY, ["train.compile=true", "deepspeed.zero_stage=3"])
