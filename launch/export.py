"""Export a run's autoencoder to a diffusers folder.

    python launch/export.py --checkpoint runs/tiny --output exported/
    python launch/export.py --checkpoint runs/tiny/checkpoints/step_00000300 --output exported/

The folder loads with diffusers' `AutoencoderKLCogVideoX.from_pretrained(output)`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from trainer.export import export_autoencoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="run directory, its checkpoints/ folder, or one checkpoint"
    )
    parser.add_argument("--output", required=True, help="folder to write config.json + safetensors into")
    parser.add_argument(
        "--scaling-factor", type=float, default=None, help="latent scaling factor for config.json"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        folder = export_autoencoder(args.checkpoint, args.output, scaling_factor=args.scaling_factor)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
