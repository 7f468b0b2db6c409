"""Peak memory and step time of an autoencoder training step with and without activation checkpointing.

    python bench/checkpointing.py --preset cogvideox --frames 17 --size 128

Each setting runs in its own process so that peak memory (CPU: peak resident set size above the level
after the model and input are built; CUDA: torch.cuda.max_memory_allocated) is its own. The step is a
forward (chunked encode, sample, decode) and backward of L1 + KL, timed as the median of the repeats
after one warm-up. The last line reads `memory_saving=<1 - on/off> time_overhead=<on/off - 1>`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(
    preset: str, frames: int, size: int, checkpointing: bool, dtype_name: str, repeats: int, device: str
):
    import torch

    from models import build_autoencoder

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    model = build_autoencoder(preset, gradient_checkpointing=checkpointing).to(device, dtype).train()
    video = (torch.rand(1, 3, frames, size, size, device=device) * 2 - 1).to(dtype)
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
        out = model(video)
        kl = 0.5 * (out.mean.float().pow(2) + out.logvar.float().exp() - 1 - out.logvar.float()).mean()
        loss = (out.recon.float() - video.float()).abs().mean() + 1e-6 * kl
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cogvideox")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure(
            args.preset, args.frames, args.size, args.child == "on", args.dtype, args.repeats, args.device
        )
        print(json.dumps(result))
        return
    results = {}
    for mode in ("off", "on"):
        command = [sys.executable, __file__, *sys.argv[1:], "--child", mode]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
        print(
            f"{args.preset} 1x3x{args.frames}x{args.size}x{args.size} {args.dtype} on {args.device}, "
            f"checkpointing {mode:>3}: peak {results[mode]['peak_mib']:8.0f} MiB, step {results[mode]['step_s']:7.2f} s"
        )
    saving = 1 - results["on"]["peak_mib"] / results["off"]["peak_mib"]
    overhead = results["on"]["step_s"] / results["off"]["step_s"] - 1
    print(f"memory_saving={saving:.3f} time_overhead={overhead:.3f}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
