"""Run `tinymim segment` (plain or under torchrun) and save this process's final model to
OUT/rank{RANK}.safetensors: the weights each rank ends with, buffers included.

    python seg_train_worker.py OUT override [override ...]
"""
import logging
import os
import sys
from dataclasses import replace

from safetensors.torch import save_file

from tinymim.tasks import TASKS, load_config, run

built = []
build = TASKS["segment"].build


def capture(cfg):
    task = build(cfg)
    built.append(task)
    return task


TASKS["segment"] = replace(TASKS["segment"], build=capture)  # run() looks the task up when it is called

if __name__ == "__main__":
    out, overrides = sys.argv[1], sys.argv[2:]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run("segment", load_config("segment", None, overrides), out)
    state = {k: v.detach().clone().contiguous() for k, v in built[0].model.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{os.environ.get('RANK', '0')}.safetensors"))
