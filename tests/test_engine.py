"""The shared engine: learning-rate schedule, parameter groups, accumulation, precisions."""
import math

import pytest
import torch
from conftest import tiny_distill_config

import tinymim.tasks as tasks
from tinymim.core.rundir import RunDir
from tinymim.tasks.distill import build_distill_task


def metrics(run):
    return RunDir(run).read_metrics()


def test_lr_is_linear_warmup_then_half_cycle_cosine_per_step(tmp_path):
    # 256 images / batch 32 = 8 steps per epoch, 2 epochs, warmup 0.5 epoch = 4 steps
    cfg = tiny_distill_config(epochs=2, warmup_epochs=0.5, blr=1e-3, batch_size=32, min_lr=0.0)
    tasks.run("distill", cfg, tmp_path / "run")
    peak = 1e-3 * 32 / 256  # lr = blr x batch / 256
    total, warmup = 16, 4
    for rec in metrics(tmp_path / "run"):
        t = rec["step"]  # the lr logged after step t is the one step t+1 will use
        expected = peak * t / warmup if t < warmup else \
            peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        assert rec["lr"] == pytest.approx(expected, rel=1e-6, abs=1e-12), t


def test_parameter_groups():
    from tinymim.train.optim import build_optimizer

    cfg = tiny_distill_config(lr=1e-3, weight_decay=0.05, betas=[0.9, 0.95])
    task = build_distill_task(cfg)
    opt = build_optimizer(task.get_trainable_module(), cfg.train)  # the engine's own optimizer
    names = {id(p): n for n, p in task.get_trainable_module().named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "vit.blocks.0.attn.qkv.weight" in decayed and "vit.cls_token" in decayed
    assert "vit.blocks.0.attn.qkv.bias" in plain and "vit.blocks.0.norm1.weight" in plain
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["lr"] == 1e-3
    # the relation block's unused parts are not optimized at all
    assert not any(n.startswith(("vit.blocks.1.mlp", "vit.blocks.1.attn.proj", "vit.norm.")) for n in decayed | plain)


def test_accumulation_matches_one_big_batch(tmp_path):
    base = dict(epochs=1, batch_size=32, precision="fp32")
    cfg_a = tiny_distill_config(**base)
    cfg_a.student.drop_path_rate = 0.0
    cfg_b = tiny_distill_config(**base, accum_steps=4)
    cfg_b.student.drop_path_rate = 0.0
    tasks.run("distill", cfg_a, tmp_path / "a")
    tasks.run("distill", cfg_b, tmp_path / "b")
    la = [r["loss"] for r in metrics(tmp_path / "a")]
    lb = [r["loss"] for r in metrics(tmp_path / "b")]
    assert la == pytest.approx(lb, rel=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precisions_train_on_cpu(tmp_path, precision):
    cfg = tiny_distill_config(epochs=1, precision=precision, blr=5e-3)
    cfg.data.synthetic_size = 512
    tasks.run("distill", cfg, tmp_path / "run")
    m = metrics(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in m)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["scaler"] is not None


def test_teacher_linears_cast_once_give_identical_targets():
    torch.manual_seed(0)
    task = build_distill_task(tiny_distill_config())
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = task.teacher(x)
    task.prepare(torch.device("cpu"), "bf16")
    assert task.teacher.vit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert task.teacher.vit.blocks[0].norm1.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = task.teacher(x)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    tasks.run("distill", tiny_distill_config(max_steps=2, tensorboard=True), tmp_path / "run")
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_activation_checkpointing_gives_the_same_gradients():
    """train.activation_checkpointing recomputes the student's blocks in the backward: same loss and
    gradients (drop path included: the recomputation replays the RNG), nothing else changes."""
    from conftest import tiny_distill_config

    from tinymim.data.loader import build_loader
    from tinymim.tasks.distill import build_distill_task

    cfg = tiny_distill_config()
    cfg.student.drop_path_rate = 0.2
    batch = next(iter(build_loader(cfg.data, 8)[0]))
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        task = build_distill_task(cfg)
        task.to(torch.device("cpu"))
        task.prepare(torch.device("cpu"), "fp32")
        task.set_grad_checkpointing(enable)
        assert task.student.grad_checkpointing is enable
        torch.manual_seed(1)
        task(batch)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in task.student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_a_run_locks_its_directory_once(tmp_path, monkeypatch):
    """run_task takes the lock before building the task; the loop does not take it again (under torchrun each
    lock is a collective)."""
    taken = []
    real_lock = RunDir.lock
    monkeypatch.setattr(RunDir, "lock", lambda self: taken.append(self.path) or real_lock(self))
    tasks.run("distill", tiny_distill_config(max_steps=1), tmp_path / "run")
    assert taken == [tmp_path / "run"]


def test_the_engine_hands_the_task_its_evaluation_loader_classes_and_last_epoch(tmp_path):
    """The loaders function returns what it makes (Loaders); the engine gives its evaluation side to the task
    through Task.attach, before the run's files are written (classes.json)."""
    import json

    from tinymim.tasks.finetune import build_finetune_task, classify_loaders
    from tinymim.train.bookkeeping import Loaders
    from tinymim.train.engine import train

    cfg = tasks.load_config("finetune", None, [
        "model.name=vit_custom", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "data.name=synthetic", "data.img_size=32", "data.synthetic_size=64", "data.num_workers=0",
        "train.batch_size=32", "train.epochs=3", "train.max_steps=5", "train.progress=false", "eval_every=10"])
    task = build_finetune_task(cfg)
    made = []

    def loader_fn(batch, rank, world, seed):
        made.append(classify_loaders(task, batch, rank, world, seed))
        return made[-1]

    train(task, tasks.TASKS["finetune"].resolve(cfg), loader_fn, tmp_path / "run")
    (loaders,) = made
    assert isinstance(loaders, Loaders) and loaders.eval is not None and len(loaders.classes) == 10
    assert task.eval_loader is loaders.eval and task.classes == loaders.classes
    assert task.last_epoch == 3  # 5 steps of 2 per epoch end in epoch 3: evaluated there despite eval_every=10
    assert json.loads((tmp_path / "run" / "classes.json").read_text())["classes"] == loaders.classes
    evaluated = [r for r in metrics(tmp_path / "run") if "val_top1" in r]
    assert [r["step"] for r in evaluated] == [5]
