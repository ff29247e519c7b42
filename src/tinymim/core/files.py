"""Files written whole or not at all, and read tolerantly: `atomic_write` (a temporary file beside the
target, synced, then renamed over it) and its text, JSON and torch writers, whose errors say in one line
what to do (a full disk, a read-only or forbidden folder); readers of JSON lines, YAML and JSON that go
on where they can; `safe_torch_load`, torch.load that never unpickles code; and the errors they raise,
which the run directory's own raise too (`RunDirError`, `DiskFullError`, `CheckpointError`)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import pickletools
import secrets
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
import yaml

from tinymim.core.errors import TinymimError


class RunDirError(TinymimError):
    """A run directory that cannot be used as asked, with what to do about it."""


class CheckpointError(TinymimError):
    """A weights or checkpoint file that cannot be used, with what to do about it."""


class DiskFullError(RunDirError):
    """No space left while writing; what was saved before is intact."""


TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------------------------------------
# writing files


def write_error(e: OSError, path: Path) -> RunDirError:
    """The one-line error for a failed write of `path`."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        return DiskFullError(
            f"no space left on the device of {path.parent} while writing {path.name}"
            f"{f' ({free / 2**20:.0f} MiB free)' if free is not None else ''}; what was saved before is intact: "
            "free some space (or use another --output) and run the same command again to resume")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the file system is read-only" if e.errno == errno.EROFS else "permission denied"
        return RunDirError(f"cannot write {path}: {why}; choose an --output folder you can write to")
    return RunDirError(f"cannot write {path}: {e.strerror or e}")


def _free_bytes(path: Path) -> int | None:
    for p in (path.parent, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


class _Sink:
    """A file wrapper that remembers the OSError of a failed write: torch.save reports it only as
    'unexpected pos ...'."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _open_tmp(path: Path) -> tuple[Path, BinaryIO]:
    """A new temporary file beside `path`; created with mode 0666 so that the umask decides."""
    tmp = path.parent / f"{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return tmp, os.fdopen(fd, "wb")


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Write `path` through write(file): to a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, f = _open_tmp(path)
        sink = _Sink(f)
        with f:
            try:
                write(sink)
            except RuntimeError:
                if sink.error is not None:  # torch.save's wrapping of a failed write
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        with contextlib.suppress(OSError):  # make the rename itself durable
            dirfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
    except OSError as e:
        raise write_error(e, path) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def save_torch(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


# ---------------------------------------------------------------------------------------------
# reading files (tolerant where a reader can go on)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file; a line that is not a JSON object (a partial last line after
    a kill) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out


def read_yaml(path: str | Path) -> dict | None:
    """A YAML mapping, or None when the file is missing, empty, truncated or not a mapping."""
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return loaded if isinstance(loaded, dict) else None


def read_json(path: str | Path, what: str = "file") -> dict | None:
    """A JSON object, None when the file is missing; a corrupt one is a one-line error."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path} ({what}) is corrupt ({e}); restore it, or delete it") from e
    if not isinstance(obj, dict):
        raise RunDirError(f"{path} ({what}) is corrupt (not a JSON object); restore it, or delete it")
    return obj


def safe_torch_load(path: str | Path) -> Any:
    """torch.load that refuses pickled code and names the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    damaged = f"cannot read {path}: the file is damaged, truncated or not a PyTorch checkpoint"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror})") from e
    # torch.save writes a zip archive (or, before 1.6, a pickle stream starting with PROTO 0x80)
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(f"{damaged} (it starts with neither a zip nor a pickle header)")
    try:
        with warnings.catch_warnings():  # torch's warnings about odd pickle protocols: the error below says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(str(e))
        if not _parses_as_pickle(path, head):  # garbage, not an object that would run code
            raise CheckpointError(f"{damaged} ({reason})") from e
        raise CheckpointError(
            f"refused to load {path}: it holds pickled objects other than tensors and plain "
            f"containers, which could run code ({reason}). If you trust the file, "
            "convert it to safetensors yourself; tinymim never unpickles arbitrary objects.") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{damaged} ({_unpickler_reason(str(e))})") from e


def _parses_as_pickle(path: Path, head: bytes) -> bool:
    """Whether the file is a well-formed pickle stream (read, never run): what torch's weights-only
    unpickler refused is then an object it will not build, else the bytes are damaged."""
    if head[:1] != b"\x80":  # a zip archive: torch names a refused object a global
        return True
    try:
        with open(path, "rb") as f:
            for _ in pickletools.genops(f):
                pass
        return True
    except Exception:  # noqa: BLE001 - any failure to parse means damaged bytes
        return False


def _unpickler_reason(message: str) -> str:
    """The reason torch gives, without its advice to load with weights_only=False (never ours to give)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error"):
            rest = line.split(":", 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return rest.split(". Please")[0].rstrip(".")
    keep = [line for line in lines if "weights_only" not in line and "Please file an issue" not in line]
    first = keep[0] if keep else lines[0] if lines else "unreadable"
    return first.split(". This is an internal")[0].rstrip(".")[:200]
