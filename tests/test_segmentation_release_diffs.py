"""Segmentation as the release (mmseg 0.x / mmcv 1.x) computes it, each against the reference formula
written here: the init's position-embedding resize (plain bicubic), mmseg's PhotoMetricDistortion (8 bits
after every step), mmcv's poly schedule with linear warmup; and train.precision=fp16, the release's."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_segmentation import _seg_folder, tiny_segment_overrides

# ---------------------------------------------------------------------------------------------
# 1. position embeddings resized by plain bicubic, as the release's backbone init


def sincos_table(grid: int, dim: int) -> np.ndarray:
    """MAE's 2-D sin-cos position embedding (grid*grid x dim), a class-token row of zeros in front."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    table = np.concatenate([one_axis(dim // 2, h), one_axis(dim // 2, w)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table], axis=0).astype(np.float32)


def test_segmentation_init_resizes_position_embeddings_by_plain_bicubic(tmp_path):
    from tinymim.core.config import from_dict
    from tinymim.models.checkpoint import save_weights
    from tinymim.models.vit import ModelConfig, create_vit
    from tinymim.tasks.segment import SegmentConfig, build_backbone

    arch = {"name": "vit_custom", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    source = create_vit(ModelConfig(**arch, img_size=56)).state_dict()  # a 14 x 14 grid
    table = torch.from_numpy(sincos_table(14, 32))[None]
    source["pos_embed"] = table
    save_weights(source, tmp_path / "init.safetensors")
    cfg = from_dict(SegmentConfig, {"model": arch, "blocks": [1, 2, 1, 2], "init": str(tmp_path / "init.safetensors"),
                                    "data": {"crop_size": 128}})  # a 32 x 32 grid
    loaded = build_backbone(cfg).pos_embed.detach()
    # the release (MAE / BEiT segmentation backbones): F.interpolate bicubic, align_corners=False, no antialias
    grid = table[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    plain = F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert torch.equal(loaded, torch.cat([table[:, :1], plain.reshape(1, 1024, 32)], dim=1))
    smooth = F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    assert (smooth.permute(0, 2, 3, 1).reshape(1, 1024, 32) - loaded[:, 1:]).abs().max() > 1e-2  # what it was


# ---------------------------------------------------------------------------------------------
# 2. mmseg 0.x's PhotoMetricDistortion, draw by draw


class MmsegDraws:
    """np.random as mmseg calls it (randint(2) gates, uniform, randint), every draw recorded; the gates
    named in `off` drawn as 0 (the step skipped)."""

    def __init__(self, seed: int, off=()):
        self.rs, self.off, self.record = np.random.RandomState(seed), set(off), []

    def gate(self, step: str) -> int:
        value = 0 if step in self.off else int(self.rs.randint(2))
        self.record.append(("gate", value))
        return value

    def uniform(self, lo, hi):
        value = self.rs.uniform(lo, hi)
        self.record.append(("uniform", value))
        return value

    def randint(self, lo, hi):
        value = int(self.rs.randint(lo, hi))
        self.record.append(("integers", value))
        return value


class Replay:
    """The recorded draws fed to tinymim's rng interface, in order and of the same kind (or the test fails)."""

    def __init__(self, record):
        self.record = iter(record)

    def _next(self, kind):
        got, value = next(self.record)
        assert got == kind, f"tinymim draws {kind} where mmseg draws {got}"
        return value

    def random(self):
        return 0.25 if self._next("gate") else 0.75  # tinymim applies a step when random() < 0.5

    def uniform(self, lo, hi):
        return self._next("uniform")

    def integers(self, lo, hi):
        return self._next("integers")


def mmseg_photometric(img, draws: MmsegDraws, cv2, hue_delta=18):
    """mmseg 0.x PhotoMetricDistortion.__call__ (brightness_delta 32, contrast and saturation 0.5-1.5), its
    HSV through OpenCV as mmcv.bgr2hsv / hsv2bgr (on RGB here: the same HSV as BGR's)."""
    def convert(x, alpha=1, beta=0):
        x = x.astype(np.float32) * alpha + beta
        return np.clip(x, 0, 255).astype(np.uint8)

    def contrast(x):
        return convert(x, alpha=draws.uniform(0.5, 1.5)) if draws.gate("contrast") else x

    if draws.gate("brightness"):
        img = convert(img, beta=draws.uniform(-32, 32))
    mode = draws.gate("mode")
    if mode == 1:
        img = contrast(img)
    if draws.gate("saturation"):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=draws.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if draws.gate("hue"):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + draws.randint(-hue_delta, hue_delta)) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if mode == 0:
        img = contrast(img)
    return img


def photo(seed):
    """64 pixels wide: every pixel of a row goes through OpenCV's vectorised loop, as in a 512 crop."""
    return np.random.default_rng(seed).integers(0, 256, (24, 64, 3), dtype=np.uint8)


def test_hsv_conversions_are_opencvs():
    cv2 = pytest.importorskip("cv2", reason="OpenCV (the dev extra's imagecorruptions) is the reference")
    from tinymim.data.segmentation import hsv_to_rgb_cv, rgb_to_hsv_cv

    rgb = np.random.default_rng(0).integers(0, 256, (512, 256, 3), dtype=np.uint8)
    rgb[0, :64] = [[v, v, v] for v in range(0, 256, 4)]  # greys: no hue, no saturation
    assert np.array_equal(rgb_to_hsv_cv(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
    hsv = np.random.default_rng(1).integers(0, 256, (512, 256, 3), dtype=np.uint8)
    hsv[..., 0] %= 180
    assert np.array_equal(hsv_to_rgb_cv(hsv), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))


@pytest.mark.parametrize("off", [("saturation", "hue"), ()], ids=["brightness_contrast", "every_step"])
def test_photometric_distortion_is_mmsegs_draw_by_draw(off):
    cv2 = pytest.importorskip("cv2", reason="OpenCV (the dev extra's imagecorruptions) is mmseg's HSV")
    from tinymim.data.segmentation import _photometric

    both = 0
    for seed in range(64):
        img, draws = photo(seed), MmsegDraws(seed, off)
        expected = mmseg_photometric(img, draws, cv2)
        both += [v for k, v in draws.record if k == "gate"][:1] == [1] and len(draws.record) > 4
        assert np.array_equal(_photometric(img.copy(), Replay(draws.record)), expected), seed
    assert both > 5  # brightness and a contrast both drawn in many of them


def test_a_brightened_pixel_is_clipped_before_contrast():
    """mmseg: 250 + 30 -> 255 (uint8), then x 0.5 -> 127; scaling the unclipped 280 would give 140."""
    from tinymim.data.segmentation import _photometric

    img = np.full((2, 2, 3), 250, np.uint8)
    record = [("gate", 1), ("uniform", 30.0), ("gate", 1), ("gate", 1), ("uniform", 0.5), ("gate", 0), ("gate", 0)]
    assert (_photometric(img, Replay(record)) == 127).all()


# ---------------------------------------------------------------------------------------------
# 3. mmcv's PolyLrUpdaterHook with linear warmup (by_epoch=False, warmup_ratio 1e-6, min_lr 0)


def mmcv_lr(base, t, total, warmup, power=1.0, min_lr=0.0, ratio=1e-6):
    regular = (base - min_lr) * (1 - t / total) ** power + min_lr  # PolyLrUpdaterHook.get_lr
    if t < warmup:  # LrUpdaterHook.get_warmup_lr, 'linear'
        return regular * (1 - (1 - t / warmup) * (1 - ratio))
    return regular


@pytest.mark.parametrize("total,warmup,power", [(160_000, 1500, 1.0), (1200, 100, 1.0), (50, 7, 0.9)])
def test_poly_mmcv_schedule_is_mmcvs_at_every_step(total, warmup, power):
    from tinymim.train.config import TrainConfig
    from tinymim.train.optim import build_optimizer, build_scheduler

    scales = [1.0, 0.75 ** 3]  # a head's group and a layer-decayed one
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.0, "lr_scale": s} for s in scales]
    cfg = TrainConfig(lr=1e-4, epochs=10_000, max_steps=total, warmup_steps=warmup, schedule="poly_mmcv",
                      poly_power=power, betas=[0.9, 0.999])
    optimizer = build_optimizer(groups, cfg)
    scheduler = build_scheduler(optimizer, cfg, per_epoch=100)
    steps = range(total) if total < 2000 else sorted({0, 1, 2, 749, 1499, 1500, 1501, 80_000, 159_998, 159_999})
    worst = 0.0
    for t in steps:
        scheduler.step_update(t)
        for group, scale in zip(optimizer.param_groups, scales):
            expected = mmcv_lr(1e-4 * scale, t, total, warmup, power)
            worst = max(worst, abs(group["lr"] - expected) / (1e-4 * scale))
    assert worst < 1e-12
    scheduler.step_update(warmup)  # where timm's poly (schedule=poly) is at the full lr: 1 - warmup/total of it
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * (1 - warmup / total) ** power, rel=1e-12)


