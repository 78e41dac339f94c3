"""Shards on object storage (s3://): expand specs and stream a shard's bytes, retrying transient failures.

    s3 spec (brace pattern, glob, folder, .txt listing) --expand--> shard urls, checked to exist (a listing per folder)
    shard url --open_shard--> RetryingReader: a forward-only byte stream for tarfile's streaming mode; a failed
                              read is retried from the same offset with exponential backoff, then named
Credentials and endpoint come only from the standard AWS environment (see store.object_fs).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import braceexpand

from .errors import RemoteReadError, ShardError, ShardNotFoundError
from .store import object_fs

BLOCK_BYTES = 8 << 20  # one ranged GET per 8 MiB of shard
ATTEMPTS = 5
BACKOFF_S = 0.5  # waits 0.5, 1, 2, 4 s between the attempts
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _strip(url: str) -> str:
    return url[len("s3://"):]


def expand(spec: str, expand_line: Callable[[str], list[str]]) -> list[str]:
    """An s3:// spec -> shard urls. `expand_line` expands each line of a listing file (local or remote lines)."""
    fs = object_fs()
    if spec.endswith(".txt"):
        try:
            text = fs.cat_file(_strip(spec)).decode()
        except FileNotFoundError:
            raise ShardNotFoundError(f"shard listing {spec} not found") from None
        base = spec.rsplit("/", 1)[0]
        out: list[str] = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.extend(expand_line(line if "://" in line or line.startswith(("/", "pipe:")) else f"{base}/{line}"))
        return out
    if "{" in spec:
        urls = list(braceexpand.braceexpand(spec))
    elif any(c in spec for c in "*?["):
        urls = sorted(f"s3://{p}" for p in fs.glob(_strip(spec)))
        if not urls:
            raise ShardNotFoundError(f"glob {spec!r} matched no objects")
    elif spec.endswith("/"):
        urls = sorted(f"s3://{p}" for p in fs.ls(_strip(spec), detail=False)
                      if p.endswith((".tar", ".tar.gz", ".tgz")))
        if not urls:
            raise ShardNotFoundError(f"{spec} holds no .tar shards")
    else:
        urls = [spec]
    listed: dict[str, set[str]] = {}  # one listing per folder instead of a request per shard
    missing = []
    for u in urls:
        folder = u.rsplit("/", 1)[0]
        if folder not in listed:
            try:
                listed[folder] = {f"s3://{p}" for p in fs.ls(_strip(folder), detail=False)}
            except FileNotFoundError:
                listed[folder] = set()
            except PermissionError as e:
                raise ShardError(f"{folder}: listing refused ({e}); check the AWS credentials in the "
                                 "environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)") from e
        if u not in listed[folder]:
            missing.append(u)
    if missing:
        raise ShardNotFoundError(f"{len(missing)} shard(s) not found, first: {missing[:3]}")
    return urls


class RetryingReader(io.RawIOBase):
    """Reads one object from the start, forward only. A failed read (connection reset, timeout, 5xx after
    s3fs's own retries) reopens the object at the current offset after a backoff; after `attempts` failures
    it raises RemoteReadError naming the url, the offset and the attempts (iter_raw_samples adds the member)."""

    def __init__(self, url: str, *, attempts: int | None = None, backoff_s: float | None = None,
                 block_bytes: int | None = None):
        self.url = url
        self.attempts = ATTEMPTS if attempts is None else attempts
        self.backoff_s = BACKOFF_S if backoff_s is None else backoff_s
        self.block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
        self.fs = object_fs()
        self.offset = 0
        self.failures = 0  # failed reads that a retry recovered or that ended in RemoteReadError
        self._f = None
        self._call(lambda: None)  # open now: a missing shard is named before any reading starts

    def _open(self):
        f = self.fs.open(_strip(self.url), "rb", block_size=self.block_bytes, cache_type="readahead")
        if self.offset:
            f.seek(self.offset)
        return f

    def _call(self, read):
        last: Exception | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                if self._f is None:
                    self._f = self._open()
                return read()
            except _NOT_TRANSIENT as e:
                if isinstance(e, FileNotFoundError):
                    raise ShardNotFoundError(f"shard {self.url} not found") from None
                raise ShardError(f"{self.url}: access refused ({type(e).__name__}: {e}); check the AWS "
                                 "credentials in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)") from e
            except Exception as e:  # transport errors come as botocore, aiohttp or OSError types
                last = e
                self.failures += 1
                self._drop()
                if attempt < self.attempts:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise RemoteReadError(self.url, offset=self.offset, attempts=self.attempts,
                              cause=f"{type(last).__name__}: {last}")

    def _drop(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:
                pass
            self._f = None

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._call(lambda: self._f.read(len(b)))
        n = len(data)
        b[:n] = data
        self.offset += n
        return n

    def close(self) -> None:
        self._drop()
        super().close()


def open_shard(url: str) -> io.BufferedReader:
    return io.BufferedReader(RetryingReader(url), buffer_size=min(1 << 20, BLOCK_BYTES))
