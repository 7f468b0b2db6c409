"""bf16 at ZeRO-0: the engines' list-wise optimizer step (trainer.engines.use_foreach_bf16_step) against
DeepSpeed's own `FP16_UnfusedOptimizer.step`, on one real rank.

Tolerances, measured here: without clipping, and around a skipped step, the weights and float32 master
weights are bit-equal. The gradient norm DeepSpeed reports differs by up to 1.8e-8 (relative): DeepSpeed
sums the squared per-parameter norms in float32, the list-wise step in float64. Where the gradient is
clipped, that moves the clip factor, and the weights after three clipped steps agree to 9.2e-8 of each
tensor's largest entry. Asserted at 1e-6 both.

Three cases, each run twice from the same weights and inputs (once with the list-wise step build_engine
installs, once with DeepSpeed's): three steps without clipping, three with the gradient clipped on every
step, and a step whose gradient holds a NaN. A parameter the loss does not reach checks DeepSpeed's rule
that it steps with a zero gradient (weight decay still moves it)."""

from pathlib import Path

import torch

from distributed_utils import run_ranks
from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.engines import build_engine

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 1)
        self.unused = torch.nn.Linear(4, 4)  # no gradient ever reaches it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3, 4)))


def _run(dist_info, grad_clip: float, foreach: bool, nan_step: int | None) -> dict:
    config = load_config(
        TINY,
        [
            "deepspeed.bf16=true",
            "deepspeed.zero_stage=0",
            f"optim.generator.grad_clip={grad_clip}",
            "optim.generator.weight_decay=0.1",
        ],
    )
    torch.manual_seed(0)
    module = _Net()
    unused_before = module.unused.weight.detach().to(torch.bfloat16).float().clone()  # what DS starts from
    engine = build_engine(module, config.optim.generator, config, dist_info.device, total_steps=10)
    replaced = "step" in vars(engine.optimizer)
    if not foreach:
        del engine.optimizer.step  # DeepSpeed's own method again
    x = torch.randn(2, 3, 4, 6, 6, generator=torch.Generator().manual_seed(1)).to(dist_info.device)
    applied, norms, buffers = [], [], []
    for step in range(3):
        engine.backward(engine(x.to(torch.bfloat16)).float().square().mean())
        if step == nan_step:
            engine.module.conv.weight.grad[0, 0, 0, 0, 0] = float("nan")
        engine.step()
        applied.append(engine.was_step_applied())
        norms.append(engine.optimizer._global_grad_norm)
        kept = getattr(engine.optimizer, "_float32_gradient_buffers", None)
        buffers.append(None if kept is None else [b.data_ptr() for b in kept])
    grads_left = [p.grad is not None for p in engine.module.parameters()]
    low = [p for group in engine.optimizer.fp16_groups for p in group]
    master = [p.detach().cpu().clone() for group in engine.optimizer.fp32_groups for p in group]
    # the unused weight's float32 master copy: weight decay of lr x 0.1 is below the bf16 weight's resolution
    unused_master = master[next(i for i, p in enumerate(low) if p is engine.module.unused.weight)]
    return {
        "replaced": replaced,
        "weights": [p.detach().float().cpu().clone() for p in engine.module.parameters()],
        "master": master,
        "applied": applied,
        "norms": norms,
        "grads_left": grads_left,
        "buffers": buffers,
        "unused_moved": not torch.equal(unused_master, unused_before),
    }


def _worker(rank: int, world_size: int) -> dict:
    dist_info = init_distributed()
    cases = {"no_clip": (100.0, None), "clip": (1e-3, None), "nan": (100.0, 1)}
    return {
        name: {foreach: _run(dist_info, clip, foreach, nan_step) for foreach in (True, False)}
        for name, (clip, nan_step) in cases.items()
    }


def test_foreach_bf16_step_matches_deepspeed_step(tmp_path):
    (results,) = run_ranks(_worker, tmp_path, world_size=1)
    for name, runs in results.items():
        ours, theirs = runs[True], runs[False]
        assert ours["replaced"] and theirs["replaced"], name  # build_engine installed it both times
        assert ours["applied"] == theirs["applied"], name
        for mine, ds in zip(
            ours["weights"] + ours["master"], theirs["weights"] + theirs["master"], strict=True
        ):
            if name == "clip":
                # the clip factor divides by the norm, which DeepSpeed sums in float32 and we in float64
                assert (mine - ds).abs().max() <= 1e-6 * ds.abs().max(), name
            else:
                assert torch.equal(mine, ds), name
        for mine, ds in zip(ours["norms"], theirs["norms"], strict=True):
            assert mine == ds or abs(mine - ds) <= 1e-6 * abs(ds), (name, ours["norms"], theirs["norms"])
        assert ours["grads_left"] == theirs["grads_left"] == [False] * len(ours["grads_left"]), name
    assert results["no_clip"][True]["applied"] == [True, True, True]
    assert results["nan"][True]["applied"] == [True, False, True]
    # clipping really acted: a norm above the 1e-3 threshold on every step
    assert all(norm > 1e-3 for norm in results["clip"][True]["norms"])
    # the list-wise step casts the gradients into the same float32 buffers at every step (no fresh memory)
    kept = results["no_clip"][True]["buffers"]
    assert kept[0] is not None and kept[0] == kept[1] == kept[2]
    # the unused parameter moved (weight decay on a zero gradient), under both steps
    assert results["no_clip"][True]["unused_moved"] and results["no_clip"][False]["unused_moved"]
