"""Fine-tuning, linear probing and k-NN: the downstream protocol."""

import pytest
import torch
from conftest import tiny_vit

import tinymim.tasks as tasks
from tinymim.core.rundir import RunDir
from tinymim.tasks import linprobe
from tinymim.tasks.finetune import ClassifyDataConfig, build_finetune_task
from tinymim.tasks.finetune_config import FinetuneConfig
from tinymim.train.knn import knn_accuracy


def tiny_finetune_config(**train) -> FinetuneConfig:
    from tinymim.train.config import TrainConfig

    return FinetuneConfig(
        model=tiny_vit(dim=48, depth=3, heads=3, drop_path_rate=0.1),
        data=ClassifyDataConfig(name="synthetic", img_size=32, synthetic_size=256, num_workers=0, eval_crop_pct=1.0),
        train=TrainConfig(**{"batch_size": 32, "epochs": 1, "warmup_epochs": 0.5, "precision": "fp32",
                             "progress": False, "log_every": 1, "blr": 5e-4, "betas": [0.9, 0.999], **train}))


def test_layer_decay_learning_rates_follow_the_formula():
    """Group of layer i gets lr x decay^(L+1-i): embeddings layer 0, block j layer j+1, head L+1."""
    import timm.optim
    import timm.scheduler

    cfg = tiny_finetune_config()
    task = build_finetune_task(cfg)
    model, depth, decay, lr = task.model, 3, 0.65, 1e-3
    opt = timm.optim.create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=0.05, layer_decay=decay)
    sched = timm.scheduler.CosineLRScheduler(opt, t_initial=100, warmup_t=0, t_in_epochs=False)
    sched.step_update(0)  # the scheduler applies each group's scale
    lr_of = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lr_of[p] = g["lr"]
    named = dict(model.named_parameters())

    def expected(layer):
        return lr * decay ** (depth + 1 - layer)

    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        assert lr_of[named[name]] == pytest.approx(expected(0))
    for j in range(depth):
        assert lr_of[named[f"blocks.{j}.attn.qkv.weight"]] == pytest.approx(expected(j + 1))
        assert lr_of[named[f"blocks.{j}.norm1.bias"]] == pytest.approx(expected(j + 1))
    assert lr_of[named["head.weight"]] == pytest.approx(expected(depth + 1)) == pytest.approx(lr)
    assert lr_of[named["fc_norm.weight"]] == pytest.approx(lr)


def test_head_init_and_pooling():
    task = build_finetune_task(tiny_finetune_config())
    assert task.model.head.weight.std().item() < 1e-4  # trunc-normal std 2e-5
    assert task.model.global_pool == "avg" and isinstance(task.model.fc_norm, torch.nn.LayerNorm)
    assert task.num_classes == 10


def test_finetune_runs_and_evaluates(tmp_path):
    cfg = tiny_finetune_config(epochs=2)
    tasks.run("finetune", cfg, str(tmp_path / "run"))
    records = RunDir(tmp_path / "run").read_metrics()
    evals = [r for r in records if "val_top1" in r]
    assert [r["epoch"] for r in evals] == [1.0, 2.0]
    assert all(0 <= r["val_top1"] <= 100 and r["val_top5"] >= r["val_top1"] for r in evals)
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "best.safetensors").is_file()


def test_finetune_from_a_distilled_student(tmp_path):
    from conftest import tiny_distill_config


    tasks.run("distill", tiny_distill_config(max_steps=2), tmp_path / "distill")
    cfg = tiny_finetune_config(max_steps=1)
    cfg.model = tiny_vit(dim=48, depth=2, heads=3)
    cfg.init = str(tmp_path / "distill")
    task = build_finetune_task(cfg)
    from safetensors.torch import load_file
    student = load_file(tmp_path / "distill" / "student.safetensors")
    assert torch.equal(task.model.blocks[1].attn.qkv.weight, student["blocks.1.attn.qkv.weight"])


