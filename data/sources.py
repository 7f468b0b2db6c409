"""Where shards come from: local paths, object stores and HTTP(S) through fsspec, and `pipe:` commands.

Remote filesystems (s3fs, gcsfs, aiohttp) are imported by fsspec on first use, not here. Credentials
come the usual way: the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
GOOGLE_APPLICATION_CREDENTIALS, ...) or `storage_options`, e.g. for an S3-compatible store
`{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}`.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from typing import BinaryIO

import braceexpand
import fsspec

logger = logging.getLogger("data")

# Protocols whose filesystems can list a prefix, so a glob pattern can be expanded.
LISTABLE_PROTOCOLS = ("s3", "gs", "gcs")
REMOTE_PROTOCOLS = (*LISTABLE_PROTOCOLS, "http", "https")
PIPE_PREFIX = "pipe:"
# How long a `pipe:` command may keep running after closing its output before it counts as failed.
PIPE_EXIT_TIMEOUT_S = 30.0


def expand_shard_urls(shards: str | Sequence[str], storage_options: Mapping | None = None) -> list[str]:
    """Brace patterns, globs, or a list of either -> shard URLs; ValueError if none or a local one is missing.

    Local paths are globbed (sorted) and checked to exist; `s3://`/`gs://` globs are listed through
    fsspec; other remote URLs and `pipe:` commands are only brace-expanded (not checked).
    """
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    local: list[str] = []
    for pattern in patterns:
        for item in braceexpand.braceexpand(str(pattern)):
            protocol = shard_protocol(item)
            if protocol == "pipe":
                urls.append(item)
            elif protocol == "file":
                path = item.removeprefix("file://")
                matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
                urls.extend(matches)
                local.extend(matches)
            elif protocol in LISTABLE_PROTOCOLS and glob.has_magic(item):
                urls.extend(_remote_glob(item, storage_options))
            else:
                # Checking thousands of remote objects up front would be slow; a missing one is
                # counted as an unreadable shard when it is opened.
                _filesystem_class(protocol)
                urls.append(item)
    if not urls:
        raise ValueError(f"no shards found for {shards!r}")
    missing = [path for path in local if not os.path.isfile(path)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"{len(missing)} of {len(urls)} shards in {shards!r} do not exist: {shown}")
    return urls


def open_shard(url: str, storage_options: Mapping | None = None) -> BinaryIO:
    """Binary stream of one shard; any failure to open it is an OSError naming the URL.

    A `pipe:` command's failure (non-zero exit) is raised as an OSError by the read that reaches
    the end of its output.
    """
    protocol = shard_protocol(url)
    if protocol == "file":
        return open(url.removeprefix("file://"), "rb")
    if protocol == "pipe":
        return _PipeReader(url.removeprefix(PIPE_PREFIX))  # type: ignore[return-value]
    _filesystem_class(protocol)  # a missing package is a setup error, not an unreadable shard
    try:
        return fsspec.open(url, mode="rb", **dict(storage_options or {})).open()
    except OSError:
        raise
    except Exception as exn:
        raise OSError(f"cannot open {url}: {type(exn).__name__}: {exn}") from exn


def shard_protocol(url: str) -> str:
    """The URL's protocol: "file", "pipe", or one of REMOTE_PROTOCOLS; ValueError for any other."""
    if url.startswith(PIPE_PREFIX):
        return "pipe"
    if "://" not in url:
        return "file"
    protocol = url.split("://", 1)[0].lower()
    if protocol == "file" or protocol in REMOTE_PROTOCOLS:
        return protocol
    supported = ", ".join(f"{name}://" for name in REMOTE_PROTOCOLS)
    raise ValueError(
        f"unsupported shard URL {url!r}: use a local path, file://, {supported} or pipe:<command>"
    )


def _filesystem_class(protocol: str) -> type:
    """fsspec's filesystem for `protocol`; ImportError naming the package to install if it is missing."""
    try:
        return fsspec.get_filesystem_class(protocol)
    except ImportError as exn:
        raise ImportError(f"reading {protocol}:// shards needs an extra package: {exn}") from exn


def _remote_glob(pattern: str, storage_options: Mapping | None) -> list[str]:
    _filesystem_class(shard_protocol(pattern))
    fs, path = fsspec.core.url_to_fs(pattern, **dict(storage_options or {}))
    return sorted(fs.unstrip_protocol(match) for match in fs.glob(path))


class _PipeReader(io.RawIOBase):
    """The stdout of a shell command; reaching its end with a non-zero exit status raises OSError."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.name = PIPE_PREFIX + command
        self.command = command
        # stderr goes to a file, not a pipe: an undrained pipe could block a chatty command.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        try:
            self._process = subprocess.Popen(
                command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr
            )
        except OSError as exn:
            self._stderr.close()
            raise OSError(f"cannot start {self.name}: {exn}") from exn
        self._checked = False  # whether the exit status was checked at the end of the output
        self._killed = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        assert self._process.stdout is not None
        count = self._process.stdout.readinto(buffer)
        if count == 0 and not self._checked:
            self._check_exit()
        return count

    def _check_exit(self) -> None:
        self._checked = True
        try:
            status = self._process.wait(timeout=PIPE_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            raise OSError(
                f"{self.name} closed its output but was still running after {PIPE_EXIT_TIMEOUT_S:.0f} s"
            ) from None
        if status != 0:
            raise OSError(f"{self.name} exited with status {status}: {self._stderr_tail()}")

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return text[-500:] if text else "(no stderr)"

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._process.poll() is None:
                # Closed before the end (e.g. the reader stopped early): the command is not needed.
                self._process.kill()
                self._killed = True
            self._process.wait()
            if not (self._checked or self._killed) and self._process.returncode != 0:
                logger.warning(
                    "%s exited with status %d: %s", self.name, self._process.returncode, self._stderr_tail()
                )
        finally:
            assert self._process.stdout is not None
            self._process.stdout.close()
            self._stderr.close()
            super().close()
