"""Peak memory and step time of the 3D discriminators with and without activation checkpointing.

    python bench/discriminator_checkpointing.py --frames 17 --size 128

Each discriminator (default widths), setting and step pattern runs in its own process so that peak memory
(CPU: peak resident set size above the level after the model and inputs are built; CUDA:
torch.cuda.max_memory_allocated) is its own. Before that baseline every process, whatever its setting, runs
one tiny checkpointed forward and backward: the first one imports torch._dynamo (~75 MiB of RSS), which
would otherwise be charged to checkpointing. Two step patterns:

Discriminator step: forward of a batch of 2 (a real and a fake clip), hinge loss, backward; timed as the
median of the repeats after one warm-up. Here checkpointing saves little peak memory: the full-resolution
first block dominates, and its recomputation in the backward materialises the same tensors again.

Generator step, as in the trainer (trainer/step.py): the autoencoder's graph is still held while the
discriminator, frozen (parameters requires_grad False) but in train mode, runs on the reconstruction (a
batch of 1 that requires grad), and its activations stay alive until `torch.autograd.grad(adversarial,
recon)`. A `--held-gib` (2) fp32 tensor, filled so that it is resident, stands for that graph; it is built
before the baseline, so the reported peak is what the discriminator adds on top of it (building it also
lifts the current RSS above any earlier transient, so the ru_maxrss baseline is the current RSS; a gap is
printed when it is not). One forward, then `torch.autograd.grad(logits.mean(), clip)`. These processes run
with glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the RSS.

`held`: the discriminator's activation memory kept between its forward and backward, which is what
checkpointing saves in the generator step. Method: the generator-step forward runs under
`torch.autograd.graph.saved_tensors_hooks`, whose pack hook records the untyped storage of every tensor
autograd saves for backward by `data_ptr()` with its `nbytes()`, deduplicated across the forward (a saved
tensor stays alive until the backward, so no other saved storage can reuse its address), leaving out the
storages of the parameters and of the input clip, which are alive anyway. Why this counts exactly what
checkpointing keeps: torch 2.13's non-reentrant checkpoint saves each block's inputs (`_make_saved_tensor`)
before it pushes its own `_checkpoint_hook`, so those go through the user's pack hook; inside the block
its hook is the innermost one and the only one that runs, and it stores an empty `_Holder` in place of
each saved tensor; the recomputed tensors exist only during the backward. It is checked by measurement,
printed beside it: after the peak is read, a second, warm forward (its one-off allocations, kernel caches
and thread stacks, already made) under the same hooks, with `live` the growth of the current RSS
(/proc/self/statm; CUDA: torch.cuda.memory_allocated) over that forward and `freed` its drop when the
logits, and so the graph, are dropped: both equal `held` plus the logits, to within a fraction of a MiB,
with and without checkpointing.

fp32 on CPU (CPU bf16 conv3d backward is unreliable in torch 2.13), bf16 on CUDA. The last line per
discriminator reads `<name> memory_saving=<1 - on/off> held_saving=<1 - held on/off>
gstep_memory_saving=<1 - generator-step peak on/off> time_overhead=<on/off - 1>`, memory_saving and
time_overhead from the discriminator step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DISCRIMINATORS = ("Discriminator3D", "HybridDiscriminator3D", "CausalDiscriminator3D")


def measure(
    name: str, frames: int, size: int, checkpointing: bool, dtype_name: str, repeats: int, device: str
) -> dict[str, float | bool]:
    import torch
    import torch.nn.functional as F

    from models.discriminator import Discriminator3D
    from models.discriminator_video import CausalDiscriminator3D, HybridDiscriminator3D

    classes = {cls.__name__: cls for cls in (Discriminator3D, HybridDiscriminator3D, CausalDiscriminator3D)}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    model = classes[name](gradient_checkpointing=checkpointing).to(device, dtype).train()
    _import_checkpoint_machinery(device)
    real, fake = ((torch.rand(1, 3, frames, size, size, device=device) * 2 - 1).to(dtype) for _ in range(2))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        # (2, 3, T, H, W) -> logits; the real half first
        logits_real, logits_fake = model(torch.cat([real, fake])).float().chunk(2)
        loss = F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_mib": peak / 2**20, "step_s": statistics.median(times[1:]), "checkpointing": checkpointing}


def measure_generator_step(
    name: str, frames: int, size: int, checkpointing: bool, dtype_name: str, device: str, held_gib: float
) -> dict[str, float | bool]:
    import torch

    from models.discriminator import Discriminator3D
    from models.discriminator_video import CausalDiscriminator3D, HybridDiscriminator3D

    classes = {cls.__name__: cls for cls in (Discriminator3D, HybridDiscriminator3D, CausalDiscriminator3D)}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    # frozen as in the trainer's generator step, but in train mode (checkpointing is on only in training)
    model = (
        classes[name](gradient_checkpointing=checkpointing).to(device, dtype).train().requires_grad_(False)
    )
    _import_checkpoint_machinery(device)
    # the reconstruction: (1, 3, T, H, W), requires grad
    clip = (torch.rand(1, 3, frames, size, size, device=device) * 2 - 1).to(dtype).requires_grad_()
    # stands for the autoencoder's graph held during the generator step; filled, so resident
    held_graph = torch.ones(int(held_gib * 2**30) // 4, device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        baseline_gap = 0
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        baseline_gap = base - _current_rss()

    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()} | {
        clip.untyped_storage().data_ptr()
    }

    def held_by_autograd() -> tuple[torch.autograd.graph.saved_tensors_hooks, dict[int, int]]:
        """Hooks recording the storages autograd saves ({data_ptr: nbytes}, parameters and clip left out)."""
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in excluded:
                saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
            # detached (same storage): returning a saved output itself would tie it to its own grad_fn in a
            # reference cycle, and the graph would outlive the logits
            return tensor.detach()

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), saved

    def allocated() -> int:
        return torch.cuda.memory_allocated() if cuda else _current_rss()

    # the measured generator step
    hooks, saved = held_by_autograd()
    start = time.perf_counter()
    with hooks:
        logits = model(clip)
    (grad,) = torch.autograd.grad(logits.float().mean(), clip)
    if cuda:
        torch.cuda.synchronize()
    step = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    del logits, grad

    # Cross-check of `held`, after the peak was read: a second forward, now warm (the first one's one-off
    # allocations, such as kernel caches and thread stacks, are in place), and the memory that its graph
    # holds and gives back when dropped, without a backward.
    hooks, saved_again = held_by_autograd()
    before = allocated()
    with hooks:
        logits = model(clip)
    live = allocated() - before
    del logits
    freed = before + live - allocated()
    del held_graph
    return {
        "gstep_peak_mib": peak / 2**20,
        "held_mib": sum(saved.values()) / 2**20,
        "held_again_mib": sum(saved_again.values()) / 2**20,
        "live_mib": live / 2**20,
        "freed_mib": freed / 2**20,
        "gstep_s": step,
        "baseline_gap_mib": baseline_gap / 2**20,
        "checkpointing": checkpointing,
    }


def _import_checkpoint_machinery(device: str) -> None:
    """Run one tiny non-reentrant checkpoint forward and backward before the baseline, whatever the setting.

    The first checkpointed forward imports torch._dynamo (the checkpoint code touches its config and
    decorators), which adds about 75 MiB of RSS on CPU; left in the measured step, that would be charged to
    checkpointing as if it were activation memory.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    x = torch.ones(4, device=device, requires_grad=True)
    checkpoint(torch.sin, x, use_reentrant=False).sum().backward()


