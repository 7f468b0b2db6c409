"""decode_clip seeks to the keyframe at or before a clip's start: the frames must be those of a full decode."""

import io
from fractions import Fraction
from random import Random

import av
import numpy as np
import pytest
import torch

import data.video
from data.video import VideoTooShortError, clip_span, decode_clip

FRAMES = 48
HEIGHT, WIDTH = 48, 64
FPS = 8


def moving_pattern(frames: int = FRAMES) -> np.ndarray:
    """uint8 (T, H, W, 3) frames of a textured pattern that moves: every frame differs, P/B frames are real."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (HEIGHT, 4 * WIDTH, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(texture[::4, ::4], 4, axis=0), 4, axis=1)[:HEIGHT, : 4 * WIDTH]
    return np.stack([np.roll(texture, -3 * i, axis=1)[:, :WIDTH] for i in range(frames)])


def encode(
    codec: str,
    container_format: str,
    gop: int,
    frames: int = FRAMES,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
) -> bytes:
    """Video of `moving_pattern` with a keyframe every `gop` frames (no scene-cut keyframes); `pts` in `time_base`."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.gop_size = gop
        if time_base is not None:  # the encoder's too, or it rounds the pts to the frame rate
            stream.time_base = stream.codec_context.time_base = time_base
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "sc_threshold": "0", "bf": "2"}
        else:
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for index, array in enumerate(moving_pattern(frames)):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[index], time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def keyframe_indices(video: bytes) -> list[int]:
    with av.open(io.BytesIO(video)) as container:
        return [i for i, frame in enumerate(container.decode(video=0)) if frame.key_frame]


def full_decode(video: bytes) -> torch.Tensor:
    """Every frame, decoded from the first one (start=0 never seeks)."""
    with av.open(io.BytesIO(video)) as container:
        count = sum(1 for _ in container.decode(video=0))
    return decode_clip(video, num_frames=count, start=0)


@pytest.fixture
def seek_results(monkeypatch):
    """Results of the seek path per call: a list of frames, or None when it fell back to the full decode."""
    results = []
    original = data.video._decode_after_seek

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        results.append(result)
        return result

    monkeypatch.setattr(data.video, "_decode_after_seek", spy)
    return results


VIDEOS = {
    ("h264-mp4", 8): ("libx264", "mp4", 8),
    ("h264-mp4", 12): ("libx264", "mp4", 12),
    ("vp9-webm", 8): ("libvpx-vp9", "webm", 8),
    ("vp9-webm", 10): ("libvpx-vp9", "webm", 10),
}


@pytest.fixture(scope="module", params=sorted(VIDEOS), ids=lambda key: f"{key[0]}-gop{key[1]}")
def cfr_video(request):
    codec, container_format, gop = VIDEOS[request.param]
    video = encode(codec, container_format, gop)
    assert keyframe_indices(video) == list(range(0, FRAMES, gop))  # the GOP the test means
    return video, gop, full_decode(video)


