"""Shard URLs and streams: local paths, pipe: commands, HTTP (local server) and S3 (moto server)."""

import functools
import io
import socket
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer
from webdataset.tariterators import tar_file_expander

from data.sources import expand_shard_urls, open_shard

pytestmark = pytest.mark.timeout(60)

BUCKET = "shards"
DUMMY_CREDENTIALS = {"key": "testing", "secret": "testing"}


def write_shard(path: Path, index: int) -> bytes:
    """A small tar with two samples (mp4 + json each); returns its bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for sample in range(2):
            key = f"{index:06d}{sample:03d}"
            for ext, data in (("mp4", f"video {key}".encode() * 50), ("json", b'{"frames": 9}')):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def read_all(url: str, storage_options: dict | None = None) -> bytes:
    with open_shard(url, storage_options) as stream:
        return stream.read()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def shard_dir(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """Three shards shard-000000.tar .. shard-000002.tar; returns the folder and name -> bytes."""
    contents = {f"shard-{i:06d}.tar": write_shard(tmp_path / f"shard-{i:06d}.tar", i) for i in range(3)}
    return tmp_path, contents


@pytest.fixture
def http_root(shard_dir):
    """Base URL of an HTTP server on 127.0.0.1 serving the shard folder."""
    folder, contents = shard_dir

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", contents
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def s3_endpoint():
    """Endpoint URL of a moto S3 server with a bucket holding two shards; yields (endpoint, name -> bytes)."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=DUMMY_CREDENTIALS["key"],
        aws_secret_access_key=DUMMY_CREDENTIALS["secret"],
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    contents = {}
    for index in range(2):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo(f"{index:06d}000.mp4")
            info.size = 1000 + index
            tar.addfile(info, io.BytesIO(bytes([index]) * info.size))
        name = f"shard-{index:06d}.tar"
        client.put_object(Bucket=BUCKET, Key=name, Body=buffer.getvalue())
        contents[name] = buffer.getvalue()
    client.put_object(Bucket=BUCKET, Key="other.txt", Body=b"not a shard")
    yield endpoint, contents
    server.stop()


def s3_options(endpoint: str) -> dict:
    # skip_instance_cache: every test gets its own client, not one cached by an earlier test.
    return {
        **DUMMY_CREDENTIALS,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }


# Local paths


def test_local_path_glob_and_brace_pattern(shard_dir):
    folder, contents = shard_dir
    paths = [str(folder / name) for name in sorted(contents)]
    assert expand_shard_urls(paths[0]) == paths[:1]
    assert expand_shard_urls(str(folder / "shard-*.tar")) == paths
    assert expand_shard_urls(str(folder / "shard-{000000..000001}.tar")) == paths[:2]
    assert expand_shard_urls([paths[2], str(folder / "shard-00000[01].tar")]) == [paths[2], *paths[:2]]
    assert expand_shard_urls("file://" + paths[0]) == paths[:1]
    for path in paths:
        assert read_all(path) == contents[Path(path).name]


