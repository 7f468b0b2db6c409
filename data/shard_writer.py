"""Video files -> webdataset shards in the video2dataset layout (KEY.mp4 + KEY.json + KEY.txt).

Keys are 9-digit sample ids in input order (`000000000`, `000000001`, ...); videos are found sorted, and
worker processes only probe and re-encode, so the shards' names, keys and json do not depend on the number
of workers (libx264's bytes are expected to match too, but are not promised). Each shard is written under
a temporary name and renamed when complete. A video that cannot be read is skipped, logged and counted.
Re-encoded videos are H.264, limited-range BT.601 yuv420p (tagged so), turned upright when the source has
a display rotation.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal, NamedTuple

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data.pipeline import VIDEO_EXTENSIONS

logger = logging.getLogger("data")

# m4v is mp4 under Apple's name. The pipeline does not need it in its VIDEO_EXTENSIONS: shards always hold
# KEY.mp4, whatever the input was called.
_INPUT_EXTENSIONS = (*VIDEO_EXTENSIONS, "m4v")
_PASSTHROUGH_SUFFIXES = (".mp4", ".m4v")
# Re-encoded videos are limited-range BT.601 yuv420p, tagged as such: the tags tell readers that honour them,
# and BT.601 is also what swscale (so most readers) assumes for untagged video and what
# data.demo.encode_mp4 writes. The source's primaries and transfer are kept: the RGB is not converted.
_OUTPUT_FORMAT = "yuv420p"
_OUTPUT_COLORSPACE = Colorspace.ITU601  # swscale's name for the matrix
_OUTPUT_COLORSPACE_TAG = 6  # the same as an AVColorSpace: AVCOL_SPC_SMPTE170M
_OUTPUT_COLOR_RANGE = ColorRange.MPEG
# AVColorSpace tag of a decoded frame -> swscale matrix, passed explicitly (as is the range) because PyAV's
# defaults for them changed across versions; untagged (or RGB) frames get swscale's default, BT.601.
_SWS_COLORSPACES = {
    1: Colorspace.ITU709,  # AVCOL_SPC_BT709
    4: Colorspace.FCC,
    5: Colorspace.ITU601,  # AVCOL_SPC_BT470BG
    6: Colorspace.ITU601,  # AVCOL_SPC_SMPTE170M
    7: Colorspace.SMPTE240M,
    9: Colorspace.BT2020,  # AVCOL_SPC_BT2020_NCL
    10: Colorspace.BT2020,  # AVCOL_SPC_BT2020_CL
}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_MAX_KEY = 10**9  # keys are 9 digits
_TAR_BLOCK = tarfile.BLOCKSIZE
_TAR_END = 2 * tarfile.BLOCKSIZE  # the end-of-archive blocks


def parse_size(text: str) -> int:
    """'500MB', '1e9', '2GiB', '1048576' -> bytes (decimal units; KiB/MiB/GiB/TiB binary); ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"cannot read size {text!r}: use bytes or a unit, e.g. 1e9, 500MB, 2GiB")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size < 1:
        raise ValueError(f"size must be at least 1 byte, got {text!r}")
    return size


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardWriterConfig:
    """What goes into the shards; `--fps`, `--max-side` and `--clip-frames` imply re-encoding to H.264."""

    max_count: int = 1000  # samples per shard
    max_size: int | None = None  # bytes per shard (tar file size); None: no limit
    clip_frames: int | None = None  # cut each video into clips of this many frames
    clip_stride: int | None = None  # frames between clip starts; None: clip_frames (consecutive, no overlap)
    reencode: bool = False
    crf: int = 20
    fps: float | None = None  # resample to this frame rate (nearest frame)
    max_side: int | None = None  # downscale so the longer side is at most this (aspect kept, even sizes)
    caption: Literal["stem", "none"] = "stem"

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {self.max_count}")
        if self.max_size is not None and self.max_size < 1:
            raise ValueError(f"max_size must be >= 1 byte, got {self.max_size}")
        if self.clip_frames is not None and self.clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {self.clip_frames}")
        if self.clip_stride is not None:
            if self.clip_frames is None:
                raise ValueError("clip_stride needs clip_frames (the clip length)")
            if self.clip_stride < 1:
                raise ValueError(f"clip_stride must be >= 1, got {self.clip_stride}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51] (libx264), got {self.crf}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.max_side is not None and self.max_side < 2:
            raise ValueError(f"max_side must be >= 2 (H.264 yuv420p needs even sizes), got {self.max_side}")
        if self.caption not in ("stem", "none"):
            raise ValueError(f"caption must be 'stem' or 'none', got {self.caption!r}")

    @property
    def encodes(self) -> bool:
        """Whether every video is re-encoded (else H.264 mp4 files are stored byte for byte)."""
        return (
            self.reencode or self.clip_frames is not None or self.fps is not None or self.max_side is not None
        )


@dataclass(slots=True)
class ShardSummary:
    """What `write_shards` did."""

    videos: int  # video files found
    samples: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # videos skipped, by reason
    bytes_written: int = 0

    def line(self) -> str:
        """One line for the end of a run."""
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
        return (
            f"{self.videos} videos -> {self.samples} samples in {len(self.shards)} shards "
            f"({self.bytes_written / 1e6:.1f} MB); skipped {sum(self.skipped.values())} videos"
            + (f" ({reasons})" if reasons else "")
        )


class VideoProbe(NamedTuple):
    """Video stream facts read with PyAV."""

    codec: str
    width: int
    height: int
    frames: int  # from the container, else counted by decoding
    fps: float
    duration: float  # seconds


class VideoSource(NamedTuple):
    """A video file and the url recorded for it (its path relative to the input root, '/'-separated)."""

    path: Path
    url: str


def find_videos(input: str | os.PathLike) -> list[VideoSource]:
    """Videos (by extension) under a folder, recursively, or matching a glob; sorted by url."""
    text = os.fspath(input)
    if os.path.isdir(text):
        root = Path(text)
        paths = [path for path in root.rglob("*") if path.is_file()]
    elif glob.has_magic(text):
        parts = Path(text).parts
        fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
        root = Path(*parts[:fixed]) if fixed else Path(".")
        found = [Path(p) for p in glob.glob(text, recursive=True)]
        paths = [p for p in found if p.is_file()]
        for folder in (p for p in found if p.is_dir()):
            paths.extend(path for path in folder.rglob("*") if path.is_file())
    elif os.path.isfile(text):
        root, paths = Path(text).parent, [Path(text)]
    else:
        raise ValueError(f"input {text!r} is neither a folder, a file nor a glob that matches")
    videos = {
        path.relative_to(root).as_posix(): path
        for path in paths
        if path.suffix.lower().lstrip(".") in _INPUT_EXTENSIONS
    }
    if not videos:
        raise ValueError(f"no video files ({', '.join(_INPUT_EXTENSIONS)}) found in {text!r}")
    return [VideoSource(videos[url], url) for url in sorted(videos)]


class ShardPattern:
    """An output pattern with one printf integer field for the shard index, e.g. 'out/shard-%06d.tar'."""

    def __init__(self, pattern: str) -> None:
        fields = re.findall(r"%[0-9]*d", pattern)
        if len(fields) != 1 or "%" in re.sub(r"%[0-9]*d|%%", "", pattern):
            raise ValueError(
                f"output pattern {pattern!r} needs exactly one shard-index field like %06d "
                "(and %% for a literal %), e.g. 'out/shard-%06d.tar'"
            )
        self.pattern = pattern
        before, after = re.split(r"%[0-9]*d", pattern.replace("%%", "\0"))
        before, after = before.replace("\0", "%"), after.replace("\0", "%")
        self._glob = glob.escape(before) + "*" + glob.escape(after)
        self._regex = re.compile(re.escape(before) + r"(\d+)" + re.escape(after))

    def path(self, index: int) -> str:
        return self.pattern % index

    def existing(self) -> dict[int, str]:
        """Shard index -> path of the files already matching the pattern."""
        found = {}
        for path in glob.glob(self._glob):
            match = self._regex.fullmatch(path)
            if match and os.path.isfile(path) and self.path(int(match.group(1))) == path:
                found[int(match.group(1))] = path
        return found


def write_shards(
    input: str | os.PathLike,
    output: str,
    config: ShardWriterConfig | None = None,
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool | None = None,
) -> ShardSummary:
    """Write the videos of `input` (folder or glob) into shards named by `output` ('out/shard-%06d.tar').

    Raises ValueError before writing anything for bad arguments, when no video is found, or when shards
    matching `output` exist and `overwrite` is False (with `overwrite`, left-over shards of higher index
    are removed at the end). `progress`: a tqdm bar on stderr; None shows it when stderr is a terminal.
    """
    config = config or ShardWriterConfig()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    pattern = ShardPattern(output)
    videos = find_videos(input)
    existing = pattern.existing()
    if existing and not overwrite:
        shown = ", ".join(sorted(existing.values())[:3]) + (" ..." if len(existing) > 3 else "")
        raise ValueError(
            f"{len(existing)} shards matching {output!r} exist ({shown}); pass --overwrite (overwrite=True) to replace them"
        )
    Path(pattern.path(0)).parent.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = sys.stderr.isatty()
    summary = ShardSummary(videos=len(videos))
    jobs = [(video, config) for video in videos]
    with ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            # spawn: the parent has torch (and tqdm's monitor thread) loaded; forking those is not safe.
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))))
            results: Iterable[_VideoResult] = pool.imap(_process_video, jobs, chunksize=1)
        else:
            results = map(_process_video, jobs)
        if progress:
            stack.enter_context(logging_redirect_tqdm())
        bar = stack.enter_context(
            tqdm(total=len(jobs), unit="video", file=sys.stderr, disable=not progress, dynamic_ncols=True)
        )
        writer = stack.enter_context(_ShardWriter(pattern, config.max_count, config.max_size))
        for video, result in zip(videos, results, strict=True):
            bar.update()
            if result.skip_reason is not None:
                summary.skipped[result.skip_reason] = summary.skipped.get(result.skip_reason, 0) + 1
                logger.warning("skipping %s (%s): %s", video.path, result.skip_reason, result.detail)
                continue
            for sample in result.samples:
                if summary.samples >= _MAX_KEY:
                    raise ValueError(f"more than {_MAX_KEY} samples do not fit 9-digit keys")
                key = f"{summary.samples:09d}"
                meta = {"key": key, **sample.meta}
                writer.add(
                    key,
                    (
                        ("mp4", sample.mp4),
                        ("json", json.dumps(meta, sort_keys=True).encode()),
                        ("txt", meta["caption"].encode()),
                    ),
                )
                summary.samples += 1
            bar.set_postfix(samples=summary.samples, shards=writer.shards_started, refresh=False)
    summary.shards = writer.written
    summary.bytes_written = sum(os.path.getsize(path) for path in writer.written)
    for index, path in sorted(existing.items()):
        if index >= len(writer.written):
            logger.info("removing left-over shard %s of an earlier run", path)
            os.unlink(path)
    return summary


