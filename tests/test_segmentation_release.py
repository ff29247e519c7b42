"""Segmentation as the release trains it: torchrun (DDP), the release's layer decay, BEiT's relative
position bias and layer scale on timm's blocks, SyncBN under DDP on GPUs, mmseg's loss and hue."""
import logging
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import TORCHRUN
from conftest import subprocess_env as env
from safetensors.torch import load_file
from test_segmentation import _seg_folder, tiny_segment_overrides

from tinymim.core.rundir import RunDir

HERE = Path(__file__).resolve().parent


def ddp_overrides(root):
    """8 steps of batch 4 (2 per process) on 8 images: 2 steps an epoch, a checkpoint every epoch; the
    release's backbone options on, so every new parameter must get its gradient under DDP too."""
    return tiny_segment_overrides(root, "train.max_steps=8", "train.checkpoint_every=2", "eval_every=4",
                                  "rel_pos_bias=true", "layer_scale=1.0", "model.drop_path_rate=0.1")


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    root = _seg_folder(tmp_path_factory.mktemp("segdata") / "data", "train", 8)
    _seg_folder(root, "val", 2, seed=1)
    return root


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, seg_data):
    out = tmp_path_factory.mktemp("segddp") / "run"
    r = subprocess.run([*TORCHRUN, str(HERE / "seg_train_worker.py"), str(out), *ddp_overrides(seg_data)],
                       env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


@pytest.mark.slow
def test_torchrun_segmentation_trains_and_ends_with_the_same_weights_on_both_ranks(two_process_run):
    out, err = two_process_run
    steps = [r["step"] for r in RunDir(out).read_metrics() if "loss" in r]
    assert steps == list(range(1, 9))
    assert "BatchNorm per process: 2 CPU processes" in err  # said once, by rank 0
    assert err.count("pyramid and heads normalize with") == 1
    a, b = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert a.keys() == b.keys() and any("relative_position_bias_table" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    saved = load_file(out / "segmenter.safetensors")
    assert not any(k.startswith("pyramid.vit.norm.") for k in saved)  # the unused final norm is gone
    table = next(v for k, v in a.items() if k.endswith("relative_position_bias_table"))
    assert table.abs().sum() > 0  # zero-initialised, and trained


@pytest.mark.slow
def test_sigterm_under_torchrun_segmentation_resumes_to_the_same_weights(tmp_path, seg_data, two_process_run):
    out = tmp_path / "run"
    cmd = [*TORCHRUN, "-m", "tinymim", "segment", "--output", str(out), *ddp_overrides(seg_data)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints" / "last.pt").is_file():  # the first checkpoint (step 2) is on disk
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    stops = [line for line in err.splitlines() if line.startswith("stopped on SIGTERM at step")]
    assert len(stops) == 1, err[-3000:]
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    step = ckpt["global_step"]
    assert 2 <= step < 8 and not ckpt["finished"] and ckpt["world"] == 2
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"resuming {out} from step {step}" in r.stderr, r.stderr[-3000:]
    straight = load_file(two_process_run[0] / "segmenter.safetensors")
    resumed = load_file(out / "segmenter.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.allclose(straight[k], resumed[k], atol=1e-6), k


# ---------------------------------------------------------------------------------------------
# layer decay: the release's constructor, restated


def release_constructor_scales(names: list[str], depth: int, decay: float) -> dict[str, float]:
    """mmcv_custom/layer_decay_optimizer_constructor.py of the release, on its own parameter names:
    num_layers = depth + 2; get_num_layer_for_vit; scale = decay ** (num_layers - layer_id - 1)."""
    def release_name(ours: str) -> str:  # tinymim's modules under the release's names
        return ours.replace("pyramid.vit.", "backbone.").replace("pyramid.up4", "backbone.fpn1").replace(
            "pyramid.up2", "backbone.fpn2").replace("decode.", "decode_head.").replace("aux.", "auxiliary_head.")

    def get_num_layer_for_vit(var_name: str, num_max_layer: int) -> int:
        if var_name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
            return 0
        elif var_name.startswith("backbone.patch_embed"):
            return 0
        elif var_name.startswith("backbone.blocks"):
            return int(var_name.split(".")[2]) + 1
        else:
            return num_max_layer - 1

    num_layers = depth + 2
    return {n: decay ** (num_layers - get_num_layer_for_vit(release_name(n), num_layers) - 1) for n in names}


@pytest.mark.parametrize("depth,decay", [(12, 0.75), (12, 0.8), (4, 0.75)])
def test_every_parameters_lr_is_the_release_constructors(depth, decay):
    from tinymim.core.config import from_dict
    from tinymim.tasks.segment import SegmentConfig, build_segment_task
    from tinymim.train.config import TrainConfig
    from tinymim.train.optim import build_optimizer, build_scheduler

    cfg = from_dict(SegmentConfig, {
        "model": {"name": "vit_custom", "patch_size": 8, "embed_dim": 32, "depth": depth, "num_heads": 2},
        "blocks": [1, 2, 3, depth], "channels": 16, "aux_channels": 8, "layer_decay": decay,
        "rel_pos_bias": True, "layer_scale": 1.0, "data": {"crop_size": 32, "num_classes": 4}})
    task = build_segment_task(cfg)
    train = TrainConfig(lr=1e-3, warmup_steps=0, schedule="poly", weight_decay=0.05, epochs=1)
    optimizer = build_optimizer(task.param_groups(0.05), train)
    build_scheduler(optimizer, train, per_epoch=10)  # sets each group's lr from lr_scale
    lr_of, decay_of = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[id(p)], decay_of[id(p)] = group["lr"], group["weight_decay"]
    names = [n for n, p in task.model.named_parameters() if p.requires_grad]
    expected = release_constructor_scales(names, depth, decay)
    params = dict(task.model.named_parameters())
    assert len(lr_of) == len(names)  # every trained parameter in exactly one group
    for n in names:
        assert lr_of[id(params[n])] == pytest.approx(1e-3 * expected[n], rel=1e-12), n
        no_decay = params[n].ndim == 1 or n.endswith(".bias")  # the release's rule as it runs (its name check misses)
        assert decay_of[id(params[n])] == (0.0 if no_decay else 0.05), n
    assert lr_of[id(params["decode.classifier.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(params[f"pyramid.vit.blocks.{depth - 1}.attn.qkv.weight"])] == pytest.approx(1e-3 * decay)
    assert lr_of[id(params["pyramid.vit.patch_embed.proj.weight"])] == pytest.approx(1e-3 * decay ** (depth + 1))


# ---------------------------------------------------------------------------------------------
# relative position bias and layer scale on timm's blocks


def expected_bias(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """heads x N x N, token pair by token pair: patches (y, x) in row-major order after the class token;
    patch i -> patch j reads entry ((yi - yj + H - 1) * (2W - 1) + (xi - xj + W - 1)); then the three
    class-token entries: class -> patch, patch -> class, class -> class."""
    h, w = grid
    n = h * w + 1
    base = (2 * h - 1) * (2 * w - 1)
    out = torch.empty(table.shape[1], n, n)
    for i in range(n):
        for j in range(n):
            if i == 0 and j == 0:
                e = base + 2
            elif i == 0:
                e = base
            elif j == 0:
                e = base + 1
            else:
                yi, xi = divmod(i - 1, w)
                yj, xj = divmod(j - 1, w)
                e = (yi - yj + h - 1) * (2 * w - 1) + (xi - xj + w - 1)
            out[:, i, j] = table[e]
    return out


def _vit(img_size=(24, 32), **kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0, **kw)


@pytest.mark.parametrize("fused", [False, True])
def test_relative_position_bias_at_zero_is_the_plain_block_and_adds_its_entries_to_the_logits(fused):
    from tinymim.models.segmenter import RelPosBiasAttention, add_relative_position_bias

    plain, biased = _vit().eval(), _vit().eval()
    add_relative_position_bias(biased)
    x = torch.randn(2, 3, 24, 32)
    for m in (plain, biased):
        for blk in m.blocks:
            blk.attn.fused_attn = fused
    attn = biased.blocks[0].attn
    assert isinstance(attn, RelPosBiasAttention) and attn.relative_position_bias_table.shape == (5 * 7 + 3, 4)
    assert torch.equal(attn.relative_position_bias_table, torch.zeros(38, 4))
    with torch.no_grad():
        assert torch.allclose(plain(x), biased(x), atol=1e-6)  # a zero table: the plain ViT, block for block

        tokens = torch.randn(2, 13, 32)
        attn.relative_position_bias_table.normal_()
        q, k, v = attn.qkv(tokens).reshape(2, 13, 3, 4, 8).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) / math.sqrt(8) + expected_bias(attn.relative_position_bias_table, (3, 4))
        reference = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 13, 32))
        assert torch.allclose(attn(tokens), reference, atol=1e-5)
        assert torch.equal(attn.relative_position_bias(), expected_bias(attn.relative_position_bias_table, (3, 4)))


def test_backbone_options_load_plain_weights_and_report_the_new_tables(tmp_path, caplog):
    from safetensors.torch import save_file

    from tinymim.core.config import from_dict
    from tinymim.tasks.segment import SegmentConfig, build_backbone

    source = _vit(img_size=32)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "plain.safetensors")
    cfg = from_dict(SegmentConfig, {
        "model": {"name": "vit_custom", "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4},
        "init": str(tmp_path / "plain.safetensors"), "rel_pos_bias": True, "layer_scale": 1.0,
        "blocks": [1, 1, 2, 2], "data": {"crop_size": 32}})
    with caplog.at_level(logging.INFO, logger="tinymim"):
        vit = build_backbone(cfg)
    assert "newly initialised" in caplog.text and "relative_position_bias_table" in caplog.text
    assert torch.equal(vit.blocks[1].ls2.gamma, torch.ones(32))
    assert torch.equal(vit.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    # BEiT's / the release's layer scale names load into timm's
    from tinymim.models.checkpoint import load_vit_weights

    state = {k: v for k, v in vit.state_dict().items()}
    state["blocks.0.gamma_1"] = torch.full((32,), 0.5)
    del state["blocks.0.ls1.gamma"]
    load_vit_weights(vit, state)
    assert torch.equal(vit.blocks[0].ls1.gamma, torch.full((32,), 0.5))


def test_rel_pos_bias_on_a_model_with_register_tokens_is_one_line(tmp_path, capsys):
    from tinymim.cli import main

    root = _seg_folder(tmp_path / "data", "train", 4)
    code = main(["segment", "--output", str(tmp_path / "run"),
                 *tiny_segment_overrides(root, "rel_pos_bias=true", "model.name=vit_medium_patch16_reg4_gap_256",
                                         "model.patch_size=8", "train.max_steps=1")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "rel_pos_bias=true" in err[0] and "register tokens" in err[0], err


# ---------------------------------------------------------------------------------------------
# SyncBN, loss averaging, hue


def _tiny_task(**extra):
    from tinymim.core.config import from_dict
    from tinymim.tasks.segment import SegmentConfig, build_segment_task

    return build_segment_task(from_dict(SegmentConfig, {
        "model": {"name": "vit_custom", "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2},
        "blocks": [1, 2, 3, 4], "channels": 16, "aux_channels": 8, "data": {"crop_size": 32, "num_classes": 4},
        **extra}))


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _norms(model: nn.Module) -> set[type]:
    return {type(m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not name.startswith("pyramid.vit")}


def test_under_ddp_on_gpus_the_heads_and_neck_norms_are_syncbn(monkeypatch, caplog, one_process_group):
    from tinymim.tasks.base import Task

    wrapped = []
    monkeypatch.setattr(Task, "prepare_distributed", lambda self, **kw: wrapped.append(kw) or self)
    task = _tiny_task()
    with caplog.at_level(logging.INFO, logger="tinymim"):
        task.prepare(torch.device("cuda", 0), "bf16")  # the decision only: nothing runs on the device
    assert "SyncBatchNorm over 1 GPU processes" in caplog.text
    task.prepare_distributed(device_ids=[0])
    assert _norms(task.model) == {nn.SyncBatchNorm} and wrapped  # converted, then wrapped
    assert isinstance(task.model.pyramid.up4[1], nn.SyncBatchNorm)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in task.model.decode.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in task.model.aux.modules())


def test_on_cpu_processes_batchnorm_stays_and_is_said_once(monkeypatch, caplog, one_process_group):
    from tinymim.tasks.base import Task

    monkeypatch.setattr(Task, "prepare_distributed", lambda self, **kw: self)
    task = _tiny_task()
    with caplog.at_level(logging.INFO, logger="tinymim"):
        task.prepare(torch.device("cpu"), "fp32")
    task.prepare_distributed()
    assert _norms(task.model) == {nn.BatchNorm2d}
    assert caplog.text.count("BatchNorm per process: 1 CPU processes, "
                             "and PyTorch's SyncBatchNorm runs on GPUs only") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where there is no GPU")
def test_sync_bn_true_on_cpu_is_one_line(tmp_path, capsys):
    from tinymim.cli import main

    root = _seg_folder(tmp_path / "data", "train", 2)
    code = main(["segment", "--output", str(tmp_path / "run"), *tiny_segment_overrides(root, "sync_bn=true")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "sync_bn=true needs GPU processes" in err[0] and "sync_bn=auto" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("average", ["all_pixels", "valid_pixels"])
def test_cross_entropy_averages_as_mmseg(average):
    task = _tiny_task(loss_average=average, data={"crop_size": 32, "num_classes": 4, "ignore_index": 255})
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    y = torch.randint(0, 4, (2, 3, 5))
    y[0, 0] = 255  # 5 of 30 pixels ignored
    p = logits.log_softmax(1)
    nll = [-p[b, y[b, i, j], i, j].item() for b in range(2) for i in range(3) for j in range(5) if y[b, i, j] != 255]
    expected = sum(nll) / (30 if average == "all_pixels" else 25)
    assert task.cross_entropy(logits, y).item() == pytest.approx(expected, rel=1e-5)


class _Scripted:
    """An rng whose random() gates only the hue step and whose uniform() returns its upper bound."""

    def __init__(self):
        self.draws = iter([0.9, 0.9, 0.9, 0.0, 0.9])  # brightness, contrast last, saturation, hue, contrast

    def random(self):
        return next(self.draws)

    def uniform(self, lo, hi):
        return hi

    def integers(self, lo, hi):
        return hi - 1  # numpy's randint: the upper bound excluded, as mmseg's


def test_hue_shifts_as_mmseg_at_most_34_degrees_up():
    import colorsys

    from tinymim.data.segmentation import _photometric

    img = np.zeros((4, 4, 3), np.uint8)
    img[...] = (200, 60, 60)  # hue 0 degrees
    out = _photometric(img, _Scripted(), hue_delta=18)
    h = colorsys.rgb_to_hsv(*(out[0, 0] / 255.0))[0] * 360
    assert abs(h - 34) < 2  # 17 OpenCV units of 2 degrees (PIL's 256 hue steps round it)


def test_two_prefix_tokens_index_is_the_release_tinymim_star_t_layout():
    """The top-left corner at 512 pixels (32 x 32 patches) as the release's T* backbone builds it."""
    from tinymim.models.segmenter import relative_position_index

    index = relative_position_index((32, 32), prefix_tokens=2)
    assert index.shape == (1026, 1026) and int(index.max()) + 1 == 63 * 63 + 6
    assert index[:4, :4].tolist() == [[3974, 3972, 3972, 3972], [3973, 3971, 3969, 3969],
                                      [3973, 3970, 1984, 1983], [3973, 3970, 1985, 1984]]
    assert torch.equal(relative_position_index((3, 4))[1:, 1:], index_of_patches((3, 4)))


def index_of_patches(grid):
    h, w = grid
    pairs = [(divmod(i, w), divmod(j, w)) for i in range(h * w) for j in range(h * w)]
    return torch.tensor([(yi - yj + h - 1) * (2 * w - 1) + (xi - xj + w - 1) for (yi, xi), (yj, xj) in pairs]
                        ).reshape(h * w, h * w)


# ---------------------------------------------------------------------------------------------
# every parameter trains (DDP stops on one without a gradient), TinyMIM*-T's backbone


@pytest.mark.parametrize("star", [False, True])
def test_every_trained_parameter_gets_a_gradient(star):
    extra = {"dist_token": True, "extra_head_dim": 48} if star else {}
    task = _tiny_task(rel_pos_bias=True, layer_scale=1.0,
                      model={"name": "vit_custom", "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 4,
                             **extra})
    model = task.model.train()
    logits, aux = model(torch.randn(2, 3, 32, 32))
    (logits.sum() + aux.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_tinymim_star_t_pyramid_is_the_releases():
    """4D channels at strides 4 / 8 / 16 / 32 for patch 16; the coarsest level from conv1x1's 1280-wide
    tokens (E here) through a 3x3 stride-2 conv; the release's T* neck shapes at D = 192."""
    from tinymim.models.segmenter import ViTPyramid
    from tinymim.models.vit import ModelConfig, create_vit

    vit = create_vit(ModelConfig(name="vit_custom", img_size=64, patch_size=16, embed_dim=24, depth=4, num_heads=12,
                                 dist_token=True, extra_head_dim=40))
    pyramid = ViTPyramid(vit, (1, 2, 3, 4))
    feats = pyramid(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 96, 16, 16), (1, 96, 8, 8), (1, 96, 4, 4), (1, 96, 2, 2)]
    shapes = {k: tuple(v.shape) for k, v in pyramid.state_dict().items() if not k.startswith("vit.")}
    assert shapes["up4.0.weight"] == (24, 48, 2, 2) and shapes["up4.1.weight"] == (48,)  # fpn1.0, fpn1.1
    assert shapes["up4.3.weight"] == (48, 96, 2, 2) and shapes["up2.weight"] == (24, 96, 2, 2)  # fpn1.3, fpn2.0
    assert shapes["same.weight"] == (96, 24, 1, 1) and shapes["down2.weight"] == (96, 40, 3, 3)  # fpn3, fpn4.0
    # the coarsest level: the last block's patch tokens through conv1x1 (per token), then fpn4
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pyramid.eval()
        last = vit.forward_intermediates(x, indices=[3], output_fmt="NCHW", intermediates_only=True)[0]
        tokens = last.flatten(2).transpose(1, 2)  # 16 patch tokens x 24
        projected = vit.conv1x1(tokens).transpose(1, 2).reshape(1, 40, 4, 4)
        assert torch.allclose(pyramid(x)[3], pyramid.down2(projected), atol=1e-5)


def test_released_tinymim_star_t_checkpoint_loads_into_the_segmentation_backbone(tmp_path, caplog):
    """The released TinyMIM-FT-Tstar.pth layout (key names and shapes from the release's code and log,
    random values, under 'model'): every encoder key and conv1x1 loaded, the classifier heads set
    aside and named, the release's new tables and gammas newly initialised."""
    from tinymim.core.config import from_dict
    from tinymim.tasks.segment import SegmentConfig, build_backbone

    d, depth, extra, classes = 192, 12, 1280, 1000
    g = torch.Generator().manual_seed(0)
    state = {"cls_token": (1, 1, d), "dist_token": (1, 1, d), "pos_embed": (1, 198, d),
             "patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,),
             "conv1x1.0.weight": (d,), "conv1x1.0.bias": (d,), "conv1x1.1.weight": (extra, d),
             "conv1x1.1.bias": (extra,), "fc_norm.weight": (extra,), "fc_norm.bias": (extra,),
             "head.weight": (classes, extra), "head.bias": (classes,), "head_dist.weight": (classes, extra),
             "head_dist.bias": (classes,)}
    for b in range(depth):
        state.update({f"blocks.{b}.norm1.weight": (d,), f"blocks.{b}.norm1.bias": (d,),
                      f"blocks.{b}.attn.qkv.weight": (3 * d, d), f"blocks.{b}.attn.qkv.bias": (3 * d,),
                      f"blocks.{b}.attn.proj.weight": (d, d), f"blocks.{b}.attn.proj.bias": (d,),
                      f"blocks.{b}.norm2.weight": (d,), f"blocks.{b}.norm2.bias": (d,),
                      f"blocks.{b}.mlp.fc1.weight": (4 * d, d), f"blocks.{b}.mlp.fc1.bias": (4 * d,),
                      f"blocks.{b}.mlp.fc2.weight": (d, 4 * d), f"blocks.{b}.mlp.fc2.bias": (d,)})
    assert len(state) == 159
    state = {k: torch.randn(shape, generator=g) for k, shape in state.items()}
    torch.save({"model": state, "epoch": 999}, tmp_path / "TinyMIM-FT-Tstar.pth")
    cfg = from_dict(SegmentConfig, {"model": {"name": "vit_tiny_patch16_224", "num_heads": 12, "dist_token": True,
                                              "extra_head_dim": 1280},
                                    "init": str(tmp_path / "TinyMIM-FT-Tstar.pth"), "rel_pos_bias": True,
                                    "layer_scale": 1.0, "data": {"crop_size": 64}})
    with caplog.at_level(logging.INFO, logger="tinymim"):
        vit = build_backbone(cfg)
    own = vit.state_dict()
    for k, v in state.items():
        if k.startswith(("fc_norm.", "head.", "head_dist.")):
            assert k.split(".")[0] in caplog.text  # set aside, and said
        elif k == "pos_embed":  # 14 x 14 patches resized to the crop's 4 x 4, prefix rows kept
            assert torch.equal(own[k][:, :2], v[:, :2]) and own[k].shape == (1, 18, d)
        else:
            assert torch.equal(own[k], v), k
    assert "relative_position_bias_table" in caplog.text and "ls1.gamma" in caplog.text
    assert vit.blocks[0].attn.relative_position_bias_table.shape == (7 * 7 + 6, 12)
