"""Teacher import from the official MAE / TinyMIM layouts, and export to timm and ONNX."""
import json

import pytest
import timm
import torch
from conftest import tiny_distill_config, tiny_vit
from safetensors.torch import load_file

import tinymim.tasks as tasks
from tinymim.models.checkpoint import CheckpointError, load_state_dict, load_vit_weights
from tinymim.models.vit import create_vit
from tinymim.tasks.distill import build_distill_task


def encoder_state(dim=64, depth=3, heads=4, seed=0):
    torch.manual_seed(seed)
    return create_vit(tiny_vit(dim=dim, depth=depth, heads=heads)).state_dict()


def mae_pretrain_checkpoint(path, enc):
    """The official MAE pre-training layout: {'model': encoder keys + decoder_* + mask_token}."""
    state = dict(enc)
    state.update({"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
                  "decoder_embed.bias": torch.zeros(32), "decoder_pos_embed": torch.zeros(1, 65, 32),
                  "decoder_blocks.0.norm1.weight": torch.ones(32), "decoder_norm.weight": torch.ones(32),
                  "decoder_pred.weight": torch.randn(48, 32), "decoder_pred.bias": torch.zeros(48)})
    torch.save({"model": state, "optimizer": {}, "epoch": 799}, path)


def assert_same_encoder(model, enc):
    own = model.state_dict()
    for k, v in enc.items():
        assert torch.equal(own[k], v), k


def test_official_mae_pretrain_layout_as_teacher(tmp_path, caplog):
    enc = encoder_state()
    mae_pretrain_checkpoint(tmp_path / "mae_pretrain_vit_tiny.pth", enc)
    cfg = tiny_distill_config()
    cfg.teacher.checkpoint = str(tmp_path / "mae_pretrain_vit_tiny.pth")
    with caplog.at_level("INFO"):
        task = build_distill_task(cfg)
    # every encoder key used (the teacher is truncated after its target block = the last one here)
    teacher = create_vit(tiny_vit(dim=64, depth=3, heads=4))
    ignored = load_vit_weights(teacher, load_state_dict(tmp_path / "mae_pretrain_vit_tiny.pth"))
    assert_same_encoder(teacher, enc)
    assert set(ignored) == {"mask_token", "decoder_embed.weight", "decoder_embed.bias", "decoder_pos_embed",
                            "decoder_blocks.0.norm1.weight", "decoder_norm.weight", "decoder_pred.weight",
                            "decoder_pred.bias"}
    assert "set aside 8 non-encoder keys" in caplog.text and "decoder_" in caplog.text
    assert torch.equal(task.teacher.vit.blocks[2].attn.qkv.weight, enc["blocks.2.attn.qkv.weight"])


def test_mae_finetuned_layout(tmp_path):
    enc = encoder_state()
    state = {k: v for k, v in enc.items() if not k.startswith("norm.")}  # global pool: fc_norm, no norm
    state.update({"fc_norm.weight": torch.ones(64), "fc_norm.bias": torch.zeros(64),
                  "head.weight": torch.randn(1000, 64), "head.bias": torch.zeros(1000)})
    torch.save({"model": state}, tmp_path / "mae_finetuned.pth")
    model = create_vit(tiny_vit(dim=64, depth=3, heads=4))
    ignored = load_vit_weights(model, load_state_dict(tmp_path / "mae_finetuned.pth"))
    assert set(ignored) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert_same_encoder(model, {k: v for k, v in enc.items() if not k.startswith("norm.")})


