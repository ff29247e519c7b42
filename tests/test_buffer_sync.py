"""Under torchrun every process evaluates the same model and the exported weights are that model: buffers
that training updates per process (a linear probe's BatchNorm running statistics) are made rank 0's before
each evaluation, checkpoint and export (tinymim.train.engine.same_buffers)."""
import subprocess

import conftest
import pytest
import torch
from conftest import MICRO_FINETUNE
from conftest import subprocess_env as env
from PIL import Image
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # a torchrun of 2 processes

WORKER = conftest.ROOT / "tests" / "buffer_sync_worker.py"


def noise_classes(root, per_class: int, seed: int):
    """Two classes of random-noise images: each process's batches give its BatchNorm other statistics."""
    g = torch.Generator().manual_seed(seed)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / c / f"{i:02d}.png")
    return root


def test_every_process_evaluates_and_exports_rank_0s_batchnorm_statistics(tmp_path):
    train, val = noise_classes(tmp_path / "train", 16, 0), noise_classes(tmp_path / "val", 4, 1)
    run, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    args = ["linprobe", *conftest.with_overrides(MICRO_FINETUNE, "train.batch_size=8", "train.epochs=2"),
            "data.name=folder", f"data.root={train}", f"data.val_root={val}", "train.log_every=1", "--output", str(run)]
    args = [a for a in args if a.split("=")[0] not in ("mixup", "cutmix")]  # fine-tuning's keys, not a probe's
    r = subprocess.run([*conftest.TORCHRUN, str(WORKER), str(dump), *args], env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for epoch in (1, 2):  # 4 steps an epoch, each process training on its own half of every batch
        ranks = [torch.load(dump / f"rank{rank}_epoch{epoch}.pt", weights_only=True) for rank in (0, 1)]
        a, b = ranks[0]["buffers"], ranks[1]["buffers"]
        assert a["num_batches_tracked"].item() == 4 * epoch
        assert a["running_mean"].abs().max() > 0  # it trained: statistics the two halves would give apart
        for name in a:
            assert torch.equal(a[name], b[name]), (epoch, name, (a[name] - b[name]).abs().max().item())
        assert ranks[0]["metrics"] == ranks[1]["metrics"] and "top1" in ranks[0]["metrics"]
    exported = load_file(run / "model.safetensors")
    for name, value in a.items():
        assert torch.equal(exported[f"head.0.{name}"], value), name