def probe_video(source: str | os.PathLike | bytes) -> VideoProbe:
    """Probe a video file or payload; decodes its first frame (so an undecodable stream fails here), and
    every frame when the container does not give the count. Raises av.FFmpegError/ValueError when unusable.
    """
    opened = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
    with av.open(opened, mode="r") as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        decoded = container.decode(stream)
        first = next(decoded, None)
        if first is None:
            raise ValueError("no decodable frame")
        frames = stream.frames if stream.frames > 0 else 1 + sum(1 for _ in decoded)
        rate = _frame_rate(stream)
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None and container.duration > 0:
            duration = container.duration / av.time_base
        else:
            duration = frames / fps if fps else 0.0
        return VideoProbe(
            stream.codec_context.name, first.width, first.height, frames, fps, round(duration, 6)
        )


# --- worker side: one video -> its samples -------------------------------------------------------------


class _Sample(NamedTuple):
    mp4: bytes
    meta: dict  # everything but the key


class _VideoResult(NamedTuple):
    samples: list[_Sample]
    skip_reason: str | None = None
    detail: str = ""


class _SkipVideo(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _process_video(job: tuple[VideoSource, ShardWriterConfig]) -> _VideoResult:
    video, config = job
    try:
        if config.encodes or video.path.suffix.lower() not in _PASSTHROUGH_SUFFIXES:
            samples = _encode_video(video, config)
        else:
            probe = probe_video(video.path)
            if probe.codec != "h264":
                samples = _encode_video(video, config)
            else:
                _check_probe(probe)
                samples = [_Sample(video.path.read_bytes(), _meta(video, config, probe, reencoded=False))]
        return _VideoResult(samples)
    except _SkipVideo as exn:
        return _VideoResult([], exn.reason, str(exn))
    except Exception as exn:  # any unreadable input is skipped: one odd file must not end a long run
        return _VideoResult([], "unreadable_video", f"{type(exn).__name__}: {exn}")


def _check_probe(probe: VideoProbe) -> None:
    if probe.frames < 1:
        raise _SkipVideo("no_frames", "the video has no frames")
    if probe.fps <= 0:
        raise _SkipVideo("unknown_fps", "the container gives no frame rate")


def _meta(
    video: VideoSource, config: ShardWriterConfig, probe: VideoProbe, *, reencoded: bool, **extra: object
) -> dict:
    return {
        "url": video.url,
        "caption": video.path.stem if config.caption == "stem" else "",
        "status": "success",
        "width": probe.width,
        "height": probe.height,
        "frames": probe.frames,
        "fps": probe.fps,
        "duration": probe.duration,
        "reencoded": reencoded,
        **extra,
    }


def _encode_video(video: VideoSource, config: ShardWriterConfig) -> list[_Sample]:
    """Decode, resample, scale and re-encode one video (as a whole, or cut into clips)."""
    with av.open(os.fspath(video.path), mode="r") as container:
        if not container.streams.video:
            raise _SkipVideo("unreadable_video", "no video stream")
        stream = container.streams.video[0]
        source_rate = _frame_rate(stream)
        if not source_rate:
            raise _SkipVideo("unknown_fps", "the container gives no frame rate")
        rate = Fraction(config.fps).limit_denominator(1001) if config.fps else source_rate
        encoders = _ClipEncoders(rate, config)
        source_frames = 0
        for frame_index, frame in _resample(container.decode(stream), source_rate, rate):
            source_frames = max(source_frames, frame_index + 1)
            encoders.add(frame, frame_index)
        finished = encoders.finish()
    if source_frames == 0:
        raise _SkipVideo("no_frames", "no frame decoded")
    if not finished:
        span = config.clip_frames
        raise _SkipVideo("too_short", f"fewer output frames than one clip of {span}")
    samples = []
    for clip_index, (mp4, source_start, (width, height)) in enumerate(finished):
        probe = probe_video(mp4)
        extra: dict[str, object] = {
            "source_width": width,
            "source_height": height,
            "source_fps": float(source_rate),
        }
        if config.clip_frames is not None:
            extra |= {
                "clip_index": clip_index,
                "source_frame_start": source_start,
                "source_time_start": round(float(source_start / source_rate), 6),
            }
        samples.append(_Sample(mp4, _meta(video, config, probe, reencoded=True, **extra)))
    return samples


def _frame_rate(stream: av.video.stream.VideoStream) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    return None


def _resample(
    frames: Iterator[av.VideoFrame], source_rate: Fraction, rate: Fraction
) -> Iterator[tuple[int, av.VideoFrame]]:
    """(source frame index, frame) at `rate`: output frame j shows source frame round(j * source_rate / rate).

    Works on frame indices, so it assumes a constant source frame rate.
    """
    ratio = source_rate / rate
    wanted = 0
    for index, frame in enumerate(frames):
        while math.floor(wanted * ratio + Fraction(1, 2)) == index:
            yield index, frame
            wanted += 1


class _ClipEncoders:
    """Feeds output frames into one H.264 encoder per clip (or one for the whole video)."""

    def __init__(self, rate: Fraction, config: ShardWriterConfig) -> None:
        self.rate, self.config = rate, config
        self.clip_frames = config.clip_frames
        self.stride = config.clip_stride or config.clip_frames
        self.active: list[tuple[_Mp4Encoder, int]] = []  # (encoder, source frame start)
        self.finished: list[tuple[bytes, int, tuple[int, int]]] = []
        self.count = 0  # output frames seen
        self.source_size: tuple[int, int] = (0, 0)

    def add(self, frame: av.VideoFrame, source_index: int) -> None:
        if self.count == 0:
            self.source_size = _display_size(frame)
            self.size = _output_size(*self.source_size, self.config.max_side)
        starts_clip = self.count == 0 if self.stride is None else self.count % self.stride == 0
        if starts_clip:
            encoder = _Mp4Encoder(*self.size, self.rate, self.config.crf, tags_from=frame)
            self.active.append((encoder, source_index))
        self.count += 1
        output = _output_frame(frame, *self.size)  # once for all the clips that hold it
        still_open = []
        for encoder, start in self.active:
            encoder.add(output)
            if encoder.frames == self.clip_frames:
                self.finished.append((encoder.finish(), start, self.source_size))
            else:
                still_open.append((encoder, start))
        self.active = still_open

    def finish(self) -> list[tuple[bytes, int, tuple[int, int]]]:
        """Encoded clips in order; an unfinished clip (shorter than clip_frames) is dropped."""
        if self.clip_frames is None and self.active:
            encoder, start = self.active.pop()
            self.finished.append((encoder.finish(), start, self.source_size))
        self.active = []
        return self.finished


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counterclockwise quarter turns that show `frame` upright (its display matrix's rotation)."""
    return round(frame.rotation / 90) % 4


def _display_size(frame: av.VideoFrame) -> tuple[int, int]:
    """(width, height) as the frame is shown, its rotation applied."""
    turned = _quarter_turns(frame) % 2
    return (frame.height, frame.width) if turned else (frame.width, frame.height)


def _output_frame(frame: av.VideoFrame, width: int, height: int) -> av.VideoFrame:
    """A decoded frame turned upright, scaled to (width, height) and converted to the output's colours."""
    source_colors = {
        "src_colorspace": _SWS_COLORSPACES.get(frame.colorspace),
        "src_color_range": frame.color_range,
    }
    turns = _quarter_turns(frame)
    if turns or source_colors["src_colorspace"] not in (None, _OUTPUT_COLORSPACE):
        # Through RGB: swscale cannot rotate (and rotated pixels, not a display matrix, show the clip upright
        # to every reader), and its direct change of YUV matrix is less exact (BT.709 photo -> BT.601:
        # 2.0 levels mean error, 1.1 through RGB).
        rgb = frame.reformat(format="rgb24", **source_colors).to_ndarray()  # (H, W, 3)
        # PyAV's rotation is counterclockwise, as np.rot90's turns are.
        upright = np.ascontiguousarray(np.rot90(rgb, turns))  # (W, H, 3) after a quarter turn
        frame, source_colors = av.VideoFrame.from_ndarray(upright, format="rgb24"), {}
    return frame.reformat(
        width=width,
        height=height,
        format=_OUTPUT_FORMAT,
        interpolation="AREA",
        dst_colorspace=_OUTPUT_COLORSPACE,
        dst_color_range=_OUTPUT_COLOR_RANGE,
        **source_colors,
    )


def _output_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height)) if max_side else 1.0
    # yuv420p needs even sizes: round down (a 1-pixel rescale at most when not downscaling).
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


