"""Sharded data read by offset: `ShardImages`, a shard set (tinymim.data.shard_format; written by
tinymim.data.shard_writer) as an image source, local or at a URL (downloads: tinymim.data.shard_download).

Longer than 300 lines because it is one class whose index checks, reads and open files share its state
(the format, the writer and the downloads are modules of their own already).

`ShardImages` reads a shard folder, or a URL prefix (http://, https://, file://) holding the same files:
remote shards are downloaded whole, once, into a cache folder the first time one of their samples is read
(one subfolder per URL and index content: shard sets never share files, and shards written anew at
the same URL are fetched anew). An index is trusted only as far as it checks out: shard names must be
plain file names (nothing outside the folder or the cache), labels must match the classes their keys
name, and each shard's size and the tar headers of its first and last sample must be where the index
says (when it is opened; a remote one once downloaded).

`tinymim.data.loader.ShardBatchSampler` splits by whole shards: each epoch the shard order is shuffled
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
import hashlib
import io
import json
import os
import tarfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.utils.data as tud
from PIL import Image

from tinymim.core.errors import DataError
from tinymim.data.images import decode_image
from tinymim.data.shard_download import _check_size, _download, _reason, _remote_size, _size
from tinymim.data.shard_format import FORMAT, INDEX, REWRITE_FIX, VERSION, WRITE_FIX, expand_braces

URL_SCHEMES = ("http://", "https://", "file://")
NAME_CODEC = ("utf-8", "surrogateescape")  # tar member names and keys: the tar's exact bytes, whatever they are
MAX_OPEN_FILES = 64  # per process: a rank's epoch touches all of its shards


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
    """A shard set as an image source (the interface of tinymim.data.sources.FolderImages): `classes`,
    `load(i)`, `read_bytes(i)`, `describe(i)`, plus `shards` and `shard_of(i)` for the sampler.

    `root`: a folder holding index.json and the shards, or a URL prefix (http://, https://, file://)
    where they are; remote shards are downloaded whole into `cache`/<hash of the URL and the index>
    (default cache: ~/.cache/tinymim/shards) the first time a sample of theirs is read. Its last part
    may be a WebDataset brace pattern (`DIR/train-{000000..000009}.tar`): then only those shards of
    the folder's index are read."""

    def __init__(self, root: str | Path, cache: str | Path | None = None):
        self.root = str(root)
        self.remote = self.root.startswith(URL_SCHEMES)
        if self.remote:
            self.root = self.root.rstrip("/")
        self.pattern, self.selected = None, None
        parent, _, last = self.root.rpartition("/")
        if "{" in last:  # a brace pattern names some of the folder's shards
            self.pattern, self.selected, self.root = self.root, expand_braces(last), parent or "."
        self._where = f"{self.root}/{INDEX}" if self.remote else str(Path(self.root) / INDEX)
        text = self._read_index()
        self.cache = None
        if self.remote:
            digest = hashlib.sha256(self.root.encode() + b"\n" + text).hexdigest()[:16]
            self.cache = Path(cache or Path.home() / ".cache" / "tinymim" / "shards").expanduser() / digest
        self._load_index(self._select(self._parse_index(text)))
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
                            f"`tinymim shards SRC --output {self.root}`, or index WebDataset tars there with "
                            f"`tinymim shards --index {self.root}`") from e
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            raise DataError(f"cannot read the shard index {self._where} ({_reason(e)}); check the path, or "
                            f"{WRITE_FIX}") from e
        return text

    def _parse_index(self, text: bytes):
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:  # RecursionError: lists or objects nested thousands deep
            reason = "nested too deep to be an index" if isinstance(e, RecursionError) else str(e)[:200]
            raise DataError(f"{self._where} is corrupt ({reason}); {WRITE_FIX} again") from None

    def _load_index(self, index) -> None:
        try:
            if not isinstance(index, dict) or index.get("format") != FORMAT:
                raise ValueError("not a tinymim shard index")
            if index.get("version") != VERSION:
                raise ValueError(f"format version {index.get('version')}; this tinymim reads version {VERSION}")
            self.classes = [str(c) for c in index["classes"]]
            # tinymim's own shards put each image's label member right after it, under a key naming its
            # class; other tools' need neither
            self._label_members = index.get("source") != "webdataset"
            self._tars = self._tars_folder(index.get("tars"))
            self.labelled = index.get("label") != "none"  # shards indexed for pre-training carry no classes
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
                # (an index of other tools' tars records where those samples' headers start: their whole names)
                headers = [int(h) for h in s["header_offsets"]] if "header_offsets" in s else [None, None]
                self._ends[name] = [(str(s["keys"][j]), str(s["exts"][j]), int(s["offsets"][j]), int(s["sizes"][j]),
                                     int(s["labels"][j]), headers[min(j, 1)]) for j in sorted({0, n - 1}) if n]
                start += n
            if not shards or start != index["total"]:
                raise ValueError(f"its shards hold {start} samples, its total says {index['total']}")
            cols = {col: [v for s in index["shards"] for v in s[col]] for col in ("keys", "offsets", "sizes", "labels")}
            # numpy arrays, not lists of Python objects: forked loader workers share them without copies
            self.keys = np.array([k.encode(*NAME_CODEC) for k in cols["keys"]], dtype=bytes)
            self.offsets = np.array(cols["offsets"], dtype=np.int64)
            self.sizes = np.array(cols["sizes"], dtype=np.int64)
            self.labels = np.array(cols["labels"], dtype=np.int64)
            if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < len(self.classes):
                raise ValueError(f"labels outside 0..{len(self.classes) - 1}")
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, IndexError) as e:
            raise DataError(f"{self._where} is not a readable shard index ({str(e)[:200]}); {WRITE_FIX} again") from e
        if self._label_members:  # keys name classes in tinymim's own shards only (`3/s00003` is just a key)
            self._check_labels(cols["keys"])
        self.shards = shards
        self._starts = [s.start for s in shards]
        self._verified: set[str] = set()

    def _select(self, index):
        """The index restricted to the shards the brace pattern names (all of them without one)."""
        if self.selected is None or not isinstance(index, dict) or not isinstance(index.get("shards"), list):
            return index
        # sets, not lists: a pattern of 20,000 names against an index of 20,000 shards stays linear
        listed = {s["name"] for s in index["shards"] if isinstance(s, dict) and isinstance(s.get("name"), str)}
        missing = [name for name in self.selected if name not in listed]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DataError(f"{self.pattern} names {missing[0]}{more}, which {self._where} does not list "
                            f"(it has {len(listed)} shards, e.g. "
                            f"{min(listed) if listed else 'none'}); fix the pattern, or give the folder")
        wanted = set(self.selected)
        chosen = [s for s in index["shards"] if isinstance(s, dict) and isinstance(s.get("name"), str)
                  and s["name"] in wanted]
        return {**index, "shards": chosen, "total": sum(int(s["samples"]) for s in chosen)}

    def _shard_name(self, name) -> str:
        """A shard's name: a plain file name, so that nothing an index names is read or written outside
        its folder or the download cache."""
        name = str(name)
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
            raise DataError(f"{self._where} names shard {name!r}, not a plain file name in {self.root}: refusing "
                            f"to read or download it; {WRITE_FIX} again")
        return name

    def _tars_folder(self, tars) -> Path | None:
        """The folder of the shards: the index's own, or the one it names (`tinymim shards --index DIR
        --output OUT` leaves the tars in DIR); shard names stay plain file names inside it."""
        if tars is None:
            return None if self.remote else Path(self.root)
        if not isinstance(tars, str) or not tars or "\0" in tars:
            raise ValueError(f"its tars folder {tars!r} is not a path")
        if self.remote:
            raise DataError(f"{self._where} reads its tars from the folder {tars}: serve the index beside its tars "
                            f"(index them with `tinymim shards --index DIR` there), or read it from a local folder")
        return Path(self.root) / tars

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
                path = self._tars / shard.name
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
                for key, ext, offset, size, label, header in self._ends[shard.name]:
                    found = (_member_at(f, key, ext, offset, size, label if self._label_members else None)
                             if header is None else _named_member_at(f, header, f"{key}.{ext}", offset, size))
                    if found is not None:
                        raise DataError(f"shard {path} does not match {INDEX}: it holds {found} where the index puts "
                                        f"{f'{key}.{ext}'!r} (shards swapped, or written again since the index); "
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
        return f"{self.shard_of(i).name}:{self.keys[i].decode('utf-8', 'backslashreplace')}"

    def listing(self) -> list[str]:
        """What the set holds, wherever it is served from: its shards and, in index order, each
        sample's key and label (a resumed run must see the same samples at the same indices)."""
        return [*(f"{s.name} {s.samples}" for s in self.shards),
                *(f"{k.decode('utf-8', 'backslashreplace')} {label}" for k, label in zip(self.keys,
                                                                                           self.labels.tolist()))]

    # files

    def _url(self, shard: Shard) -> str:
        return f"{self.root}/{shard.name}"

    def _path(self, shard: Shard) -> Path:
        return self.cache / shard.name if self.remote else self._tars / shard.name

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


def _member_at(f, key: str, ext: str, offset: int, size: int, label: int | None) -> str | None:
    """None when the tar `f` holds sample `key` as _write_tar wrote it: the image's header right before
    `offset`, its label member right after its data (label None: shards another tool wrote, the image
    alone); else what it holds there instead."""
    name = f"{key}.{ext}"
    try:
        f.seek(offset - tarfile.BLOCKSIZE)
        info = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), *NAME_CODEC)
    except (tarfile.HeaderError, ValueError, OSError):
        return f"no tar header before byte {offset}"
    # the header's own name field, as bytes: the whole name (ustar: its prefix field joined), its first 100
    # bytes (a GNU long-name header before it holds the rest), or, from Python's pax writer, '?' for each
    # non-ASCII character (the name is whole in the pax header before it)
    exact = name.encode(*NAME_CODEC)
    spelled = {exact, exact[:100], name.encode("ascii", "replace")[:100]}
    if info.name.encode(*NAME_CODEC) not in spelled or info.size != size or not info.isreg():
        return f"{info.name!r} ({info.size} bytes) at byte {offset}"
    if label is None:
        return None
    f.seek(offset + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:  # reads from here; pax headers included
            cls = tar.next()
            if cls is None or cls.name != f"{key}.cls" or tar.extractfile(cls).read() != str(label).encode():
                return f"{cls.name if cls else 'no member'} after {name}, not its label {label}"
    except (tarfile.TarError, OSError, EOFError):
        return f"no label member after {name}"
    return None


def _named_member_at(f, header: int, name: str, offset: int, size: int) -> str | None:
    """None when the tar `f` holds a file named `name` (the same bytes), `size` long, whose headers start
    at byte `header` and data at `offset`; else what it holds there. Its headers are read as tarfile reads
    them (GNU long names, pax records), so the whole name is compared, however the writer spelled it."""
    try:
        f.seek(header)
        with tarfile.open(fileobj=f, mode="r:", encoding=NAME_CODEC[0], errors=NAME_CODEC[1]) as tar:
            member = tar.next()
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return f"no tar header at byte {header}"
    if member is None:
        return f"no member at byte {header}"
    if (member.name, member.offset_data, member.size) != (name, offset, size) or not member.isreg():
        return f"{member.name!r} ({member.size} bytes at byte {member.offset_data})"
    return None
