"""Streaming video clips from webdataset shards (video2dataset layout: KEY.mp4, KEY.json, KEY.txt).

Every random choice is seeded from the run seed and the epoch, so a run's data order and augmentation
are reproducible:
  - shard order (`mode="epoch"`): each epoch permutes the shards from (seed, epoch) before the
    rank/worker split, the same on every rank, so an epoch visits every shard once;
  - shard draws (`mode="resampled"`): an endless stream of rounds; in round r each rank's logical
    worker draws shards from all shards with replacement, seeded from (seed, r, rank, worker);
  - sample order: a shuffle buffer seeded from (seed, epoch or round, rank, worker);
  - clip start and crop: seeded from (seed, epoch, shard file name, sample key), so a sample gets the
    same clip whichever rank or worker reads it (resampled: also from the rank, worker and draw, so a
    shard drawn twice gives different clips).

Batches are made inside the DataLoader workers (`build_dataloader`): each clip is decoded straight into
its slot of a batch in shared memory (one copy per frame after the RGB conversion; no stacking and no
copy into shared memory afterwards). With aspect-ratio `buckets` a worker keeps one pending batch per
bucket and yields a batch when one fills, so a batch has one shape.

A batch's `position` lets a stopped run resume exactly (see DataPosition); skipped samples are counted
per reason (SKIP_REASONS) by the worker that met them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import count
from random import Random
from typing import Any, BinaryIO, Literal

import av
import numpy as np
import torch
import webdataset as wds
from einops import rearrange
from PIL import ExifTags, Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from data.sources import expand_shard_urls, open_shard
from data.transforms import cover_window, crop_window, resize
from data.video import (
    VideoDecodeError,
    VideoTooShortError,
    decode_frames,
    frame_size,
    stack_rgb,
    stride_for_fps,
    video_fps,
    write_frames,
)

logger = logging.getLogger("data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
MODES = ("epoch", "resampled")
# Every reason a sample or shard is skipped for (the `reason` of SkipCounter.skip).
SKIP_REASONS = (
    "unreadable_shard",
    "bad_tar_entry",
    "truncated_tar",
    "duplicate_key",
    "missing_video",
    "bad_json",
    "unknown_fps",
    "video_too_short",
    "corrupt_video",
    "image_in_video_stream",
    "corrupt_image",
)

# EXIF orientation (2..8) -> the transposition that shows the image upright (1: as stored)
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# slot(shape, epoch) -> the (C, T, H, W) tensor a clip of that shape is written into
Slot = Callable[[tuple[int, ...], int], torch.Tensor]


class SkipCounter:
    """Counts samples (and shards) skipped by one process, by reason; `.counts` is a plain dict."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_reason(self) -> dict[str, int]:
        """Every reason of SKIP_REASONS -> its count (0 when none)."""
        return {reason: self.counts.get(reason, 0) for reason in SKIP_REASONS}

    def skip(self, reason: str, where: str, detail: object) -> None:
        assert reason in SKIP_REASONS, f"add {reason!r} to SKIP_REASONS"
        self.counts[reason] = self.counts.get(reason, 0) + 1
        logger.warning("skipping %s (%s): %s", where, reason, detail)


class SkippedSamples:
    """Skipped samples over all DataLoader workers of this rank, read from batches.

    Each batch carries the running counts of the worker that made it (`skipped`, `skipped_by_reason`,
    `worker`); the totals are sums of each worker's latest counts.
    """

    def __init__(self) -> None:
        self.latest: dict[int, int] = {}
        self.latest_by_reason: dict[int, Mapping[str, int]] = {}

    def update(self, batch: Mapping[str, Any]) -> int:
        self.latest[batch["worker"]] = batch["skipped"]
        if "skipped_by_reason" in batch:
            self.latest_by_reason[batch["worker"]] = dict(batch["skipped_by_reason"])
        return self.total

    @property
    def total(self) -> int:
        return sum(self.latest.values())

    def by_reason(self) -> dict[str, int]:
        """Every reason of SKIP_REASONS -> skipped samples (or shards) for it, summed over workers."""
        return {
            reason: sum(counts.get(reason, 0) for counts in self.latest_by_reason.values())
            for reason in SKIP_REASONS
        }


