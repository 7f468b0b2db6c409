"""Reconstruction quality (PSNR, SSIM, LPIPS, L1) of an autoencoder over a set of shards.

    python launch/evaluate.py --checkpoint runs/tiny --data 'shards/eval-{000000..000003}.tar' --output metrics.json
    deepspeed --num_gpus 8 launch/evaluate.py --checkpoint exported/ --data 'shards/*.tar' --max-clips 1024 --output m.json

--checkpoint is a run directory, a checkpoint folder (EMA weights when present; --no-ema for the trained
ones) or a diffusers folder. Clips are taken from the first frame of each video, centre-cropped to a
square and resized to --resolution, in shard order; the first --max-clips of them are scored. Under a
launcher (deepspeed, torchrun, srun) every rank reads the same stream and reconstructs every
world_size-th batch, so the metrics do not depend on the number of ranks; rank 0 prints the table and
writes the JSON: {"psnr", "ssim", "lpips", "l1", "clips", and the settings}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

import torch
import torch.distributed as dist

from trainer.distributed import exit_process, init_distributed
from trainer.quality import QualityMetrics
from trainer.tools import (
    add_lpips_arguments,
    evaluation_batches,
    load_autoencoder,
    lpips_from_args,
    reconstruct_clip,
)

METRIC_ORDER = ("psnr", "ssim", "lpips", "l1", "clips")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="run dir, checkpoint folder or diffusers folder")
    parser.add_argument(
        "--data", required=True, help="shard pattern(s): local paths, globs, brace ranges, URLs"
    )
    parser.add_argument("--output", required=True, help="JSON file for the metrics")
    parser.add_argument("--num-frames", type=int, default=17, help="frames per clip, 4k+1 (default 17)")
    parser.add_argument("--resolution", type=int, default=256, help="square clip size, a multiple of 8")
    parser.add_argument("--max-clips", type=int, default=None, help="score only the first N clips")
    parser.add_argument("--batch-size", type=int, default=1, help="clips per forward on each rank")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument("--no-ema", action="store_true", help="the trained weights, not the EMA ones")
    add_lpips_arguments(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.num_frames < 1 or (args.num_frames - 1) % 4:
        parser.error(f"--num-frames must be 4k+1 (e.g. 17, 33), got {args.num_frames}")
    if args.resolution < 8 or args.resolution % 8:
        parser.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.batch_size < 1 or (args.max_clips is not None and args.max_clips < 1):
        parser.error("--batch-size and --max-clips must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    # DeepSpeed 0.19 calls a torch collective that torch 2.13 deprecated.
    warnings.filterwarnings(
        "ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning
    )
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    info = init_distributed()  # a group of one without a launcher
    try:
        return evaluate(args, info.rank, info.world_size, info.device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def evaluate(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> int:
    try:
        model, weights = load_autoencoder(args.checkpoint, ema=not args.no_ema)
        batches = evaluation_batches(
            args.data,
            num_frames=args.num_frames,
            resolution=args.resolution,
            batch_size=args.batch_size,
            max_clips=args.max_clips,
            num_workers=args.num_workers,
        )
        lpips = lpips_from_args(args, device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model.to(device)
    if lpips is None:
        lpips_source = None
    else:
        lpips_source = (
            "random (testing only)" if args.lpips_random else args.lpips_weights or "torch hub cache"
        )
    quality = QualityMetrics(lpips)
    totals = quality.accumulator(device)  # a rank may get no batch: reduce still needs the device
    began = time.perf_counter()
    for index, video in enumerate(batches):
        if index % world_size != rank:
            continue
        target = video.to(device)
        totals.add(quality(reconstruct_clip(model, target), target))
    results = totals.reduce()  # a collective: every rank calls it
    if rank == 0:
        if results["clips"] == 0:
            print(f"error: no usable clip of {args.num_frames} frames in {args.data}", file=sys.stderr)
            return 2
        report = {
            **{name: results[name] for name in METRIC_ORDER if name in results},
            "checkpoint": str(args.checkpoint),
            "weights": weights,
            "data": args.data,
            "num_frames": args.num_frames,
            "resolution": args.resolution,
            "ranks": world_size,
            "lpips_weights": lpips_source,
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(format_table(results))
        print(
            f"{results['clips']} clips on {world_size} rank(s) in {time.perf_counter() - began:.1f} s; wrote {args.output}"
        )
    return 0 if results["clips"] else 2


def format_table(results: dict[str, float]) -> str:
    rows = [(name, f"{results[name]:.6g}") for name in METRIC_ORDER if name in results]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>12}" for name, value in rows)


if __name__ == "__main__":
    exit_process(main())
