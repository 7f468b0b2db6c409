"""Tests of data/: decoding, transforms, the shard pipeline (split, determinism, bad data) and demo shards."""

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path
from random import Random

import pytest
import torch

from data import (
    VideoDecodeError,
    VideoTooShortError,
    build_dataloader,
    build_video_dataset,
    crop,
    decode_clip,
    ensure_demo_shards,
    resize_shorter_side,
    video_to_clip_tensor,
    write_demo_shards,
)
from data.demo import _load_photo, encode_mp4, random_camera_move, render_clip

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(train_shards=4, eval_shards=2, clips_per_shard=4, frames=17, height=64, width=80, fps=8, seed=0)
TINY = dict(train_shards=1, eval_shards=1, clips_per_shard=2, frames=9, height=32, width=48, fps=8, seed=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_shards(tmp_path_factory.mktemp("demo"), **SMALL)


def counting_video(frames: int, height: int = 32, width: int = 48) -> bytes:
    """A video whose frame i is a flat grey of level 10 * i, so decoded frames reveal their index."""
    levels = torch.arange(frames, dtype=torch.uint8) * 10
    return encode_mp4(levels.view(-1, 1, 1, 1).expand(frames, height, width, 3).contiguous(), fps=8)


def frame_indices(clip: torch.Tensor) -> list[int]:
    return [round(level / 10) for level in clip.float().mean(dim=(1, 2, 3)).tolist()]


def all_keys(pattern_or_dir, split: str) -> list[str]:
    keys = []
    for path in sorted(Path(pattern_or_dir).glob(f"{split}-*.tar")):
        with tarfile.open(path) as tar:
            keys += sorted({name.split(".")[0] for name in tar.getnames()})
    return keys


# ---------------------------------------------------------------- decode_clip


def test_decode_clip_shape_dtype_and_stride():
    video = counting_video(20)
    clip = decode_clip(video, num_frames=5, frame_stride=3, start=2)
    assert clip.shape == (5, 32, 48, 3) and clip.dtype == torch.uint8
    assert frame_indices(clip) == [2, 5, 8, 11, 14]


def test_decode_clip_random_start_is_seeded_and_fits():
    video = counting_video(20)
    starts = set()
    for seed in range(8):
        first = frame_indices(decode_clip(video, 4, 2, rng=Random(seed)))
        again = frame_indices(decode_clip(video, 4, 2, rng=Random(seed)))
        assert first == again
        assert first == list(range(first[0], first[0] + 8, 2)) and first[-1] <= 19
        starts.add(first[0])
    assert len(starts) > 1


@pytest.mark.parametrize("frame_count", [100, 3])
def test_decode_clip_survives_wrong_metadata_frame_count(frame_count):
    clip = decode_clip(counting_video(10), 4, 3, rng=Random(0), frame_count=frame_count)
    assert frame_indices(clip) == [0, 3, 6, 9]  # the only clip that fits in 10 frames


def test_decode_clip_too_short_says_how_many_frames():
    with pytest.raises(VideoTooShortError, match=r"has 5 frames .* needs 7"):
        decode_clip(counting_video(5), num_frames=4, frame_stride=2)
    with pytest.raises(VideoDecodeError, match=r"has 5 frames"):
        decode_clip(counting_video(5), num_frames=4, frame_stride=1, start=3)


@pytest.mark.parametrize("payload", [b"", b"not a video at all" * 50, "truncated"])
def test_decode_clip_corrupt_payload(payload):
    if payload == "truncated":
        payload = counting_video(10)[:300]
    with pytest.raises(VideoDecodeError):
        decode_clip(payload, num_frames=2)


# ---------------------------------------------------------------- transforms


def test_transforms_shapes_and_range():
    video = torch.randint(0, 256, (3, 60, 90, 3), dtype=torch.uint8)
    assert resize_shorter_side(video, 30).shape == (3, 30, 45, 3)
    assert resize_shorter_side(video.float(), 120).shape == (3, 120, 180, 3)
    assert torch.equal(crop(video, 40), video[:, 10:50, 25:65])
    assert crop(video, (20, 30), random=True, rng=Random(0)).shape == (3, 20, 30, 3)
    clip = video_to_clip_tensor(video, 48, train=True, rng=Random(0))
    assert clip.shape == (3, 3, 48, 48) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    black, white = torch.zeros_like(video), torch.full_like(video, 255)
    assert video_to_clip_tensor(black, 48, train=False).eq(-1).all()
    assert video_to_clip_tensor(white, 48, train=False).eq(1).all()


def test_uint8_resize_matches_float_resize():
    video = torch.randint(0, 256, (2, 50, 70, 3), dtype=torch.uint8)
    fast = resize_shorter_side(video, 23).float()
    reference = resize_shorter_side(video.float(), 23)
    assert (fast - reference).abs().max() <= 1.0


# ---------------------------------------------------------------- pipeline


def take(dataset, n):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(n)]


