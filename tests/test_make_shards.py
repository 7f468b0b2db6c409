"""make_shards: real short videos (mp4, webm, mkv, a corrupt one) -> shards that the data pipeline reads."""

import io
import itertools
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import skimage.data
from av.video.reformatter import ColorRange, Colorspace

from data import build_video_dataset
from data.shard_writer import ShardPattern, ShardWriterConfig, parse_size, write_shards
from data.video import decode_clip

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 64, 48

# relative path -> (photo, frames, fps, codec, container format)
VIDEOS = {
    "a_astronaut.mp4": (skimage.data.astronaut, 12, 8, "libx264", "mp4"),
    "b_coffee.mp4": (skimage.data.coffee, 25, 10, "libx264", "mp4"),
    "sub/c_chelsea.webm": (skimage.data.chelsea, 17, 12, "libvpx", "webm"),
    "sub/deeper/d_rocket.mkv": (skimage.data.rocket, 20, 8, "mpeg4", "matroska"),
}
CORRUPT = "e_truncated.mp4"


def _pan(photo: np.ndarray, frames: int) -> np.ndarray:
    """uint8 (T, H, W, 3): a window sliding 2 px per frame over the photo, downscaled by 4."""
    small = np.ascontiguousarray(photo[::4, ::4, :3])
    return np.stack([small[i : i + HEIGHT, 2 * i : 2 * i + WIDTH] for i in range(frames)])