class DataPosition:
    """What a training loop consumed of a rank's stream; its `state()` resumes the stream exactly.

    Call `update(batch)` for every batch taken from the DataLoader (before using it). A worker's
    position is (epoch or round, raw samples consumed in it, raw indices of clips still pending in
    other buckets...); `mode` is the dataset's ("epoch" or "resampled"): a state resumes only the same.
    """

    def __init__(self, num_workers: int, world_size: int, epoch_offset: int = 0, mode: str = "epoch") -> None:
        self.num_workers = max(num_workers, 1)
        self.world_size = world_size
        self.epoch_offset = epoch_offset  # the dataset's: where workers that produced nothing start
        self.mode = mode
        self.positions: dict[int, tuple[int, ...]] = {}
        self.batches = 0

    def update(self, batch: Mapping[str, Any]) -> None:
        self.positions[int(batch["worker"])] = tuple(int(v) for v in batch["position"])
        self.batches += 1

    def state(self) -> dict[str, Any]:
        return {
            "positions": dict(self.positions),
            "next_worker": self.batches % self.num_workers,
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "epoch_offset": self.epoch_offset,
            "mode": self.mode,
        }

    @staticmethod
    def resumable(
        state: Mapping[str, Any] | None, num_workers: int, world_size: int, mode: str = "epoch"
    ) -> bool:
        """Whether a saved state resumes exactly with this many workers and ranks and this mode (else: a
        new pass). States saved before modes existed are epoch mode."""
        return (
            bool(state)
            and state.get("num_workers") == max(num_workers, 1)
            and state.get("world_size", world_size) == world_size
            and state.get("mode", "epoch") == mode
        )

    @classmethod
    def start(
        cls,
        num_workers: int,
        world_size: int,
        epoch_offset: int,
        resume_state: Mapping[str, Any] | None,
        mode: str = "epoch",
    ) -> DataPosition:
        """The position a run tracks: the saved one when its stream resumes from it, else a fresh one."""
        if cls.resumable(resume_state, num_workers, world_size, mode):
            return cls.from_state(resume_state)
        return cls(num_workers, world_size, epoch_offset, mode)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> DataPosition:
        position = cls(
            int(state["num_workers"]),
            int(state["world_size"]),
            int(state.get("epoch_offset", 0)),
            str(state.get("mode", "epoch")),
        )
        position.positions = {int(k): tuple(int(x) for x in v) for k, v in state["positions"].items()}
        # batches only matter modulo num_workers: keep the round robin where it was
        position.batches = int(state["next_worker"])
        return position


def expand_shards(shards: str | Sequence[str], storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Brace patterns, globs, lists of either; local paths or s3://, gs://, http(s)://, pipe: URLs -> the
    shard URLs (see data.sources.expand_shard_urls). ValueError if none, or if local shards are missing."""
    return expand_shard_urls(shards, storage_options)


def distributed_rank_and_world_size(
    rank: int | None = None, world_size: int | None = None
) -> tuple[int, int]:
    """Explicit values, else torch.distributed when initialised, else RANK/WORLD_SIZE from the environment."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither")
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return rank, world_size


