"""Reconstruct a video or an image with a trained autoencoder and print PSNR, SSIM, LPIPS and L1.

    python launch/reconstruct.py --checkpoint runs/tiny --input clip.mp4 --output recon.mp4 --side-by-side
    python launch/reconstruct.py --checkpoint exported/ --input photo.png --output recon.png

--checkpoint is a run directory (its latest checkpoint), one checkpoint folder, or a diffusers
AutoencoderKLCogVideoX folder; a checkpoint's EMA weights are used when it has them (--no-ema: the
trained ones). Any frame count and size work: the clip is padded to 4k+1 frames (last frame repeated)
and to multiples of 8 pixels (edges replicated), and the output is cropped back to the input's frame
count and size. Videos are written as H.264 mp4 at the input's frame rate: yuv420p, or yuv444p when a
side is odd (exact size, but browsers and QuickTime do not play it). Images are written as png.
The metrics compare the model's output (before H.264 compression) with the decoded input frames; LPIPS
needs pretrained weights (--lpips-weights, or the torch hub cache) and is skipped with a message without.

Memory: activations are bounded by the model's temporal chunks (and by --tile in space); the frames of
a segment (the whole video by default, --segment-frames to bound them) are held in memory. Segments
are encoded independently, so a long video in segments can show a seam at each segment start.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

import av
import torch

from trainer.distributed import exit_process
from trainer.tools import (
    ReconstructionScore,
    VideoWriter,
    add_lpips_arguments,
    default_device,
    frames_to_clip,
    is_image,
    iter_video,
    load_autoencoder,
    lpips_from_args,
    parse_size,
    read_image,
    reconstruct_clip,
    to_uint8,
    video_fps,
    write_image,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="run dir, checkpoint folder or diffusers folder")
    parser.add_argument("--input", required=True, help="a video (mp4, webm, ...) or an image (png, jpg)")
    parser.add_argument("--output", required=True, help="output video (.mp4) or, for an image, .png")
    parser.add_argument("--side-by-side", action="store_true", help="write input | reconstruction")
    parser.add_argument("--no-ema", action="store_true", help="the trained weights, not the EMA ones")
    parser.add_argument(
        "--tile",
        default=None,
        help="spatial tile size in pixels, e.g. 256 or 240x360 (H x W), multiples of 8; default: whole frames",
    )
    parser.add_argument(
        "--tile-overlap", default="64", help="overlap of neighbouring tiles in pixels (default 64)"
    )
    parser.add_argument(
        "--segment-frames",
        type=int,
        default=None,
        help="reconstruct the video in independent segments of this many frames (4k+1) to bound memory; "
        "default: the whole video at once",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model precision")
    parser.add_argument("--crf", type=int, default=18, help="H.264 quality of the output (lower: better)")
    add_lpips_arguments(parser)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if is_image(args.input) != is_image(args.output):
        kind = "an image" if is_image(args.input) else "a video"
        raise ValueError(
            f"--input {args.input} is {kind}, so --output must be {kind} too (png for an image, mp4 for "
            f"a video), got {args.output}"
        )
    if args.segment_frames is not None and (args.segment_frames < 1 or (args.segment_frames - 1) % 4):
        raise ValueError(f"--segment-frames must be 4k+1 (e.g. 33, 65), got {args.segment_frames}")
    args.tile = parse_size(args.tile) if args.tile is not None else None
    args.tile_overlap = parse_size(args.tile_overlap)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        check_args(args)
        if not Path(args.input).is_file():
            raise FileNotFoundError(f"--input {args.input} does not exist")
        model, weights = load_autoencoder(args.checkpoint, ema=not args.no_ema)
        device = torch.device(args.device) if args.device else default_device()
        lpips = lpips_from_args(args, device)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model.to(device, DTYPES[args.dtype])
    print(f"autoencoder: {weights}, on {device} in {args.dtype}")

    score = ReconstructionScore(lpips)
    began = time.perf_counter()
    if is_image(args.input):
        segments, writer = (read_image(path) for path in [args.input]), None  # read inside the try below
    else:
        try:
            fps = video_fps(args.input)
        except (av.FFmpegError, ValueError) as err:
            print(f"error: cannot read {args.input} as a video: {err}", file=sys.stderr)
            return 2
        segments = iter_video(args.input, args.segment_frames)
        writer = VideoWriter(args.output, fps, crf=args.crf)
    try:
        for frames in segments:
            target = frames_to_clip(frames, device)
            recon = reconstruct_clip(model, target, tile_size=args.tile, tile_overlap=args.tile_overlap)
            score.add(recon, target)
            out = to_uint8(recon[0])
            if args.side_by_side:
                out = torch.cat([frames, out], dim=2)  # (T, H, W, C): side by side along the width
            if writer is None:
                write_image(args.output, out[0])
            else:
                writer.write(out)
    except (av.FFmpegError, OSError, ValueError) as err:  # an undecodable input, a bad tile size, ...
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if writer is not None:
            writer.close()
    if not score.frames:
        print(f"error: {args.input} has no frames", file=sys.stderr)
        return 2
    metrics = score.result()
    height, width = frames.shape[1:3]
    seconds = time.perf_counter() - began
    print(f"wrote {args.output}: {metrics['frames']} frame(s) of {width}x{height} in {seconds:.1f} s")
    print(format_metrics(metrics))
    return 0


def format_metrics(metrics: dict[str, float]) -> str:
    """One line: PSNR 31.2000 dB  SSIM 0.9100  LPIPS 0.0500  L1 0.0200 (n/a for what was not computed)."""

    def value(name: str) -> str:
        return f"{metrics[name]:.4f}" if name in metrics else "n/a"

    return f"PSNR {value('psnr')} dB  SSIM {value('ssim')}  LPIPS {value('lpips')}  L1 {value('l1')}"


if __name__ == "__main__":
    exit_process(main())
