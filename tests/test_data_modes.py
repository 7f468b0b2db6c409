"""Data stream modes and shapes: epoch vs resampled shards, aspect-ratio buckets, exact resume of both.

- epoch mode (the default) visits every shard once per epoch; resampled mode is an endless stream in
  which each rank's logical worker draws shards from all of them with replacement, seeded;
- with buckets, each clip takes the bucket nearest its aspect ratio and a batch holds one bucket;
- a run stopped after k batches and resumed from its DataPosition sees exactly the batches an
  uninterrupted run sees from k+1 on, in both modes and with buckets (clips pending in a bucket
  when it stopped are decoded again on resume).
"""

import io
import itertools
import math
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from data import DataPosition, build_dataloader, build_video_dataset, decode_clip, write_demo_shards
from data.demo import encode_mp4
from data.transforms import resize

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards")
    made = write_demo_shards(
        out, train_shards=4, eval_shards=1, clips_per_shard=3, frames=9, height=32, width=48, fps=8, seed=2
    )
    return made.train_pattern


def shard_keys(pattern: str) -> dict[str, set[str]]:
    """Shard file name -> the keys in it."""
    out = {}
    for path in sorted(Path(pattern).parent.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            out[path.name] = {name.split(".")[0] for name in tar.getnames()}
    return out


def loader(shards, rank=0, num_workers=0, resume_state=None, world_size=WORLD_SIZE, **kwargs):
    options = dict(num_frames=5, resolution=32, train=True, seed=7, shuffle_buffer=4, uint8=True)
    dataset = build_video_dataset(
        shards, rank=rank, world_size=world_size, resume_state=resume_state, **{**options, **kwargs}
    )
    return iter(build_dataloader(dataset, batch_size=2, num_workers=num_workers))


def take(batches, count: int, position: DataPosition | None = None) -> list[dict]:
    out = []
    for _ in range(count):
        batch = next(batches)
        if position is not None:
            position.update(batch)
        out.append(batch)
    return out


def assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert [b["key"] for b in got] == [b["key"] for b in expected]
    for batch, reference in zip(got, expected, strict=True):
        assert torch.equal(batch["video"], reference["video"])  # same clip start and crop, not only the key


# ---------------------------------------------------------------- epoch vs resampled


def test_epoch_mode_is_the_default_and_visits_every_shard_once_per_epoch(shards):
    assert_same_batches(
        take(loader(shards, num_workers=2, mode="epoch"), 6), take(loader(shards, num_workers=2), 6)
    )
    all_keys = sorted(key for keys in shard_keys(shards).values() for key in keys)
    # each rank reads 2 shards x 3 clips per epoch: 3 batches; over both ranks an epoch is every clip once
    by_epoch = [[], []]
    for rank in range(WORLD_SIZE):
        for batch in take(loader(shards, rank=rank, num_workers=0), 6):
            epoch = batch["position"][0]
            by_epoch[epoch] += batch["key"]
    assert sorted(by_epoch[0]) == all_keys and sorted(by_epoch[1]) == all_keys


def test_resampled_is_deterministic_per_seed(shards):
    first = take(loader(shards, num_workers=2, mode="resampled"), 8)
    again = take(loader(shards, num_workers=2, mode="resampled"), 8)
    assert_same_batches(again, first)
    other_seed = take(loader(shards, num_workers=2, mode="resampled", seed=8), 8)
    assert [b["key"] for b in other_seed] != [b["key"] for b in first]


def test_resampled_workers_draw_from_all_shards_with_replacement(shards):
    dataset = build_video_dataset(
        shards, num_frames=5, resolution=32, seed=7, rank=1, world_size=WORLD_SIZE, mode="resampled"
    )
    names = sorted(shard_keys(shards))
    for worker in range(2):
        # 4 shards over 2 ranks x 2 workers: one draw per round
        draws = [
            Path(url).name for rnd in range(40) for url in dataset.shards_for(rnd, worker, num_workers=2)
        ]
        counts = Counter(draws)
        assert sorted(counts) == names  # every shard, not this rank's and worker's share
        assert any(a == b for a, b in itertools.pairwise(draws))  # with replacement: a shard twice in a row
    # the clips follow the draws: one worker's stream has clips of every shard, and repeats
    batches = take(loader(shards, rank=1, num_workers=0, mode="resampled", shuffle_buffer=0), 30)
    keys = [key for batch in batches for key in batch["key"]]
    shard_of = {key: name for name, shard in shard_keys(shards).items() for key in shard}
    assert {shard_of[key] for key in keys} == set(names)
    assert len(set(keys)) < len(keys)


def test_a_shard_drawn_twice_gives_other_clips(tmp_path):
    made = write_demo_shards(
        tmp_path,
        train_shards=1,
        eval_shards=1,
        clips_per_shard=2,
        frames=17,
        height=32,
        width=48,
        fps=8,
        seed=5,
    )
    # one shard: every round draws it; shuffle_buffer=0 keeps the shard's order
    stream = iter(
        build_video_dataset(
            made.train_pattern,
            num_frames=5,
            resolution=32,
            seed=3,
            rank=0,
            world_size=1,
            mode="resampled",
            shuffle_buffer=0,
        )
    )
    samples = [next(stream) for _ in range(8)]
    first_key = samples[0]["key"]
    clips = [s["video"] for s in samples if s["key"] == first_key]
    assert len(clips) == 4
    assert any(not torch.equal(clips[0], clip) for clip in clips[1:])  # random start and crop per draw


def test_resampled_needs_no_shard_per_reader_and_is_for_training_only(shards):
    one_shard = str(Path(shards).parent / "train-000000.tar")
    with pytest.raises(ValueError, match="need at least 2 shards"):
        build_video_dataset(one_shard, num_frames=5, resolution=32, rank=0, world_size=2)
    batches = loader(one_shard, rank=1, num_workers=2, mode="resampled")
    assert len(take(batches, 3)) == 3
    with pytest.raises(ValueError, match="one pass"):
        build_video_dataset(shards, num_frames=5, resolution=32, train=False, mode="resampled")
    with pytest.raises(ValueError, match="mode must be one of"):
        build_video_dataset(shards, num_frames=5, resolution=32, mode="shuffled")


# Rank r reads about 6 clips per round in resampled mode here (one shard of 3 clips per worker and round).
@pytest.mark.parametrize(("num_workers", "stop_after"), [(0, 2), (0, 5), (2, 3), (2, 4)])
def test_resampled_stream_resumes_exactly(shards, num_workers, stop_after):
    total = 10
    for rank in range(WORLD_SIZE):
        uninterrupted = take(loader(shards, rank, num_workers, mode="resampled"), total)
        position = DataPosition(num_workers, WORLD_SIZE, mode="resampled")
        stopped = take(loader(shards, rank, num_workers, mode="resampled"), stop_after, position)
        state = position.state()
        assert state["mode"] == "resampled"
        resumed = take(
            loader(shards, rank, num_workers, resume_state=state, mode="resampled"), total - stop_after
        )
        assert_same_batches(stopped + resumed, uninterrupted)
    assert len({batch["position"][0] for batch in uninterrupted}) > 1  # the test crossed a round


def test_a_position_of_the_other_mode_starts_a_new_pass_with_a_warning(shards, caplog):
    position = DataPosition(0, WORLD_SIZE, mode="epoch")
    take(loader(shards, num_workers=0), 2, position)
    fresh = take(loader(shards, num_workers=0, mode="resampled"), 2)
    with caplog.at_level("WARNING", logger="data"):
        resumed = take(loader(shards, num_workers=0, mode="resampled", resume_state=position.state()), 2)
    assert_same_batches(resumed, fresh)
    assert "starting a new pass" in caplog.text
    assert not DataPosition.resumable(position.state(), 0, WORLD_SIZE, mode="resampled")
    old_state = {k: v for k, v in position.state().items() if k != "mode"}  # saved before modes existed
    assert DataPosition.resumable(old_state, 0, WORLD_SIZE)


# ---------------------------------------------------------------- aspect-ratio buckets

SIZES = {"wide": (32, 48), "tall": (48, 32), "square": (32, 32), "wider": (32, 64)}  # (height, width)
BUCKETS = [(16, 24), (24, 16), (16, 16)]


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> tuple[str, dict[str, tuple[int, int]]]:
    """4 shards of 6 clips each, of the 4 aspect ratios of SIZES; returns the pattern and key -> size."""
    out = tmp_path_factory.mktemp("mixed")
    size_of = {}
    generator = torch.Generator().manual_seed(0)
    for shard in range(4):
        with tarfile.open(out / f"mixed-{shard:06d}.tar", mode="w") as tar:
            for index in range(6):
                key = f"{shard:03d}{index:03d}"
                name = list(SIZES)[(shard + index) % len(SIZES)]
                height, width = size_of[key] = SIZES[name]
                video = torch.randint(0, 256, (9, height, width, 3), dtype=torch.uint8, generator=generator)
                data = encode_mp4(video, fps=8)
                info = tarfile.TarInfo(f"{key}.mp4")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(out / "mixed-{000000..000003}.tar"), size_of


def nearest_bucket(height: int, width: int) -> tuple[int, int]:
    return min(BUCKETS, key=lambda b: abs(math.log(b[1] / b[0]) - math.log(width / height)))


def bucket_batches(pattern, num_workers=0, resume_state=None, batch_size=2, **kwargs):
    options = dict(num_frames=5, resolution=16, seed=11, shuffle_buffer=4, rank=0, world_size=1, uint8=True)
    dataset = build_video_dataset(
        pattern, buckets=BUCKETS, resume_state=resume_state, **{**options, **kwargs}
    )
    return iter(build_dataloader(dataset, batch_size=batch_size, num_workers=num_workers))


def test_bucket_batches_have_one_shape_and_each_clip_the_nearest_bucket(mixed_shards):
    pattern, size_of = mixed_shards
    batches = take(bucket_batches(pattern, num_workers=2), 20)
    shapes = set()
    for batch in batches:
        _, channels, frames, height, width = batch["video"].shape
        assert (channels, frames) == (3, 5) and len(batch["key"]) == 2
        for key in batch["key"]:
            assert (height, width) == nearest_bucket(*size_of[key]), key
        shapes.add((height, width))
    assert shapes == set(BUCKETS)  # the 32x64 clips share the 16x24 bucket (nearest in log ratio)


def test_bucket_clip_is_the_largest_window_of_its_aspect_ratio_resized(mixed_shards):
    pattern, size_of = mixed_shards
    # eval: clips from frame 0, centred windows; one pass, every clip once, last partial batches kept
    dataset = build_video_dataset(
        pattern, num_frames=5, resolution=16, train=False, rank=0, world_size=1, buckets=BUCKETS, uint8=True
    )
    batches = list(build_dataloader(dataset, batch_size=4, num_workers=0, drop_last=False))
    assert sorted(key for batch in batches for key in batch["key"]) == sorted(size_of)
    by_key = {key: batch["video"][i] for batch in batches for i, key in enumerate(batch["key"])}
    key = next(k for k, size in size_of.items() if size == SIZES["wider"])  # 32x64 -> a 32x48 window -> 16x24
    with tarfile.open(Path(pattern).parent / f"mixed-{int(key[:3]):06d}.tar") as tar:
        mp4 = tar.extractfile(f"{key}.mp4").read()
    expected = resize(decode_clip(mp4, 5, start=0)[:, :, 8:56], (16, 24))
    assert torch.equal(by_key[key], expected.permute(3, 0, 1, 2))


def test_bucket_batches_are_deterministic_and_float_clips_match_uint8(mixed_shards):
    pattern, _ = mixed_shards
    first = take(bucket_batches(pattern, num_workers=2), 10)
    assert_same_batches(take(bucket_batches(pattern, num_workers=2), 10), first)
    floats = take(bucket_batches(pattern, num_workers=2, uint8=False), 10)
    assert [b["key"] for b in floats] == [b["key"] for b in first]
    for batch, reference in zip(floats, first, strict=True):
        torch.testing.assert_close(
            batch["video"], reference["video"].float() * (2 / 255) - 1, rtol=0, atol=1e-6
        )


@pytest.mark.parametrize(("num_workers", "stop_after"), [(0, 3), (0, 7), (2, 3), (2, 6)])
def test_bucket_stream_resumes_exactly_with_pending_clips(mixed_shards, num_workers, stop_after):
    pattern, _ = mixed_shards
    total = 14
    uninterrupted = take(bucket_batches(pattern, num_workers), total)
    position = DataPosition(num_workers, 1)
    stopped = take(bucket_batches(pattern, num_workers), stop_after, position)
    resumed = take(bucket_batches(pattern, num_workers, resume_state=position.state()), total - stop_after)
    assert_same_batches(stopped + resumed, uninterrupted)
    # the stops left clips pending in other buckets (positions longer than (epoch, consumed))
    assert any(len(batch["position"]) > 2 for batch in uninterrupted[:stop_after])


def test_bucket_stream_resumes_exactly_in_resampled_mode(mixed_shards):
    pattern, _ = mixed_shards
    uninterrupted = take(bucket_batches(pattern, 2, mode="resampled", batch_size=3), 10)
    position = DataPosition(2, 1, mode="resampled")
    stopped = take(bucket_batches(pattern, 2, mode="resampled", batch_size=3), 5, position)
    resumed = take(
        bucket_batches(pattern, 2, resume_state=position.state(), mode="resampled", batch_size=3), 5
    )
    assert_same_batches(stopped + resumed, uninterrupted)


def test_dataset_built_with_a_batch_size_yields_batches(mixed_shards):
    pattern, _ = mixed_shards
    dataset = build_video_dataset(
        pattern, num_frames=5, resolution=16, seed=11, rank=0, world_size=1, buckets=BUCKETS, batch_size=3
    )
    batch = next(iter(dataset))
    assert batch["video"].shape[0] == 3 and batch["video"].dtype == torch.float32
    assert set(batch) >= {"video", "key", "skipped", "skipped_by_reason", "worker", "position"}
    assert next(iter(build_dataloader(dataset, batch_size=None)))["key"] == batch["key"]
    with pytest.raises(ValueError, match="makes batches of 3"):
        build_dataloader(dataset, batch_size=2)


def test_clip_seeds_do_not_depend_on_batching(shards):
    """The same clips, whether the dataset is iterated clip by clip or batched in workers."""
    dataset = build_video_dataset(
        shards, num_frames=5, resolution=32, seed=7, rank=0, world_size=1, uint8=True
    )
    stream = iter(dataset)
    clips = [next(stream) for _ in range(6)]
    batches = take(iter(build_dataloader(dataset, batch_size=2, num_workers=0)), 3)
    assert [c["key"] for c in clips] == [k for b in batches for k in b["key"]]
    assert torch.equal(torch.stack([c["video"] for c in clips]), torch.cat([b["video"] for b in batches]))
