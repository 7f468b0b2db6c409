"""Exact resume of the data stream: a run stopped after k batches and resumed from its saved position sees
exactly the clips an uninterrupted run sees from batch k+1 on, on every rank, with and without workers,
across epoch boundaries and shuffle buffers."""

import pytest
import torch

from data import DataPosition, build_dataloader, build_video_dataset, write_demo_shards

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards")
    made = write_demo_shards(
        out, train_shards=4, eval_shards=1, clips_per_shard=3, frames=9, height=32, width=48, fps=8, seed=2
    )
    return made.train_pattern


def loader(shards: str, rank: int, num_workers: int, resume_state=None):
    dataset = build_video_dataset(
        shards,
        num_frames=5,
        resolution=32,
        train=True,
        seed=7,
        shuffle_buffer=4,
        rank=rank,
        world_size=WORLD_SIZE,
        resume_state=resume_state,
    )
    return iter(build_dataloader(dataset, batch_size=2, num_workers=num_workers))


def take(batches, count: int, position: DataPosition | None = None) -> list[tuple[list[str], torch.Tensor]]:
    out = []
    for _ in range(count):
        batch = next(batches)
        if position is not None:
            position.update(batch)
        out.append((batch["key"], batch["video"]))
    return out


# Each rank has 2 shards x 3 clips = 6 clips per epoch (3 batches of 2): 8 batches cross two epochs.
@pytest.mark.parametrize(("num_workers", "stop_after"), [(0, 3), (2, 3), (2, 4)])
def test_resumed_stream_continues_exactly_where_the_stopped_one_was(shards, num_workers, stop_after):
    total = 8
    seen_by_rank = []
    for rank in range(WORLD_SIZE):
        uninterrupted = take(loader(shards, rank, num_workers), total)
        position = DataPosition(num_workers, WORLD_SIZE)
        stopped = take(loader(shards, rank, num_workers), stop_after, position)
        state = position.state()
        resumed = take(loader(shards, rank, num_workers, resume_state=state), total - stop_after)
        assert [keys for keys, _ in stopped + resumed] == [keys for keys, _ in uninterrupted]
        for (_, video), (_, expected) in zip(stopped + resumed, uninterrupted, strict=True):
            assert torch.equal(video, expected)  # same clip start and crop, not only the same key
        # a resumed run goes on saving positions that resume exactly again
        again = DataPosition.from_state(state)
        batches = loader(shards, rank, num_workers, resume_state=state)
        take(batches, 1, again)
        final = take(loader(shards, rank, num_workers, resume_state=again.state()), total - stop_after - 1)
        assert [keys for keys, _ in final] == [keys for keys, _ in uninterrupted[stop_after + 1 :]]
        seen_by_rank.append({key for keys, _ in uninterrupted[:3] for key in keys})
    # within an epoch, the ranks read different shards: no clip is seen twice
    assert not seen_by_rank[0] & seen_by_rank[1]


def test_a_different_worker_count_starts_a_new_pass_with_a_warning(shards, caplog):
    position = DataPosition(2, WORLD_SIZE)
    take(loader(shards, 0, 2), 2, position)
    fresh = take(loader(shards, 0, 0), 2)
    with caplog.at_level("WARNING", logger="data"):
        resumed = take(loader(shards, 0, 0, resume_state=position.state()), 2)
    assert [k for k, _ in resumed] == [k for k, _ in fresh]
    assert "starting a new pass" in caplog.text


def test_uint8_clips_convert_to_exactly_the_float_clips(shards):
    from data.transforms import uint8_to_model_range

    def first_clips(uint8: bool) -> list[torch.Tensor]:
        dataset = build_video_dataset(
            shards, num_frames=5, resolution=32, train=True, seed=7, rank=0, world_size=1, uint8=uint8
        )
        stream = iter(dataset)
        return [next(stream)["video"] for _ in range(4)]

    for small, full in zip(first_clips(True), first_clips(False), strict=True):
        assert small.dtype == torch.uint8 and small.shape == full.shape
        torch.testing.assert_close(uint8_to_model_range(small), full, rtol=0, atol=1e-6)