def test_tinymim_t_layout_with_distillation_token(tmp_path):
    enc = encoder_state()
    cls_pos, patch_pos = enc["pos_embed"][:, :1], enc["pos_embed"][:, 1:]
    state = dict(enc)
    state.update({"dist_token": torch.randn(1, 1, 64),
                  "pos_embed": torch.cat([cls_pos, torch.randn(1, 1, 64), patch_pos], 1),  # 1 + 1 + 64 = 66
                  "head.weight": torch.randn(1000, 64), "head.bias": torch.zeros(1000),
                  "head_dist.weight": torch.randn(1000, 64), "head_dist.bias": torch.zeros(1000),
                  "fc_norm.weight": torch.ones(64), "fc_norm.bias": torch.zeros(64),
                  "fc.weight": torch.randn(64, 64), "fc.bias": torch.zeros(64)})
    assert state["pos_embed"].shape[1] == 66  # the 198-token layout at 32px/patch 4
    torch.save({"model": state}, tmp_path / "tinymim_t.pth")
    model = create_vit(tiny_vit(dim=64, depth=3, heads=4))
    ignored = load_vit_weights(model, load_state_dict(tmp_path / "tinymim_t.pth"))
    assert {"dist_token", "head_dist.weight", "fc.weight", "fc_norm.weight"} <= set(ignored)
    assert_same_encoder(model, enc)  # pos_embed: the distillation token's position is dropped


def test_position_embedding_is_resized_for_another_grid(tmp_path):
    from safetensors.torch import save_file

    save_file(encoder_state(), tmp_path / "w.safetensors")  # 32px / patch 4: 8x8 grid
    model = create_vit(tiny_vit(dim=64, depth=3, heads=4, img=48))  # 12x12 grid
    load_vit_weights(model, load_state_dict(tmp_path / "w.safetensors"))
    assert model.pos_embed.shape == (1, 145, 64)
    assert torch.equal(model.pos_embed[:, :1], encoder_state()["pos_embed"][:, :1])  # class token kept apart


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "distill"
    tasks.run("distill", tiny_distill_config(max_steps=3), run)
    return run


