"""TinyMIM*-T's classifier (tinymim.models.star.DistilledViT) and DeiT-style hard distillation in fine-tuning."""
import importlib.util
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import tiny_vit

import tinymim.tasks as tasks
from tinymim.cli import main
from tinymim.models.checkpoint import load_state_dict, load_vit_weights
from tinymim.models.star import DistilledViT
from tinymim.models.vit import ModelConfig, create_vit
from tinymim.tasks.finetune import ClassifyDataConfig, FrozenTeacher, build_finetune_task
from tinymim.tasks.finetune_config import FinetuneConfig

DIM, DEPTH, HEADS, EXTRA, CLASSES = 32, 2, 4, 64, 5  # 32px, patch 4: 64 patches, pos_embed 66 rows


def star_cfg(**kw) -> ModelConfig:
    return tiny_vit(dim=DIM, depth=DEPTH, heads=HEADS, dist_token=True, extra_head_dim=EXTRA, **kw)


def star(classes=CLASSES, **kw) -> DistilledViT:
    return create_vit(star_cfg(**kw), num_classes=classes, global_pool="avg", fc_norm=True)


def release_tstar_state(dim=192, depth=12, extra=1280, classes=1000, tokens=198) -> dict:
    """The released TinyMIM*-T checkpoint's keys and shapes (release_notes.md section 4), random values."""
    shapes = {"cls_token": (1, 1, dim), "dist_token": (1, 1, dim), "pos_embed": (1, tokens, dim),
              "patch_embed.proj.weight": (dim, 3, 16 if dim == 192 else 4, 16 if dim == 192 else 4),
              "patch_embed.proj.bias": (dim,), "conv1x1.0.weight": (dim,), "conv1x1.0.bias": (dim,),
              "conv1x1.1.weight": (extra, dim), "conv1x1.1.bias": (extra,),
              "fc_norm.weight": (extra,), "fc_norm.bias": (extra,), "head.weight": (classes, extra),
              "head.bias": (classes,), "head_dist.weight": (classes, extra), "head_dist.bias": (classes,)}
    for b in range(depth):
        for name, (out, inp) in {"norm1": (dim, None), "attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim),
                                 "norm2": (dim, None), "mlp.fc1": (4 * dim, dim), "mlp.fc2": (dim, 4 * dim)}.items():
            shapes[f"blocks.{b}.{name}.weight"] = (out,) if inp is None else (out, inp)
            shapes[f"blocks.{b}.{name}.bias"] = (out,)
    return {k: torch.randn(s) for k, s in shapes.items()}


def test_release_names_and_shapes():
    m = star()
    assert m.dist_token.shape == (1, 1, DIM) and m.pos_embed.shape == (1, 64 + 2, DIM) and m.num_prefix_tokens == 2
    ln, fc, act = m.conv1x1
    assert isinstance(ln, nn.LayerNorm) and ln.eps == 1e-5 and ln.normalized_shape == (DIM,)
    assert (fc.in_features, fc.out_features) == (DIM, EXTRA) and isinstance(act, nn.GELU)
    assert isinstance(m.norm, nn.Identity) and not any(k.startswith("norm.") for k in m.state_dict())
    assert m.fc_norm.normalized_shape == (EXTRA,)
    for head in (m.head, m.head_dist):
        assert (head.in_features, head.out_features) == (EXTRA, CLASSES)
    # the release's scale: ViT-T, 12 heads, conv1x1 to 1280: exactly the released checkpoint's keys
    with torch.device("meta"):
        t = create_vit(ModelConfig(name="vit_tiny_patch16_224", num_heads=12, dist_token=True, extra_head_dim=1280),
                       num_classes=1000, global_pool="avg", fc_norm=True)
    assert {k: tuple(v.shape) for k, v in t.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in release_tstar_state().items()}
    assert len(t.state_dict()) == 159 and t.blocks[0].attn.num_heads == 12
    # without heads: 5.8M parameters, the paper's count
    assert sum(p.numel() for n, p in t.named_parameters() if not n.startswith("head")) == pytest.approx(5.8e6, rel=0.01)