def test_linear_probe_trains_only_the_head(tmp_path):
    cfg = linprobe.LinearProbeConfig(model=tiny_vit(dim=48, depth=2, heads=3),
                                     data=ClassifyDataConfig(name="synthetic", img_size=32, synthetic_size=256,
                                                             num_workers=0, eval_crop_pct=1.0, auto_augment=None,
                                                             reprob=0.0))
    cfg.train.batch_size, cfg.train.epochs, cfg.train.blr, cfg.train.progress = 32, 1, 0.1, False
    cfg.train.precision, cfg.train.warmup_epochs = "fp32", 0.2
    task = linprobe.build_linprobe_task(cfg)
    before = {k: v.clone() for k, v in task.probe.backbone.state_dict().items()}
    head_before = task.probe.head[1].weight.clone()
    from tinymim.tasks.finetune import build_classify_loaders
    from tinymim.train.engine import train as engine_train

    def loader_fn(batch, rank, world, seed):
        loader, sampler = build_classify_loaders(cfg.data, batch, rank, world, seed)
        return loader, sampler

    engine_train(task, cfg, loader_fn, tmp_path / "run")
    after = task.probe.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and buffers unchanged
    assert not torch.equal(head_before, task.probe.head[1].weight)
    assert isinstance(task.probe.head[0], torch.nn.BatchNorm1d) and not task.probe.head[0].affine


def test_knn_on_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    num_classes, dim = 10, 32
    centers = torch.randn(num_classes, dim, generator=g) * 3

    def sample(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        return centers[y] + torch.randn(n, dim, generator=g), y

    xtr, ytr = sample(2000)
    xte, yte = sample(500)
    acc = knn_accuracy(xtr, ytr, xte, yte, num_classes, k=20, temperature=0.07)
    assert acc > 95
    # and chance level when features carry no label information
    assert knn_accuracy(torch.randn(2000, dim, generator=g), ytr, xte, yte, num_classes) < 30


def test_knn_monitoring_during_distillation(tmp_path):
    from conftest import tiny_distill_config


    cfg = tiny_distill_config(epochs=2)
    cfg.knn.every_epochs, cfg.knn.name, cfg.knn.bank_size, cfg.knn.val_size = 2, "synthetic", 256, 128
    tasks.run("distill", cfg, tmp_path / "run")
    records = RunDir(tmp_path / "run").read_metrics()
    knn = [r for r in records if "val_knn_top1" in r]
    assert [r["epoch"] for r in knn] == [2.0]  # every 2 epochs: once
    assert 0 <= knn[0]["val_knn_top1"] <= 100


def test_model_ema_is_what_gets_evaluated_and_exported(tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_finetune_config(max_steps=3)
    cfg.ema_decay = 0.5
    task = build_finetune_task(cfg)
    assert task.ema is not None
    tasks.run("finetune", cfg, str(tmp_path / "run"))
    exported = load_file(tmp_path / "run" / "model.safetensors")
    # the EMA copy differs from the raw weights after a few steps at decay 0.5
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    raw = ckpt["model"]["blocks.0.attn.qkv.weight"]
    assert not torch.equal(exported["blocks.0.attn.qkv.weight"], raw)
    assert torch.equal(ckpt["model"]["__ema__.blocks.0.attn.qkv.weight"], exported["blocks.0.attn.qkv.weight"])


def test_ema_follows_the_task_and_every_task_compiles(tmp_path):
    """The EMA copy is a registered submodule (it moves with the task: timm's EMA lerps in place, so a
    CPU copy of a GPU model would fail); compile() wraps the trainable part for every task, and the
    wrappers stay out of the task's state_dict."""
    cfg = tiny_finetune_config(max_steps=3)
    cfg.ema_decay = 0.5
    task = build_finetune_task(cfg).to(torch.float64)
    assert next(task.ema.module.parameters()).dtype == torch.float64
    compiled = task.compile()
    assert task.trainable_forward is compiled and compiled is not task.model
    assert not any(k.startswith("wrapped") for k in task.state_dict())


def test_finetune_eval_every_evaluates_every_n_epochs_and_at_the_end(tmp_path):
    cfg = tiny_finetune_config(epochs=5)  # 256 synthetic images, batch 32: 8 steps an epoch
    cfg.eval_every = 2
    tasks.run("finetune", cfg, str(tmp_path / "run"))
    evaluated = [r["step"] for r in RunDir(tmp_path / "run").read_metrics() if "val_top1" in r]
    assert evaluated == [16, 32, 40]  # epochs 2, 4, then the last (5)