def test_poly_mmcv_schedule_resumes_where_it_stopped():
    from tinymim.train.config import TrainConfig
    from tinymim.train.optim import build_optimizer, build_scheduler

    cfg = TrainConfig(lr=1e-3, epochs=1, max_steps=40, warmup_steps=10, schedule="poly_mmcv", betas=[0.9, 0.999])

    def fresh():
        optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 0.0}], cfg)
        return optimizer, build_scheduler(optimizer, cfg, per_epoch=40)

    optimizer, scheduler = fresh()
    scheduler.step_update(5)
    saved = scheduler.state_dict()
    optimizer2, resumed = fresh()
    resumed.load_state_dict(saved)
    resumed.step_update(6)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(mmcv_lr(1e-3, 6, 40, 10), rel=1e-12)


def test_segmentation_defaults_and_recipes_take_the_mmcv_schedule():
    from tinymim.tasks import load_config

    assert load_config("segment", None, []).train.schedule == "poly_mmcv"
    for recipe in ("ade20k/segment_vit_base", "ade20k/segment_vit_tiny_star", "camvid/segment_micro"):
        assert load_config("segment", recipe).train.schedule == "poly_mmcv", recipe
    assert load_config("finetune", None, []).train.schedule == "cosine"  # other tasks unchanged


# ---------------------------------------------------------------------------------------------
# 4. fp16, the release's precision, on request


def _cpu_autocast_fp16() -> str | None:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3))
    except (RuntimeError, TypeError) as e:
        return f"this torch has no fp16 autocast on CPU ({e})"
    return None


@pytest.mark.skipif(_cpu_autocast_fp16() is not None, reason=str(_cpu_autocast_fp16()))
def test_segmentation_trains_in_fp16_on_request(tmp_path):
    from safetensors.torch import load_file

    from tinymim.core.rundir import RunDir
    from tinymim.tasks import load_config, run

    assert load_config("segment", "ade20k/segment_vit_base", ["train.precision=fp16"]).train.precision == "fp16"
    root = _seg_folder(tmp_path / "data", "train", 4)
    _seg_folder(root, "val", 1, seed=1)
    cfg = load_config("segment", None, tiny_segment_overrides(root, "train.max_steps=2", "train.precision=fp16"))
    run("segment", cfg, tmp_path / "run")
    weights = load_file(str(RunDir(tmp_path / "run").weights()))
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["scaler"].get("scale", 0) > 0  # fp16 trained with its loss scaler (bf16 and fp32 have none)