def test_train_returns_both_heads_and_eval_averages_them():
    torch.manual_seed(0)
    m = star()
    x = torch.randn(3, 3, 32, 32)
    # by hand: [cls, dist, patches] + pos, blocks, conv1x1; head on fc_norm(mean of patches), head_dist on dist
    t = m.patch_embed(x)
    t = torch.cat([m.cls_token.expand(3, -1, -1), m.dist_token.expand(3, -1, -1), t], 1) + m.pos_embed
    for blk in m.blocks:
        t = blk(t)
    t = m.conv1x1(t)
    cls = m.head(m.fc_norm(t[:, 2:].mean(1)))
    dist = m.head_dist(t[:, 1])
    out = m.train()(x)
    assert isinstance(out, tuple) and torch.allclose(out[0], cls, atol=1e-5) and torch.allclose(out[1], dist, atol=1e-5)
    assert torch.allclose(m.eval()(x), (cls + dist) / 2, atol=1e-5)
    # timm's forward_intermediates drops both prefix tokens
    feats = m.forward_intermediates(x, indices=[1], output_fmt="NCHW", intermediates_only=True)
    assert feats[0].shape == (3, DIM, 8, 8)
    t = m.patch_embed(x)
    t = torch.cat([m.cls_token.expand(3, -1, -1), m.dist_token.expand(3, -1, -1), t], 1) + m.pos_embed
    t = m.blocks(t)
    assert torch.allclose(feats[0], t[:, 2:].reshape(3, 8, 8, DIM).permute(0, 3, 1, 2), atol=1e-5)


def test_without_extra_head_token_pooling_is_timms_deit():
    torch.manual_seed(0)
    cfg = tiny_vit(dim=DIM, depth=DEPTH, heads=HEADS, dist_token=True)
    m = create_vit(cfg, num_classes=CLASSES, global_pool="token").eval()
    assert not hasattr(m, "conv1x1") and isinstance(m.norm, nn.LayerNorm)
    x = torch.randn(2, 3, 32, 32)
    t = m.forward_features(x)
    assert torch.allclose(m(x), (m.head(t[:, 0]) + m.head_dist(t[:, 1])) / 2, atol=1e-6)


