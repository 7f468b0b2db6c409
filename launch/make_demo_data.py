"""Write the demo video shards (camera moves over scikit-image's photographs).

python launch/make_demo_data.py --output demo_data --train-shards 8 --eval-shards 2
"""

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data.demo import write_demo_shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="demo_data", help="folder for the shards (default: demo_data)")
    parser.add_argument("--train-shards", type=int, default=8)
    parser.add_argument("--eval-shards", type=int, default=2)
    parser.add_argument("--clips-per-shard", type=int, default=16)
    parser.add_argument("--frames", type=int, default=33, help="frames per clip")
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    began = time.perf_counter()
    shards = write_demo_shards(
        args.output,
        train_shards=args.train_shards,
        eval_shards=args.eval_shards,
        clips_per_shard=args.clips_per_shard,
        frames=args.frames,
        height=args.height,
        width=args.width,
        fps=args.fps,
        seed=args.seed,
    )
    print(f"train shards: {shards.train_pattern}")
    print(f"eval shards:  {shards.eval_pattern}")
    print(f"unseen-photo shards: {shards.unseen_pattern}")
    print(f"done in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