def test_export_timm_folder_loads_with_plain_timm(distilled_run, tmp_path):
    from tinymim.cli import main

    out = tmp_path / "export"
    assert main(["export", str(distilled_run), "--format", "timm", "--output", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_args"]["num_heads"] == 3 and "block_heads" not in json.dumps(cfg)
    assert (out / "model.safetensors").is_file() and "tinymim" in (out / "README.md").read_text()
    plain = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
    # the same features as the student inside tinymim: by default (relation targets only) its patch tokens'
    # mean entering its last block (what its k-NN monitor read; tests/test_one_feature.py checks every way)
    from tinymim.models.vit import TokenFeatures

    student = create_vit(tiny_vit(dim=48, depth=2, heads=3))
    student.load_state_dict(load_file(distilled_run / "student.safetensors"))
    student.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (plain(x) - TokenFeatures(student, 2)(x)).abs().max().item() < 1e-5
    # --features final --pool token: the class token after every block, as timm's default ViT head reads it
    assert main(["export", str(distilled_run), "--output", str(tmp_path / "token"), "--features", "final",
                 "--pool", "token"]) == 0
    token = timm.create_model(f"local-dir:{tmp_path / 'token'}", pretrained=True, num_classes=0).eval()
    with torch.no_grad():
        assert (token(x) - student(x)).abs().max().item() < 1e-5


def test_export_onnx_matches_pytorch(distilled_run, tmp_path):
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime as ort

    from tinymim.evaluate.export import export_onnx
    from tinymim.evaluate.exportable import build_exportable

    diff = export_onnx(distilled_run, tmp_path / "student.onnx")
    assert diff < 1e-4
    model, _ = build_exportable(distilled_run)
    x = torch.randn(5, 3, 32, 32)  # another batch size: the batch axis is dynamic
    got = ort.InferenceSession(str(tmp_path / "student.onnx")).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(x).numpy()).max() < 1e-4


def test_export_of_a_bare_checkpoint_needs_its_architecture(tmp_path):
    from tinymim.core.errors import TinymimError
    from tinymim.evaluate.exportable import build_exportable

    torch.save(encoder_state(), tmp_path / "w.pth")
    with pytest.raises(TinymimError, match="--model"):
        build_exportable(tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        build_exportable(tmp_path / "w.pth", "vit_small_patch16_224")


@pytest.mark.slow  # a subprocess
def test_timm_pretrained_names_need_the_network(tmp_path):
    import subprocess
    import sys

    from conftest import subprocess_env

    from tinymim.models.checkpoint import load_weights

    # offline from the start (the hub library reads this when imported): a clear error, at once
    env = subprocess_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hub-cache"))
    r = subprocess.run([sys.executable, "-m", "tinymim", "distill", "--output", str(tmp_path / "run"),
                        "teacher.checkpoint=vit_base_patch16_224.mae", "data.img_size=224", "train.batch_size=2"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "cannot download 'vit_base_patch16_224.mae'" in r.stderr
    assert "offline or no network" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nothing-here.pth")


def test_distilled_student_as_teacher_takes_the_declared_relation_heads(distilled_run):
    """Sequential distillation: the student's relation block was trained with 4 heads (3 elsewhere).
    As the next teacher its relation heads are what the recipe declares (docs/method.md section 2), not
    what its run directory recorded; undeclared, they are its architecture's 3."""
    from tinymim.tasks.distill_config import TeacherConfig

    for declared, expected in ((4, 4), (None, 3)):
        cfg = tiny_distill_config()
        cfg.teacher = TeacherConfig(model=tiny_vit(dim=48, depth=2, heads=3), checkpoint=str(distilled_run),
                                    relation_heads=declared)
        cfg.student = tiny_vit(dim=48, depth=2, heads=2)
        task = build_distill_task(cfg)
        assert task.teacher.heads == expected
        assert task.student.blocks[-1].attn.num_heads == expected and task.student.blocks[0].attn.num_heads == 2


def test_a_run_directory_as_teacher_supplies_its_architecture(distilled_run):
    """`teacher.checkpoint=RUN_DIR` with no teacher.model keys: the teacher is built as the run's
    student was (48 wide, 2 blocks, 3 heads, patch 4, 32px); keys given on the command line win."""
    from tinymim.tasks.distill_config import load

    small = ["student.name=vit_custom", "student.img_size=32", "student.patch_size=4", "student.embed_dim=48",
             "student.depth=2", "student.num_heads=2", "data.name=synthetic", "data.img_size=32",
             f"teacher.checkpoint={distilled_run}", "teacher.target_block=2"]
    cfg = load(None, small)
    assert (cfg.teacher.model.name, cfg.teacher.model.embed_dim, cfg.teacher.model.depth,
            cfg.teacher.model.num_heads, cfg.teacher.model.patch_size) == ("vit_custom", 48, 2, 3, 4)
    task = build_distill_task(cfg)
    assert task.teacher.vit.embed_dim == 48 and len(task.teacher.vit.blocks) == 2
    assert load(None, [*small, "teacher.model.num_heads=6"]).teacher.model.num_heads == 6
    # a model named on the command line is taken as given, whole
    named = load(None, [*small, "teacher.model.name=vit_tiny_patch16_224", "teacher.target_block=2"])
    assert named.teacher.model.embed_dim is None


def _export_and_load(source, out, *extra):
    from tinymim.cli import main

    assert main(["export", str(source), "--format", "timm", "--output", str(out), *extra]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    return model, timm.data.resolve_data_config({}, model=model)


def test_exported_student_carries_the_runs_preprocessing_and_a_true_card(distilled_run, tmp_path):
    import yaml

    run_cfg = yaml.safe_load((distilled_run / "config.yaml").read_text())
    model, data = _export_and_load(distilled_run, tmp_path / "student")
    assert data["mean"] == pytest.approx(tuple(run_cfg["data"]["mean"]))
    assert data["std"] == pytest.approx(tuple(run_cfg["data"]["std"]))
    assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == 1.0 and data["interpolation"] == "bicubic"
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert "tag" not in config["pretrained_cfg"] and "in21k" not in json.dumps(config)
    card = (tmp_path / "student" / "README.md").read_text()
    assert "relations qk, vv (KL, softmax, weight 1.0)" in card and "license: apache-2.0" in card
    assert "CC-BY-NC" not in card and "these were never trained" in card
    # the relation block's input tokens, as the k-NN monitor reads them
    from tinymim.evaluate.visualize import load_run
    from tinymim.models.vit import TokenFeatures

    feats, _ = _export_and_load(distilled_run, tmp_path / "relation_input", "--features", "relation-input")
    task, _ = load_run(distilled_run)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(feats(x), TokenFeatures(task.student, len(task.student.blocks))(x), atol=1e-5)
    assert "entering the last (relation) block" in (tmp_path / "relation_input" / "README.md").read_text()


def test_exported_classifier_gives_the_same_logits(tmp_path):
    from tinymim.core.config import load_config
    from tinymim.evaluate.robustness import load_classifier
    from tinymim.tasks.finetune_config import FinetuneConfig

    cfg = load_config(FinetuneConfig, None, [
        "model.name=vit_custom", "model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "data.name=synthetic", "data.img_size=32", "data.synthetic_size=64", "data.num_workers=0",
        "data.mean=[0.4,0.45,0.5]", "data.std=[0.2,0.25,0.3]", "data.eval_crop_pct=0.9", "data.auto_augment=null",
        "mixup=0", "cutmix=0", "train.batch_size=16", "train.max_steps=3", "train.precision=fp32",
        "train.progress=false", "train.warmup_epochs=0"])
    tasks.run("finetune", cfg, str(tmp_path / "ft"))
    model, data = _export_and_load(tmp_path / "ft", tmp_path / "export")
    assert data["mean"] == pytest.approx((0.4, 0.45, 0.5)) and data["std"] == pytest.approx((0.2, 0.25, 0.3))
    assert data["crop_pct"] == pytest.approx(0.9) and data["input_size"] == (3, 32, 32)
    assert model.num_classes == 10
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["label_names"] == [f"class_{c}" for c in range(10)]
    ours, _ = load_classifier(tmp_path / "ft", weights="last")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - ours(x)).abs().max().item() < 1e-5


def _files(root) -> dict:
    """Every file under root: its bytes and mtime (what a refused command must not change)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_export_refuses_a_non_empty_folder_unless_overwrite_and_writes_umask_modes(distilled_run, tmp_path, capsys):
    import os
    import stat

    from tinymim.cli import main

    out = tmp_path / "export"
    old_umask = os.umask(0o022)
    try:
        assert main(["export", str(distilled_run), "--output", str(out)]) == 0
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
        assert modes == {"config.json": 0o644, "model.safetensors": 0o644, "README.md": 0o644}
        assert not [p for p in tmp_path.iterdir() if p.name != "export"]  # no temporary folder left
        capsys.readouterr()
        before, run_before = _files(out), _files(distilled_run)

        # a second export into the same folder: refused, the first one byte for byte as it was
        assert main(["export", str(distilled_run), "--output", str(out), "--features", "relation-input"]) == 1
        line = _error_line(capsys.readouterr().err)
        assert line.startswith(f"error: --output {out} is not empty (it holds README.md, config.json, "
                               "model.safetensors)") and "--overwrite" in line
        assert _files(out) == before

        # a run's own folder is never an export's, even with --overwrite
        assert main(["export", str(distilled_run), "--output", str(distilled_run), "--overwrite"]) == 1
        assert "is the source itself" in _error_line(capsys.readouterr().err)
        ft_like = tmp_path / "other_run"
        ft_like.mkdir()
        (ft_like / "config.yaml").write_text("model: {}\ntrain: {}\n")
        (ft_like / "model.safetensors").write_bytes(b"a fine-tuned run's weights")
        other = _files(ft_like)
        assert main(["export", str(distilled_run), "--output", str(ft_like), "--overwrite"]) == 1
        assert "is a tinymim run folder" in _error_line(capsys.readouterr().err)
        assert _files(ft_like) == other and _files(distilled_run) == run_before

        # --overwrite replaces the export's files, with the umask's mode again
        assert main(["export", str(distilled_run), "--output", str(out), "--features", "relation-input",
                     "--overwrite"]) == 0
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == modes
        assert "entering the last (relation) block" in (out / "README.md").read_text()
    finally:
        os.umask(old_umask)


def test_export_onnx_refuses_an_existing_file_unless_overwrite(distilled_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from tinymim.cli import main

    out = tmp_path / "student.onnx"
    out.write_bytes(b"an earlier export")
    before = _files(tmp_path)
    assert main(["export", str(distilled_run), "--format", "onnx", "--output", str(out)]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line == f"error: --output {out} already exists; choose a new file name, or pass --overwrite to replace it"
    assert _files(tmp_path) == before
    assert main(["export", str(distilled_run), "--format", "onnx", "--output", str(tmp_path)]) == 1
    assert "is a folder: --format onnx writes one file" in _error_line(capsys.readouterr().err)
    assert main(["export", str(distilled_run), "--format", "onnx", "--output", str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] != b"an e" and (out.stat().st_mode & 0o777) == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx"]  # no temporary file left


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_of_a_pipeline_folder_or_an_empty_folder_says_what_it_is(tmp_path, capsys):
    from tinymim.cli import main
    from tinymim.core.rundir import RunDir

    pipe = tmp_path / "pipe"
    for stage in ("teacher", "finetune"):
        (pipe / stage).mkdir(parents=True)
        (pipe / stage / RunDir.RECORD).write_text('{"stage": "%s", "status": "done"}\n' % stage)
    (pipe / "report.md").write_text("# report\n")
    before = _files(tmp_path)
    out = tmp_path / "export"
    assert main(["export", str(pipe), "--output", str(out)]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line == (f"error: {pipe} is a pipeline folder, not a run: export one of its stages' run folders "
                    f"instead ({pipe}/finetune, {pipe}/teacher)")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(empty), "--output", str(out)]) == 1
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {empty} is an empty folder: it holds no run;") and "bare checkpoint" not in line
    assert _files(tmp_path) == before and not out.exists()


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_exported_encoder_gives_knn_features(tmp_path, pool):
    """The timm folder an encoder exports to computes what the card says: by default the mean of the
    patch tokens (entering the last block of this relation-distilled student), i.e. tinymim knn's
    features (TokenFeatures); --pool token the class token. The card's title is the model's real
    architecture."""
    import timm

    from tinymim.evaluate.export import export_timm
    from tinymim.evaluate.exportable import build_exportable
    from tinymim.models.vit import TokenFeatures

    tasks.run("distill", tiny_distill_config(max_steps=1), tmp_path / "run")
    out = export_timm(tmp_path / "run", tmp_path / "export", pool=pool)
    exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    knn_model = build_exportable(tmp_path / "run")[0]  # what tinymim knn builds
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = exported(x)
        if pool == "avg":
            expected = TokenFeatures(knn_model)(x)
        else:
            expected = knn_model.forward_features(x)[:, 0]
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    card = (out / "README.md").read_text()
    title = card.split("\n")[5]
    # by default the blocks distillation trained: the student's first (tests/test_one_feature.py)
    assert title.startswith("# ViT, 1 block 48 wide, 3 heads, patch 4, 32px") and "vit_base" not in title
    assert ("mean of the patch tokens" in card) == (pool == "avg")


def test_onnx_export_says_nothing_but_its_result(distilled_run, tmp_path, recwarn):
    """The tracer's warnings about timm's shape checks are not the user's business: the export is
    checked against onnxruntime instead."""
    pytest.importorskip("onnxruntime")
    from tinymim.evaluate.export import export_onnx

    assert export_onnx(distilled_run, tmp_path / "m.onnx") < 1e-4
    assert not [w for w in recwarn if issubclass(w.category, torch.jit.TracerWarning)]
