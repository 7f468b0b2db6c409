"""A NaN step at ZeRO-0 fp32 is skipped as DeepSpeed skips one at ZeRO-2, on 2 real CPU ranks (gloo).

ZeRO-0 in fp32 is the one configuration where DeepSpeed's engine steps the torch optimizer itself, with no
overflow check: trainer/step.py skips the update there. Before the fix it dropped the gradients and then
called engine.step(), which clips them first and failed with IndexError on every rank (grad_clip > 0, the
default); without clipping it went on, but the skipped step advanced the learning-rate schedule.

Both engines of the adversarial step, at ZeRO-0 with clipping on and off and at ZeRO-2 (the reference);
rank 1's clip is NaN at step 1 of 3. Asserted: no exception; step 1 reported not applied on both ranks,
for both engines; no weight moved by it, the gradients cleared after it (ZeRO-0); the learning rate of
every later step as if step 1 had not happened (a warm-up makes each step's rate different), as ZeRO-2's;
the engines' step counters as ZeRO-2's; step 2 applied.
"""

from pathlib import Path

import pytest
import torch

from distributed_utils import run_ranks
from models import build_autoencoder
from trainer.build import build_loss
from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.engines import build_engines
from trainer.step import AdversarialStep

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

STEPS, NAN_STEP, NAN_RANK, WARMUP = 3, 1, 1, 8
# (ZeRO stage, grad_clip): ZeRO-2 skips the same way with clipping on or off (it checks the norm either
# way), so one ZeRO-2 run is the reference for both ZeRO-0 runs.
REFERENCE = (2, 1.0)
CASES = [(0, 1.0), (0, 0.0), REFERENCE]


def _weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def _nan_worker(rank: int, world_size: int) -> dict[tuple[int, float], dict]:
    dist_info = init_distributed()
    # (STEPS x world_size, 3, 5, 16, 16) in [-1, 1], the same in every process
    videos = torch.rand(STEPS * world_size, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    results = {}
    for stage, clip in CASES:
        config = load_config(
            TINY,
            [
                "deepspeed.bf16=false",
                f"deepspeed.zero_stage={stage}",
                "data.batch_size=1",
                "loss.disc_start=0",  # both engines step from step 0
                "loss.perceptual_weight=0",  # time; LPIPS does not meet the engines
                "discriminator.gradient_checkpointing=false",
                *(
                    f"optim.{name}.{key}"
                    for name in ("generator", "discriminator")
                    for key in (f"grad_clip={clip}", f"warmup_steps={WARMUP}")
                ),
            ],
        )
        torch.manual_seed(0)
        autoencoder, discriminator = build_autoencoder("tiny"), config.discriminator.build()
        loss = build_loss(config.loss, discriminator.output_weights(1.0))
        engines = build_engines(autoencoder, discriminator, config, dist_info.device)
        step = AdversarialStep(*engines, loss)
        record = {"lr": [], "applied": [], "moved": [], "grads_left": []}
        for global_step in range(STEPS):
            video = videos[global_step * world_size + rank][None]
            if global_step == NAN_STEP and rank == NAN_RANK:
                video = torch.full_like(video, float("nan"))
            record["lr"].append([engine.get_lr()[0] for engine in engines])
            before = [_weights(engine) for engine in engines]
            _, recon = step.generator_step(video, global_step)
            step.discriminator_step(video, recon, global_step)
            record["applied"].append((step.generator_applied, step.discriminator_applied))
            record["moved"].append(
                [
                    any(not torch.equal(b, a) for b, a in zip(old, _weights(engine), strict=True))
                    for old, engine in zip(before, engines, strict=True)
                ]
            )
            record["grads_left"].append(
                any(p.grad is not None for engine in engines for p in engine.module.parameters())
            )
        record["counters"] = [(e.global_steps, e.global_samples, e.skipped_steps) for e in engines]
        step.last_layer.remove()
        results[stage, clip] = record
    return results


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return run_ranks(_nan_worker, tmp_path_factory.mktemp("nan_ranks"))


@pytest.mark.parametrize("clip", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_nan_step_at_zero_0_fp32_is_skipped_like_zero_2(rank_results, clip):
    applied = [True] * STEPS
    applied[NAN_STEP] = False
    # the warm-up's rate at each step: (optimizer steps applied so far + 1) / WARMUP of the base rate
    multipliers = [(sum(applied[:index]) + 1) / WARMUP for index in range(STEPS)]
    for rank, results in enumerate(rank_results):
        zero_0, zero_2 = results[0, clip], results[REFERENCE]
        for record in (zero_0, zero_2):
            assert record["applied"] == [(a, a) for a in applied], (rank, clip, record["applied"])
            assert record["moved"] == [[a, a] for a in applied], (rank, clip, record["moved"])
        assert not any(zero_0["grads_left"]), (rank, clip, zero_0["grads_left"])
        base = [lr / multipliers[0] for lr in zero_0["lr"][0]]
        for lrs, multiplier in zip(zero_0["lr"], multipliers, strict=True):
            assert lrs == pytest.approx([b * multiplier for b in base], rel=1e-12), (rank, clip, zero_0["lr"])
        assert zero_0["lr"] == zero_2["lr"], (rank, clip)
        # DeepSpeed counts a skipped step in skipped_steps and still in global_steps and global_samples
        assert zero_2["counters"] == [(STEPS, STEPS * 2, 1)] * 2, (rank, clip)
        assert zero_0["counters"] == zero_2["counters"], (rank, clip)
