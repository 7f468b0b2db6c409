"""Decoding video clips from in-memory bytes with PyAV."""

from __future__ import annotations

import io
import random
from fractions import Fraction

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

# A pts may be this far (in frames) off the constant-rate grid, e.g. from webm's millisecond timestamps.
_GRID_TOLERANCE = 0.25
# Tries to find a keyframe at or before the start when the demuxer seeks too far (its index uses dts, say).
_SEEK_ATTEMPTS = 3


class VideoDecodeError(ValueError):
    """The payload is not a decodable video (corrupt, empty, no video stream)."""


class VideoTooShortError(VideoDecodeError):
    """The video decodes but has fewer frames than the requested clip spans."""


def clip_span(num_frames: int, frame_stride: int = 1) -> int:
    """Number of source frames a clip of `num_frames` frames taken every `frame_stride` frames spans."""
    return (num_frames - 1) * frame_stride + 1


def video_fps(video_bytes: bytes) -> float | None:
    """The video stream's average frame rate from the container header (no decoding), or None."""
    try:
        with av.open(io.BytesIO(video_bytes), mode="r") as container:
            if not container.streams.video:
                return None
            rate = container.streams.video[0].average_rate or container.streams.video[0].base_rate
            return float(rate) if rate else None
    except (av.FFmpegError, OSError, EOFError, UnicodeDecodeError, ZeroDivisionError):
        return None


def stride_for_fps(source_fps: float, target_fps: float) -> int:
    """The frame stride that samples a `source_fps` video closest to `target_fps` (at least 1)."""
    if source_fps <= 0 or target_fps <= 0:
        raise ValueError(f"frame rates must be > 0, got source {source_fps}, target {target_fps}")
    return max(1, round(source_fps / target_fps))


def decode_clip(
    video_bytes: bytes,
    num_frames: int,
    frame_stride: int = 1,
    start: int | None = None,
    rng: random.Random | None = None,
    frame_count: int | None = None,
) -> torch.Tensor:
    """Decode `num_frames` frames, every `frame_stride`-th from `start`, as uint8 (T, H, W, C) RGB, upright
    (turned by the stream's rotation, as players show it).

    With `start=None` the start is drawn uniformly from `rng` (a fresh unseeded one if None) among
    the starts that fit. `frame_count` (e.g. from the sample's json) avoids needing the container's
    frame count; if it turns out to be wrong the clip is taken from the frames actually decoded.

    A clip that starts after the first frame is decoded from the keyframe at or before its start
    (a seek), frames identified by their pts; when the stream's timing cannot be trusted for that
    (no pts, variable frame rate, frames that do not line up after the seek) it is decoded from the
    first frame. Either way the frames are those of a decode from the first frame.
    """
    return stack_rgb(decode_frames(video_bytes, num_frames, frame_stride, start, rng, frame_count))


def stack_rgb(frames: list[av.VideoFrame]) -> torch.Tensor:
    """Decoded frames -> uint8 (T, H, W, C) RGB, upright."""
    # One reformatter for the clip keeps one swscale context: about 3x cheaper than frame.to_ndarray.
    reformatter = VideoReformatter()
    return torch.from_numpy(np.stack([_rgb24(reformatter, frame) for frame in frames]))