def test_missing_local_shards_are_listed(shard_dir):
    folder, _ = shard_dir
    with pytest.raises(
        ValueError, match=r"2 of 4 shards .* do not exist: .*shard-000003\.tar, .*shard-000004\.tar"
    ):
        expand_shard_urls(str(folder / "shard-{000001..000004}.tar"))
    with pytest.raises(ValueError, match="no shards found"):
        expand_shard_urls(str(folder / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError):
        open_shard(str(folder / "shard-000009.tar"))


def test_unknown_protocol_names_the_supported_ones():
    with pytest.raises(
        ValueError, match=r"unsupported shard URL 'ftp://host/a\.tar'.*s3://.*gs://.*https://.*pipe:"
    ):
        expand_shard_urls("ftp://host/a.tar")
    with pytest.raises(ValueError, match="unsupported shard URL"):
        open_shard("hdfs://cluster/a.tar")


def test_module_does_not_import_remote_filesystems():
    code = "import sys, data.sources; print(sorted({'s3fs', 'gcsfs', 'aiohttp'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"


# pipe: commands


def test_pipe_reads_the_command_output(shard_dir):
    folder, contents = shard_dir
    pattern = f"pipe:cat {folder}/shard-{{000000..000001}}.tar"
    urls = expand_shard_urls(pattern)
    assert urls == [f"pipe:cat {folder}/shard-000000.tar", f"pipe:cat {folder}/shard-000001.tar"]
    assert [read_all(url) for url in urls] == [contents["shard-000000.tar"], contents["shard-000001.tar"]]
    # tarfile's stream mode, as webdataset reads a shard, sees every entry.
    with open_shard(urls[0]) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        assert [member.name for member in tar] == [
            "000000000.mp4",
            "000000000.json",
            "000000001.mp4",
            "000000001.json",
        ]


def test_failing_pipe_raises_oserror_with_its_stderr(tmp_path):
    with pytest.raises(OSError, match=r"exited with status 1: .*No such file"):
        read_all(f"pipe:cat {tmp_path}/missing.tar")
    # A failure after some output is reported too, at the end of the output.
    with open_shard("pipe:printf abc; exit 3") as stream:
        assert stream.read(3) == b"abc"
        with pytest.raises(OSError, match="status 3"):
            stream.read(10)
    # Read as the pipeline reads a shard: the error reaches webdataset's handler, which counts it.
    errors = []
    with open_shard("pipe:exit 2") as stream:
        files = list(tar_file_expander([{"url": "pipe:exit 2", "stream": stream}], handler=errors.append))
    assert files == []
    assert len(errors) == 1 and isinstance(errors[0], OSError) and "status 2" in str(errors[0])


def test_pipe_closed_early_stops_the_command():
    stream = open_shard("pipe:yes")
    assert stream.read(4) == b"y\ny\n"
    stream.close()  # must neither hang nor raise
    assert stream.closed


# HTTP


def test_http_urls_are_brace_expanded_and_read(http_root):
    root, contents = http_root
    urls = expand_shard_urls(root + "/shard-{000000..000002}.tar")
    assert urls == [f"{root}/{name}" for name in sorted(contents)]
    assert [read_all(url) for url in urls] == [contents[name] for name in sorted(contents)]


def test_missing_http_shard_is_an_oserror(http_root):
    root, _ = http_root
    with pytest.raises(OSError, match=r"shard-000009\.tar"):
        read_all(root + "/shard-000009.tar")


# S3 (moto server)


def test_s3_brace_pattern_reads_objects(s3_endpoint):
    endpoint, contents = s3_endpoint
    options = s3_options(endpoint)
    urls = expand_shard_urls(f"s3://{BUCKET}/shard-{{000000..000001}}.tar", options)
    assert urls == [f"s3://{BUCKET}/{name}" for name in sorted(contents)]
    assert [read_all(url, options) for url in urls] == [contents[name] for name in sorted(contents)]


def test_s3_glob_lists_the_bucket(s3_endpoint):
    endpoint, contents = s3_endpoint
    urls = expand_shard_urls(f"s3://{BUCKET}/shard-*.tar", s3_options(endpoint))
    assert urls == [f"s3://{BUCKET}/{name}" for name in sorted(contents)]
    with pytest.raises(ValueError, match="no shards found"):
        expand_shard_urls(f"s3://{BUCKET}/nothing-*.tar", s3_options(endpoint))


def test_s3_credentials_from_the_environment(s3_endpoint, monkeypatch):
    endpoint, contents = s3_endpoint
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = "shard-000001.tar"
    assert read_all(f"s3://{BUCKET}/{name}", {"skip_instance_cache": True}) == contents[name]


def test_missing_s3_object_is_an_oserror(s3_endpoint):
    endpoint, _ = s3_endpoint
    with pytest.raises(OSError, match=r"shard-000009\.tar"):
        read_all(f"s3://{BUCKET}/shard-000009.tar", s3_options(endpoint))
