"""Export a run's autoencoder to a diffusers folder.

    python launch/export.py --checkpoint runs/tiny --output exported/
    python launch/export.py --checkpoint runs/tiny/checkpoints/step_00000300 --output exported/
    python launch/export.py --checkpoint runs/tiny --output exported/ \\
        --measure-scaling-factor --data 'shards/eval-{000000..000003}.tar' --max-clips 64

The folder loads with diffusers' `AutoencoderKLCogVideoX.from_pretrained(output)`. A checkpoint of a run
with ema.enabled exports its EMA weights unless --no-ema is given.

config.json's `scaling_factor` is --scaling-factor, or with --measure-scaling-factor 1 / std of the
latents over the first --max-clips clips of --data (diffusers' convention: pipelines use
`latent_dist.sample() * scaling_factor`, which then has unit variance). The std is that of posterior
samples, computed exactly from the posterior means and variances (no noise draw); it is measured with the
exported weights. Without either, the released CogVideoX VAE's 1.15258426 is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

import torch

from trainer.distributed import exit_process
from trainer.export import export_weights, load_checkpoint_autoencoder, measure_scaling_factor
from trainer.tools import default_device, evaluation_batches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="run directory, its checkpoints/ folder, or one checkpoint"
    )
    parser.add_argument("--output", required=True, help="folder to write config.json + safetensors into")
    parser.add_argument(
        "--no-ema", action="store_true", help="export the trained weights even if the checkpoint has EMA ones"
    )
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument(
        "--scaling-factor", type=float, default=None, help="latent scaling factor for config.json"
    )
    scale.add_argument(
        "--measure-scaling-factor",
        action="store_true",
        help="measure 1 / std of the latents over --data and write it into config.json",
    )
    measure = parser.add_argument_group("measuring the scaling factor")
    measure.add_argument("--data", default=None, help="shard pattern(s) of the clips to measure on")
    measure.add_argument("--max-clips", type=int, default=32, help="clips to measure on (default 32)")
    measure.add_argument("--num-frames", type=int, default=17, help="frames per clip, 4k+1 (default 17)")
    measure.add_argument("--resolution", type=int, default=256, help="square clip size (default 256)")
    measure.add_argument("--batch-size", type=int, default=1, help="clips per forward (default 1)")
    measure.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.measure_scaling_factor and not args.data:
        parser.error("--measure-scaling-factor needs --data (shards of clips to measure on)")
    if args.data and not args.measure_scaling_factor:
        parser.error("--data is only used with --measure-scaling-factor")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        weights = load_checkpoint_autoencoder(args.checkpoint, ema=not args.no_ema)
        scaling_factor = args.scaling_factor
        if args.measure_scaling_factor:
            clips = evaluation_batches(
                args.data,
                num_frames=args.num_frames,
                resolution=args.resolution,
                batch_size=args.batch_size,
                max_clips=args.max_clips,
            )
            device = torch.device(args.device) if args.device else default_device()
            model = weights.build().to(device)
            scaling_factor, count = measure_scaling_factor(model, clips, device)
            print(
                f"scaling factor {scaling_factor:.8g} (1 / std of the {weights.source} weights' latents over "
                f"{count} clips of {args.num_frames}x{args.resolution}x{args.resolution})"
            )
        folder = export_weights(weights, args.output, scaling_factor=scaling_factor)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported the {weights.source} weights of {weights.folder} to {folder}")
    return 0


if __name__ == "__main__":
    exit_process(main())