class VideoShardDataset(IterableDataset):
    """Clips (or, with `batch_size`, batches) from video shards; see `build_video_dataset`."""

    def __init__(
        self,
        shards: list[str],
        *,
        num_frames: int,
        resolution: int,
        frame_stride: int,
        train: bool,
        seed: int,
        shuffle_buffer: int,
        epoch_offset: int,
        rank: int,
        world_size: int,
        storage_options: Mapping[str, Any] | None = None,
        resume_state: Mapping[str, Any] | None = None,
        uint8: bool = False,
        target_fps: float | None = None,
        mode: Literal["epoch", "resampled"] = "epoch",
        buckets: Sequence[tuple[int, int]] = (),
        batch_size: int | None = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        self.uint8 = uint8
        self.target_fps = target_fps
        self.shards = shards
        self.resume_state = dict(resume_state) if resume_state else None
        self.storage_options = dict(storage_options or {})
        self.num_frames = num_frames
        self.resolution = resolution
        self.frame_stride = frame_stride
        self.train = train
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch_offset = epoch_offset
        self.rank = rank
        self.world_size = world_size
        self.mode = mode
        self.buckets = [(int(h), int(w)) for h, w in buckets]
        self.batch_size = batch_size
        self.drop_last = drop_last
        # Counts of this process only: with DataLoader workers, read the `skipped*` fields of batches.
        self.skip_counter = SkipCounter()

    def batched(self, batch_size: int, drop_last: bool = True) -> VideoShardDataset:
        """This dataset yielding batches of `batch_size` clips (one bucket each) instead of clips."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batched = object.__new__(VideoShardDataset)
        batched.__dict__.update(self.__dict__)
        batched.batch_size, batched.drop_last = batch_size, drop_last
        batched.skip_counter = SkipCounter()
        return batched

    def check_split(self, num_workers: int) -> None:
        """Raise ValueError if some rank or worker would get no shard (epoch mode: each reads its share)."""
        readers = self.world_size * max(num_workers, 1)
        if self.mode == "epoch" and len(self.shards) < readers:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {self.world_size} ranks x {max(num_workers, 1)} "
                f"workers: need at least {readers} shards (one per rank and worker); write smaller "
                "shards, use fewer workers, or data.mode='resampled'"
            )

    def shards_for(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        """This rank's and worker's shards in `epoch` (epoch mode: a split of a permutation shared by all
        ranks; resampled mode: round `epoch`'s draws from all shards with replacement)."""
        if self.mode == "resampled":
            draws = max(1, len(self.shards) // (self.world_size * num_workers))
            rng = Random(f"resampled/{self.seed}/{epoch}/{self.rank}/{worker}")
            return rng.choices(self.shards, k=draws)
        order = list(self.shards)
        if self.train:
            Random(f"shards/{self.seed}/{epoch}").shuffle(order)
        return order[self.rank :: self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.check_split(num_workers)
        worker, epoch, skip, replay = self._resume_point(physical, num_workers)
        if self.batch_size is None:
            yield from self._samples(worker, num_workers, epoch, skip, replay, self._new_clip)
            return
        # In a DataLoader worker the batches live in shared memory: they reach the main process uncopied.
        batches = _Batches(self, shared=info is not None)
        for sample in self._samples(worker, num_workers, epoch, skip, replay, batches.slot):
            batch = batches.add(sample)
            if batch is not None:
                yield batch
        if not self.drop_last:
            yield from batches.leftovers()

    def _new_clip(self, shape: tuple[int, ...], epoch: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.uint8 if self.uint8 else torch.float32)

    def _samples(
        self, worker: int, num_workers: int, epoch: int, skip: int, replay: Sequence[int], slot: Slot
    ) -> Iterator[dict[str, Any]]:
        """This logical worker's clips from `epoch` on (train: endless), after skipping `skip` raw samples
        of the first epoch except those in `replay` (decoded again: clips pending in a bucket).

        Training raises RuntimeError once the epochs (rounds) in a row without a clip have read every shard
        of the dataset: an endless stream over only bad data would otherwise spin forever, while bad shards
        among good ones only cost warnings (counting distinct shards, not reads: with as many readers as
        shards, one bad shard can come to the same reader several epochs in a row).
        """
        epochs = count(epoch) if self.train else [epoch]
        fruitless: set[str] = set()  # the shards read in the epochs in a row that gave no clip
        shards = set(self.shards)
        for epoch in epochs:
            produced = 0
            for sample in self._epoch(epoch, worker, num_workers, skip, replay, slot):
                produced += 1
                fruitless.clear()
                yield sample
            if self.train and produced == 0 and skip == 0:  # a resumed epoch may have been all skipped
                urls = self.shards_for(epoch, worker, num_workers)
                period = f"round {epoch}" if self.mode == "resampled" else f"epoch {epoch}"
                fruitless.update(urls)
                if fruitless >= shards:
                    raise RuntimeError(
                        f"rank {self.rank} worker {worker}: no usable clip in any of the dataset's "
                        f"{len(shards)} shards, read in epochs (rounds) in a row; the last, {period}, over "
                        f"{urls}; skipped {self.skip_counter.counts}"
                    )
                logger.warning(
                    "rank %d worker %d: no usable clip in %s over %s (shards without one, in a row: %d; the "
                    "stream stops when that is all %d); skipped %s",
                    self.rank,
                    worker,
                    period,
                    urls,
                    len(fruitless),
                    len(shards),
                    self.skip_counter.counts,
                )
            skip, replay = 0, ()

    def _resume_point(self, physical: int, num_workers: int) -> tuple[int, int, int, tuple[int, ...]]:
        """(logical worker, epoch, raw samples to skip, raw samples among them to decode) of this worker.

        Each logical worker's stream is a pure function of (seed, epoch, rank, logical worker). A resumed
        run gives physical worker p the role of logical worker (p + next_worker) % W, so the DataLoader's
        round robin (worker 0 first) continues where the stopped run's was, and each logical worker
        fast-forwards its stream past the raw samples it had produced (read, not decoded), decoding
        only those whose clips were still pending in a bucket.
        """
        state = self.resume_state
        if not state:
            return physical, self.epoch_offset, 0, ()
        if not DataPosition.resumable(state, num_workers, self.world_size, self.mode):
            logger.warning(
                "data position saved with %s workers x %s ranks in %s mode, now %d x %d in %s mode: starting "
                "a new pass instead of resuming exactly",
                state.get("num_workers"),
                state.get("world_size"),
                state.get("mode", "epoch"),
                num_workers,
                self.world_size,
                self.mode,
            )
            return physical, self.epoch_offset, 0, ()
        worker = (physical + int(state.get("next_worker", 0))) % num_workers
        position = state.get("positions", {}).get(worker)
        if position is None:  # this worker had produced nothing yet: it starts where the stopped run's did
            return worker, int(state.get("epoch_offset", 0)), 0, ()
        epoch, consumed, *pending = (int(v) for v in position)
        return worker, epoch, consumed, tuple(pending)

    def _epoch(
        self, epoch: int, worker: int, num_workers: int, skip: int, replay: Sequence[int], slot: Slot
    ) -> Iterator[dict[str, Any]]:
        """Clips of one epoch (or round) of this rank's logical `worker`, after skipping `skip` raw samples
        except those in `replay`."""
        urls = self.shards_for(epoch, worker, num_workers)
        if self.mode == "resampled":
            seeds = [f"clip/{self.seed}/{epoch}/{self.rank}/{worker}/{draw}" for draw in range(len(urls))]
        else:
            seeds = [f"clip/{self.seed}/{epoch}"] * len(urls)
        samples = (
            {**sample, "__seed__": f"{seed}/{os.path.basename(url)}/{sample['__key__']}"}
            for url, seed in zip(urls, seeds, strict=True)
            for sample in self._read_shard(url)
        )
        if self.train and self.shuffle_buffer > 1:
            rng = Random(f"samples/{self.seed}/{epoch}/{self.rank}/{worker}")
            samples = wds.filters.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(
                samples
            )
        replay = set(replay)
        for consumed, sample in enumerate(samples, start=1):
            if consumed <= skip and consumed not in replay:
                continue
            video = self._clip(sample, lambda shape: slot(shape, epoch))
            if video is not None:
                yield {
                    "video": video,
                    "key": sample["__key__"],
                    "skipped": self.skip_counter.total,
                    "skipped_by_reason": self.skip_counter.by_reason(),
                    "worker": worker,
                    # where this worker's stream is: resuming after this sample skips `consumed` raw samples
                    "position": (epoch, consumed),
                }

    def _read_shard(self, url: str) -> Iterator[dict[str, Any]]:
        """Raw samples (bytes by extension) of one tar; a truncated or corrupt tar ends early, counted."""
        try:
            stream = _TailTrackingReader(open_shard(url, self.storage_options))
        except OSError as exn:
            self.skip_counter.skip("unreadable_shard", url, exn)
            return
        read_errors: list[Exception] = []

        def stop_reading(exn: Exception) -> bool:
            # Returning False ends the shard like a normal end, so the samples already complete still arrive.
            read_errors.append(exn)
            return False

        def skip_entry(exn: Exception) -> bool:  # e.g. a duplicated file name: skip it, keep reading
            self.skip_counter.skip("bad_tar_entry", url, exn.args[0] if exn.args else repr(exn))
            return True

        with stream:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=stop_reading)
            yield from self._first_of_each_key(group_by_keys(files, handler=skip_entry))
        if read_errors:
            exn = read_errors[0]
            self.skip_counter.skip("truncated_tar", url, exn.args[0] if exn.args else repr(exn))
        elif url.endswith(".tar") and stream.ended_without_archive_end():
            # tarfile ends quietly when the data stops at (or inside) a header block.
            self.skip_counter.skip(
                "truncated_tar", url, "the data ends without the tar end-of-archive blocks"
            )

    def _first_of_each_key(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """`samples` of one shard less the repeats of a key (counted): a key split by other keys' files
        comes twice."""
        seen: set[str] = set()
        for sample in samples:
            if sample["__key__"] in seen:
                where = f"{sample['__key__']} in {sample['__url__']}"
                self.skip_counter.skip(
                    "duplicate_key", where, f"the key came earlier in the shard; {_entries(sample)}"
                )
                continue
            seen.add(sample["__key__"])
            yield sample

    def _clip(
        self, sample: dict[str, Any], slot: Callable[[tuple[int, ...]], torch.Tensor]
    ) -> torch.Tensor | None:
        """The (C, T, H, W) clip of one raw sample written into `slot(shape)`, or None (counted) when the
        sample is unusable."""
        where = f"{sample['__key__']} in {sample['__url__']}"
        video_ext = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
        if video_ext is None:
            image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
            if image_ext is not None:  # an image is a 1-frame clip
                return self._image_clip(sample, sample[image_ext], where, slot)
            self.skip_counter.skip("missing_video", where, f"no video entry, only {_entries(sample)}")
            return None
        frame_count = meta = None
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (ValueError, RecursionError) as exn:  # bad UTF-8 or JSON; RecursionError: deep nesting
                self.skip_counter.skip("bad_json", where, exn)
                return None
            frame_count = _frame_count(meta)
        rng = Random(sample["__seed__"])
        frame_stride = self.frame_stride
        if self.target_fps is not None:
            fps = _metadata_fps(meta) or video_fps(sample[video_ext])
            if fps is None:
                self.skip_counter.skip("unknown_fps", where, "no frame rate in the json or the container")
                return None
            frame_stride = stride_for_fps(fps, self.target_fps)
        try:
            frames = decode_frames(
                sample[video_ext],
                self.num_frames,
                frame_stride,
                start=None if self.train else 0,
                rng=rng,
                frame_count=frame_count,
            )
        except VideoTooShortError as exn:
            self.skip_counter.skip("video_too_short", where, exn)
            return None
        except (VideoDecodeError, UnicodeDecodeError) as exn:
            # UnicodeDecodeError: PyAV decodes a damaged mp4's metadata strings as UTF-8 and lets it out.
            self.skip_counter.skip("corrupt_video", where, exn)
            return None
        return self._place(frames, frame_size(frames), rng, slot)

    def _image_clip(
        self, sample: dict[str, Any], data: bytes, where: str, slot: Callable[[tuple[int, ...]], torch.Tensor]
    ) -> torch.Tensor | None:
        """(C, 1, H, W) clip of an image entry (jpg, png, webp), or None (counted) if it does not decode."""
        if self.num_frames != 1:
            self.skip_counter.skip(
                "image_in_video_stream", where, f"an image is 1 frame, the clips have {self.num_frames}"
            )
            return None
        try:
            with Image.open(io.BytesIO(data)) as image:
                frames = torch.from_numpy(_image_rgb(image))[None]  # (1, H, W, 3)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exn:
            # SyntaxError: how PIL reports a damaged file (a PNG chunk, an EXIF header) once it is open
            self.skip_counter.skip("corrupt_image", where, exn)
            return None
        return self._place(frames, tuple(frames.shape[1:3]), Random(sample["__seed__"]), slot)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the clips cut from `height` x `width` frames: the square `resolution`, or
        the bucket whose aspect ratio is nearest theirs (in log ratio; the first of equals)."""
        if not self.buckets:
            return self.resolution, self.resolution
        ratio = math.log(width / height)
        return min(self.buckets, key=lambda bucket: abs(math.log(bucket[1] / bucket[0]) - ratio))

    def _place(
        self,
        frames: list[av.VideoFrame] | torch.Tensor,
        size: tuple[int, int],
        rng: Random,
        slot: Callable[[tuple[int, ...]], torch.Tensor],
    ) -> torch.Tensor:
        """Cut the clip from decoded frames (PyAV frames or uint8 (T, H, W, C)) into `slot`: the largest
        window with the target's aspect ratio (random position when training, else centred), resized
        to the target size; uint8, or float32 in [-1, 1]."""
        height, width = size
        target = self.target_size(height, width)
        window = cover_window(height, width, target)
        top, left = crop_window(height, width, *window, random=self.train, rng=rng)
        out = slot((3, len(frames), *target))  # (C, T, H, W)
        if window == target and not isinstance(frames, torch.Tensor):
            write_frames(frames, out, top, left)  # no resize: one copy per frame, no intermediate clip
        else:
            if not isinstance(frames, torch.Tensor):
                frames = stack_rgb(frames)
            clip = resize(frames[:, top : top + window[0], left : left + window[1]], target)
            out.copy_(rearrange(clip, "t h w c -> c t h w"))
        if out.dtype != torch.uint8:
            out.mul_(2 / 255).sub_(1.0)  # as data.transforms.to_model_range
        return out


class _Batches:
    """One worker's pending batches, one per clip shape (bucket): clips are decoded into their slots.

    Batch positions: (epoch, raw samples consumed, raw indices of the clips then pending in other
    buckets); resuming decodes those again (see VideoShardDataset._resume_point). With buckets, a train
    epoch's leftover clips (under a batch in a bucket) are dropped at its end, so that pending clips
    are always of the current epoch; without buckets a batch may straddle two epochs (nothing is
    pending once it is out).
    """

    def __init__(self, dataset: VideoShardDataset, shared: bool) -> None:
        self.batch_size = dataset.batch_size
        self.dtype = torch.uint8 if dataset.uint8 else torch.float32
        self.shared = shared
        self.per_epoch = bool(dataset.buckets) and dataset.train
        self.pending: dict[tuple[int, ...], _PendingBatch] = {}

    def slot(self, shape: tuple[int, ...], epoch: int) -> torch.Tensor:
        if self.per_epoch:
            for stale in [key for key, batch in self.pending.items() if batch.epoch != epoch]:
                del self.pending[stale]
        batch = self.pending.get(shape)
        if batch is None:
            batch = self.pending[shape] = _PendingBatch(
                self.batch_size, shape, self.dtype, self.shared, epoch
            )
        return batch.video[len(batch.keys)]

    def add(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        """Take a clip (already in its slot); the batch it fills, if it fills one."""
        shape = tuple(sample["video"].shape)
        batch = self.pending[shape]
        batch.keys.append(sample["key"])
        batch.indices.append(sample["position"][1])
        batch.last = sample
        if len(batch.keys) < self.batch_size:
            return None
        del self.pending[shape]
        return self._out(batch, sample)

    def leftovers(self) -> Iterator[dict[str, Any]]:
        """The partial batches at the end of a finite stream (eval), in the order they were started."""
        while self.pending:
            batch = self.pending.pop(next(iter(self.pending)))
            if batch.keys:
                yield self._out(batch, batch.last)

    def _out(self, batch: _PendingBatch, last: dict[str, Any]) -> dict[str, Any]:
        epoch, consumed = last["position"]
        waiting = sorted(index for other in self.pending.values() for index in other.indices)
        assert not waiting or all(other.epoch == epoch for other in self.pending.values()), (
            "pending across epochs"
        )
        return {
            "video": batch.video[: len(batch.keys)],
            "key": batch.keys,
            "skipped": last["skipped"],
            "skipped_by_reason": last["skipped_by_reason"],
            "worker": last["worker"],
            "position": (epoch, consumed, *waiting),
        }


class _PendingBatch:
    def __init__(
        self, batch_size: int, shape: tuple[int, ...], dtype: torch.dtype, shared: bool, epoch: int
    ) -> None:
        shape = (batch_size, *shape)
        if shared:
            numel = math.prod(shape)
            storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
            self.video = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
        else:
            self.video = torch.empty(shape, dtype=dtype)
        self.epoch = epoch
        self.keys: list[str] = []
        self.indices: list[int] = []  # raw sample index (in its epoch) of each clip
        self.last: dict[str, Any] = {}  # the latest clip's sample


def build_video_dataset(
    shards: str | list[str],
    *,
    num_frames: int,
    resolution: int,
    frame_stride: int = 1,
    train: bool = True,
    seed: int = 0,
    shuffle_buffer: int = 64,
    epoch_offset: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    resume_state: Mapping[str, Any] | None = None,
    uint8: bool = False,
    target_fps: float | None = None,
    mode: Literal["epoch", "resampled"] = "epoch",
    buckets: Sequence[Sequence[int]] = (),
    batch_size: int | None = None,
    drop_last: bool = True,
) -> VideoShardDataset:
    """Dataset of `{"video": float32 (C, T, H, W) in [-1, 1], "key": str, "skipped": int,
    "skipped_by_reason": {reason: int}, "worker": int, "position": tuple}` (with `uint8`: uint8 in [0, 255]).

    `train=True`: endless; random clip start and crop; `mode="epoch"`: each epoch permutes the shards
    and visits each once; `mode="resampled"`: each logical worker draws shards from all of them with
    replacement (seeded), so no shard count constraint. `train=False`: one pass in shard order; clips
    from the first frame, centre crop.
    Shards are split by rank, then by DataLoader worker (epoch mode); the rank comes from
    `rank`/`world_size` when given, else torch.distributed when initialised, else the RANK/WORLD_SIZE
    environment variables.
    `buckets`: [height, width] sizes; each clip takes the one nearest its aspect ratio (else the square
    `resolution`): the largest window of that aspect ratio, resized to it.
    `batch_size`: yield batches (as `build_dataloader` makes them, one bucket each) instead of clips.
    `skipped*`: the running counts of unusable samples of the process (worker) that made the sample.
    `storage_options`: fsspec options for remote shards (credentials, endpoint_url, ...).
    `resume_state`: a `DataPosition.state()` saved by a stopped run: the stream continues exactly after
    the last batch that run consumed (same rank count, worker count and mode; otherwise a new pass
    from `epoch_offset`, with a warning).
    """
    if num_frames < 1 or frame_stride < 1 or resolution < 1:
        raise ValueError(
            f"num_frames ({num_frames}), frame_stride ({frame_stride}) and resolution ({resolution}) "
            "must be >= 1"
        )
    if shuffle_buffer < 0 or epoch_offset < 0:
        raise ValueError(f"shuffle_buffer ({shuffle_buffer}) and epoch_offset ({epoch_offset}) must be >= 0")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "resampled" and not train:
        raise ValueError(
            "mode='resampled' is an endless training stream; evaluation (train=False) is one pass"
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None for single clips), got {batch_size}")
    sizes = [tuple(bucket) for bucket in buckets]
    if any(len(size) != 2 or min(size) < 1 for size in sizes):
        raise ValueError(f"buckets must be [height, width] pairs of positive sizes, got {list(buckets)}")
    rank, world_size = distributed_rank_and_world_size(rank, world_size)
    dataset = VideoShardDataset(
        expand_shards(shards, storage_options),
        num_frames=num_frames,
        resolution=resolution,
        frame_stride=frame_stride,
        train=train,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        epoch_offset=epoch_offset,
        rank=rank,
        world_size=world_size,
        storage_options=storage_options,
        resume_state=resume_state,
        uint8=uint8,
        target_fps=target_fps,
        mode=mode,
        buckets=sizes,
        batch_size=batch_size,
        drop_last=drop_last,
    )
    dataset.check_split(num_workers=1)
    return dataset


def collate_clips(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> `{"video": (B, C, T, H, W), "key": [str], "skipped": int, "skipped_by_reason": dict,
    "worker": int, "position": (epoch, consumed) of the batch's last sample in its worker's stream}`.

    For datasets that yield single clips; `build_dataloader` has VideoShardDataset batch inside its workers.
    """
    videos = [sample["video"] for sample in samples]
    out = None
    if get_worker_info() is not None:
        # In a DataLoader worker, stack straight into shared memory (as torch's default_collate does):
        # otherwise the batch is copied once more into shared memory to reach the main process.
        numel = sum(video.numel() for video in videos)
        storage = videos[0].untyped_storage()._new_shared(numel * videos[0].element_size())
        out = videos[0].new(storage).resize_(len(videos), *videos[0].shape)
    batch = {
        "video": torch.stack(videos, out=out),
        "key": [sample["key"] for sample in samples],
        # A batch comes from one worker, so the largest count is that worker's latest.
        "skipped": max(sample["skipped"] for sample in samples),
        "worker": samples[0]["worker"],
        "position": samples[-1].get("position"),
    }
    if "skipped_by_reason" in samples[-1]:
        batch["skipped_by_reason"] = samples[-1]["skipped_by_reason"]
    return batch


def build_dataloader(
    dataset: IterableDataset,
    batch_size: int | None,
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader of batches (see `collate_clips`); workers persist across epochs (and eval passes).

    A VideoShardDataset makes its batches in the workers (`VideoShardDataset.batched`; one bucket per
    batch): `batch_size` is then the dataset's if it was built with one (None or equal), and
    `drop_last` drops each worker's last partial batch of a finite pass, as torch's batching does.
    """
    if isinstance(dataset, VideoShardDataset):
        if dataset.batch_size is None:
            if batch_size is None:
                raise ValueError("give batch_size, or build the dataset with one")
            dataset = dataset.batched(batch_size, drop_last)
        elif batch_size not in (None, dataset.batch_size):
            raise ValueError(
                f"the dataset makes batches of {dataset.batch_size}, got batch_size={batch_size}"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        dataset.check_split(num_workers)
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_as_is,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            worker_init_fn=_ignore_termination,
        )
    if batch_size is None or batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1 and num_workers ({num_workers}) >= 0")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_clips,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_termination,
    )


def _ignore_termination(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM. A stop sent to the whole process group (SLURM, `tini -g` in the
    Docker image, `kill -- -PGID`) killed them (torch's worker handler re-raises it), and their rank then
    failed on its next batch instead of saving a checkpoint (see Trainer._install_signal_handlers). A worker
    still ends with its rank: torch's workers exit when their parent is gone, or get SIGKILL."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class _TailTrackingReader:
    """File wrapper that remembers whether the end was reached and the last 1024 bytes read."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self.fileobj = fileobj
        self.tail = b""
        self.reached_end = False

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        if size < 0 or len(data) < size:
            self.reached_end = True
        self.tail = (self.tail + data)[-1024:]
        return data

    def ended_without_archive_end(self) -> bool:
        # A complete tar ends with two zero blocks; tarfile stops at the first one and reads in
        # 10 KiB records, so a complete archive's last read ends with zeros.
        return self.reached_end and self.tail[-512:] != bytes(512)

    def close(self) -> None:
        self.fileobj.close()

    def __enter__(self) -> _TailTrackingReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __str__(self) -> str:
        return str(getattr(self.fileobj, "name", self.fileobj))


def _image_rgb(image: Image.Image) -> np.ndarray:
    """An image as uint8 (H, W, 3) RGB, upright (its EXIF orientation applied); ValueError if its pixels
    have no known range.

    16-bit greys (PNG's mode I;16, or I within 0..65535) are scaled to 8 bits: convert("RGB") would clip
    them, all white. Float pixels (mode F) and 32-bit integers beyond 16 bits have no agreed range. Other
    modes convert as PIL does (palette and grey expand; alpha is dropped).
    """
    image = _exif_upright(image)
    if image.mode == "F":
        raise ValueError("float pixels (PIL mode F) have no known range")
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"integer pixels (PIL mode {image.mode}) from {values.min()} to {values.max()}: beyond 16 "
                "bits, their range is unknown"
            )
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257): 0..65535 -> 0..255
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(image.convert("RGB"))  # a copy: writable, unlike np.asarray's


def _exif_upright(image: Image.Image) -> Image.Image:
    """The image turned (or flipped) as its EXIF orientation says, as ImageOps.exif_transpose does but
    without rewriting the metadata, which fails on some damaged EXIF that still gives an orientation.
    ValueError if the EXIF cannot be read: the image's orientation is unknown."""
    image.load()  # first, so that a damaged image is not taken for damaged EXIF (PNG's may follow the pixels)
    try:
        exif = image.getexif()
    except SyntaxError as exn:  # PIL's error for a malformed EXIF (TIFF) header
        raise ValueError(f"unreadable EXIF, so the orientation is unknown: {exn}") from exn
    orientation = exif.get(ExifTags.Base.Orientation, 1)
    transpose = _EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return image if transpose is None else image.transpose(transpose)


def _entries(sample: dict[str, Any]) -> list[str]:
    return sorted(key for key in sample if not key.startswith("__"))


def _metadata_fps(meta: object) -> float | None:
    """The frame rate in a sample's json (ours and make_shards': `fps`; video2dataset's ffprobe output:
    the video stream's `avg_frame_rate` like "30000/1001"), or None."""
    if not isinstance(meta, dict):
        return None
    value = meta.get("fps")
    video_metadata = meta.get("video_metadata")
    if value is None and isinstance(video_metadata, dict):
        streams = [s for s in video_metadata.get("streams") or [] if isinstance(s, dict)]
        value = next((s.get("avg_frame_rate") for s in streams if s.get("codec_type") == "video"), None)
    try:
        if isinstance(value, str) and "/" in value:
            numerator, denominator = value.split("/", 1)
            value = float(numerator) / float(denominator)
        fps = float(value) if value is not None else None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return fps if fps is not None and math.isfinite(fps) and fps > 0 else None


def _frame_count(meta: object) -> int | None:
    """The frame count in a sample's json if it has one (ours: `frames`; ffprobe's: `nb_frames`)."""
    if not isinstance(meta, dict):
        return None
    value = meta.get("frames", meta.get("nb_frames"))
    video_metadata = meta.get("video_metadata")  # video2dataset's ffprobe output
    if value is None and isinstance(video_metadata, dict):
        streams = [s for s in video_metadata.get("streams") or [] if isinstance(s, dict)]
        value = next((s.get("nb_frames") for s in streams if s.get("codec_type") == "video"), None)
    try:
        return int(value) if value is not None and int(value) > 0 else None
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf) from json's Infinity or 1e400
        return None
