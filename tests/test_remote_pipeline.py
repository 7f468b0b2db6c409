"""The whole data pipeline on remote shards: the same clips from local files, an HTTP server and an S3 server
on loopback, and pipe: URLs."""

import functools
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

from data import build_dataloader, build_video_dataset, write_demo_shards

CREDENTIALS = {"key": "testing", "secret": "testing"}
BUCKET = "video-shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_demo_shards(
        out, train_shards=2, eval_shards=1, clips_per_shard=3, frames=9, height=32, width=48, fps=8, seed=1
    )
    return out


def clips(shard_spec, **kwargs) -> dict[str, torch.Tensor]:
    dataset = build_video_dataset(
        shard_spec, num_frames=5, resolution=32, train=False, rank=0, world_size=1, **kwargs
    )
    return {sample["key"]: sample["video"] for sample in dataset}


def assert_same_clips(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected) and len(expected) == 6
    for key, video in expected.items():
        assert torch.equal(actual[key], video), key


def train_names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("train-*.tar"))


def test_http_shards_give_the_local_clips(shards):
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        names = train_names(shards)
        local = clips([str(shards / name) for name in names])
        assert_same_clips(clips([f"{base}/{name}" for name in names]), local)
        # a missing remote shard is counted and skipped, the others still arrive
        dataset = build_video_dataset(
            [f"{base}/{names[0]}", f"{base}/missing.tar"],
            num_frames=5,
            resolution=32,
            train=False,
            rank=0,
            world_size=1,
        )
        arrived = [sample["key"] for sample in dataset]
        assert len(arrived) == 3 and dataset.skip_counter.counts == {"unreadable_shard": 1}
    finally:
        server.shutdown()
        server.server_close()


def test_s3_shards_give_the_local_clips_also_through_workers(shards):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=BUCKET)
        names = train_names(shards)
        for name in names:
            client.upload_file(str(shards / name), BUCKET, name)
        options = {**CREDENTIALS, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        local = clips([str(shards / name) for name in names])
        assert_same_clips(
            clips(f"s3://{BUCKET}/train-{{000000..000001}}.tar", storage_options=options), local
        )
        assert_same_clips(clips(f"s3://{BUCKET}/train-*.tar", storage_options=options), local)
        # 2 DataLoader workers, one shard each
        dataset = build_video_dataset(
            f"s3://{BUCKET}/train-*.tar",
            num_frames=5,
            resolution=32,
            train=False,
            rank=0,
            world_size=1,
            storage_options=options,
        )
        loader = build_dataloader(dataset, batch_size=1, num_workers=2, drop_last=False)
        through_workers = {batch["key"][0]: batch["video"][0] for batch in loader}
        assert_same_clips(through_workers, local)
    finally:
        server.stop()


def test_pipe_shards_give_the_local_clips(shards):
    names = train_names(shards)
    local = clips([str(shards / name) for name in names])
    assert_same_clips(clips([f"pipe:cat {shards / name}" for name in names]), local)
