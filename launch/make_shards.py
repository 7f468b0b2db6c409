"""Pack video files into webdataset shards (video2dataset layout: KEY.mp4 + KEY.json + KEY.txt).

python launch/make_shards.py --input videos/ --output 'shards/shard-%06d.tar' --max-count 500
python launch/make_shards.py --input 'raw/**/*.mkv' --output 'clips/%06d.tar' --clip-frames 33 --max-side 256

H.264 mp4 files are stored as they are unless --reencode, --fps, --max-side or --clip-frames is given;
other videos are re-encoded to H.264. Unreadable videos are skipped and counted.
Exit status: 0 done, 1 nothing written (every video skipped), 2 bad arguments.
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from data.shard_writer import ShardWriterConfig, parse_size, write_shards


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exn:
        raise argparse.ArgumentTypeError(str(exn)) from None


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="folder (searched recursively) or glob of videos")
    parser.add_argument(
        "--output", required=True, help="shard pattern with one %%d field, e.g. 'out/shard-%%06d.tar'"
    )
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard (default: 1000)")
    parser.add_argument("--max-size", type=_size, default=None, help="bytes per shard, e.g. 1e9 or 500MB")
    parser.add_argument(
        "--clip-frames", type=int, default=None, help="cut videos into clips of this many frames"
    )
    parser.add_argument(
        "--clip-stride", type=int, default=None, help="frames between clip starts (default: --clip-frames)"
    )
    parser.add_argument("--reencode", action="store_true", help="re-encode H.264 mp4 inputs too")
    parser.add_argument("--crf", type=int, default=20, help="libx264 quality when encoding (default: 20)")
    parser.add_argument("--fps", type=float, default=None, help="resample to this frame rate")
    parser.add_argument(
        "--max-side", type=int, default=None, help="downscale so the longer side is at most this"
    )
    parser.add_argument(
        "--caption", choices=("stem", "none"), default="stem", help="KEY.txt: file stem or empty"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes probing and encoding (default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards that already exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = ShardWriterConfig(
            max_count=args.max_count,
            max_size=args.max_size,
            clip_frames=args.clip_frames,
            clip_stride=args.clip_stride,
            reencode=args.reencode,
            crf=args.crf,
            fps=args.fps,
            max_side=args.max_side,
            caption=args.caption,
        )
        summary = write_shards(
            args.input,
            args.output,
            config,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None,
        )
    except ValueError as exn:
        parser.exit(2, f"{parser.prog}: error: {exn}\n")
    print(summary.line())
    return 0 if summary.samples else 1


if __name__ == "__main__":
    sys.exit(main())