def decode_frames(
    video_bytes: bytes,
    num_frames: int,
    frame_stride: int = 1,
    start: int | None = None,
    rng: random.Random | None = None,
    frame_count: int | None = None,
) -> list[av.VideoFrame]:
    """The decoded frames `decode_clip` converts to RGB (same arguments, same frames, same rng draws);
    for callers that write the frames straight into their own buffer (see `write_frames`)."""
    if num_frames < 1 or frame_stride < 1:
        raise ValueError(f"num_frames ({num_frames}) and frame_stride ({frame_stride}) must be >= 1")
    if start is not None and start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if not video_bytes:
        raise VideoDecodeError("empty video payload (0 bytes)")
    span = clip_span(num_frames, frame_stride)
    try:
        with av.open(io.BytesIO(video_bytes), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError("payload has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"
            chose_start = start is None
            if start is None:
                known = frame_count if frame_count is not None and frame_count > 0 else stream.frames
                if known < span:
                    # Unknown (mkv and webm give none) or suspiciously short length: count the packets,
                    # which costs a demux but no decoding, rather than decode the whole video to count.
                    known = _count_packets(video_bytes)
                if known < span:
                    # Too few packets: a short video, cheap to keep whole; choose from what decodes.
                    frames = list(container.decode(stream))
                    if len(frames) < span:
                        raise _too_short(len(frames), num_frames, frame_stride)
                    start = (rng or random.Random()).randint(0, len(frames) - span)
                    return _checked(frames[start : start + span : frame_stride])
                start = (rng or random.Random()).randint(0, known - span)
            if start > 0 and _seekable(stream):
                try:
                    picked = _decode_after_seek(container, stream, start, num_frames, frame_stride)
                except av.FFmpegError:
                    picked = None  # e.g. corrupt data after the seek point: the full decode judges it
                if picked is not None:
                    return _checked(picked)
                # Seeking could not be trusted: decode from the first frame in a fresh container.
                with av.open(io.BytesIO(video_bytes), mode="r") as fresh:
                    fresh_stream = fresh.streams.video[0]
                    fresh_stream.thread_type = "SLICE"
                    picked, seen = _decode_from_first_frame(
                        fresh, fresh_stream, start, num_frames, frame_stride
                    )
            else:
                picked, seen = _decode_from_first_frame(container, stream, start, num_frames, frame_stride)
            if picked is not None:
                return _checked(picked)
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, EOFError) as exn:
        raise VideoDecodeError(f"cannot decode video payload ({len(video_bytes)} bytes): {exn}") from exn
    if chose_start and seen >= span:
        # The metadata (or the packet count) over-counted the frames: retry once with the true count.
        return decode_frames(video_bytes, num_frames, frame_stride, rng=rng, frame_count=seen)
    raise _too_short(seen, num_frames, frame_stride, start=start)


def frame_size(frames: list[av.VideoFrame]) -> tuple[int, int]:
    """(height, width) of decoded frames as displayed: upright, after their rotation (see `_rgb24`)."""
    return _display_size(frames[0])


def write_frames(frames: list[av.VideoFrame], out: torch.Tensor, top: int = 0, left: int = 0) -> torch.Tensor:
    """Write the (h, w) window at (top, left) of each upright RGB frame into `out`, a (C, T, h, w) uint8 or
    float32 CPU tensor (a float one gets the frames' values 0..255 unchanged); returns `out`.

    The same pixels as `decode_clip(...)[:, top : top + h, left : left + w]` in (C, T, h, w) layout, with
    one copy per frame instead of a stacked (T, H, W, C) clip, a crop and a layout change.
    """
    _, count, height, width = out.shape
    if count != len(frames):
        raise ValueError(f"out has {count} frames, got {len(frames)}")
    reformatter = VideoReformatter()
    # numpy's strided copy takes the (H, W, C) -> (C, H, W) transposition about 1.5x faster than torch's
    # copy_ for these frame sizes, and without per-frame tensor wrappers.
    target = out.numpy()
    for index, frame in enumerate(frames):
        rgb = _rgb24(reformatter, frame)  # (H, W, C), a view of the converted (and rotated) frame
        np.copyto(target[:, index], rgb[top : top + height, left : left + width].transpose(2, 0, 1))
    return out


def _rgb24(reformatter: VideoReformatter, frame: av.VideoFrame) -> np.ndarray:
    """The frame as (H, W, C) RGB, upright: turned as its display matrix says (phones store portrait video
    as landscape frames plus a rotation), a view of the converted frame."""
    return np.rot90(reformatter.reformat(frame, format="rgb24").to_ndarray(), _quarter_turns(frame))


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counterclockwise quarter turns (0..3) that make the frame upright, as np.rot90's `k`.

    PyAV's `rotation` is the display matrix's counterclockwise angle (FFmpeg's av_display_rotation_get),
    so -90 (a phone's portrait video) is a clockwise quarter turn, as ffmpeg's autorotate does it. An
    angle between quarter turns (never written by phones or cameras) goes to the nearest one (ties to
    even); a flip in the matrix is ignored.
    """
    return round(frame.rotation / 90) % 4


def _display_size(frame: av.VideoFrame) -> tuple[int, int]:
    """(height, width) of the frame once upright."""
    if _quarter_turns(frame) % 2:
        return frame.width, frame.height
    return frame.height, frame.width


def _count_packets(video_bytes: bytes) -> int:
    """Packets of the first video stream (one per frame for the codecs in use), demuxed, not decoded."""
    with av.open(io.BytesIO(video_bytes), mode="r") as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)  # less the empty flush packets


def _checked(frames: list[av.VideoFrame]) -> list[av.VideoFrame]:
    # Damaged streams often decode without an error, the decoder concealing the damage (altered pixels):
    # FFmpeg flags such frames as corrupt, and a clip with one is rejected rather than trained on.
    corrupt = sum(frame.is_corrupt for frame in frames)
    if corrupt:
        raise VideoDecodeError(f"{corrupt} of the clip's {len(frames)} frames are corrupt (damaged stream)")
    # A stream may change its frame size mid-way (WebRTC and screen recordings do): a clip is one size.
    first = _layout(frames[0])
    for index, frame in enumerate(frames[1:], start=1):
        if _layout(frame) != first:
            raise VideoDecodeError(
                f"the clip's frames change from {_describe(first)} to {_describe(_layout(frame))} at its "
                f"frame {index} of {len(frames)}"
            )
    return frames


def _layout(frame: av.VideoFrame) -> tuple[int, int, str]:
    """(height, width) as displayed and pixel format: what frames of one clip must share."""
    return (*_display_size(frame), frame.format.name)


def _describe(layout: tuple[int, int, str]) -> str:
    height, width, pixel_format = layout
    return f"{width}x{height} {pixel_format}"


def _seekable(stream: av.VideoStream) -> bool:
    """Whether the stream has what pts -> frame index needs: a start time, a time base, a frame rate."""
    return stream.start_time is not None and bool(stream.time_base) and bool(stream.average_rate)


def _decode_after_seek(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    start: int,
    num_frames: int,
    frame_stride: int,
) -> list[av.VideoFrame] | None:
    """The clip's frames decoded from the keyframe at or before `start`, or None if that cannot be trusted.

    Frames are identified by pts: index = (pts - start_time) * time_base * average_rate. None (the
    caller then decodes from the first frame) unless the first frame after the seek is a keyframe at or
    before `start`, every frame from there has the next index up to the clip's last frame, and the
    packets before the keyframe are exactly the frames before it on the grid.
    """
    frames_per_tick = stream.time_base * stream.average_rate
    origin = stream.start_time
    last = start + clip_span(num_frames, frame_stride) - 1
    target = origin + round(start / frames_per_tick)
    for _ in range(_SEEK_ATTEMPTS):
        if target < origin:
            return None
        container.seek(target, stream=stream, backward=True, any_frame=False)
        picked: list[av.VideoFrame] = []
        expected = None
        for frame in container.decode(stream):
            index = _pts_to_index(frame.pts, origin, frames_per_tick)
            if index is None:
                return None  # no pts, or one off the constant-rate grid
            if expected is None:
                if not frame.key_frame:
                    return None  # e.g. an open GOP's leading frames: they may differ from a full decode
                if index > start:
                    target = frame.pts - 1  # the demuxer chose a keyframe after the start: go further back
                    break
                key_pts, key_index = frame.pts, index
            elif index != expected:
                return None  # a gap or a repeat: the rate is not constant here
            expected = index + 1
            if index >= start and (index - start) % frame_stride == 0:
                picked.append(frame)
                if index == last:
                    break
        else:
            return None  # the frames ran out first: the full decode counts them and says so
        if not picked:
            continue  # broke off to seek further back
        # The pts grid held from the keyframe on; it must hold before it too, or the frame the grid
        # calls `key_index` is not the key_index-th of a full decode (e.g. a gap before the seek point).
        return (
            picked if _frames_before_line_up(container, stream, key_pts, key_index, frames_per_tick) else None
        )
    return None


def _frames_before_line_up(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    key_pts: int,
    key_index: int,
    frames_per_tick: Fraction,
) -> bool:
    """Whether the packets before the keyframe at `key_pts` are exactly frames 0..key_index-1 of the grid.

    Demuxes (without decoding) from the first packet: cheap next to decoding. In a closed GOP every
    frame shown before a keyframe is stored before it.
    """
    if key_index == 0:
        return True
    container.seek(stream.start_time, stream=stream, backward=True, any_frame=False)
    indices = set()
    for packet in container.demux(stream):
        if packet.pts == key_pts:
            return packet.is_keyframe and len(indices) == key_index
        index = _pts_to_index(packet.pts, stream.start_time, frames_per_tick)
        if index is None or index >= key_index or index in indices:
            return False
        indices.add(index)
    return False


def _pts_to_index(pts: int | None, origin: int, frames_per_tick: Fraction) -> int | None:
    """Frame index of a pts on the constant-rate grid, or None when there is no pts or it is off the grid."""
    if pts is None:
        return None
    # round((pts - origin) * frames_per_tick) and its distance to the grid, in integers (Fraction
    # arithmetic per frame cost about 1 ms per clip); a tie (0.5 off) is off the grid either way.
    scaled = (pts - origin) * frames_per_tick.numerator
    ticks = frames_per_tick.denominator
    index, remainder = divmod(scaled, ticks)
    if 2 * remainder > ticks:
        index, remainder = index + 1, remainder - ticks
    return index if index >= 0 and abs(remainder) <= _GRID_TOLERANCE * ticks else None


def _decode_from_first_frame(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    start: int,
    num_frames: int,
    frame_stride: int,
) -> tuple[list[av.VideoFrame] | None, int]:
    """The clip's frames counted from the first decoded frame, or None and the number of frames there are."""
    wanted = range(start, start + clip_span(num_frames, frame_stride), frame_stride)
    picked = []
    seen = 0
    for index, frame in enumerate(container.decode(stream)):
        seen = index + 1
        if index in wanted:
            picked.append(frame)
            if len(picked) == num_frames:
                return picked, seen
    return None, seen


def _too_short(have: int, num_frames: int, frame_stride: int, start: int = 0) -> VideoTooShortError:
    need = clip_span(num_frames, frame_stride)
    where = f" (frames {start}..{start + need - 1})" if start else ""
    return VideoTooShortError(
        f"video has {have} frames but a clip of {num_frames} frames at stride {frame_stride} "
        f"needs {need}{where}"
    )
