"""Data the pipeline meets in the wild: frame sizes that change mid-stream, bad shards among good ones,
videos of unknown length, rotated phone videos, 16-bit and EXIF-oriented images."""

import io
import logging
import struct
import tarfile
from pathlib import Path
from random import Random

import av
import numpy as np
import pytest
import skimage.data
import torch
from einops import rearrange
from PIL import Image

import data.video
from data import build_video_dataset
from data.transforms import resize
from data.video import VideoDecodeError, VideoTooShortError, clip_span, decode_clip, decode_frames, frame_size

HEIGHT, WIDTH = 48, 64


def photo_frames(frames: int = 9, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """uint8 (T, H, W, 3): a crop of a photograph panning sideways, so frames differ and are not symmetric."""
    image = skimage.data.astronaut()[::4, ::4]  # (128, 128, 3)
    return np.stack(
        [np.ascontiguousarray(np.roll(image, -3 * i, axis=1)[:height, :width]) for i in range(frames)]
    )


def encode(
    frames: np.ndarray, container_format: str = "mp4", codec: str = "libx264", gop: int = 12, fps: int = 8
) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "sc_threshold": "0"}
        elif codec.startswith("libvpx"):
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def full_decode(video: bytes) -> torch.Tensor:
    with av.open(io.BytesIO(video)) as container:
        count = sum(1 for _ in container.decode(video=0))
    return decode_clip(video, count, start=0)


# ---------------------------------------------------------------- frame size changes mid-stream


@pytest.fixture(scope="module")
def size_change() -> bytes:
    """12 frames: 6 of 64x48, then 6 of 48x32 (two MPEG-TS segments back to back, as a stream switches)."""
    first = encode(photo_frames(6), "mpegts", gop=6)
    second = encode(photo_frames(6, 32, 48), "mpegts", gop=6)
    return first + second


def test_a_clip_across_a_frame_size_change_is_a_decode_error(size_change):
    with pytest.raises(VideoDecodeError, match=r"change from 64x48 yuv420p to 48x32 yuv420p at its frame 6"):
        decode_clip(size_change, 9, start=0)
    # Clips on one side of the change are fine.
    assert decode_clip(size_change, 4, start=0).shape == (4, 48, 64, 3)
    assert decode_clip(size_change, 4, start=7).shape == (4, 32, 48, 3)


def test_a_frame_size_change_is_counted_as_corrupt_video_and_skipped(tmp_path, size_change, caplog):
    write_tar(tmp_path / "s.tar", [("000000000.mp4", size_change), ("000000001.mp4", encode(photo_frames()))])
    for resolution in (48, 16):  # without and with a resize
        dataset = build_video_dataset(
            str(tmp_path / "s.tar"), num_frames=9, resolution=resolution, train=False, rank=0, world_size=1
        )
        with caplog.at_level(logging.WARNING, logger="data"):
            assert [sample["key"] for sample in dataset] == ["000000001"]
        assert dataset.skip_counter.counts == {"corrupt_video": 1}
    assert "64x48 yuv420p to 48x32 yuv420p" in caplog.text
    short_clips = build_video_dataset(
        str(tmp_path / "s.tar"), num_frames=4, resolution=16, train=False, rank=0, world_size=1
    )
    assert [sample["key"] for sample in short_clips] == ["000000000", "000000001"]


# ---------------------------------------------------------------- bad shards among good ones


def write_shards(folder: Path, bad: set[int], count: int = 8) -> str:
    """`count` shards of 2 short videos each; those in `bad` are empty files (an object cut to 0 bytes)."""
    video = encode(photo_frames(), gop=9)
    for shard in range(count):
        path = folder / f"{shard:05d}.tar"
        if shard in bad:
            path.write_bytes(b"")
        else:
            write_tar(path, [(f"{shard:04d}{index:05d}.mp4", video) for index in range(2)])
    return str(folder / f"{{00000..{count - 1:05d}}}.tar")


def take(dataset, clips: int) -> list[str]:
    keys = []
    for sample in dataset:
        keys.append(sample["key"])
        if len(keys) == clips:
            return keys
    raise AssertionError("the train stream ended")


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_one_bad_shard_among_good_ones_does_not_end_the_stream(tmp_path, mode, caplog):
    # 8 shards for 8 ranks: each reads 1 shard per epoch (round), so the bad one leaves some reader's
    # epoch without a clip.
    pattern = write_shards(tmp_path, bad={2})
    bad_reads = 0
    for rank in range(8):
        dataset = build_video_dataset(
            pattern, num_frames=9, resolution=16, seed=0, shuffle_buffer=0, rank=rank, world_size=8, mode=mode
        )
        with caplog.at_level(logging.WARNING, logger="data"):
            keys = take(dataset, 16)
        assert not any(key.startswith("0002") for key in keys)
        bad_reads += dataset.skip_counter.counts.get("truncated_tar", 0)
    assert bad_reads >= 2
    period = "round" if mode == "resampled" else "epoch"
    assert f"worker 0: no usable clip in {period} " in caplog.text
    assert "00002.tar" in caplog.text and "shards without one, in a row: 1;" in caplog.text