def _current_rss() -> int:
    """The current resident set size in bytes, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cuda = _cuda_available()
    parser.add_argument("--discriminators", nargs="+", choices=DISCRIMINATORS, default=list(DISCRIMINATORS))
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if cuda else "fp32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--held-gib", type=float, default=2.0, help="size of the stand-in for the autoencoder's held graph"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # "<name>:<on|off>:<dstep|gstep>"
    args = parser.parse_args()
    if args.child:
        name, mode, pattern = args.child.split(":")
        if pattern == "dstep":
            result = measure(
                name, args.frames, args.size, mode == "on", args.dtype, args.repeats, args.device
            )
        else:
            result = measure_generator_step(
                name, args.frames, args.size, mode == "on", args.dtype, args.device, args.held_gib
            )
        print(json.dumps(result))
        return
    shape = f"2x3x{args.frames}x{args.size}x{args.size}"
    gstep_shape = f"1x3x{args.frames}x{args.size}x{args.size}"
    for name in args.discriminators:
        results, gstep = {}, {}
        for mode in ("off", "on"):
            results[mode] = _run_child(name, mode, "dstep")
            print(
                f"{name} {shape} {args.dtype} on {args.device}, checkpointing {mode:>3}: "
                f"peak {results[mode]['peak_mib']:8.0f} MiB, step {results[mode]['step_s']:7.2f} s",
                flush=True,
            )
        for mode in ("off", "on"):
            gstep[mode] = g = _run_child(name, mode, "gstep")
            gap = g["baseline_gap_mib"]
            print(
                f"{name} {gstep_shape} {args.dtype} on {args.device}, checkpointing {mode:>3}, generator step "
                f"(D frozen, grad w.r.t. the input, {args.held_gib:g} GiB held graph): "
                f"peak {g['gstep_peak_mib']:8.0f} MiB above the held graph, held {g['held_mib']:8.1f} MiB "
                f"(check: live {g['live_mib']:.1f}, freed {g['freed_mib']:.1f} MiB), step {g['gstep_s']:7.2f} s"
                + (f" [baseline ru_maxrss {gap:.0f} MiB above the current RSS]" if gap > 16 else ""),
                flush=True,
            )
        saving = 1 - results["on"]["peak_mib"] / results["off"]["peak_mib"]
        held_saving = 1 - gstep["on"]["held_mib"] / gstep["off"]["held_mib"]
        gstep_saving = 1 - gstep["on"]["gstep_peak_mib"] / gstep["off"]["gstep_peak_mib"]
        overhead = results["on"]["step_s"] / results["off"]["step_s"] - 1
        print(
            f"{name} memory_saving={saving:.3f} held_saving={held_saving:.3f} "
            f"gstep_memory_saving={gstep_saving:.3f} time_overhead={overhead:.3f}",
            flush=True,
        )


def _run_child(name: str, mode: str, pattern: str) -> dict[str, float | bool]:
    """Run one measurement (`pattern` "dstep" or "gstep", checkpointing `mode` "on" or "off") in a fresh
    process with this process's arguments; return its result."""
    command = [sys.executable, __file__, *sys.argv[1:], "--child", f"{name}:{mode}:{pattern}"]
    env = dict(os.environ)
    if pattern == "gstep":
        # glibc: a fixed 64 KiB mmap threshold, so that every tensor but the smallest is mmapped and its
        # pages go back to the system when it is freed; the RSS then follows the live tensors (the default
        # dynamic threshold keeps freed chunks up to 32 MiB in the heap)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
