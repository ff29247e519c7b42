"""Under torchrun (gloo): each rank builds the real training loader (tinymim.data.loader.build_loader) on a shard
folder, runs one epoch through it with a loader worker process, and rank 0 prints what every rank read
as JSON: per rank the steps taken and the samples loaded ("shard-000003.tar:<key>").

    python -m torch.distributed.run --standalone --nproc_per_node=2 shard_loader_worker.py SHARDS RECORDS
"""
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from tinymim.data.loader import build_loader
from tinymim.data.pretrain import DataConfig
from tinymim.data.shards import ShardImages

root, records = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mine = records / f"rank{rank}"
mine.mkdir(parents=True)
original = ShardImages.load


def load(self, i):
    """Each process (the loader's worker included) notes every sample it reads, in its own file."""
    with open(mine / f"{os.getpid()}.txt", "a") as f:
        f.write(self.describe(i) + "\n")
    return original(self, i)


ShardImages.load = load
loader, sampler = build_loader(DataConfig(name="shards", root=root, img_size=16, num_workers=1), global_batch=8,
                               rank=rank, world=world, seed=3)
sampler.set_epoch(1)
steps = sum(1 for _ in loader)
reads = [line for p in sorted(mine.glob("*.txt")) for line in p.read_text().splitlines()]
result = {"rank": rank, "steps": steps, "steps_per_epoch": sampler.steps_per_epoch,
          "sampler": type(sampler).__name__, "reads": reads}
gathered = [None] * world
dist.all_gather_object(gathered, result)
if rank == 0:
    print("READS " + json.dumps(gathered))
dist.destroy_process_group()
