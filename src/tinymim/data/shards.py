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
the same URL are fetched anew). An index is trusted only as far as it checks out: shard names must be
plain file names (nothing outside the folder or the cache), labels must match the classes their keys
name, and each shard's size and the tar headers of its first and last sample must be where the index
says (when it is opened; a remote one once downloaded).

`tinymim.data.pretrain.ShardBatchSampler` splits by whole shards: each epoch the shard order is shuffled
with (seed, epoch), the shards are dealt to ranks greedily by sample count (largest first, to the rank holding fewest,
so ranks hold disjoint shards), and each rank shuffles all of its shards' samples together with
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
import re
import tarfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.utils.data as tud
from PIL import Image

from tinymim.core.errors import DataError
from tinymim.core.rundir import TMP_SUFFIX, RunDirError, atomic_write
from tinymim.data.images import decode_image

log = logging.getLogger(__name__)

FORMAT, VERSION = "tinymim-shards", 1
INDEX = "index.json"
SHARD_NAME = "shard-{:06d}.tar"
URL_SCHEMES = ("http://", "https://", "file://")
WRITE_FIX = "write them with `tinymim shards SRC --output DIR`"
REWRITE_FIX = "rewrite the shards with `tinymim shards SRC --output DIR`"
RESUME_FIX = ("another source, --shard-size or --seed; give the interrupted write's SRC, --shard-size and --seed, "
              "or choose a new --output")
# the temporary files atomic_write leaves when a write is killed (rundir._open_tmp names them)
_TMP = re.compile(rf"(shard-\d{{6}}\.tar|{re.escape(INDEX)})\.[0-9a-f]{{8}}{re.escape(TMP_SUFFIX)}")
MAX_OPEN_FILES = 64  # per process: a rank's epoch touches all of its shards


# ---------------------------------------------------------------------------------------------
# writing


def write_shards(source, output: str | Path, shard_size: int = 1000, seed: int = 0) -> dict:
    """Write `source` (a `tinymim.data.pretrain.FolderImages`: its listing, its class names) as tar shards of
    `shard_size` samples and an index into `output`; returns the index. Every file is written to a
    temporary file beside it and renamed, index.json last: a folder without it is unfinished, and writing
    into it again (same source, shard size and seed) keeps the shards it finished and writes the rest."""
    if shard_size < 1:
        raise DataError(f"shard size must be 1 or more, got {shard_size}; e.g. --shard-size 1000 "
                        "(about 100 MiB of ImageNet JPEGs a shard)")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {output} is a file; choose a folder for the shards")
    if (output / INDEX).exists():
        raise DataError(f"{output} already holds shards; choose a new --output, or delete its "
                        f"{INDEX} and shard-*.tar to write them again")
    samples = list(source.samples)
    if not samples:
        raise DataError(f"no images in {source.root}; nothing to write")
    keys = _keys(source.root, [path for path, _ in samples])
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)  # each shard a mix of classes, the same for a given seed
    plan = [[(keys[i], Path(samples[i][0]).suffix.lower().lstrip("."), samples[i][0], samples[i][1])
             for i in order[start:start + shard_size]] for start in range(0, len(order), shard_size)]
    done = _finished_shards(output, plan)  # all checked before anything is written
    for stale in output.glob(f"*{TMP_SUFFIX}") if output.is_dir() else []:
        if _TMP.fullmatch(stale.name):  # an interrupted write's unfinished file
            stale.unlink()
    if done:
        log.info("%s holds %d of the %d shards finished: writing the rest", output, len(done), len(plan))
    shards = []
    for k, items in enumerate(plan):
        name = SHARD_NAME.format(k)
        if k not in done:
            offsets, sizes = _write_tar(output / name, items)
            done[k] = {"name": name, "samples": len(items), "bytes": (output / name).stat().st_size,
                       "keys": [it[0] for it in items], "exts": [it[1] for it in items],
                       "offsets": offsets, "sizes": sizes, "labels": [it[3] for it in items]}
        shards.append(done[k])
        if (k + 1) * 10 // len(plan) > k * 10 // len(plan):
            log.info("wrote %d of %d shards", k + 1, len(plan))
    counts = collections.Counter(label for _, label in samples)
    index = {"format": FORMAT, "version": VERSION, "seed": seed, "shard_size": shard_size,
             "classes": list(source.classes),
             "class_counts": {c: counts.get(i, 0) for i, c in enumerate(source.classes)},
             "total": len(samples), "shards": shards}
    atomic_write(output / INDEX, lambda f: f.write(_index_text(index).encode()))
    return index