def test_pipeline_yields_clips_of_requested_shape(demo):
    dataset = build_video_dataset(demo.train_pattern, num_frames=9, resolution=48, frame_stride=2)
    for sample in take(dataset, 6):
        assert sample["video"].shape == (3, 9, 48, 48) and sample["video"].dtype == torch.float32
        assert sample["video"].min() >= -1 and sample["video"].max() <= 1
        assert isinstance(sample["key"], str) and len(sample["key"]) == 9
        assert sample["skipped"] == 0
    batch = next(iter(build_dataloader(dataset, batch_size=3)))
    assert batch["video"].shape == (3, 3, 9, 48, 48) and len(batch["key"]) == 3 and batch["skipped"] == 0


def test_pipeline_is_deterministic_per_seed(demo):
    def run(seed):
        return take(build_video_dataset(demo.train_pattern, num_frames=5, resolution=32, seed=seed), 24)

    first, again, other = run(0), run(0), run(1)
    assert [s["key"] for s in first] == [s["key"] for s in again]
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(first, again, strict=True))
    assert [s["key"] for s in first] != [s["key"] for s in other]


def test_train_epochs_cover_every_clip_then_reshuffle(demo):
    keys = all_keys(Path(demo.train_pattern).parent, "train")
    samples = take(build_video_dataset(demo.train_pattern, num_frames=5, resolution=32), 2 * len(keys))
    epoch0, epoch1 = [s["key"] for s in samples[: len(keys)]], [s["key"] for s in samples[len(keys) :]]
    assert sorted(epoch0) == sorted(epoch1) == keys
    assert epoch0 != epoch1


def test_eval_is_one_ordered_pass_from_the_first_frame(demo):
    dataset = build_video_dataset(demo.eval_pattern, num_frames=17, resolution=64, train=False)
    keys = [s["key"] for s in dataset]
    assert keys == all_keys(Path(demo.eval_pattern).parent, "eval")
    assert [s["key"] for s in dataset] == keys  # a second pass repeats the first


def loader_keys(dataset, num_workers):
    loader = build_dataloader(dataset, batch_size=1, num_workers=num_workers, drop_last=False)
    return [key for batch in loader for key in batch["key"]]


def test_eval_split_over_ranks_and_workers_covers_each_clip_once(demo):
    expected = all_keys(Path(demo.train_pattern).parent, "train")
    seen = []
    for rank in range(2):
        dataset = build_video_dataset(
            demo.train_pattern, num_frames=5, resolution=32, train=False, rank=rank, world_size=2
        )
        seen += loader_keys(dataset, num_workers=2)
    assert sorted(seen) == expected  # every clip, none twice


def test_train_ranks_read_disjoint_shards(demo, monkeypatch):
    keys_per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = build_video_dataset(demo.train_pattern, num_frames=5, resolution=32, seed=7)
        assert (dataset.rank, dataset.world_size) == (rank, 2)
        keys_per_rank.append({s["key"] for s in take(dataset, 8)})  # one epoch: 2 shards x 4 clips
    assert not keys_per_rank[0] & keys_per_rank[1]
    assert sorted(keys_per_rank[0] | keys_per_rank[1]) == all_keys(Path(demo.train_pattern).parent, "train")


def test_too_few_shards_for_ranks_and_workers(demo):
    dataset = build_video_dataset(demo.train_pattern, num_frames=5, resolution=32, rank=1, world_size=2)
    with pytest.raises(ValueError, match="need at least 6 shards"):
        build_dataloader(dataset, batch_size=1, num_workers=3)
    with pytest.raises(ValueError, match="need at least 8"):
        build_video_dataset(demo.train_pattern, num_frames=5, resolution=32, rank=0, world_size=8)


