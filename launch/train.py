"""Train a video autoencoder: `deepspeed launch/train.py --config configs/tiny.json [section.key=value ...]`."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

import torch.distributed as dist

from trainer.config import ConfigError, load_config
from trainer.distributed import exit_process
from trainer.trainer import NonFiniteTrainingError, Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="JSON run config, e.g. configs/tiny.json")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides: train.max_steps=20 train.output_dir=/tmp/run"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # DeepSpeed 0.19 calls a torch collective that torch 2.13 deprecated, once per step on every rank.
    warnings.filterwarnings(
        "ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning
    )
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        trainer = Trainer(config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        # "signal": SIGTERM/SIGUSR1 saved a checkpoint and stopped the run, a clean exit (resume continues it)
        trainer.train()
    except NonFiniteTrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_process(main())
