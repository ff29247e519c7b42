"""data.prefetch: the next batch's views are built in a background thread while the current one trains
(tinymim.data.prefetch). On the CPU the thread runs the same hook as on a GPU (without streams): the
same views and losses as without prefetching, its errors ending the run in one line with the state
after the last completed step saved, and a stop signal while a batch is in flight stopping cleanly."""
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL_DISTILL, signal_once_marked, subprocess_env, tiny_distill_config, with_overrides
from safetensors.torch import load_file
from test_device_decode import natural_jpegs

from tinymim.core.config import ConfigError
from tinymim.core.errors import DataError
from tinymim.data.prefetch import Prefetcher
from tinymim.data.pretrain import DataConfig, paired_views, with_device_images
from tinymim.data.sources import FolderImages
from tinymim.data.view_dataset import PairedViewDataset, collate

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")


def jpeg_batches(root, cfg: DataConfig, batch: int = 4) -> list[dict]:
    """Loader-like batches of the folder (per-sample seeds as the loader draws them)."""
    ds = PairedViewDataset(FolderImages(root), cfg)
    items = [(i, 9_000 + i) for i in range(len(ds))]
    return [collate([ds[x] for x in items[i:i + batch]]) for i in range(0, len(items), batch)]


def clone(batch: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_prefetched_views_are_the_plain_views(tmp_path, decode):
    root = natural_jpegs(tmp_path, per_class=5)
    broken = root / "b" / "broken.jpg"  # a file the decoder may refuse: counted the same either way
    data = bytearray((root / "b" / "0.jpg").read_bytes())
    data[600:] = b"\xff\xd9" + bytes(len(data) - 602)
    broken.write_bytes(bytes(data))
    cfg = DataConfig(name="folder", root=str(root), img_size=48, decode=decode)
    batches = jpeg_batches(root, cfg)
    plain = [paired_views(b, cfg, CPU) + (b["skipped"],) for b in map(clone, batches)]
    prefetcher = Prefetcher(iter(list(map(clone, batches))), lambda b: with_device_images(b, cfg, CPU), 2, CPU)
    ahead = [paired_views(b, cfg, CPU) + (b["skipped"],) for b in prefetcher]
    prefetcher.close()
    assert len(ahead) == len(plain) == len(batches)
    for (t0, s0, k0), (t1, s1, k1) in zip(plain, ahead):
        assert torch.equal(t0, t1) and torch.equal(s0, s1) and k0 == k1
    assert not prefetcher.thread.is_alive()


def test_an_error_in_the_thread_is_raised_by_next_with_its_type_and_message():
    def source():
        yield {"x": torch.zeros(1)}
        yield {"x": torch.ones(1)}
        yield {"x": torch.full((1,), 2.0)}

    def hook(batch):
        if batch["x"].item() == 1:
            raise DataError("no image of the batch could be decoded (a.jpg ...); is the dataset corrupt?")
        return batch

    p = Prefetcher(source(), hook, 1, CPU)
    assert next(p)["x"].item() == 0
    with pytest.raises(DataError, match="^no image of the batch could be decoded"):
        next(p)
    with pytest.raises(StopIteration):  # ended: nothing after the error
        next(p)
    p.close()
    assert not p.thread.is_alive()


def test_at_most_depth_batches_are_taken_ahead_and_close_joins():
    pulled = []

    def source():
        for i in range(50):
            pulled.append(i)
            yield {"i": i}

    for depth in (1, 2):
        pulled.clear()
        p = Prefetcher(source(), lambda b: b, depth, CPU)
        for consumed in range(1, 4):
            assert next(p)["i"] == consumed - 1
            deadline = time.monotonic() + 30
            while len(pulled) < consumed + depth and time.monotonic() < deadline:
                time.sleep(0.001)
            assert len(pulled) == consumed + depth  # taken ahead: exactly `depth`, never more
        p.close()
        assert not p.thread.is_alive() and len(pulled) == 3 + depth


def test_close_while_the_hook_is_in_flight_stops_the_thread():
    entered = threading.Event()

    def hook(batch):
        if batch["i"] == 1:
            entered.set()
            threading.current_thread().stopping.wait(60)  # a long decode, ended by close()
        return batch

    p = Prefetcher(iter([{"i": i} for i in range(5)]), hook, 1, CPU)
    assert next(p)["i"] == 0
    assert entered.wait(60)
    p.close()
    assert not p.thread.is_alive()
    with pytest.raises(StopIteration):
        next(p)


def distill_run(out: Path, data: DataConfig, steps: int = 6, batch: int = 8) -> tuple[list[dict], dict]:
    from tinymim.tasks import run

    cfg = tiny_distill_config(batch_size=batch, max_steps=steps, epochs=2)
    cfg.data = data
    assert run("distill", cfg, str(out)) is not None
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in metrics if "loss" in m], load_file(out / "student.safetensors")


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_a_run_with_prefetch_is_the_run_without(tmp_path, decode):
    root = natural_jpegs(tmp_path / "data", per_class=20)
    runs = {}
    for prefetch in (0, 1):
        data = DataConfig(name="folder", root=str(root), img_size=32, num_workers=1, decode=decode, prefetch=prefetch)
        runs[prefetch] = distill_run(tmp_path / f"run{prefetch}", data, steps=7)  # 5 steps an epoch: two epochs
    (m0, w0), (m1, w1) = runs[0], runs[1]
    assert [m["step"] for m in m0] == [m["step"] for m in m1] == list(range(1, 8))
    for a, b in zip(m0, m1):
        losses = [{k: v for k, v in m.items() if k.startswith("loss")} for m in (a, b)]
        assert losses[0] == losses[1]
        assert a["skipped_images"] == b["skipped_images"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    for m in m0 + m1:  # the loader's wait is logged with and without prefetching
        assert m["loader_wait_s"] >= 0 and math.isfinite(m["loader_wait_s"])


def test_loader_wait_is_logged_for_synthetic_data(tmp_path):
    metrics, _ = distill_run(tmp_path / "run", DataConfig(name="synthetic", img_size=32, num_workers=0,
                                                           synthetic_size=32), steps=3)
    assert len(metrics) == 3 and all(m["loader_wait_s"] >= 0 for m in metrics)


def test_prefetch_is_a_pretraining_setting():
    from tinymim.tasks import load_config

    assert load_config("distill", None, ["data.prefetch=2"]).data.prefetch == 2
    assert load_config("mae", None, ["data.prefetch=0"]).data.prefetch == 0
    with pytest.raises(ConfigError, match="prefetch must be 0"):
        load_config("distill", None, ["data.prefetch=-1"])
    assert load_config("finetune", None, []).data.prefetch == 0
    with pytest.raises(ConfigError, match="data.prefetch applies to pre-training views"):
        load_config("finetune", None, ["data.prefetch=1"])


# ---------------------------------------------------------------------------------------------
# the real command line in a subprocess (tests/faulty_run.py injects the faults)

RUN = with_overrides(SMALL_DISTILL, "data.img_size=32", "data.num_workers=1", "train.batch_size=8",
                     "train.epochs=1", "train.checkpoint_every=1000", "train.log_every=1")


def fault_cli(fault, output: Path, args) -> list[str]:
    prefix = [sys.executable, str(HERE / "faulty_run.py"), *map(str, fault), "--"] if fault else \
        [sys.executable, "-m", "tinymim"]
    return [*prefix, "distill", *args, "--output", str(output)]


def checkpoint_of(run_dir: Path) -> tuple[int, bool]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return ckpt["global_step"], ckpt["finished"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", [1, 0])
def test_a_batch_that_does_not_decode_ends_the_run_in_one_line_with_its_state_saved(tmp_path, prefetch):
    root = natural_jpegs(tmp_path / "data", per_class=24)  # 48 images: 6 steps of 8
    args = [*RUN, "data.name=folder", f"data.root={root}", "data.decode=device", f"data.prefetch={prefetch}"]
    out = tmp_path / "run"
    r = subprocess.run(fault_cli(("decodefail", 4), out, args), env=subprocess_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("error: no image of the batch could be decoded")
    assert f"the state after step 3 is saved in {out / 'checkpoints' / 'last.pt'}" in lines[0]
    assert checkpoint_of(out) == (3, False)  # batch 4 failed: steps 1-3 are kept
    assert not (out / "student.safetensors").exists()
    r = subprocess.run(fault_cli(None, out, args), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"resuming {out} from step 3" in r.stderr, r.stderr[-3000:]
    assert checkpoint_of(out) == (6, True)


@pytest.mark.slow
def test_sigterm_while_a_prefetch_is_in_flight_stops_cleanly_then_resumes_exactly(tmp_path):
    args = [*RUN, "data.synthetic_size=64", "data.prefetch=1"]  # 8 steps
    straight = tmp_path / "straight"
    r = subprocess.run(fault_cli(None, straight, args), env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    out, marker = tmp_path / "run", tmp_path / "in_flight"
    # batch 5 is held in the prefetch thread; step 4 trains only once the signal is in
    r = signal_once_marked(fault_cli(("holdprefetch", 5, marker), out, args), marker, subprocess_env())
    stdout, stderr = r.stdout, r.stderr
    assert r.returncode == 75, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.strip()][-1] == (
        f"stopped on SIGTERM at step 4 of 8; checkpoint written to {out / 'checkpoints' / 'last.pt'}; "
        "run the same command again to resume")
    assert "Traceback" not in stderr and checkpoint_of(out) == (4, False)
    alive = stdout.split("threads alive:")[1].split()[0].split(",")
    assert "tinymim-prefetch" not in alive, alive  # the thread was stopped and joined

    r = subprocess.run(fault_cli(None, out, args), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"resuming {out} from step 4" in r.stderr, r.stderr[-3000:]
    a, b = load_file(straight / "student.safetensors"), load_file(out / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
