"""Demo video shards made offline: camera moves (pans, zooms, rotations) over scikit-image's photographs.

Train clips are camera moves over six photographs. Eval clips are held-out clips of the same six
photographs: camera paths drawn from their own random stream, never trained on. Unseen clips move over
two other photographs that training never sees, for a harder generalisation check (on the tiny preset a
few hundred steps raise eval PSNR by ~9 dB but unseen PSNR by only ~2 dB: six photographs are too few to
transfer to new content that soon).
Each clip is H.264 (yuv420p) in an mp4, stored video2dataset-style as KEY.mp4 + KEY.json + KEY.txt.
Generation is deterministic for a seed up to the encoder: the rendered frames, keys, metadata and
captions are; libx264's bytes were seen to differ between runs for some clips on a loaded machine.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tarfile
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from random import Random
from typing import NamedTuple

import av
import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from einops import rearrange

logger = logging.getLogger("data")

# Bump when the generator's output changes, so ensure_demo_shards regenerates old sets.
DEMO_FORMAT_VERSION = 2
MARKER_NAME = "DONE.json"

# name -> (loader, caption subject). Colour photographs that ship with scikit-image (no download).
PHOTOS = {
    "astronaut": (skimage.data.astronaut, "an astronaut"),
    "chelsea": (skimage.data.chelsea, "a cat"),
    "coffee": (skimage.data.coffee, "a cup of coffee"),
    "hubble_deep_field": (skimage.data.hubble_deep_field, "the Hubble deep field"),
    "immunohistochemistry": (skimage.data.immunohistochemistry, "a stained tissue sample"),
    "retina": (skimage.data.retina, "a human retina"),
    "rocket": (skimage.data.rocket, "a rocket on its launch pad"),
    "motorcycle": (lambda: skimage.data.stereo_motorcycle()[0], "a motorcycle"),
}
TRAIN_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina")
UNSEEN_PHOTOS = ("rocket", "motorcycle")
MOTIONS = ("pan_left", "pan_right", "pan_up", "pan_down", "pan_diagonal", "zoom_in", "zoom_out", "rotate")
_MOTION_WORDS = {
    "pan_left": "A slow pan to the left",
    "pan_right": "A slow pan to the right",
    "pan_up": "A slow upward pan",
    "pan_down": "A slow downward pan",
    "pan_diagonal": "A diagonal pan",
    "zoom_in": "A slow zoom in",
    "zoom_out": "A slow zoom out",
    "rotate": "A slow rotation",
}
# Photos are resized so their shorter side is this many times the frame's: room to pan, while a frame
# pixel covers at most _MAX_ZOOM photo pixels, so bilinear sampling without a prefilter hardly aliases.
_PHOTO_SHORT_SIDE = 2.0
_MAX_ZOOM = 1.4


class DemoShards(NamedTuple):
    """Brace patterns of the written shards, ready for `build_video_dataset`."""

    train_pattern: str
    eval_pattern: str  # held-out clips of the training photographs
    unseen_pattern: str  # clips of photographs training never sees


@dataclass(frozen=True, slots=True)
class CameraView:
    """Where the camera looks: centre (photo pixels), zoom (photo pixels per frame pixel), angle (radians)."""

    cx: float
    cy: float
    zoom: float
    angle: float


@dataclass(frozen=True, slots=True)
class CameraMove:
    """A move from one view to another; `ease` smooths the start and end."""

    motion: str
    start: CameraView
    end: CameraView
    ease: bool

    def view(self, t: float) -> CameraView:
        """View at time t in [0, 1]; zoom is interpolated geometrically so it looks steady."""
        # Half linear, half smoothstep: gentle start and end, yet the camera never stands still.
        s = 0.5 * t + 0.5 * t * t * (3 - 2 * t) if self.ease else t
        a, b = self.start, self.end
        return CameraView(
            cx=a.cx + (b.cx - a.cx) * s,
            cy=a.cy + (b.cy - a.cy) * s,
            zoom=a.zoom * (b.zoom / a.zoom) ** s,
            angle=a.angle + (b.angle - a.angle) * s,
        )


@lru_cache(maxsize=16)
def _load_photo(name: str, short_side: int) -> torch.Tensor:
    """Photo `name` as float32 (3, H, W) in [0, 1], its shorter side resized to `short_side` (cached: do not modify)."""
    loader, _ = PHOTOS[name]
    image = torch.from_numpy(np.ascontiguousarray(loader()[..., :3]))
    image = rearrange(image, "h w c -> 1 c h w").float() / 255.0
    scale = short_side / min(image.shape[-2:])
    size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
    image = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
    return image[0].clamp_(0.0, 1.0)


def random_camera_move(
    rng: Random, motion: str, photo_hw: tuple[int, int], frame_hw: tuple[int, int]
) -> CameraMove:
    """A random `motion` whose every view stays inside the photo."""
    photo_h, photo_w = photo_hw
    height, width = frame_hw
    # At most the whole photo's width or height in view, and at most _MAX_ZOOM photo pixels per frame pixel.
    max_zoom = min(photo_w / width, photo_h / height, _MAX_ZOOM)

    def centre_range(zoom: float, angle: float) -> tuple[float, float, float, float]:
        # Half extents of the (rotated) view, in photo pixels: the centre must stay this far from the edges.
        c, s = abs(math.cos(angle)), abs(math.sin(angle))
        half_w, half_h = zoom * (c * width + s * height) / 2, zoom * (s * width + c * height) / 2
        return half_w, photo_w - half_w, half_h, photo_h - half_h

    def random_centre(zoom: float, angle: float = 0.0) -> tuple[float, float]:
        x0, x1, y0, y1 = centre_range(zoom, angle)
        return rng.uniform(x0, x1), rng.uniform(y0, y1)

    ease = rng.random() < 0.5
    if motion.startswith("pan_"):
        zoom = rng.uniform(0.55, 0.8) * max_zoom
        x0, x1, y0, y1 = centre_range(zoom, 0.0)
        cx, cy = random_centre(zoom)  # the coordinate that does not move
        travel = rng.uniform(0.6, 1.0)
        if motion in ("pan_left", "pan_right"):
            # Panning left means the camera turns left: the view centre moves left over the photo.
            a, b = (x1, x0) if motion == "pan_left" else (x0, x1)
            start_xy, end_xy = (a, cy), (a + (b - a) * travel, cy)
        elif motion in ("pan_up", "pan_down"):
            a, b = (y1, y0) if motion == "pan_up" else (y0, y1)
            start_xy, end_xy = (cx, a), (cx, a + (b - a) * travel)
        else:
            sx, sy = rng.choice([(x0, y0), (x0, y1), (x1, y0), (x1, y1)])
            ex, ey = x0 + x1 - sx, y0 + y1 - sy
            start_xy, end_xy = (sx, sy), (sx + (ex - sx) * travel, sy + (ey - sy) * travel)
        return CameraMove(motion, CameraView(*start_xy, zoom, 0.0), CameraView(*end_xy, zoom, 0.0), ease)
    if motion in ("zoom_in", "zoom_out"):
        wide = rng.uniform(0.8, 0.95) * max_zoom
        close = wide * rng.uniform(0.5, 0.7)
        cx, cy = random_centre(wide)  # valid for the wide view, hence for the close one too
        near, far = CameraView(cx, cy, close, 0.0), CameraView(cx, cy, wide, 0.0)
        return (
            CameraMove(motion, far, near, ease)
            if motion == "zoom_in"
            else CameraMove(motion, near, far, ease)
        )
    if motion == "rotate":
        angle = math.radians(rng.uniform(8.0, 25.0)) * rng.choice((-1.0, 1.0))
        c, s = math.cos(angle), abs(math.sin(angle))
        fit = min(photo_w / (c * width + s * height), photo_h / (s * width + c * height), _MAX_ZOOM)
        zoom = rng.uniform(0.6, 0.85) * fit
        cx, cy = random_centre(zoom, angle)  # extents grow with the angle (< 30 deg): valid throughout
        return CameraMove(motion, CameraView(cx, cy, zoom, 0.0), CameraView(cx, cy, zoom, angle), ease)
    raise ValueError(f"unknown motion {motion!r}; choose from {MOTIONS}")


def render_clip(photo: torch.Tensor, move: CameraMove, frames: int, height: int, width: int) -> torch.Tensor:
    """Film `move` over `photo` (3, Hp, Wp) in [0, 1]: uint8 (T, H, W, C) frames, bilinear sub-pixel sampling."""
    photo_h, photo_w = photo.shape[-2:]
    rows = []
    for index in range(frames):
        view = move.view(index / max(frames - 1, 1))
        c, s = math.cos(view.angle), math.sin(view.angle)
        # Output coordinates in [-1, 1] -> photo coordinates in [-1, 1] (affine_grid convention).
        rows.append(
            [
                [
                    view.zoom * width * c / photo_w,
                    -view.zoom * height * s / photo_w,
                    2 * view.cx / photo_w - 1,
                ],
                [
                    view.zoom * width * s / photo_h,
                    view.zoom * height * c / photo_h,
                    2 * view.cy / photo_h - 1,
                ],
            ]
        )
    theta = torch.tensor(rows, dtype=torch.float32)  # (T, 2, 3)
    # F.affine_grid's result, computed directly: its CPU kernel is several times slower here.
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * (2 / width) - 1
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) * (2 / height) - 1
    base = torch.stack(
        [xs.expand(height, width), ys[:, None].expand(height, width), torch.ones(height, width)], -1
    )
    grid = torch.einsum("hwk,tjk->thwj", base, theta)  # (T, H, W, 2)
    video = F.grid_sample(
        photo.unsqueeze(0).expand(frames, -1, -1, -1),
        grid,
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )  # (T, C, H, W)
    return rearrange((video * 255).round_().clamp_(0, 255).to(torch.uint8), "t c h w -> t h w c").contiguous()


def encode_mp4(video: torch.Tensor, fps: int, crf: int = 20) -> bytes:
    """uint8 (T, H, W, C) RGB -> H.264 (libx264, yuv420p) mp4 bytes."""
    _, height, width, _ = video.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {height}x{width}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        for frame in video.numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


@dataclass(frozen=True, slots=True)
class _DemoParams:
    train_shards: int
    eval_shards: int
    clips_per_shard: int
    frames: int
    height: int
    width: int
    fps: int
    seed: int
    version: int = DEMO_FORMAT_VERSION

    def __post_init__(self) -> None:
        if min(self.train_shards, self.eval_shards, self.clips_per_shard, self.frames, self.fps) < 1:
            raise ValueError(f"shard counts, clips_per_shard, frames and fps must be >= 1: {self}")
        if self.height < 16 or self.width < 16 or self.height % 2 or self.width % 2:
            raise ValueError(f"height and width must be even and >= 16, got {self.height}x{self.width}")
        if self.clips_per_shard > 10000:
            raise ValueError(
                f"clips_per_shard must be <= 10000 (keys are shard * 10000 + index), got {self.clips_per_shard}"
            )

    @property
    def total_clips(self) -> int:
        return (self.train_shards + 2 * self.eval_shards) * self.clips_per_shard


def write_demo_shards(
    output_dir: str | os.PathLike,
    *,
    train_shards: int = 8,
    eval_shards: int = 2,
    clips_per_shard: int = 16,
    frames: int = 33,
    height: int = 96,
    width: int = 128,
    fps: int = 8,
    seed: int = 0,
) -> DemoShards:
    """Write `train-%06d.tar` and `eval-%06d.tar` shards into `output_dir`, then the DONE.json marker."""
    params = _DemoParams(train_shards, eval_shards, clips_per_shard, frames, height, width, fps, seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_NAME).unlink(missing_ok=True)  # a half-written set never looks complete
    began = time.perf_counter()
    threads = torch.get_num_threads()
    # The tensors are small: one thread is as fast, and several slow down badly on a busy machine.
    torch.set_num_threads(1)
    try:
        for split, count, photos in (
            ("train", train_shards, TRAIN_PHOTOS),
            ("eval", eval_shards, TRAIN_PHOTOS),
            ("unseen", eval_shards, UNSEEN_PHOTOS),
        ):
            for shard in range(count):
                _write_shard(out / f"{split}-{shard:06d}.tar", split, shard, photos, params)
            _remove_stale_shards(out, split, count)
    finally:
        torch.set_num_threads(threads)
    _atomic_write(out / MARKER_NAME, json.dumps(asdict(params), indent=2).encode())
    logger.info("wrote %d demo clips to %s in %.1f s", params.total_clips, out, time.perf_counter() - began)
    return _patterns(out, params)


def ensure_demo_shards(
    output_dir: str | os.PathLike,
    *,
    train_shards: int = 8,
    eval_shards: int = 2,
    clips_per_shard: int = 16,
    frames: int = 33,
    height: int = 96,
    width: int = 128,
    fps: int = 8,
    seed: int = 0,
) -> DemoShards:
    """The demo shards in `output_dir`, generated first if they are missing or were made with other parameters."""
    params = _DemoParams(train_shards, eval_shards, clips_per_shard, frames, height, width, fps, seed)
    out = Path(output_dir)
    marker = out / MARKER_NAME
    try:
        found = json.loads(marker.read_text())
    except (OSError, ValueError):
        found = None
    shards_present = all(
        (out / f"{split}-{shard:06d}.tar").is_file()
        for split, count in (("train", train_shards), ("eval", eval_shards), ("unseen", eval_shards))
        for shard in range(count)
    )
    if found == asdict(params) and shards_present:
        return _patterns(out, params)
    if found is None:
        logger.info("demo shards not found in %s: generating %d clips", out, params.total_clips)
    else:
        logger.info(
            "demo shards in %s differ from the requested ones: regenerating %d clips", out, params.total_clips
        )
    return write_demo_shards(out, **{k: v for k, v in asdict(params).items() if k != "version"})


def _write_shard(path: Path, split: str, shard: int, photos: tuple[str, ...], params: _DemoParams) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(params.clips_per_shard):
            key = f"{shard * 10000 + index:09d}"
            rng = Random(f"demo/{params.seed}/{split}/{shard}/{index}")
            photo_name, motion = rng.choice(photos), rng.choice(MOTIONS)
            photo = _load_photo(photo_name, round(_PHOTO_SHORT_SIDE * min(params.height, params.width)))
            move = random_camera_move(rng, motion, tuple(photo.shape[-2:]), (params.height, params.width))
            video = render_clip(photo, move, params.frames, params.height, params.width)
            caption = f"{_MOTION_WORDS[motion]} across a photograph of {PHOTOS[photo_name][1]}."
            meta = {
                "key": key,
                "caption": caption,
                "url": f"skimage.data:{photo_name}",
                "status": "success",
                "split": split,
                "width": params.width,
                "height": params.height,
                "frames": params.frames,
                "fps": params.fps,
                "duration": params.frames / params.fps,
                "source": photo_name,
                "motion": {
                    "type": motion,
                    "ease": move.ease,
                    "start": asdict(move.start),
                    "end": asdict(move.end),
                },
            }
            for suffix, data in (
                ("mp4", encode_mp4(video, params.fps)),
                ("json", json.dumps(meta, sort_keys=True).encode()),
                ("txt", caption.encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed: byte-identical shards
                tar.addfile(info, io.BytesIO(data))
    _atomic_write(path, buffer.getvalue())


def _atomic_write(path: Path, data: bytes) -> None:
    # A per-process temporary name: two ranks generating at once each replace the file whole.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _remove_stale_shards(out: Path, split: str, count: int) -> None:
    for path in out.glob(f"{split}-*.tar"):
        match = re.fullmatch(rf"{split}-(\d{{6}})\.tar", path.name)
        if match and int(match.group(1)) >= count:
            path.unlink(missing_ok=True)


def _patterns(out: Path, params: _DemoParams) -> DemoShards:
    return DemoShards(
        train_pattern=str(out / f"train-{{000000..{params.train_shards - 1:06d}}}.tar"),
        eval_pattern=str(out / f"eval-{{000000..{params.eval_shards - 1:06d}}}.tar"),
        unseen_pattern=str(out / f"unseen-{{000000..{params.eval_shards - 1:06d}}}.tar"),
    )
