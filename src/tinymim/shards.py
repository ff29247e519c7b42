"""Sharded data: an ImageFolder written as WebDataset tar shards, read by offset, split among ranks by shard.

On disk (`tinymim shards SRC --output DIR`):

    DIR/shard-000000.tar, shard-000001.tar, ...   plain (uncompressed) tar files
        <key>.<ext>   the original image file, byte for byte (ext: its suffix, lowercased: jpg, jpeg, png ...)
        <key>.cls     its label, as decimal text
    DIR/index.json    format, version, class names, images per class, total, and per shard: file name,
                      sample count, byte size, and per sample its key, ext, the offset and size of the image
                      data inside the tar, and its label

A key is `<class folder>/<file name without suffix>`, with dots turned into underscores (WebDataset splits
a member name at the first dot of its base name). A sample's two members are consecutive, so the shards
are ordinary WebDataset shards (`webdataset.WebDataset("DIR/shard-{000000..000127}.tar")` reads them);
tinymim itself does not need the webdataset package: the index lets it read any sample with one pread.
Samples are written in an order shuffled with a fixed seed, so every shard mixes classes; every shard
holds `shard_size` samples except the last.

`ShardImages` reads a shard folder, or a URL prefix (http://, https://, file://) holding the same files:
remote shards are downloaded whole, once, into a cache folder the first time one of their samples is read
(one subfolder per URL and index content: shard sets never share files, and shards written anew at
the same URL are fetched anew).

`tinymim.data.ShardBatchSampler` splits by whole shards: each epoch the shard order is shuffled with (seed, epoch),
the shards are dealt to ranks greedily by sample count (largest first, to the rank holding fewest, so
ranks hold disjoint shards), and each rank shuffles all of its shards' samples together with
(seed, epoch, rank). Every rank takes total // global_batch steps; a rank whose shards hold fewer samples
than that needs starts over on its own samples, and one holding more leaves the rest for another epoch.
With equal shards and a shard count divisible by the number of ranks, every sample is read exactly once
an epoch, bar the drop-last remainder.
"""
from __future__ import annotations

import bisect
import collections
import fcntl
import hashlib
import io
import json
import logging
import os
import random
import tarfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.utils.data as tud
from PIL import Image

from tinymim.errors import DataError
from tinymim.rundir import RunDirError, atomic_write

log = logging.getLogger(__name__)

FORMAT, VERSION = "tinymim-shards", 1
INDEX = "index.json"
SHARD_NAME = "shard-{:06d}.tar"
URL_SCHEMES = ("http://", "https://", "file://")
WRITE_FIX = "write them with `tinymim shards SRC --output DIR`"
MAX_OPEN_FILES = 64  # per process: a rank's epoch touches all of its shards


# ---------------------------------------------------------------------------------------------
# writing


def write_shards(source, output: str | Path, shard_size: int = 1000, seed: int = 0) -> dict:
    """Write `source` (a `tinymim.data.FolderImages`: its listing, its class names) as tar shards of
    `shard_size` samples and an index into `output`; returns the index. Every file is written to a
    temporary file beside it and renamed, index.json last: a folder without it is unfinished."""
    if shard_size < 1:
        raise DataError(f"shard size must be 1 or more, got {shard_size}; e.g. --shard-size 1000 "
                        "(about 100 MiB of ImageNet JPEGs a shard)")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {output} is a file; choose a folder for the shards")
    if output.is_dir() and ((output / INDEX).exists() or any(output.glob("shard-*.tar"))):
        raise DataError(f"{output} already holds shards; choose a new --output, or delete its "
                        f"{INDEX} and shard-*.tar to write them again")
    samples = list(source.samples)
    if not samples:
        raise DataError(f"no images in {source.root}; nothing to write")
    keys = _keys(source.root, [path for path, _ in samples])
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)  # each shard a mix of classes, the same for a given seed
    shards = []
    starts = range(0, len(order), shard_size)
    for k, start in enumerate(starts):
        chosen = order[start:start + shard_size]
        items = [(keys[i], Path(samples[i][0]).suffix.lower().lstrip("."), samples[i][0], samples[i][1])
                 for i in chosen]
        name = SHARD_NAME.format(k)
        offsets, sizes = _write_tar(output / name, items)
        shards.append({"name": name, "samples": len(items), "bytes": (output / name).stat().st_size,
                       "keys": [it[0] for it in items], "exts": [it[1] for it in items],
                       "offsets": offsets, "sizes": sizes, "labels": [it[3] for it in items]})
        if (k + 1) * 10 // len(starts) > k * 10 // len(starts):
            log.info("wrote %d of %d shards", k + 1, len(starts))
    counts = collections.Counter(label for _, label in samples)
    index = {"format": FORMAT, "version": VERSION, "seed": seed, "shard_size": shard_size,
             "classes": list(source.classes),
             "class_counts": {c: counts.get(i, 0) for i, c in enumerate(source.classes)},
             "total": len(samples), "shards": shards}
    atomic_write(output / INDEX, lambda f: f.write(_index_text(index).encode()))
    return index


