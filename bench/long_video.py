"""Reconstruct a long, large clip tiled in space and chunked in time (no_grad); print time and peak memory.

    python bench/long_video.py                                  # tiny preset, 65x512x512, fp32
    python bench/long_video.py --presets tiny cogvideox --dtype bf16
    python bench/long_video.py --presets cogvideox --frames 17 --size 256

Each case runs in its own subprocess, so its peak resident memory (`ru_maxrss`) is its own. Weights are
random (the cost does not depend on them). Memory grows with the tile and the temporal chunk, not with
the clip: compare the peak with the input's and the output's sizes.
"""

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_autoencoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run_case(args: argparse.Namespace) -> None:
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = build_autoencoder(args.case).eval().to(dtype)
    # (1, 3, T, H, W) in [-1, 1]
    x = (
        torch.rand(1, 3, args.frames, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2
        - 1
    ).to(dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    input_gib = x.numel() * x.element_size() / 2**30
    before = peak_rss_gib()

    start = time.perf_counter()
    with torch.no_grad():
        z = model.tiled_encode(x, args.tile_size, args.tile_overlap).mode()
        encoded = time.perf_counter()
        recon = model.tiled_decode(z, args.tile_size, args.tile_overlap)
    end = time.perf_counter()
    assert recon.shape == x.shape and torch.isfinite(recon).all()

    print(
        f"{args.case:>9} {args.dtype} {tuple(x.shape)} input {input_gib:.3f} GiB, latent {tuple(z.shape)}, "
        f"tiles {args.tile_size}px/{args.tile_overlap}px, threads {torch.get_num_threads()}: "
        f"encode {encoded - start:.1f} s + decode {end - encoded:.1f} s = {end - start:.1f} s; "
        f"peak RSS {peak_rss_gib():.2f} GiB (before the run {before:.2f} GiB, weights {weights_gib:.2f} GiB)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny"], help="autoencoder presets, one run each")
    parser.add_argument("--frames", type=int, default=65)
    parser.add_argument("--size", type=int, default=512, help="height = width, pixels")
    parser.add_argument("--tile-size", type=int, default=256, help="spatial tile, pixels")
    parser.add_argument("--tile-overlap", type=int, default=64, help="overlap of neighbouring tiles, pixels")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one preset in this process
    args = parser.parse_args()
    if args.case:
        run_case(args)
        return
    for preset in args.presets:
        command = [sys.executable, __file__, "--case", preset]
        for name in ("frames", "size", "tile_size", "tile_overlap", "dtype"):
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