def test_missing_shards_name_the_pattern(tmp_path, demo):
    with pytest.raises(ValueError, match="nothing-here"):
        build_video_dataset(str(tmp_path / "nothing-here-*.tar"), num_frames=5, resolution=32)
    with pytest.raises(ValueError, match="do not exist"):
        build_video_dataset(demo.train_pattern.replace("000003", "000009"), num_frames=5, resolution=32)


def write_tar(path: Path, entries: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_samples_and_truncated_tars_are_skipped_and_counted(tmp_path, demo, caplog):
    good, short = counting_video(12), counting_video(4)
    meta = json.dumps({"frames": 12}).encode()
    write_tar(
        tmp_path / "a-bad.tar",
        [
            ("000000000.mp4", good),
            ("000000000.json", meta),
            ("000000001.mp4", b"\x00\x00\x00\x18ftypmp42 definitely not h264" * 20),
            ("000000001.json", meta),
            ("000000002.json", meta),  # no mp4
            ("000000002.txt", b"a caption"),
            ("000000003.mp4", short),
            ("000000004.mp4", good),
            ("000000004.json", b"{not json"),
            ("000000005.mp4", good),
            ("000000005.txt", b"no json is fine"),
        ],
    )
    # One shard cut inside an mp4, one cut exactly between two samples (tarfile ends there quietly).
    entries = [
        (f"00000{i:04d}.{ext}", data) for i in range(4) for ext, data in (("mp4", good), ("json", meta))
    ]
    write_tar(tmp_path / "full.tar", entries)
    full = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "full.tar").unlink()
    two_samples = sum(512 + -(-len(data) // 512) * 512 for _, data in entries[:4])  # header + padded data
    (tmp_path / "b-cut-inside.tar").write_bytes(full[: two_samples + 512 + 100])  # in the third mp4
    (tmp_path / "c-cut-between.tar").write_bytes(full[:two_samples])

    dataset = build_video_dataset(
        str(tmp_path / "*.tar"), num_frames=4, resolution=16, frame_stride=2, train=False
    )
    with caplog.at_level(logging.WARNING, logger="data"):
        samples = list(dataset)
    # a-bad.tar: samples 0 and 5; each cut tar: its first two samples.
    expected = ["000000000", "000000005"] + ["000000000", "000000001"] * 2
    assert [s["key"] for s in samples] == expected
    assert dataset.skip_counter.counts == {
        "corrupt_video": 1,
        "missing_video": 1,
        "video_too_short": 1,
        "bad_json": 1,
        "truncated_tar": 2,
    }
    # Each sample carries the count so far; the last tar's truncation is found after its samples.
    assert [s["skipped"] for s in samples] == [0, 4, 4, 4, 5, 5]
    assert sum(record.name == "data" for record in caplog.records) == 6
    assert "has 4 frames" in caplog.text


def test_train_stream_of_only_bad_samples_raises_instead_of_spinning(tmp_path):
    write_tar(tmp_path / "bad.tar", [("000000000.mp4", b"junk" * 100)])
    dataset = build_video_dataset(str(tmp_path / "bad.tar"), num_frames=2, resolution=16)
    with pytest.raises(RuntimeError, match="no usable clip"):
        next(iter(dataset))


def test_skipped_count_survives_worker_processes(tmp_path):
    for shard in range(2):
        write_tar(
            tmp_path / f"s{shard}.tar",
            [
                ("000000000.mp4", counting_video(6)),
                ("000000001.mp4", b"junk"),
                ("000000002.mp4", counting_video(6)),
            ],
        )
    dataset = build_video_dataset(str(tmp_path / "s*.tar"), num_frames=2, resolution=16, train=False)
    batches = list(build_dataloader(dataset, batch_size=2, num_workers=2, drop_last=False))
    assert sorted((batch["worker"], batch["skipped"]) for batch in batches) == [(0, 1), (1, 1)]


# ---------------------------------------------------------------- demo data


def test_demo_clips_have_content_and_motion(demo):
    directory = Path(demo.train_pattern).parent
    for path in [directory / "train-000000.tar", directory / "eval-000000.tar"]:
        with tarfile.open(path) as tar:
            names = tar.getnames()
            assert len(names) == 3 * SMALL["clips_per_shard"]
            for name in [n for n in names if n.endswith(".mp4")]:
                key = name[:-4]
                meta = json.loads(tar.extractfile(f"{key}.json").read())
                assert (meta["frames"], meta["height"], meta["width"]) == (17, 64, 80)
                assert tar.extractfile(f"{key}.txt").read()
                video = decode_clip(tar.extractfile(name).read(), num_frames=17, start=0).float()
                assert video.shape == (17, 64, 80, 3)
                assert video.std(dim=(1, 2, 3)).min() > 10, f"{key} ({meta['source']}) is nearly flat"
                # Eased moves start and end slowly, so the first and last steps are small.
                motion = (video[1:] - video[:-1]).abs().mean(dim=(1, 2, 3))
                assert motion.min() > 0.1 and motion.mean() > 1, (
                    f"{key} ({meta['motion']['type']}) stands still"
                )


def test_demo_keys_held_out_eval_clips_and_unseen_photos(demo):
    directory = Path(demo.train_pattern).parent
    assert all_keys(directory, "train")[:5] == [
        "000000000",
        "000000001",
        "000000002",
        "000000003",
        "000010000",
    ]

    def metadata(split):
        found = []
        for path in sorted(directory.glob(f"{split}-*.tar")):
            with tarfile.open(path) as tar:
                found += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
        return found

    def camera_paths(split):
        return {json.dumps([m["source"], m["motion"]], sort_keys=True) for m in metadata(split)}

    def sources(split):
        return {m["source"] for m in metadata(split)}

    # Eval: held-out clips of the training photographs (no camera path shared with training).
    assert sources("eval") <= sources("train")
    assert not camera_paths("train") & camera_paths("eval")
    # Unseen: photographs training never sees.
    assert sources("unseen") and not sources("train") & sources("unseen")
    assert Path(demo.unseen_pattern).parent == directory


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_demo_generation_is_deterministic_and_ensure_skips_when_marker_matches(tmp_path, caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="data"):
        first = ensure_demo_shards(tmp_path / "a", **TINY)
    assert (
        "demo shards not found" in caplog.text and "generating 6 clips" in caplog.text
    )  # train, eval, unseen
    ensure_demo_shards(tmp_path / "b", **TINY)
    # Same keys, metadata and captions. The mp4 bytes are not compared: libx264 output was seen to differ
    # between runs for some clips on a loaded machine (cause not found); the frames fed to it are
    # compared bit for bit below instead.
    for name in ["train-000000.tar", "eval-000000.tar", "unseen-000000.tar"]:
        a, b = tar_members(tmp_path / "a" / name), tar_members(tmp_path / "b" / name)
        assert sorted(a) == sorted(b)
        assert all(a[m] == b[m] for m in a if not m.endswith(".mp4"))
    photo = _load_photo("astronaut", 64)
    renders = [
        render_clip(
            photo, random_camera_move(Random("r"), "rotate", tuple(photo.shape[-2:]), (32, 48)), 9, 32, 48
        )
        for _ in range(2)
    ]
    assert torch.equal(renders[0], renders[1])

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated although the marker matches")

    monkeypatch.setattr("data.demo.write_demo_shards", must_not_run)
    assert ensure_demo_shards(tmp_path / "a", **TINY) == first
    with pytest.raises(AssertionError, match="regenerated"):
        ensure_demo_shards(tmp_path / "a", **{**TINY, "seed": 4})


def test_make_demo_data_cli_runs_from_the_repo_root(tmp_path):
    result = subprocess.run(
        [
            *(sys.executable, "launch/make_demo_data.py", "--output", str(tmp_path)),
            *("--train-shards", "1", "--eval-shards", "1", "--clips-per-shard", "1"),
            *("--frames", "5", "--height", "32", "--width", "32"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "train-{000000..000000}.tar" in result.stdout
    assert (tmp_path / "DONE.json").is_file()


def test_data_package_stays_inside_its_boundary():
    forbidden = ("models", "losses", "trainer", "deepspeed", "torchvision")
    code = f"import sys, data; print(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