def _encode(path: Path, video: np.ndarray, fps: int, codec: str, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _decode(data: bytes | Path) -> np.ndarray:
    source = str(data) if isinstance(data, Path) else io.BytesIO(data)
    with av.open(source) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    for name, (photo, frames, fps, codec, fmt) in VIDEOS.items():
        _encode(root / name, _pan(photo(), frames), fps, codec, fmt)
    whole = (root / "a_astronaut.mp4").read_bytes()
    (root / CORRUPT).write_bytes(whole[: len(whole) // 2])  # mp4 index (moov) is at the end: lost
    (root / "notes.txt").write_text("not a video")
    return root


def _read_shards(paths: list[str]) -> list[tuple[list[str], dict[str, bytes]]]:
    """Per shard: member names in order, and name -> bytes."""
    shards = []
    for path in paths:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            shards.append(([m.name for m in members], {m.name: tar.extractfile(m).read() for m in members}))
    return shards


def _metas(shards: list[tuple[list[str], dict[str, bytes]]]) -> list[dict]:
    return [json.loads(data[name]) for names, data in shards for name in names if name.endswith(".json")]


def test_shards_hold_every_readable_video_with_true_metadata(videos: Path, tmp_path: Path) -> None:
    summary = write_shards(videos, str(tmp_path / "shard-%06d.tar"), ShardWriterConfig(max_count=3))
    assert summary.videos == 5 and summary.samples == 4
    assert summary.skipped == {"unreadable_video": 1}
    assert summary.shards == [str(tmp_path / "shard-000000.tar"), str(tmp_path / "shard-000001.tar")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]  # no temp files
    shards = _read_shards(summary.shards)
    keys = [[f"{i:09d}" for i in range(3)], ["000000003"]]
    for (names, _), shard_keys in zip(shards, keys, strict=True):
        assert names == [f"{key}.{ext}" for key in shard_keys for ext in ("mp4", "json", "txt")]

    metas = _metas(shards)
    assert [m["url"] for m in metas] == sorted(VIDEOS)  # sorted, relative, '/'-separated
    for meta, (_, data) in zip(metas, [s for s in shards for _ in range(len(s[0]) // 3)], strict=True):
        _, frames, fps, _, _ = VIDEOS[meta["url"]]
        truth = _decode(videos / meta["url"])
        assert len(truth) == frames
        mp4 = data[f"{meta['key']}.mp4"]
        assert meta["frames"] == frames == len(_decode(mp4))
        assert (meta["width"], meta["height"]) == (WIDTH, HEIGHT)
        assert meta["fps"] == pytest.approx(fps)
        assert meta["duration"] == pytest.approx(frames / fps, abs=1e-3)
        stem = Path(meta["url"]).stem
        assert meta["caption"] == stem and data[f"{meta['key']}.txt"] == stem.encode()
        if meta["url"].endswith(".mp4"):  # H.264 mp4: stored byte for byte
            assert not meta["reencoded"] and mp4 == (videos / meta["url"]).read_bytes()
        else:
            assert meta["reencoded"]
            with av.open(io.BytesIO(mp4)) as container:
                assert container.streams.video[0].codec_context.name == "h264"

    dataset = build_video_dataset(
        str(tmp_path / "shard-{000000..000001}.tar"),
        num_frames=9,
        resolution=32,
        train=False,
        rank=0,
        world_size=1,
    )
    clips = list(dataset)
    assert [c["key"] for c in clips] == [f"{i:09d}" for i in range(4)]
    assert all(c["video"].shape == (3, 9, 32, 32) for c in clips)
    assert dataset.skip_counter.total == 0


def test_max_size_starts_a_new_shard_before_exceeding_it(videos: Path, tmp_path: Path) -> None:
    limit = parse_size("20KiB")
    summary = write_shards(videos, str(tmp_path / "a-%03d.tar"), ShardWriterConfig(max_size=limit))
    shards = _read_shards(summary.shards)
    assert summary.samples == 4 and len(shards) > 1
    assert all(Path(p).stat().st_size <= limit for p in summary.shards)
    assert [m["key"] for m in _metas(shards)] == [f"{i:09d}" for i in range(4)]

    # Greedy: the first sample of each next shard did not fit in the previous one.
    for (names, data), (next_names, next_data) in itertools.pairwise(shards):
        used = sum(512 + -(-len(data[n]) // 512) * 512 for n in names)
        extra = sum(512 + -(-len(next_data[n]) // 512) * 512 for n in next_names[:3])
        assert -(-(used + extra + 1024) // 10240) * 10240 > limit

    # A sample bigger than the limit gets a shard of its own.
    tiny = write_shards(videos, str(tmp_path / "b-%03d.tar"), ShardWriterConfig(max_size=1000))
    assert [len(names) for names, _ in _read_shards(tiny.shards)] == [3, 3, 3, 3]


def test_clips_are_cut_consecutively_and_reencoded(videos: Path, tmp_path: Path) -> None:
    config = ShardWriterConfig(clip_frames=5, max_count=100)
    summary = write_shards(videos, str(tmp_path / "c-%06d.tar"), config)
    shards = _read_shards(summary.shards)
    metas = _metas(shards)
    counts = {url: frames // 5 for url, (_, frames, _, _, _) in VIDEOS.items()}
    assert summary.samples == len(metas) == sum(counts.values()) == 14
    for url, n in counts.items():
        clips = [m for m in metas if m["url"] == url]
        assert [m["source_frame_start"] for m in clips] == [5 * i for i in range(n)]
        assert all(m["frames"] == 5 and m["reencoded"] for m in clips)
    # The clip's frames are the source's frames from source_frame_start on.
    data = {name: payload for _, shard in shards for name, payload in shard.items()}
    clip_meta = next(m for m in metas if m["url"] == "b_coffee.mp4" and m["source_frame_start"] == 10)
    clip = _decode(data[f"{clip_meta['key']}.mp4"])
    source = _decode(videos / "b_coffee.mp4")[10:15]
    assert clip.shape == source.shape == (5, HEIGHT, WIDTH, 3)
    assert np.abs(clip.astype(float) - source).mean() < 4.0

    # A stride longer than the clip leaves gaps; a video shorter than one clip is skipped.
    strided = write_shards(
        videos, str(tmp_path / "d-%06d.tar"), ShardWriterConfig(clip_frames=5, clip_stride=8)
    )
    assert [m["source_frame_start"] for m in _metas(_read_shards(strided.shards))] == [
        0,
        0,
        8,
        16,
        0,
        8,
        0,
        8,
    ]
    too_long = write_shards(videos, str(tmp_path / "e-%06d.tar"), ShardWriterConfig(clip_frames=18))
    assert too_long.samples == 2 and too_long.skipped == {"too_short": 2, "unreadable_video": 1}


def test_reencode_resamples_fps_and_downscales(videos: Path, tmp_path: Path) -> None:
    config = ShardWriterConfig(fps=4, max_side=32, crf=30)
    summary = write_shards(videos, str(tmp_path / "r-%06d.tar"), config)
    for meta in _metas(_read_shards(summary.shards)):
        _, frames, fps, _, _ = VIDEOS[meta["url"]]
        expected = sum(1 for j in range(100) if int(j * fps / 4 + 0.5) < frames)
        assert (meta["width"], meta["height"], meta["fps"]) == (32, 24, 4.0)
        assert meta["frames"] == expected and meta["duration"] == pytest.approx(expected / 4, abs=1e-3)
        assert meta["source_fps"] == fps and meta["reencoded"]


def test_output_is_the_same_for_any_number_of_workers(videos: Path, tmp_path: Path) -> None:
    config = ShardWriterConfig(clip_frames=9, clip_stride=4, max_count=4)
    runs = [
        _read_shards(write_shards(videos, str(tmp_path / f"w{n}-%06d.tar"), config, workers=n).shards)
        for n in (1, 2)
    ]
    assert [names for names, _ in runs[0]] == [names for names, _ in runs[1]]
    assert _metas(runs[0]) == _metas(runs[1])
    assert len(_metas(runs[0])) > 4


def test_existing_shards_are_kept_unless_overwrite(videos: Path, tmp_path: Path) -> None:
    pattern = str(tmp_path / "o-%06d.tar")
    first = write_shards(videos, pattern, ShardWriterConfig(max_count=1))
    assert len(first.shards) == 4
    with pytest.raises(ValueError, match=r"4 shards matching .* exist"):
        write_shards(videos, pattern, ShardWriterConfig(max_count=2))
    second = write_shards(videos, pattern, ShardWriterConfig(max_count=2), overwrite=True)
    assert len(second.shards) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "o-000000.tar",
        "o-000001.tar",
    ]  # stale ones removed


def test_argument_checks() -> None:
    assert parse_size("1e9") == 10**9 and parse_size("500MB") == 500 * 10**6 and parse_size("2KiB") == 2048
    for bad in ("", "12XB", "-5", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    for bad in ("out/shard.tar", "out/%d-%d.tar", "out/%s.tar"):
        with pytest.raises(ValueError, match="shard-index field"):
            ShardPattern(bad)
    assert ShardPattern("x/%%-%05d.tar").path(3) == "x/%-00003.tar"
    for kwargs in ({"max_count": 0}, {"crf": 60}, {"fps": 0.0}, {"clip_stride": 2}, {"max_side": 1}):
        with pytest.raises(ValueError):
            ShardWriterConfig(**kwargs)


def test_launcher(videos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(REPO / "launch"))
    try:
        from make_shards import main
    finally:
        sys.path.remove(str(REPO / "launch"))
    for argv in (
        ["--input", str(videos), "--output", str(tmp_path / "x-%06d.tar"), "--max-count", "0"],
        ["--input", str(videos), "--output", str(tmp_path / "x.tar")],
        ["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "x-%06d.tar")],
        ["--input", str(videos), "--output", str(tmp_path / "x-%06d.tar"), "--max-size", "lots"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and "error:" in err, (argv, err)

    command = [sys.executable, "launch/make_shards.py", "--input", str(videos), "--max-size", "30kB"]
    command += ["--output", str(tmp_path / "cli-%06d.tar"), "--workers", "1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "5 videos -> 4 samples in" in done.stdout and "skipped 1 videos" in done.stdout
    assert "skipping" in done.stderr and "Traceback" not in done.stderr
    assert sorted(tmp_path.glob("cli-*.tar"))

    with pytest.raises(SystemExit) as exit_info:  # the shards exist now
        main(command[2:])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err


def _encode_tagged(
    path: Path,
    video: np.ndarray,
    *,
    codec: str = "libx264",
    fmt: str = "mp4",
    pix_fmt: str = "yuv420p",
    full_range: bool = False,
    bt709: bool = False,
    rotation: int = 0,
) -> None:
    """Like `_encode`, lossless, with the frames converted to the colours named (and tagged with them), and a
    display rotation (counterclockwise degrees, as PyAV's `VideoFrame.rotation` reads it back).
    """
    color_range = ColorRange.JPEG if full_range else ColorRange.MPEG
    matrix = Colorspace.ITU709 if bt709 else Colorspace.ITU601
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], pix_fmt
        stream.options = {"crf": "0"} if codec == "libx264" else {"lossless": "1"}
        stream.codec_context.color_range = color_range
        stream.codec_context.colorspace = 1 if bt709 else 6  # AVCOL_SPC_BT709, AVCOL_SPC_SMPTE170M
        if rotation:
            stream.set_display_rotation(rotation)
        for rgb in video:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame = frame.reformat(format=pix_fmt, dst_colorspace=matrix, dst_color_range=color_range)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _first_frame(data: bytes) -> av.VideoFrame:
    with av.open(io.BytesIO(data)) as container:
        return next(container.decode(video=0))


def test_reencoding_keeps_the_colours_of_full_range_and_bt709_sources(tmp_path: Path) -> None:
    video = _pan(skimage.data.coffee(), 9)  # a saturated photo: a BT.709 / BT.601 mix-up shows
    sources = tmp_path / "in"
    sources.mkdir()
    _encode_tagged(sources / "full_range_yuvj.mp4", video, pix_fmt="yuvj420p", full_range=True)
    _encode_tagged(sources / "full_range_tag.webm", video, codec="libvpx-vp9", fmt="webm", full_range=True)
    _encode_tagged(sources / "bt709.mp4", video, bt709=True)
    assert _first_frame((sources / "full_range_tag.webm").read_bytes()).color_range == ColorRange.JPEG

    config = ShardWriterConfig(reencode=True, crf=10)
    summary = write_shards(sources, str(tmp_path / "s-%06d.tar"), config)
    assert summary.samples == 3
    ((_, data),) = _read_shards(summary.shards)
    for meta in _metas(_read_shards(summary.shards)):
        mp4 = data[f"{meta['key']}.mp4"]
        source = decode_clip((sources / meta["url"]).read_bytes(), 9, start=0).numpy().astype(float)
        shard = decode_clip(mp4, 9, start=0).numpy().astype(float)
        # Measured: 1.6 (both full range) and 1.8 (BT.709); before the fix 9.1 and 5.3, as the full range
        # was stretched (1.09 * source - 9) and BT.709 read as BT.601.
        assert np.abs(shard - source).mean() < 2.5, meta["url"]
        # No extra clipping (measured 1.6% at 0 or 255 against the source's 1.5%; before the fix 14%).
        clipped = [np.mean((clip == 0) | (clip == 255)) for clip in (shard, source)]
        assert clipped[0] < clipped[1] + 0.005, (meta["url"], clipped)
        frame = _first_frame(mp4)  # the shard says what it holds: limited-range BT.601
        assert (frame.color_range, frame.colorspace) in ((ColorRange.MPEG, 5), (ColorRange.MPEG, 6))


def test_rotated_sources_become_upright_clips(tmp_path: Path) -> None:
    video = _pan(skimage.data.astronaut(), 9)  # (T, 48, 64, 3)
    sources = tmp_path / "in"
    sources.mkdir()
    # -90 is what phones write for portrait video: shown turned a quarter clockwise (ffmpeg: transpose=clock).
    rotations = {"minus90.mp4": -90, "plus90.mp4": 90, "upside_down.mp4": 180}
    for name, degrees in rotations.items():
        _encode_tagged(sources / name, video, rotation=degrees)
        assert _first_frame((sources / name).read_bytes()).rotation % 360 == degrees % 360  # 180 reads -180

    summary = write_shards(sources, str(tmp_path / "r-%06d.tar"), ShardWriterConfig(reencode=True))
    ((_, data),) = _read_shards(summary.shards)
    metas = _metas(_read_shards(summary.shards))
    assert sorted(m["url"] for m in metas) == sorted(rotations)
    for meta in metas:
        stored = _decode(sources / meta["url"])  # (T, H, W, C) as coded, the rotation not applied
        upright = np.rot90(stored, rotations[meta["url"]] // 90, axes=(1, 2))  # counterclockwise turns
        mp4 = data[f"{meta['key']}.mp4"]
        shard = decode_clip(mp4, 9, start=0).numpy().astype(float)
        assert shard.shape == upright.shape, meta["url"]
        display_size = (upright.shape[2], upright.shape[1])
        assert (
            (meta["width"], meta["height"]) == (meta["source_width"], meta["source_height"]) == display_size
        )
        # Measured 3.2-3.3 (2.9 for an unrotated source); turned the wrong way 79.
        assert np.abs(shard - upright).mean() < 5.0, meta["url"]
        assert _first_frame(mp4).rotation == 0  # upright pixels, no display matrix left to apply


def test_m4v_inputs_are_taken(tmp_path: Path) -> None:
    video = _pan(skimage.data.astronaut(), 9)
    for name in ("a.m4v", "b.mp4"):
        _encode(tmp_path / "in" / name, video, 8, "libx264", "mp4")
    summary = write_shards(tmp_path / "in", str(tmp_path / "m-%06d.tar"))
    assert summary.videos == summary.samples == 2
    metas = _metas(_read_shards(summary.shards))
    assert [m["url"] for m in metas] == ["a.m4v", "b.mp4"]
    assert not metas[0]["reencoded"]  # H.264 in an mp4 container under another name: stored as it is