def test_one_bad_shard_of_four_on_four_readers_never_ends_the_stream(tmp_path):
    """With as many readers as shards, the bad shard comes to the same reader several epochs in a row: with
    seed 47, rank 1 reads only it in epochs 9-12, where counting shard reads (not distinct shards) ended
    the stream after 18 clips."""
    pattern = write_shards(tmp_path, bad={2}, count=4)
    dataset = build_video_dataset(pattern, num_frames=9, resolution=16, seed=47, rank=1, world_size=4)
    assert len(take(dataset, 100)) == 100
    assert dataset.skip_counter.counts["truncated_tar"] >= 4


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_only_bad_shards_still_end_the_stream(tmp_path, mode, caplog):
    pattern = write_shards(tmp_path, bad=set(range(8)))
    dataset = build_video_dataset(pattern, num_frames=9, resolution=16, rank=1, world_size=8, mode=mode)
    with (
        caplog.at_level(logging.WARNING, logger="data"),
        pytest.raises(
            RuntimeError, match=r"rank 1 worker 0: no usable clip in any of the dataset's 8 shards"
        ),
    ):
        next(iter(dataset))
    # One shard per epoch (round), until all 8 have been read: the last raises, the others warn.
    reads = dataset.skip_counter.counts["truncated_tar"]
    assert reads >= 8 and list(dataset.skip_counter.counts) == ["truncated_tar"]
    assert caplog.text.count("no usable clip in") == reads - 1


# ---------------------------------------------------------------- videos of unknown length


class DecodeSpy:
    """Wraps av.open in data.video: counts the frames decoded and whether a decode ran to the end."""

    def __init__(self, monkeypatch) -> None:
        self.decoded = 0
        self.exhausted = False
        original = av.open
        monkeypatch.setattr(
            data.video.av, "open", lambda *args, **kwargs: _SpiedContainer(original(*args, **kwargs), self)
        )


class _SpiedContainer:
    def __init__(self, container, spy: DecodeSpy) -> None:
        self.container, self.spy = container, spy

    def __getattr__(self, name):
        return getattr(self.container, name)

    def __enter__(self):
        self.container.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self.container.__exit__(*exc_info)

    def decode(self, *args, **kwargs):
        for frame in self.container.decode(*args, **kwargs):
            self.spy.decoded += 1
            yield frame
        self.spy.exhausted = True


@pytest.fixture(scope="module", params=[("matroska", "mpeg4"), ("webm", "libvpx-vp9")], ids=["mkv", "webm"])
def unknown_length(request) -> tuple[bytes, torch.Tensor]:
    container_format, codec = request.param
    video = encode(photo_frames(40), container_format, codec, gop=10)
    with av.open(io.BytesIO(video)) as container:
        assert container.streams.video[0].frames == 0  # the container does not say how long it is
    return video, full_decode(video)


def test_unknown_length_clip_is_that_of_the_same_draw_from_a_full_decode(unknown_length):
    video, reference = unknown_length
    assert len(reference) == 40
    num_frames, frame_stride = 5, 2
    span = clip_span(num_frames, frame_stride)
    for seed in range(6):
        start = Random(seed).randint(0, len(reference) - span)  # the draw decoding all frames made
        clip = decode_clip(video, num_frames, frame_stride, rng=Random(seed))
        assert torch.equal(clip, reference[start : start + span : frame_stride]), f"seed {seed}"
    with pytest.raises(VideoTooShortError, match="has 40 frames"):
        decode_clip(video, 21, 2, rng=Random(0))


