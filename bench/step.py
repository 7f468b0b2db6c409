"""One full adversarial training step: the project's against a plain reference built from diffusers.

    python bench/step.py --widths 64,128,128,256 --frames 9 --size 64 --dtype fp32

Both steps train the `cogvideox` architecture (layers_per_block 3, 32 groups, 16 latent channels) at the
given widths, with the recipe's objective (configs/cogvideo_vae.json, disc_start 0): L1 + LPIPS (random
weights, no download) on one sampled frame + KL + adaptive-weighted hinge loss of a 3D discriminator
(the recipe's `default` size), AdamW with gradient clipping for both networks, the discriminator's hinge
loss on the real clip and the detached reconstruction.

- project: trainer/step.py's `AdversarialStep` over the two DeepSpeed engines that trainer/engines.py
  builds, in one process (gloo, world size 1), ZeRO stage `--zero-stage`.
- reference: diffusers' `AutoencoderKLCogVideoX` with the same weights and the same discriminator, the
  loss written the usual way (`torch.autograd.grad` of nll and of the generator loss w.r.t. the decoder's
  last weight with retain_graph, then one backward of the total), D frozen during the generator step as
  Lightning's optimizer toggling does. `--dtype bf16` runs it under bf16 autocast, the project in
  DeepSpeed's bf16 mode.

The two run interleaved (warm-up, then `--repeats` rounds alternating which goes first) and the medians
are compared. FLOPs come from torch.utils.flop_counter's formulas over one step each; the ceiling is a conv3d
forward+backward of the model's dominant shape (widths[0] channels, 3x3x3, the clip's frames plus the
causal padding, full resolution) timed alone between the rounds, with contiguous and with channels-last
tensors: the faster of the two is the ceiling (bf16 on a CPU runs about 2x faster channels-last). Peak
memory: max_memory_allocated on CUDA; on CPU the peak resident set size during the step above the level
just before it (sampled every 2 ms by a thread, in an extra untimed step per side). The next-to-last line counts the steps with non-finite
gradients or losses (the project's skipped updates, the reference's non-finite losses): a timing with any
is not a measurement. The last line reads `speedup=<project/reference clips/s> ceiling=<achieved/ceiling>`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, without its probing warning

RECIPE = REPO / "configs" / "cogvideo_vae.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ReferenceStep:
    """The training step written the usual way, for any CogVideoX-style VAE with diffusers' interface
    (`encode(x).latent_dist`, `decode(z).sample`) and a discriminator returning logits."""

    def __init__(
        self,
        vae: nn.Module,
        discriminator: nn.Module,
        lpips: nn.Module,
        last_layer: nn.Parameter,
        *,
        perceptual_weight: float = 1.0,
        perceptual_frames: int = 1,
        kl_weight: float = 1e-6,
        adversarial_weight: float = 0.1,
        adaptive_eps: float = 1e-4,
        adaptive_max: float = 1e4,
        grad_clip: float = 1.0,
        g_optimizer: dict | None = None,
        d_optimizer: dict | None = None,
        autocast_dtype: torch.dtype | None = None,
        sample_posterior: bool = True,
    ) -> None:
        self.vae, self.discriminator, self.lpips, self.last_layer = vae, discriminator, lpips, last_layer
        self.perceptual_weight, self.perceptual_frames = perceptual_weight, perceptual_frames
        self.kl_weight, self.adversarial_weight = kl_weight, adversarial_weight
        self.adaptive_eps, self.adaptive_max, self.grad_clip = adaptive_eps, adaptive_max, grad_clip
        self.g_optimizer = torch.optim.AdamW(vae.parameters(), **(g_optimizer or {}))
        self.d_optimizer = torch.optim.AdamW(discriminator.parameters(), **(d_optimizer or {}))
        self.autocast_dtype = autocast_dtype
        self.sample_posterior = sample_posterior

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def generator_losses(self, video: torch.Tensor):
        """(recon, nll, kl, g_loss): the autoencoder forward and the generator's terms, D frozen."""
        with self._autocast(video.device):
            posterior = self.vae.encode(video).latent_dist
            z = posterior.sample() if self.sample_posterior else posterior.mode()
            recon = self.vae.decode(z).sample
        rec = (video.float() - recon.float()).abs().mean()
        batch, _, frames = video.shape[:3]
        k = frames if self.perceptual_frames == 0 else min(self.perceptual_frames, frames)
        picked = torch.rand(batch, frames, device=video.device).argsort(dim=1)[:, :k]
        real = torch.cat([video[b, :, picked[b]].transpose(0, 1) for b in range(batch)]).float()
        fake = torch.cat([recon[b, :, picked[b]].transpose(0, 1) for b in range(batch)]).float()
        nll = rec + self.perceptual_weight * self.lpips(real, fake).mean()
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1).mean()
        with self._autocast(video.device):
            logits_fake = self.discriminator(recon)
        g_loss = -logits_fake.float().mean()
        return recon, nll, kl, g_loss

    def generator_backward(self, video: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Losses, the adaptive weight, and the autoencoder's gradients in `.grad`; returns the recon."""
        self.discriminator.requires_grad_(False)  # as Lightning's optimizer toggling does
        try:
            recon, nll, kl, g_loss = self.generator_losses(video)
            (nll_grad,) = torch.autograd.grad(nll, self.last_layer, retain_graph=True)
            (g_grad,) = torch.autograd.grad(g_loss, self.last_layer, retain_graph=True)
            d_weight = (nll_grad.float().norm() / (g_grad.float().norm() + self.adaptive_eps)).clamp(
                0.0, self.adaptive_max
            )
            d_weight = d_weight.detach()
            # kl_weight relative to the reconstruction summed per clip (LDM's meaning; `rec` is a mean)
            kl_term = self.kl_weight * kl / video[0].numel()
            loss = nll + kl_term + self.adversarial_weight * d_weight * g_loss
            loss.backward()
        finally:
            self.discriminator.requires_grad_(True)
        metrics = {"nll": nll, "kl": kl, "g_loss": g_loss, "d_weight": d_weight, "total": loss}
        return recon.detach(), {name: value.detach() for name, value in metrics.items()}

    def discriminator_backward(self, video: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """The hinge loss on D(real) and D(recon), and D's gradients in `.grad`."""
        with self._autocast(video.device):
            logits_real = self.discriminator(video)
            logits_fake = self.discriminator(recon.detach())
        d_loss = 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())
        d_loss.backward()
        return d_loss.detach()

    def step(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        self.g_optimizer.zero_grad(set_to_none=True)
        recon, metrics = self.generator_backward(video)
        nn.utils.clip_grad_norm_(self.vae.parameters(), self.grad_clip)
        self.g_optimizer.step()

        self.d_optimizer.zero_grad(set_to_none=True)
        metrics["d_loss"] = self.discriminator_backward(video, recon)
        nn.utils.clip_grad_norm_(self.discriminator.parameters(), self.grad_clip)
        self.d_optimizer.step()
        return metrics


class PeakMemory:
    """Peak memory of the code inside the block above the level at its start (bytes)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = _rss()
        self._max = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self._max = max(self._max, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, _rss()) - self._base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process's threads) of one call."""
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory (bytes) of one call above the level before it; an untimed call, since the CPU sampling
    thread takes a core from the step's threads."""
    with PeakMemory(device) as memory:
        fn()
    return memory.peak


class _FlopCount(TorchDispatchMode):
    """torch.utils.flop_counter's per-op formulas without FlopCounterMode's module tracking, whose
    backward hooks refuse `torch.autograd.grad` with respect to a leaf (what the project's step takes)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], object], dtype: torch.dtype = torch.float32) -> int:
    # fp32: oneDNN off while counting, so that models.layers.conv3d takes no two-group detour, whose
    # grouped-conv backward torch's formulas count 4/3 too high (the arithmetic is the same convolution's).
    # Other dtypes take no detour, and with oneDNN off a CPU bf16 conv runs ~40x slower (native kernels).
    with _FlopCount() as counter, torch.backends.mkldnn.flags(enabled=dtype != torch.float32):
        fn()
    return counter.total


CEILING_LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last_3d}


def conv_ceiling(
    channels: int,
    frames: int,
    size: int,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
):
    """A callable running one 3x3x3 conv3d forward+backward of the given shape and memory layout (input
    and output gradient), and its FLOPs."""
    conv = nn.Conv3d(channels, channels, 3, padding=(0, 1, 1)).to(device, dtype)
    x = torch.randn(batch, channels, frames + 2, size, size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=memory_format).requires_grad_()

    def run() -> None:
        y = conv(x)
        y.backward(torch.ones_like(y))
        conv.zero_grad(set_to_none=True)
        x.grad = None

    return run, count_flops(run, dtype)


class StepHealth:
    """How many steps of each side ran with non-finite gradients or losses: the project's updates that
    `AdversarialStep` skipped (generator, discriminator), the reference's steps with a non-finite loss.
    A timing is only a measurement when these are zero (a skipped update is cheaper than an applied one)."""

    def __init__(self) -> None:
        self.steps = {"project": 0, "reference": 0}
        self.bad = {"project": [0, 0], "reference": [0, 0]}

    def count(self, side: str, generator_ok: bool | None, discriminator_ok: bool | None) -> None:
        self.steps[side] += 1
        for index, ok in enumerate((generator_ok, discriminator_ok)):
            self.bad[side][index] += ok is False

    def report(self) -> str:
        project, reference = self.bad["project"], self.bad["reference"]
        return (
            f"non-finite: project skipped {project[0]} generator and {project[1]} discriminator updates "
            f"of {self.steps['project']} steps, reference {reference[0]} non-finite steps of "
            f"{self.steps['reference']}"
        )

    def clean(self) -> bool:
        return not any(self.bad["project"]) and not any(self.bad["reference"])


def build(args: argparse.Namespace, device: torch.device):
    """(project step callable, reference step callable, autoencoder config, StepHealth of both)."""
    from diffusers import AutoencoderKLCogVideoX

    from models import build_autoencoder
    from models.convert import diffusers_config
    from models.discriminator import Discriminator3D
    from trainer.build import build_loss
    from trainer.config import load_config
    from trainer.distributed import init_distributed
    from trainer.engines import build_engines, compile_autoencoder
    from trainer.step import AdversarialStep

    overrides = [
        "loss.disc_start=0",
        "loss.lpips.pretrained=false",
        f"deepspeed.bf16={'true' if args.dtype == 'bf16' else 'false'}",
        f"deepspeed.zero_stage={args.zero_stage}",
        f"data.batch_size={args.batch}",
        "model.gradient_checkpointing=false",
        "discriminator.gradient_checkpointing=false",
    ]
    config = load_config(RECIPE, overrides)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    widths = tuple(int(w) for w in args.widths.split(","))
    autoencoder = build_autoencoder("cogvideox", block_out_channels=widths, gradient_checkpointing=False)
    if args.compile:
        compile_autoencoder(autoencoder)  # as train.compile does; the weights are unchanged
    discriminator = config.discriminator.build()
    loss = build_loss(
        config.loss, discriminator.output_weights(config.loss.multiscale_adversarial_loss_weight)
    )
    (member,) = discriminator.members.values()

    # the reference: diffusers' VAE and a plain Discriminator3D with the same weights, in fp32 (autocast)
    vae = AutoencoderKLCogVideoX.from_config(diffusers_config(autoencoder.config))
    vae.load_state_dict(autoencoder.state_dict(), strict=True)
    ref_d = Discriminator3D(**_discriminator_arguments(member))
    ref_d.load_state_dict(member.state_dict(), strict=True)
    vae, ref_d = vae.to(device).train(), ref_d.to(device).train()
    g_opt, d_opt = config.optim.generator, config.optim.discriminator
    reference = ReferenceStep(
        vae,
        ref_d,
        loss.lpips.to(device),
        vae.decoder.conv_out.conv.weight,
        perceptual_weight=config.loss.perceptual_weight,
        perceptual_frames=config.loss.perceptual_frames,
        kl_weight=config.loss.kl_weight,
        adversarial_weight=config.loss.adversarial_loss_weight,
        adaptive_eps=config.loss.adaptive_weight_eps,
        adaptive_max=config.loss.adaptive_weight_max,
        grad_clip=g_opt.grad_clip,
        g_optimizer={"lr": g_opt.lr, "betas": g_opt.betas, "weight_decay": g_opt.weight_decay},
        d_optimizer={"lr": d_opt.lr, "betas": d_opt.betas, "weight_decay": d_opt.weight_decay},
        autocast_dtype=DTYPES[args.dtype] if args.dtype != "fp32" else None,
    )

    g_engine, d_engine = build_engines(autoencoder.train(), discriminator.train(), config, device)
    loss = loss.to(device)
    adversarial = AdversarialStep(g_engine, d_engine, loss)

    def project_step() -> None:
        _, recon = adversarial.generator_step(video, global_step=0)
        adversarial.discriminator_step(video, recon, global_step=0)
        health.count("project", adversarial.generator_applied, adversarial.discriminator_applied)

    health = StepHealth()
    generator = torch.Generator(device="cpu").manual_seed(1)
    video = (torch.rand(args.batch, 3, args.frames, args.size, args.size, generator=generator) * 2 - 1).to(
        device
    )

    def reference_step() -> None:
        metrics = reference.step(video)
        finite = all(bool(torch.isfinite(value).all()) for value in metrics.values())
        health.count("reference", finite, finite)

    return project_step, reference_step, autoencoder.config, health


def _discriminator_arguments(member: nn.Module) -> dict:
    widths = [member.stem.out_channels] + [block.conv1.out_channels for block in member.blocks]
    return {
        "in_channels": member.stem.in_channels,
        "base_channels": widths[0],
        "channel_multipliers": [w // widths[0] for w in widths],
        "num_groups": member.head_norm.num_groups,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--widths", default="64,128,128,256", help="block_out_channels of the cogvideox architecture"
    )
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    parser.add_argument(
        "--compile", action="store_true", help="the project's autoencoder as train.compile runs it"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as init_distributed sets)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--profile", choices=("project", "reference"), help="print a torch.profiler table and exit"
    )
    args = parser.parse_args(argv)
    from models.layers import cpu_has_bf16_kernels

    device = torch.device(args.device)
    if device.type == "cpu" and args.dtype == "bf16":
        if not cpu_has_bf16_kernels():
            parser.error(
                "--dtype bf16: this CPU has no oneDNN bf16 kernels (they need AVX-512 or AMX), so bf16 "
                "convolutions would run on torch's reference kernels, about 60x slower than fp32: one step "
                "would take many minutes and measure those kernels, not the step. Use --dtype fp32 here."
            )
        print(
            "note: on some CPUs (seen on AMD Zen 4, not on Intel AMX) oneDNN's bf16 conv3d backward gives "
            "non-finite weight gradients for small inputs (torch 2.13); the last lines count such steps",
            file=sys.stderr,
        )

    project_step, reference_step, config, health = build(args, device)
    dtype = DTYPES[args.dtype]
    ceilings = {
        layout: conv_ceiling(
            config.block_out_channels[0], args.frames, args.size, args.batch, dtype, device, memory_format
        )
        for layout, memory_format in CEILING_LAYOUTS.items()
    }
    ceiling_flops = ceilings["contiguous"][1]
    steps = {"project": project_step, "reference": reference_step}
    for fn in (*steps.values(), *(run for run, _ in ceilings.values())):  # warm-up (oneDNN, allocator, ...)
        fn()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            steps[args.profile]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        return
    flops = {name: count_flops(fn, dtype) for name, fn in steps.items()}

    peaks = {name: peak_memory(fn, device) for name, fn in steps.items()}

    times: dict[str, list[float]] = {name: [] for name in ("project", "reference", *ceilings)}
    cpu_times: dict[str, list[float]] = {name: [] for name in times}
    for round_index in range(args.repeats):
        order = ("project", "reference") if round_index % 2 == 0 else ("reference", "project")
        for name in order:
            wall, cpu = timed(steps[name], device)
            times[name].append(wall)
            cpu_times[name].append(cpu)
        for layout, (ceiling_run, _) in ceilings.items():
            wall, cpu = min(timed(ceiling_run, device) for _ in range(2))
            times[layout].append(wall)
            cpu_times[layout].append(cpu)

    median = {name: statistics.median(values) for name, values in times.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu_times.items()}
    # the ceiling: the faster layout's conv
    best = min(ceilings, key=lambda layout: median[layout])
    median["ceiling"], median_cpu["ceiling"] = median[best], median_cpu[best]
    ceiling = ceiling_flops / median["ceiling"]
    other = next(layout for layout in ceilings if layout != best)
    widths = ",".join(map(str, config.block_out_channels))
    print(
        f"cogvideox architecture, widths ({widths}), {args.batch}x3x{args.frames}x{args.size}x{args.size}, "
        f"{args.dtype} on {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"ZeRO {args.zero_stage}, {args.repeats} interleaved rounds"
    )
    if device.type == "cpu":
        print(
            f"CPU: {torch.backends.cpu.get_cpu_capability()} vector kernels, oneDNN bf16 kernels "
            f"{'yes' if cpu_has_bf16_kernels() else 'no'}"
        )
    print(
        f"conv3d ceiling: {config.block_out_channels[0]}->{config.block_out_channels[0]} ch 3x3x3 on "
        f"{args.frames + 2}x{args.size}x{args.size}, fwd+bwd {ceiling / 1e9:.1f} GFLOP/s {best} "
        f"(median {median['ceiling']:.3f} s, CPU {median_cpu['ceiling']:.3f} s; "
        f"{other} {ceiling_flops / median[other] / 1e9:.1f} GFLOP/s)"
    )
    for name in ("project", "reference"):
        achieved = flops[name] / median[name]
        print(
            f"{name:>9}: {args.batch / median[name]:.4f} clips/s, step median {median[name]:.2f} s "
            f"[{', '.join(f'{t:.2f}' for t in times[name])}] (CPU {median_cpu[name]:.2f} s), "
            f"{flops[name] / 1e9:.1f} GFLOP/step, "
            f"{achieved / 1e9:.1f} GFLOP/s = {achieved / ceiling:.1%} of ceiling, "
            f"peak {'RSS' if device.type == 'cpu' else 'allocated'} +{peaks[name] / 2**20:.0f} MiB"
        )
    speedup = median["reference"] / median["project"]
    print(
        f"reference FLOPs at the project's time: {flops['reference'] / median['project'] / 1e9:.1f} GFLOP/s "
        f"= {flops['reference'] / median['project'] / ceiling:.1%} of ceiling"
    )
    print(
        f"by CPU time (less sensitive to other processes on the machine): speedup "
        f"{median_cpu['reference'] / median_cpu['project']:.3f}, project at "
        f"{flops['project'] / median_cpu['project'] / (ceiling_flops / median_cpu['ceiling']):.1%} of the ceiling"
    )
    print(health.report() + ("" if health.clean() else ": these timings are not a measurement"))
    print(f"speedup={speedup:.3f} ceiling={flops['project'] / median['project'] / ceiling:.3f}")


if __name__ == "__main__":
    main()