@pytest.mark.parametrize("num_frames,frame_stride", [(5, 1), (9, 2), (4, 3)])
def test_seek_gives_the_frames_of_a_full_decode(cfr_video, seek_results, num_frames, frame_stride):
    video, gop, reference = cfr_video
    assert reference.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert len({frame.float().mean().item() for frame in reference}) > FRAMES // 2  # frames differ
    span = clip_span(num_frames, frame_stride)
    last_start = FRAMES - span
    starts = {0, 1, gop - 1, gop, gop + gop // 2, 2 * gop + 1, 3 * gop, last_start - 1, last_start}
    starts = sorted(start for start in starts if start <= last_start)
    for start in starts:
        clip = decode_clip(video, num_frames, frame_stride, start=start)
        expected = reference[start : start + span : frame_stride]
        assert torch.equal(clip, expected), f"start {start}: seeking gave other frames than a full decode"
    # Every start after the first frame went through the seek path, and none fell back.
    assert len(seek_results) == len(starts) - 1 and all(result is not None for result in seek_results)


def test_seek_skips_the_frames_before_the_keyframe(cfr_video, seek_results):
    video, gop, _ = cfr_video
    decode_clip(video, 3, start=2 * gop + 2)
    (frames,) = seek_results
    assert len(frames) == 3
    # The clip's frames carry their pts: frame index 2 * gop + 2 on the grid.
    with av.open(io.BytesIO(video)) as container:
        stream = container.streams.video[0]
        per_tick = stream.time_base * stream.average_rate
        assert round((frames[0].pts - stream.start_time) * per_tick) == 2 * gop + 2


def test_random_starts_from_metadata_match_a_full_decode(cfr_video, seek_results):
    video, _, reference = cfr_video
    num_frames, frame_stride = 6, 2
    span = clip_span(num_frames, frame_stride)
    for seed in range(6):
        start = Random(seed).randint(0, FRAMES - span)
        clip = decode_clip(video, num_frames, frame_stride, rng=Random(seed), frame_count=FRAMES)
        assert torch.equal(clip, reference[start : start + span : frame_stride])


def test_overcounted_metadata_retries_with_the_true_count(cfr_video):
    video, _, reference = cfr_video
    num_frames, span = 8, 8
    for seed in range(8):
        rng = Random(seed)
        start = rng.randint(0, FRAMES + 30 - span)
        if start + span > FRAMES:  # past the end: one retry with the decoded count, same rng
            start = rng.randint(0, FRAMES - span)
        clip = decode_clip(video, num_frames, rng=Random(seed), frame_count=FRAMES + 30)
        assert torch.equal(clip, reference[start : start + span])


def test_too_short_from_a_late_start_keeps_its_error(cfr_video):
    video, _, _ = cfr_video
    with pytest.raises(VideoTooShortError, match=rf"has {FRAMES} frames .* needs 4 \(frames 46\.\.49\)"):
        decode_clip(video, num_frames=4, start=FRAMES - 2)
    with pytest.raises(VideoTooShortError, match=rf"has {FRAMES} frames"):
        decode_clip(video, num_frames=2, start=FRAMES + 5)


@pytest.mark.parametrize("codec,container_format", [("libx264", "mp4"), ("libvpx-vp9", "webm")])
def test_variable_frame_rate_falls_back_to_a_full_decode(codec, container_format, seek_results):
    # Frame 5 lasts two frame durations: every later pts is one frame further along than its count.
    pts = [125 * (i + (i > 5)) for i in range(FRAMES)]
    video = encode(codec, container_format, gop=8, pts=pts, time_base=Fraction(1, 1000))
    reference = full_decode(video)
    for start in (3, 9, 17, 30, FRAMES - 5):
        assert torch.equal(decode_clip(video, 5, start=start), reference[start : start + 5])
    assert seek_results and all(result is None for result in seek_results)


def test_jittered_timestamps_fall_back_to_a_full_decode(seek_results):
    # A variable rate without gaps: pts alternate short and long durations, off the average grid.
    pts = [125 * i + (40 if i % 2 else 0) for i in range(FRAMES)]
    video = encode("libx264", "mp4", gop=8, pts=pts, time_base=Fraction(1, 1000))
    with av.open(io.BytesIO(video)) as container:
        assert [frame.pts for frame in container.decode(video=0)][:3] == [0, 2640, 4000]  # 1/16000 s
    reference = full_decode(video)
    for start in (9, 20, FRAMES - 3):
        assert torch.equal(decode_clip(video, 3, start=start), reference[start : start + 3])
    assert all(result is None for result in seek_results)


def test_missing_timestamps_decode_from_the_first_frame(seek_results):
    # A raw H.264 stream has no container timestamps: no seeking, the full decode counts the frames.
    video = encode("libx264", "h264", gop=8)
    reference = full_decode(video)
    for start in (5, 17, FRAMES - 4):
        assert torch.equal(decode_clip(video, 4, start=start), reference[start : start + 4])
    assert all(result is None for result in seek_results)
