"""The on-disk format of tinymim's tar shards, and the names and messages that writing them
(tinymim.data.shard_writer) and reading them (tinymim.data.shards) share.

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
"""
from __future__ import annotations

import re

FORMAT, VERSION = "tinymim-shards", 1
INDEX = "index.json"
SHARD_NAME = "shard-{:06d}.tar"
WRITE_FIX = "write them with `tinymim shards SRC --output DIR`"
REWRITE_FIX = "rewrite the shards with `tinymim shards SRC --output DIR`"


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's (braceexpand's) shard patterns: `{000000..000127}` ranges, zero-padded to the width
    of a bound written with leading zeros, and `{a,b}` lists; several braces expand left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.groups()
        width = max(len(lo), len(hi)) if lo.startswith("0") or hi.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [x for o in options for x in expand_braces(pattern[:m.start()] + o + pattern[m.end():])]