def _finished_shards(output: Path, plan: list) -> dict[int, dict]:
    """The index entries of the shards an interrupted write into `output` finished, by position in `plan`.
    Each is checked against what this write would put there (member names, sizes, times and labels: the
    tar headers only, not the image data); one cut short is written again, one holding anything else
    (another source, shard size or seed) stops the write before anything is written."""
    if not output.is_dir():
        return {}
    names = [SHARD_NAME.format(k) for k in range(len(plan))]
    stray = sorted(p.name for p in output.glob("shard-*.tar") if p.name not in names)
    if stray:
        raise DataError(f"{output / stray[0]} is not one of the {len(plan)} shards this write makes: {output} "
                        f"holds an unfinished write of {RESUME_FIX}")
    done = {}
    for k, name in enumerate(names):
        if (output / name).exists():
            entry = _finished(output / name, plan[k])
            if entry is not None:
                done[k] = entry
    return done


def _finished(path: Path, items) -> dict | None:
    """`path`'s index entry when it holds `items` whole, as _write_tar writes them; None when it is a
    part of that (cut short); a DataError when it holds anything else."""
    expected = []
    for key, ext, src, label in items:
        try:
            st = os.stat(src)
        except OSError as e:
            raise DataError(f"cannot read {src} ({e.strerror or e}); fix or remove it, then write the shards "
                            "again") from e
        expected += [(f"{key}.{ext}", st.st_size, int(st.st_mtime), None),
                     (f"{key}.cls", len(str(label)), int(st.st_mtime), str(label).encode())]
    got = []
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                n = len(got)
                name, size, mtime, data = expected[n] if n < len(expected) else (None, None, None, None)
                if (m.name, m.size, int(m.mtime)) != (name, size, mtime) or not m.isreg() or \
                        (data is not None and tar.extractfile(m).read() != data):
                    held = f"{m.name} of another size, time or label" if m.name == name else m.name
                    want = name or f"the end of the shard ({len(items)} images)"
                    raise DataError(f"{path} holds {held} where this write puts {want}: its folder holds an "
                                    f"unfinished write of {RESUME_FIX}")
                got.append(m)
        size = path.stat().st_size
    except (tarfile.TarError, OSError, EOFError):
        return None  # cut short: everything read so far was the write's own
    if len(got) < len(expected) or not got:
        return None
    end = got[-1].offset_data + -(-got[-1].size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if size != -(-(end + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE:
        return None  # the end-of-archive blocks are missing
    images = got[0::2]
    return {"name": path.name, "samples": len(items), "bytes": size, "keys": [it[0] for it in items],
            "exts": [it[1] for it in items], "offsets": [m.offset_data for m in images],
            "sizes": [m.size for m in images], "labels": [it[3] for it in items]}


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
    """A shard set as an image source (the interface of tinymim.data.pretrain.FolderImages): `classes`,
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
            shards, start, self._ends = [], 0, {}
            for s in index["shards"]:
                n = int(s["samples"])
                if not all(len(s[col]) == n for col in ("keys", "exts", "offsets", "sizes", "labels")):
                    raise ValueError(f"the sample lists of {s['name']} are not {n} long")
                name = self._shard_name(s["name"])
                if name in self._ends:
                    raise DataError(f"{self._where} names shard {name} twice; {WRITE_FIX} again")
                shards.append(Shard(name, n, int(s["bytes"]), start, start + n))
                # the first and last sample, checked against the shard's tar headers when it is opened
                self._ends[name] = [(str(s["keys"][j]), str(s["exts"][j]), int(s["offsets"][j]), int(s["sizes"][j]),
                                     int(s["labels"][j])) for j in sorted({0, n - 1}) if n]
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
        self._check_labels(cols["keys"])
        self.shards = shards
        self._starts = [s.start for s in shards]
        self._verified: set[str] = set()

    def _shard_name(self, name) -> str:
        """A shard's name: a plain file name, so that nothing an index names is read or written outside
        its folder or the download cache."""
        name = str(name)
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
            raise DataError(f"{self._where} names shard {name!r}, not a plain file name in {self.root}: refusing "
                            f"to read or download it; {WRITE_FIX} again")
        return name

    def _check_labels(self, keys: list) -> None:
        """Each sample's label against the class its key names (`<class>/<name>`, see _keys): an index
        whose labels were shifted against its class list would train on wrong labels without a sign."""
        index = {c: i for i, c in enumerate(self.classes)}
        for key, label in zip(keys, self.labels.tolist()):
            expected = index.get(str(key).split("/", 1)[0])
            if expected is not None and expected != label:
                raise DataError(f"{self._where} labels {key} as {label} ({self.classes[label]}), but its key names "
                                f"class {self.classes[expected]} ({expected}): its labels do not match its class "
                                f"list; {REWRITE_FIX}")

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
                self._check_headers(shard, path)
            return
        todo = [s for s in self.shards if _size(self.cache / s.name) != s.bytes]
        with ThreadPoolExecutor(16) as pool:  # one request per shard not in the cache yet
            for shard, size in zip(todo, pool.map(lambda s: _remote_size(self._url(s)), todo)):
                if size is not None:
                    _check_size(self._url(shard), size, shard.bytes)

    def _check_headers(self, shard: Shard, path: Path) -> None:
        """The shard's first and last sample where the index says, by their tar headers (a few blocks
        read): shards swapped or rewritten since the index was written fail here, not as wrong images."""
        if shard.name in self._verified:
            return
        try:
            with open(path, "rb") as f:
                for key, ext, offset, size, label in self._ends[shard.name]:
                    found = _member_at(f, key, ext, offset, size, label)
                    if found is not None:
                        raise DataError(f"shard {path} does not match {INDEX}: it holds {found} where the index puts "
                                        f"{key}.{ext} (shards swapped, or written again since the index); "
                                        f"{REWRITE_FIX}")
        except OSError as e:
            raise DataError(f"cannot read shard {path} ({e.strerror or e}); restore it, or {WRITE_FIX} again") from e
        self._verified.add(shard.name)

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
        return decode_image(io.BytesIO(data)), label

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
        if self.remote:  # checked once here, now that the file is local
            self._check_headers(shard, path)
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


def _member_at(f, key: str, ext: str, offset: int, size: int, label: int) -> str | None:
    """None when the tar `f` holds sample `key` as _write_tar wrote it: the image's header right before
    `offset`, its label member right after its data; else what it holds there instead."""
    name = f"{key}.{ext}"
    try:
        f.seek(offset - tarfile.BLOCKSIZE)
        info = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
    except (tarfile.HeaderError, ValueError, OSError):
        return f"no tar header before byte {offset}"
    # the header's own name field: a name too long for it, or not ASCII, is cut short there (whole in a pax header)
    if (info.name, info.size) != (name.encode("ascii", "replace")[:100].decode(), size) or not info.isreg():
        return f"{info.name} ({info.size} bytes) at byte {offset}"
    f.seek(offset + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:  # reads from here; pax headers included
            cls = tar.next()
            if cls is None or cls.name != f"{key}.cls" or tar.extractfile(cls).read() != str(label).encode():
                return f"{cls.name if cls else 'no member'} after {name}, not its label {label}"
    except (tarfile.TarError, OSError, EOFError):
        return f"no label member after {name}"
    return None


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
