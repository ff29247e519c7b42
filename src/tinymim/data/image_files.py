"""Unlabeled images for pre-training (data.name=images): every image file under a folder, at any depth,
flat or nested, or every image member of a .tar or .zip archive, read in place. No class folders are
needed; every image gets label 0 (distillation never reads it)."""
from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import torch.utils.data as tud
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from tinymim.core.errors import DataError
from tinymim.data.images import decode_image

ARCHIVES = (".tar", ".zip")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not Path(name).name.startswith(".")


class ImageFiles(tud.Dataset):
    """The images of a folder (recursively, links followed, sorted by relative path) or of a tar/zip
    archive (members read by offset / by name, nothing extracted). `load(i)` -> (RGB image, 0)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.classes = ["images"]
        self._handle, self._pid = None, None
        if self.root.is_dir():
            self.kind = "folder"
            self.items = sorted(
                os.path.relpath(os.path.join(d, f), self.root)
                for d, _, files in os.walk(self.root, followlinks=True) for f in files if is_image_name(f))
        elif self.root.is_file() and self.root.suffix.lower() == ".tar":
            self.kind = "tar"
            try:
                with tarfile.open(self.root) as t:
                    self.items = [(m.name, m.offset_data, m.size) for m in t.getmembers()
                                  if m.isfile() and is_image_name(m.name)]
            except (tarfile.TarError, OSError) as e:
                raise DataError(f"{self.root} cannot be read as a tar archive ({e}); give a folder of images, "
                                "a .tar or a .zip") from e
        elif self.root.is_file() and self.root.suffix.lower() == ".zip":
            self.kind = "zip"
            try:
                with zipfile.ZipFile(self.root) as z:
                    self.items = [i.filename for i in z.infolist() if not i.is_dir() and is_image_name(i.filename)]
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{self.root} cannot be read as a zip archive ({e}); give a folder of images, "
                                "a .tar or a .zip") from e
        elif self.root.exists():
            raise DataError(f"{self.root} is neither a folder of images nor a .tar/.zip of them; give one of those")
        else:
            raise DataError(f"{self.root} does not exist; give a folder of images, a .tar or a .zip of them")
        if not self.items:
            exts = ", ".join(sorted({e.lstrip(".") for e in IMG_EXTENSIONS}))
            raise DataError(f"no images in {self.root} (looked for {exts} files at any depth); point at the "
                            "folder or archive that holds your images")

    def __len__(self) -> int:
        return len(self.items)

    def _file(self):
        """The archive, opened once per process (loader workers are forked: each opens its own)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle = open(self.root, "rb") if self.kind == "tar" else zipfile.ZipFile(self.root)
            self._pid = os.getpid()
        return self._handle

    def read_bytes(self, i: int) -> tuple[bytes, int]:
        """The encoded file, undecoded (for decoding on the training device)."""
        item = self.items[i]
        if self.kind == "folder":
            with open(self.root / item, "rb") as f:
                return f.read(), 0
        if self.kind == "tar":
            _, offset, size = item
            return os.pread(self._file().fileno(), size, offset), 0
        return self._file().read(item), 0

    def load(self, i: int) -> tuple[Image.Image, int]:
        if self.kind == "folder":
            return decode_image(self.root / self.items[i]), 0
        return decode_image(io.BytesIO(self.read_bytes(i)[0])), 0

    def describe(self, i: int) -> str:
        item = self.items[i]
        if self.kind == "folder":
            return str(self.root / item)
        return f"{self.root}:{item if self.kind == 'zip' else item[0]}"

    def listing(self) -> list[str]:
        """What the source holds, wherever it is mounted (for the run's data fingerprint)."""
        return [self.kind, *(item if isinstance(item, str) else item[0] for item in self.items)]

    def __getstate__(self):  # an open archive handle does not travel to worker processes
        return {**self.__dict__, "_handle": None, "_pid": None}