def test_unknown_length_video_is_not_decoded_whole(monkeypatch):
    frames = 120
    video = encode(photo_frames(frames, 32, 48), "matroska", "mpeg4", gop=12)
    num_frames = 9
    seed = next(s for s in range(100) if Random(s).randint(0, frames - num_frames) < frames // 2)
    start = Random(seed).randint(0, frames - num_frames)
    spy = DecodeSpy(monkeypatch)
    clip = decode_frames(video, num_frames, rng=Random(seed))
    assert len(clip) == num_frames
    # Decoding stops at the clip's last frame: the frames after it are never decoded, let alone kept.
    assert not spy.exhausted
    assert spy.decoded <= start + num_frames < frames


# ---------------------------------------------------------------- rotation (display matrix)


def with_rotation(mp4: bytes, degrees: int) -> bytes:
    """The mp4 with its track's display matrix set to turn the picture `degrees` counterclockwise (as
    PyAV's frame.rotation reports it; phones write -90 for portrait video)."""
    cos, sin = {90: (0, 1), -90: (0, -1), -180: (-1, 0)}[degrees]
    # tkhd stores a b u / c d v / x y w; FFmpeg reads the rotation as -atan2(b, a).
    a, b, c, d = cos, -sin, sin, cos
    matrix = [a << 16, b << 16, 0, c << 16, d << 16, 0, 0, 0, 1 << 30]
    out = bytearray(mp4)
    tkhd = out.find(b"tkhd")
    assert out[tkhd + 4] == 0  # version 0: 32-bit times
    offset = tkhd + 4 + 4 + 4 * 5 + 8 + 2 * 4  # version/flags, times, track id, duration, reserved, layer...
    out[offset : offset + 36] = struct.pack(">9i", *matrix)
    return bytes(out)


@pytest.fixture(scope="module")
def plain_mp4() -> bytes:
    return encode(photo_frames(), gop=4)


@pytest.mark.parametrize("degrees,turns", [(-90, -1), (90, 1), (-180, 2)])
def test_rotated_video_decodes_upright(plain_mp4, degrees, turns):
    rotated = with_rotation(plain_mp4, degrees)
    with av.open(io.BytesIO(rotated)) as container:
        assert next(container.decode(video=0)).rotation == degrees
    stored = decode_clip(plain_mp4, 9, start=0)  # (T, H, W, C), as coded
    upright = torch.from_numpy(np.rot90(stored.numpy(), turns, axes=(1, 2)).copy())
    assert torch.equal(decode_clip(rotated, 9, start=0), upright)
    assert torch.equal(decode_clip(rotated, 4, start=5), upright[5:9])  # the seek path too
    expected_size = (WIDTH, HEIGHT) if turns % 2 else (HEIGHT, WIDTH)
    assert frame_size(decode_frames(rotated, 2, start=0)) == expected_size
    # The other way round is far off: the test tells the directions apart.
    if turns % 2:
        wrong = torch.from_numpy(np.rot90(stored.numpy(), -turns, axes=(1, 2)).copy())
        assert (wrong.float() - upright.float()).abs().mean() > 20


def test_rotated_video_takes_the_bucket_of_its_display_size(tmp_path, plain_mp4):
    portrait = with_rotation(plain_mp4, -90)  # shown 48 wide and 64 tall
    write_tar(tmp_path / "rot.tar", [("000000000.mp4", portrait)])
    upright = decode_clip(portrait, 9, start=0)
    assert upright.shape == (9, WIDTH, HEIGHT, 3)
    # (64, 48) is the display size itself: the no-resize path; (32, 24) resizes.
    for buckets, target in (([(48, 64), (64, 48)], (64, 48)), ([(24, 32), (32, 24)], (32, 24))):
        dataset = build_video_dataset(
            str(tmp_path / "rot.tar"),
            num_frames=9,
            resolution=32,
            train=False,
            rank=0,
            world_size=1,
            buckets=buckets,
            uint8=True,
        )
        (sample,) = list(dataset)
        expected = rearrange(resize(upright, target), "t h w c -> c t h w")
        assert sample["video"].shape == (3, 9, *target)
        assert torch.equal(sample["video"], expected)


# ---------------------------------------------------------------- images: 16 bits, EXIF orientation


def image_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def image_clips(tmp_path: Path, members: list[tuple[str, bytes]], buckets=()) -> tuple[list[dict], object]:
    write_tar(tmp_path / "images.tar", members)
    dataset = build_video_dataset(
        str(tmp_path / "images.tar"),
        num_frames=1,
        resolution=64,
        train=False,
        rank=0,
        world_size=1,
        buckets=buckets,
        uint8=True,
    )
    return list(dataset), dataset


def test_16_bit_grey_png_is_scaled_to_8_bits(tmp_path):
    grey = skimage.data.camera()[::8, ::8]  # (64, 64) uint8
    deep = Image.fromarray(grey.astype(np.uint16) * 257)  # the same picture in 16 bits
    assert deep.mode == "I;16"
    samples, dataset = image_clips(
        tmp_path,
        [
            ("000000000.png", image_bytes(Image.fromarray(grey), "PNG")),
            ("000000001.png", image_bytes(deep, "PNG")),
        ],
    )
    assert dataset.skip_counter.counts == {}
    eight, sixteen = (sample["video"].int() for sample in samples)
    assert torch.equal(eight[0, 0], torch.from_numpy(grey).int())
    assert (eight - sixteen).abs().max() <= 1


def test_float_image_is_skipped_as_corrupt(tmp_path):
    floats = Image.fromarray(skimage.data.camera()[::8, ::8].astype(np.float32))
    samples, dataset = image_clips(tmp_path, [("000000000.png", image_bytes(floats, "TIFF"))])  # misnamed
    assert samples == [] and dataset.skip_counter.counts == {"corrupt_image": 1}


def test_exif_orientation_is_applied(tmp_path):
    landscape = Image.fromarray(
        np.ascontiguousarray(skimage.data.astronaut()[:256:8, ::8])
    )  # 64 wide, 32 tall
    exif = landscape.getexif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to show
    jpeg = image_bytes(landscape, "JPEG", quality=95, exif=exif)
    samples, dataset = image_clips(tmp_path, [("000000000.jpg", jpeg)], buckets=[(64, 32), (32, 64)])
    assert dataset.skip_counter.counts == {}
    (sample,) = samples
    assert sample["video"].shape == (3, 1, 64, 32)  # the bucket of the display size
    with Image.open(io.BytesIO(jpeg)) as stored:
        upright = np.rot90(np.asarray(stored.convert("RGB")), -1)  # clockwise
    assert torch.equal(rearrange(sample["video"], "c 1 h w -> h w c"), torch.from_numpy(upright.copy()))