def _keys(root, paths: list[str]) -> list[str]:
    """`<class>/<name>` per file: no dot in the base name (WebDataset cuts the extension at the first
    one), made unique where two files differ only there (a.jpg and a.png, a.b.jpg and a_b.jpg)."""
    keys, seen = [], set()
    for p in paths:
        rel = Path(p).relative_to(root)
        key = rel.parent.joinpath(rel.stem.replace(".", "_")).as_posix()
        unique, n = key, 1
        while unique in seen:
            n += 1
            unique = f"{key}_{n}"
        seen.add(unique)
        keys.append(unique)
    return keys


def _write_tar(path: Path, items) -> tuple[list[int], list[int]]:
    """One shard: per item (key, ext, source file, label) the file's bytes as <key>.<ext>, then the
    label as <key>.cls. Returns where each image's data starts inside the tar, and its size."""
    offsets, sizes = [], []

    def write(f) -> None:
        offsets.clear()
        sizes.clear()
        # stream mode: the atomic writer's file object can only be written, not told or seeked
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for key, ext, src, label in items:
                data, mtime = _read_source(src)
                _add(tar, f"{key}.{ext}", data, mtime)
                # the data ends where the tar now stands, padded to whole 512-byte blocks
                offsets.append(tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
                sizes.append(len(data))
                _add(tar, f"{key}.cls", str(label).encode(), mtime)

    atomic_write(path, write)
    return offsets, sizes


def _read_source(path: str) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            return f.read(), int(os.fstat(f.fileno()).st_mtime)
    except OSError as e:  # not the writer's error: atomic_write would report it as one
        raise DataError(f"cannot read {path} ({e.strerror or e}); fix or remove it, then write the shards "
                        "again into a new --output") from e


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def _index_text(index: dict) -> str:
    """index.json, one shard a line: compact (ImageNet's is tens of MiB), still readable with `head`."""
    head = json.dumps({k: v for k, v in index.items() if k != "shards"})
    shards = ",\n".join(json.dumps(s, separators=(",", ":")) for s in index["shards"])
    return f'{head[:-1]}, "shards": [\n{shards}\n]}}\n'


# ---------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class Shard:
    """One tar file of a shard set: its samples are indices [start, stop) of the ShardImages."""

    name: str
    samples: int
    bytes: int
    start: int
    stop: int

    @property
    def range(self) -> range:
        return range(self.start, self.stop)


class ShardImages(tud.Dataset):
    """A shard set as an image source (the interface of tinymim.data.FolderImages): `classes`,
    `load(i)`, `read_bytes(i)`, `describe(i)`, plus `shards` and `shard_of(i)` for the sampler.

    `root`: a folder holding index.json and the shards, or a URL prefix (http://, https://, file://)
    where they are; remote shards are downloaded whole into `cache`/<hash of the URL and the index>
    (default cache: ~/.cache/tinymim/shards) the first time a sample of theirs is read."""

    def __init__(self, root: str | Path, cache: str | Path | None = None):
        self.root = str(root)
        self.remote = self.root.startswith(URL_SCHEMES)
        if self.remote:
            self.root = self.root.rstrip("/")
        self._where = f"{self.root}/{INDEX}" if self.remote else str(Path(self.root) / INDEX)
        text = self._read_index()
        self.cache = None
        if self.remote:
            digest = hashlib.sha256(self.root.encode() + b"\n" + text).hexdigest()[:16]
            self.cache = Path(cache or Path.home() / ".cache" / "tinymim" / "shards").expanduser() / digest
        self._load_index(self._parse_index(text))
        self._check_shards()
        self._files: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._pid = os.getpid()

    # the index

    def _read_index(self) -> bytes:
        try:
            if self.remote:
                with urllib.request.urlopen(self._where, timeout=60) as response:
                    text = response.read()
            else:
                text = Path(self._where).read_bytes()
        except FileNotFoundError as e:
            raise DataError(f"no shard index {self._where}: {self.root} is not a shard folder; write one with "
                            f"`tinymim shards SRC --output {self.root}`") from e
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            raise DataError(f"cannot read the shard index {self._where} ({_reason(e)}); check the path, or "
                            f"{WRITE_FIX}") from e
        return text

    def _parse_index(self, text: bytes):
        try:
            return json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{self._where} is corrupt ({e}); {WRITE_FIX} again") from e

    def _load_index(self, index) -> None:
        try:
            if not isinstance(index, dict) or index.get("format") != FORMAT:
                raise ValueError("not a tinymim shard index")
            if index.get("version") != VERSION:
                raise ValueError(f"format version {index.get('version')}; this tinymim reads version {VERSION}")
            self.classes = [str(c) for c in index["classes"]]
            shards, start = [], 0
            for s in index["shards"]:
                n = int(s["samples"])
                if not all(len(s[col]) == n for col in ("keys", "exts", "offsets", "sizes", "labels")):
                    raise ValueError(f"the sample lists of {s['name']} are not {n} long")
                shards.append(Shard(str(s["name"]), n, int(s["bytes"]), start, start + n))
                start += n
            if not shards or start != index["total"]:
                raise ValueError(f"its shards hold {start} samples, its total says {index['total']}")
            cols = {col: [v for s in index["shards"] for v in s[col]] for col in ("keys", "offsets", "sizes", "labels")}
            # numpy arrays, not lists of Python objects: forked loader workers share them without copies
            self.keys = np.array([k.encode() for k in cols["keys"]], dtype=bytes)
            self.offsets = np.array(cols["offsets"], dtype=np.int64)
            self.sizes = np.array(cols["sizes"], dtype=np.int64)
            self.labels = np.array(cols["labels"], dtype=np.int64)
            if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < len(self.classes):
                raise ValueError(f"labels outside 0..{len(self.classes) - 1}")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{self._where} is not a readable shard index ({e}); {WRITE_FIX} again") from e
        self.shards = shards
        self._starts = [s.start for s in shards]

    def _check_shards(self) -> None:
        """Every shard there, at its indexed size: a shard that fails to read later would only be a run of
        skipped images, so a missing one stops the run now, by name."""
        if not self.remote:
            for shard in self.shards:
                path = Path(self.root) / shard.name
                try:
                    size = path.stat().st_size
                except OSError as e:
                    raise DataError(f"shard {path} is missing ({e.strerror}; {INDEX} lists {len(self.shards)} "
                                    f"shards); restore it, or {WRITE_FIX} again") from e
                _check_size(str(path), size, shard.bytes)
            return
        todo = [s for s in self.shards if _size(self.cache / s.name) != s.bytes]
        with ThreadPoolExecutor(16) as pool:  # one request per shard not in the cache yet
            for shard, size in zip(todo, pool.map(lambda s: _remote_size(self._url(s)), todo)):
                if size is not None:
                    _check_size(self._url(shard), size, shard.bytes)

    # the source interface

    def __len__(self) -> int:
        return len(self.labels)

    def shard_of(self, i: int) -> Shard:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        return self.shards[bisect.bisect_right(self._starts, i) - 1]

    @property
    def shard_ranges(self) -> list[range]:
        return [s.range for s in self.shards]

    def load(self, i: int) -> tuple[Image.Image, int]:
        data, label = self.read_bytes(i)
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now, so a corrupt file fails here
        return img.convert("RGB"), label

    def read_bytes(self, i: int) -> tuple[bytes, int]:
        """The encoded image file and its label (FolderImages' read_bytes: for decoding on the device)."""
        shard = self.shard_of(i)
        size = int(self.sizes[i])
        data = os.pread(self._fd(shard), size, int(self.offsets[i]))
        if len(data) != size:
            raise DataError(f"{self._path(shard)} ends inside {self.describe(i)}: the shard is truncated; "
                            f"{WRITE_FIX} again")
        return data, int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"{self.shard_of(i).name}:{self.keys[i].decode()}"

    def listing(self) -> list[str]:
        """What the set holds, wherever it is served from: its shards and, in index order, each
        sample's key and label (a resumed run must see the same samples at the same indices)."""
        return [*(f"{s.name} {s.samples}" for s in self.shards),
                *(f"{k.decode()} {label}" for k, label in zip(self.keys, self.labels.tolist()))]

    # files

    def _url(self, shard: Shard) -> str:
        return f"{self.root}/{shard.name}"

    def _path(self, shard: Shard) -> Path:
        return self.cache / shard.name if self.remote else Path(self.root) / shard.name

    def _fd(self, shard: Shard) -> int:
        """An open file of the shard, per process: a loader worker forked with the parent's files
        closes its copies and opens its own, so no handle is ever shared across a fork."""
        if self._pid != os.getpid():
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()
            self._pid = os.getpid()
        fd = self._files.get(shard.name)
        if fd is not None:
            self._files.move_to_end(shard.name)
            return fd
        path = self._path(shard)
        if self.remote and _size(path) != shard.bytes:
            _download(self._url(shard), path, shard.bytes)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise DataError(f"cannot open shard {path} ({e.strerror}); restore it, or {WRITE_FIX} again") from e
        self._files[shard.name] = fd
        if len(self._files) > MAX_OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def __getstate__(self) -> dict:  # a spawned worker opens its own files
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = collections.OrderedDict(), None
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._files.values():
                os.close(fd)


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
        raise DataError(f"cannot use the shard cache {path.parent} ({e.strerror}); set data.shard_cache to a "
                        "folder you can write to") from e
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
        except RunDirError as e:
            cause = e.__cause__
            raise DataError(f"cannot store shard {url} in the shard cache {path.parent} "
                            f"({getattr(cause, 'strerror', None) or e}); set data.shard_cache to a folder "
                            "with room for the shards") from e
    _check_size(url, _size(path) or 0, expected)
    log.info("downloaded %s into %s", url, path.parent)