def test_model_options_still_apply():
    """MAE init, sin-cos table (zero rows for both prefix tokens), block heads, drop path; layer decay
    puts the distillation token with the embeddings and conv1x1 with the heads."""
    import timm.optim
    from timm.layers import DropPath

    m = star(init="mae", pos_embed="sincos", block_heads={2: 8}, drop_path_rate=0.1, drop_path_schedule="constant")
    assert torch.equal(m.pos_embed[0, :2], torch.zeros(2, DIM)) and not m.pos_embed.requires_grad
    assert m.pos_embed[0, 2:].abs().sum() > 0 and 0.01 < m.dist_token.std() < 0.04
    assert [b.attn.num_heads for b in m.blocks] == [HEADS, 8]
    assert all(isinstance(b.drop_path1, DropPath) and b.drop_path1.drop_prob == 0.1 for b in m.blocks)
    opt = timm.optim.create_optimizer_v2(m, opt="adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    scale = {n: group[id(p)]["lr_scale"] for n, p in m.named_parameters() if p.requires_grad}
    assert scale["dist_token"] == scale["cls_token"] == 0.5 ** (DEPTH + 1)
    assert scale["conv1x1.1.weight"] == scale["head_dist.weight"] == scale["fc_norm.weight"] == 1.0


def test_hard_distillation_targets_are_the_teachers_argmax():
    cfg = FinetuneConfig(model=star_cfg(), mixup=0.0, cutmix=0.0, label_smoothing=0.0,
                         data=ClassifyDataConfig(name="synthetic", img_size=32, synthetic_size=64, num_workers=0))
    task = build_finetune_task(cfg)  # no teacher: both heads learn the labels
    n = task.num_classes
    torch.manual_seed(1)
    known = torch.randn(4, n)

    class Fake(nn.Module):
        def forward(self, x):
            return known

    task.teacher = FrozenTeacher(Fake())
    task.train()
    assert not task.teacher.training
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    losses = task.forward({"image": x, "label": y})
    logits, dist_logits = task.model(x)
    targets = [max(range(n), key=lambda c: known[i, c].item()) for i in range(4)]
    ce = -sum(torch.log_softmax(dist_logits[i], 0)[targets[i]] for i in range(4)) / 4
    assert losses["loss_dist"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert losses["loss_cls"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(0.5 * losses["loss_cls"].item() + 0.5 * ce.item(), rel=1e-5)
    losses["loss"].backward()
    assert task.model.head_dist.weight.grad is not None and task.model.head.weight.grad is not None


@pytest.mark.parametrize("scale", ["tiny", "release"])
def test_released_layout_loads_with_nothing_unaccounted_for(tmp_path, scale):
    if scale == "tiny":
        state = release_tstar_state(DIM, DEPTH, EXTRA, CLASSES, tokens=66)
        model = star()
    else:
        state = release_tstar_state()
        model = create_vit(ModelConfig(name="vit_tiny_patch16_224", num_heads=12, dist_token=True,
                                       extra_head_dim=1280), num_classes=1000, global_pool="avg", fc_norm=True)
    torch.save({"model": state, "epoch": 999}, tmp_path / "TinyMIM-FT-Tstar.pth")
    loaded = load_state_dict(tmp_path / "TinyMIM-FT-Tstar.pth")
    assert len(loaded) == (159 if scale == "release" else 15 + 12 * DEPTH)
    assert load_vit_weights(model, loaded) == []
    own = model.state_dict()
    assert set(own) == set(state) and all(torch.equal(own[k], v) for k, v in state.items())


def test_released_layout_into_another_class_count_and_into_a_plain_vit(caplog):
    state = release_tstar_state(DIM, DEPTH, EXTRA, 1000, tokens=66)
    model = star(classes=10)
    with caplog.at_level(logging.INFO, logger="tinymim"):
        ignored = load_vit_weights(model, state)
    assert set(ignored) == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert "1000 classes" in caplog.text and torch.equal(model.fc_norm.weight, state["fc_norm.weight"])
    plain = create_vit(tiny_vit(dim=DIM, depth=DEPTH, heads=HEADS))
    ignored = load_vit_weights(plain, state)
    assert {"dist_token", "conv1x1.1.weight", "head_dist.weight", "fc_norm.weight", "head.weight"} <= set(ignored)
    assert torch.equal(plain.pos_embed[:, 1:], state["pos_embed"][:, 2:])


def test_plain_student_into_a_distilled_vit(tmp_path, caplog):
    from safetensors.torch import save_file

    student = create_vit(tiny_vit(dim=DIM, depth=DEPTH, heads=2, init="mae", pos_embed="sincos"))
    src = {k: v.clone() for k, v in student.state_dict().items()}
    model = star()
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("conv1x1", "fc_norm", "head"))}
    with caplog.at_level(logging.INFO, logger="tinymim"):
        ignored = load_vit_weights(model, src, source="student")
    assert set(ignored) == {"norm.weight", "norm.bias"}  # no final norm with conv1x1
    assert torch.equal(model.dist_token, src["cls_token"]) and torch.equal(model.cls_token, src["cls_token"])
    pe = model.pos_embed
    assert torch.equal(pe[:, 0], src["pos_embed"][:, 0]) and torch.equal(pe[:, 1], src["pos_embed"][:, 0])
    assert torch.equal(pe[:, 2:], src["pos_embed"][:, 1:])
    assert torch.equal(model.blocks[1].mlp.fc2.weight, src["blocks.1.mlp.fc2.weight"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.items())  # kept their init
    lines = [r.getMessage() for r in caplog.records if "newly initialised" in r.getMessage()]
    assert len(lines) == 1 and all(w in lines[0] for w in ("dist_token", "conv1x1", "fc_norm", "head", "head_dist"))
    # fine-tuning from it: the same conversion, fresh heads at std 2e-5
    save_file(src, tmp_path / "student.safetensors")
    cfg = FinetuneConfig(model=star_cfg(), init=str(tmp_path / "student.safetensors"),
                         data=ClassifyDataConfig(name="synthetic", img_size=32, synthetic_size=64, num_workers=0))
    task = build_finetune_task(cfg)
    assert torch.equal(task.model.dist_token, src["cls_token"]) and task.model.head_dist.weight.std() < 1e-4


FAST = ["model.name=vit_custom", "model.img_size=32", "model.patch_size=4", f"model.embed_dim={DIM}",
        f"model.depth={DEPTH}", f"model.num_heads={HEADS}", "data.name=synthetic", "data.img_size=32",
        "data.synthetic_size=64", "data.num_workers=0", "data.eval_crop_pct=1.0", "train.batch_size=16",
        "train.epochs=1", "train.warmup_epochs=0", "train.precision=fp32", "train.progress=false",
        "train.log_every=1", "mixup=0", "cutmix=0"]


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_bad_inputs_are_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    other = create_vit(tiny_vit(dim=DIM, depth=DEPTH, heads=HEADS), num_classes=3)  # the data has 10 classes
    save_file(other.state_dict(), tmp_path / "teacher3.safetensors")
    teacher = f"distillation.teacher={tmp_path / 'teacher3.safetensors'}"
    arch = ["distillation.teacher_model.name=vit_custom", "distillation.teacher_model.patch_size=4",
            f"distillation.teacher_model.embed_dim={DIM}", f"distillation.teacher_model.depth={DEPTH}",
            f"distillation.teacher_model.num_heads={HEADS}"]
    cases = [
        ([*FAST, "model.dist_token=true", teacher, *arch], "predicts 3 classes, the model 10"),
        ([*FAST, teacher, *arch], "set model.dist_token=true"),
        ([*FAST, "model.extra_head_dim=64"], "set dist_token=true"),
        ([*FAST, "model.dist_token=true", teacher], "give its architecture in distillation.teacher_model"),
        ([*FAST, "model.dist_token=true", "distillation.teacher=no_such_net"], "nor a timm model name"),
    ]
    for i, (overrides, message) in enumerate(cases):
        assert main(["finetune", "--output", str(tmp_path / f"run{i}"), *overrides]) == 1
        line = one_error_line(capsys)
        assert line.startswith("error:") and message in line, line


def test_distilled_finetune_run_from_a_teacher_run(tmp_path, capsys):
    from tinymim.core.rundir import RunDir
    from tinymim.evaluate.exportable import build_exportable
    from tinymim.evaluate.robustness import load_classifier

    assert main(["finetune", "--output", str(tmp_path / "teacher"), *FAST, "train.max_steps=1"]) == 0
    student = tmp_path / "student"
    assert main(["finetune", "--output", str(student), *FAST, "train.max_steps=2", "model.dist_token=true",
                 f"model.extra_head_dim={EXTRA}", f"distillation.teacher={tmp_path / 'teacher'}"]) == 0
    metrics = [r for r in RunDir(student).read_metrics() if "loss" in r]
    assert metrics and all({"loss_cls", "loss_dist"} <= set(r) for r in metrics)
    assert any("val_top1" in r for r in RunDir(student).read_metrics())
    # evaluation and export rebuild the DistilledViT from the run's config
    model, _ = load_classifier(student, weights="last")
    exported, info = build_exportable(student)
    assert isinstance(model, DistilledViT) and isinstance(exported, DistilledViT) and info["classifier"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), exported(x))
    capsys.readouterr()
    assert main(["export", str(student), "--format", "timm", "--output", str(tmp_path / "hub")]) == 1
    assert "--format onnx" in one_error_line(capsys)
    if importlib.util.find_spec("onnxruntime") is not None:
        from tinymim.evaluate.export import export_onnx

        assert export_onnx(student, tmp_path / "star.onnx") < 1e-4


def test_recipes_load():
    from tinymim.core.config import load_config

    cfg = load_config(FinetuneConfig, "imagenet/finetune_vit_tiny_star")
    assert (cfg.model.dist_token, cfg.model.extra_head_dim, cfg.model.num_heads) == (True, 1280, 12)
    assert cfg.distillation.teacher == "regnety_160.deit_in1k" and cfg.train.epochs == 1000
    cfg = load_config(FinetuneConfig, "cifar10/finetune_star_micro")
    assert cfg.model.dist_token and cfg.distillation.teacher == "runs/cifar10/finetune_teacher"
    without = tasks.load_config("finetune", "cifar10/finetune_star_micro", ["distillation.teacher=null"])
    assert without.distillation.teacher is None


def test_config_lists_an_optional_teacher_model_once_set(capsys):
    assert main(["config", "finetune", "distillation.teacher_model.name=vit_tiny_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "distillation.teacher_model.name = \"vit_tiny_patch16_224\"" in out and "model.dist_token = false" in out
