"""`python -m tinymim linprobe ...` (under torchrun), each process saving its probe's BatchNorm buffers and
the evaluation's metrics right before and after each evaluation into DUMP/rank<R>_epoch<E>.pt: the test
compares the processes' buffers with each other and with the exported weights.
Usage: buffer_sync_worker.py DUMP tinymim-arguments..."""
import os
import sys
from pathlib import Path

import torch

from tinymim.cli import main
from tinymim.tasks.linprobe import LinearProbeTask

dump = Path(sys.argv[1])
original = LinearProbeTask.evaluate


def evaluate_and_record(self, epoch: int):
    norm = self.probe.head[0]  # the probe's BatchNorm1d, as the evaluation sees it
    buffers = {name: b.detach().clone() for name, b in norm.named_buffers()}
    metrics = original(self, epoch)
    torch.save({"buffers": buffers, "metrics": {k: float(v) for k, v in (metrics or {}).items()}},
               dump / f"rank{os.environ.get('RANK', '0')}_epoch{epoch}.pt")
    return metrics


LinearProbeTask.evaluate = evaluate_and_record
raise SystemExit(main(sys.argv[2:]))
