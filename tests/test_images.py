"""Images as 1-frame clips, and joint image-video training at a configured ratio."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from random import Random

import numpy as np
import skimage.data
from PIL import Image

from data import build_video_dataset

REPO = Path(__file__).resolve().parents[1]


def image_bytes(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image_shards(folder: Path, count: int = 4) -> str:
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")]
    for shard in range(count):
        with tarfile.open(folder / f"images-{shard:06d}.tar", "w") as tar:
            for index, (photo, (ext, fmt)) in enumerate(zip(photos, formats, strict=True)):
                small = np.asarray(Image.fromarray(photo).resize((80, 64)))
                for name, data in ((f"{shard:04d}{index:05d}.{ext}", image_bytes(small, fmt)),):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            broken = b"\x89PNG\r\n\x1a\n" + b"garbage"
            info = tarfile.TarInfo(f"{shard:04d}99999.png")
            info.size = len(broken)
            tar.addfile(info, io.BytesIO(broken))
    return str(folder / f"images-{{000000..{count - 1:06d}}}.tar")


def test_images_are_one_frame_clips_and_broken_ones_are_counted(tmp_path):
    pattern = write_image_shards(tmp_path, count=1)
    dataset = build_video_dataset(pattern, num_frames=1, resolution=32, train=False, rank=0, world_size=1)
    samples = list(dataset)
    assert len(samples) == 3
    for sample in samples:
        assert sample["video"].shape == (3, 1, 32, 32)
        assert sample["video"].min() >= -1 and sample["video"].max() <= 1 and sample["video"].std() > 0.05
    assert dataset.skip_counter.counts == {"corrupt_image": 1}
    # an image in a stream of 9-frame clips is skipped and counted (before decoding, so the broken one
    # too), not stretched into a video
    videos = build_video_dataset(pattern, num_frames=9, resolution=32, train=False, rank=0, world_size=1)
    assert list(videos) == [] and videos.skip_counter.counts == {"image_in_video_stream": 4}


def test_joint_image_video_training_takes_image_batches_at_the_configured_ratio(tmp_path):
    pattern = write_image_shards(tmp_path)
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "launch/train.py",
        "--config",
        "configs/tiny.json",
        "data.demo.train_shards=2",
        "data.demo.eval_shards=1",
        "data.demo.clips_per_shard=3",
        "data.resolution=32",
        "data.batch_size=1",
        "data.num_workers=0",
        "data.shuffle_buffer=2",
        f"data.image_shards={pattern}",
        "data.image_ratio=0.5",
        "data.image_batch_size=2",
        "loss.disc_start=0",
        "train.max_steps=6",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "train.progress_bar=false",
        "eval.every=1000",
        "eval.max_clips=2",
        f"train.output_dir={run_dir}",
        f"data.demo.dir={tmp_path / 'demo'}",
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [record for record in records if "loss/rec" in record]
    expected = [float(Random(f"image/0/{step}/0").random() < 0.5) for step in range(6)]
    assert [record["data/image_batch_fraction"] for record in train] == expected
    assert 0 < sum(expected) < 6  # both kinds of step ran
    assert all(np.isfinite(record["loss/discriminator"]) for record in train)
    state = __import__("torch").load(
        run_dir / "checkpoints" / "step_00000006" / "trainer" / "rank_00000.pt", weights_only=False
    )
    assert state["image_data"]["positions"] and state["data"]["positions"]
