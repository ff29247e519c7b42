"""Shards at a URL: the size a server gives (`_remote_size`) and downloads into the shard cache, whole and
once per machine (`_download`, behind a lock file), with the size checks and one-line reasons that
reading local shards uses too."""
from __future__ import annotations

import errno
import fcntl
import logging
import urllib.request
from pathlib import Path

from tinymim.core.errors import DataError, StorageError
from tinymim.core.files import RunDirError, atomic_write
from tinymim.data.shard_format import WRITE_FIX

log = logging.getLogger(__name__)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _check_size(where: str, size: int, expected: int) -> None:
    if size != expected:
        raise DataError(f"shard {where} has {size} bytes, its index says {expected}: it is truncated or from "
                        f"another writing; restore it, or {WRITE_FIX} again")


def _reason(e: Exception) -> str:
    return str(getattr(e, "reason", None) or getattr(e, "strerror", None) or e)


def _cache_error(cache: Path, e: BaseException | None) -> StorageError:
    """A shard cache that cannot take a shard, named as full or read-only: one line that stops the run
    (every other shard would fail the same way, so no image is skipped for it)."""
    code, reason = getattr(e, "errno", None), getattr(e, "strerror", None) or str(e)
    if code in (errno.ENOSPC, errno.EDQUOT):
        state = "is full (no space left)"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        state = f"is read-only ({reason})"
    else:
        state = f"cannot be written ({reason})"
    return StorageError(f"the shard cache {cache} {state}: set data.shard_cache to a writable folder with room "
                        "for the shards")


def _remote_size(url: str) -> int | None:
    """The size of a remote file (None when the server does not say); a one-line error when it is not there."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as response:
            length = response.headers.get("Content-Length")
    except (OSError, ValueError) as e:
        raise DataError(f"shard {url} cannot be read ({_reason(e)}); check the URL, or {WRITE_FIX} "
                        "and serve that folder") from e
    return int(length) if length is not None else None


def _download(url: str, path: Path, expected: int) -> None:
    """`url` into `path`, whole and once: the loader workers (and ranks) of a machine that want the same
    shard wait on a lock file while one of them downloads it; the file appears complete or not at all."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")
    except OSError as e:
        raise _cache_error(path.parent, e) from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _size(path) == expected:  # another process fetched it meanwhile
            return
        try:
            response = urllib.request.urlopen(url, timeout=60)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot download shard {url} ({_reason(e)}); check the URL") from e

        def copy(f) -> None:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except OSError as e:  # the network's error, not the cache's
                    raise DataError(f"download of shard {url} failed ({_reason(e)}); run again to retry") from e
                if not chunk:
                    return
                f.write(chunk)

        try:
            with response:
                atomic_write(path, copy)
        except RunDirError as e:  # atomic_write's own one line, the OSError beneath it
            raise _cache_error(path.parent, e.__cause__ or e) from e
    _check_size(url, _size(path) or 0, expected)
    log.info("downloaded %s into %s", url, path.parent)