class _Mp4Encoder:
    """Streaming H.264 (libx264) mp4 encoder into memory, for frames from `_output_frame`; the same settings
    as `data.demo.encode_mp4`, with colour tags. `tags_from`: a source frame whose primaries and transfer
    (kept, as the RGB is not converted) are written with the output's matrix and range.
    """

    def __init__(
        self, width: int, height: int, rate: Fraction, crf: int, *, tags_from: av.VideoFrame
    ) -> None:
        self.buffer = io.BytesIO()
        self.container = av.open(self.buffer, mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, _OUTPUT_FORMAT
        context = self.stream.codec_context
        context.colorspace, context.color_range = _OUTPUT_COLORSPACE_TAG, _OUTPUT_COLOR_RANGE
        context.color_primaries, context.color_trc = tags_from.color_primaries, tags_from.color_trc
        # One thread: parallelism comes from worker processes, and libx264 output stays reproducible.
        self.stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        self.time_base = Fraction(1) / rate
        self.frames = 0

    def add(self, frame: av.VideoFrame) -> None:
        frame.pts, frame.time_base = self.frames, self.time_base  # the frame may go to other clips too
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def finish(self) -> bytes:
        self.container.mux(self.stream.encode())
        self.container.close()
        return self.buffer.getvalue()


# --- main process: samples -> tar shards ---------------------------------------------------------------


class _ShardWriter:
    """Writes samples into consecutive tar shards, each under a temporary name until it is complete."""

    def __init__(self, pattern: ShardPattern, max_count: int, max_size: int | None) -> None:
        self.pattern, self.max_count, self.max_size = pattern, max_count, max_size
        self.written: list[str] = []
        self.shards_started = 0
        self.tar: tarfile.TarFile | None = None
        self.tmp = ""
        self.count = 0
        self.offset = 0  # tar bytes written so far in the open shard

    def add(self, key: str, members: tuple[tuple[str, bytes], ...]) -> None:
        size = sum(_TAR_BLOCK + math.ceil(len(data) / _TAR_BLOCK) * _TAR_BLOCK for _, data in members)
        if self.tar is not None and (
            self.count >= self.max_count
            or (self.max_size is not None and _tar_file_size(self.offset + size) > self.max_size)
        ):
            self._close_shard()
        if self.tar is None:
            self._open_shard()
            if self.max_size is not None and _tar_file_size(size) > self.max_size:
                logger.warning(
                    "sample %s (%d bytes) exceeds max_size %d: it gets a shard of its own",
                    key,
                    _tar_file_size(size),
                    self.max_size,
                )
        assert self.tar is not None
        for suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed: reproducible shards
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.offset += size

    def _open_shard(self) -> None:
        path = self.pattern.path(self.shards_started)
        self.tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
        self.tar = tarfile.open(self.tmp, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in _close_shard or __exit__)
        self.shards_started += 1
        self.count = self.offset = 0

    def _close_shard(self) -> None:
        assert self.tar is not None
        self.tar.close()
        self.tar = None
        path = self.pattern.path(len(self.written))
        os.replace(self.tmp, path)
        self.written.append(path)

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.tar is None:
            return
        if exc_type is None:
            self._close_shard()
        else:  # an interrupted shard never appears under its final name
            self.tar.close()
            self.tar = None
            os.unlink(self.tmp)


def _tar_file_size(content: int) -> int:
    """Size of a tar file holding `content` bytes of headers and data (tarfile pads to 20-block records)."""
    return math.ceil((content + _TAR_END) / tarfile.RECORDSIZE) * tarfile.RECORDSIZE
