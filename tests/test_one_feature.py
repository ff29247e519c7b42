"""One model, one feature: every way to get a trained run's model gives the same output for the same
choice of features and pooling (tinymim.models.features): `load_trained(run).model`, `load_vit`, the
timm folder of `tinymim export` loaded by plain timm, its ONNX file, the features `tinymim knn` scores,
and the plain-timm snippet of the export's model card, for a distill, an MAE, a fine-tune and a
linear-probe run. The reference: the features computed by hand from the run's weights file."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import tinymim
import tinymim.tasks as tasks
from tinymim.core.rundir import RunDir

SIZES = ["name=vit_custom", "patch_size=4", "img_size=32"]
DATA = ["data.name=synthetic", "data.img_size=32", "data.num_workers=0", "data.synthetic_size=32"]
TRAIN = ["train.batch_size=16", "train.max_steps=2", "train.precision=fp32", "train.progress=false",
         "train.warmup_epochs=0"]
CLASSIFY = [*DATA, "data.auto_augment=null", "data.reprob=0", *TRAIN]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An MAE teacher (64 wide, 2 blocks, 4 heads), a student distilled from it (48 wide, 2 blocks, 3
    heads; its relation block split into the teacher's 4), a fine-tuned and a linear-probe run of that
    student; each 2 steps on 32 synthetic 32px images."""
    root = tmp_path_factory.mktemp("runs")
    plans = {
        "mae": [*(f"model.{s}" for s in SIZES), "model.embed_dim=64", "model.depth=2", "model.num_heads=4",
                "decoder.embed_dim=32", "decoder.depth=1", "decoder.num_heads=2", *DATA, *TRAIN],
        "distill": [*(f"student.{s}" for s in SIZES), "student.embed_dim=48", "student.depth=2",
                    "student.num_heads=3", f"teacher.checkpoint={root / 'mae'}", *DATA, *TRAIN],
        "finetune": [*(f"model.{s}" for s in SIZES), "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
                     f"init={root / 'distill'}", "mixup=0", "cutmix=0", *CLASSIFY],
        "linprobe": [*(f"model.{s}" for s in SIZES), "model.embed_dim=48", "model.depth=2", "model.num_heads=3",
                     f"init={root / 'distill'}", *CLASSIFY],
    }
    for task, overrides in plans.items():
        tinymim.run(task, tinymim.load_config(task, None, overrides), root / task)
    return root


def by_hand(run, features: str, pool: str, pre_logits: bool = False):
    """The reference: a plain VisionTransformer of the run's sizes holding its weights file, its
    features computed step by step (tokens through the blocks kept, the final norm if every block ran,
    the patch mean or the class token). A classifier: timm's own classifier of the run's pooling, its
    logits (a probe's through its BatchNorm), or with pre_logits its pooled features."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = RunDir(run).stored_config()
    task = RunDir(run).task()
    state = load_file(str(RunDir(run).weights()))
    section = cfg["student"] if task == "distill" else cfg["model"]
    sizes = {k: section[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    if task in ("finetune", "linprobe"):
        pool_of_run = cfg["global_pool"]
        vit = VisionTransformer(num_classes=cfg["num_classes"], global_pool=pool_of_run,
                                fc_norm=pool_of_run == "avg", **sizes)
        if task == "linprobe":  # ProbeModel: backbone -> BatchNorm (eval: running statistics) -> Linear
            backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            vit.load_state_dict({**backbone, "head.weight": state["head.1.weight"], "head.bias": state["head.1.bias"]})
            bn = torch.nn.BatchNorm1d(vit.num_features, affine=False, eps=1e-6)
            bn.load_state_dict({k[len("head.0."):]: v for k, v in state.items() if k.startswith("head.0.")})
            head = lambda pooled: vit.head(bn.eval()(pooled))  # noqa: E731
        else:
            vit.load_state_dict(state)
            head = vit.head
        vit.eval()
        return lambda x: (lambda pooled: pooled if pre_logits else head(pooled))(
            vit.forward_head(vit.forward_features(x), pre_logits=True))
    vit = VisionTransformer(num_classes=0, **sizes)
    vit.load_state_dict(state)
    vit.eval()

    def features_of(x):
        tokens = vit._pos_embed(vit.patch_embed(x))
        kept = vit.blocks if features == "final" else vit.blocks[:-1]
        for block in kept:
            tokens = block(tokens)
        if features == "final":
            tokens = vit.norm(tokens)
        return tokens[:, 1:].mean(1) if pool == "avg" else tokens[:, 0]
    return features_of


def knn_features(monkeypatch, run, tmp_path, **choice) -> torch.nn.Module:
    """The module `tinymim knn` computes its neighbours' features with (the scoring itself left out)."""
    import tinymim.evaluate.robustness as robustness

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True, exist_ok=True)
    seen = []
    monkeypatch.setattr(robustness, "build_eval_loader", lambda *a, **k: [])
    monkeypatch.setattr(robustness, "knn_loader_accuracy", lambda features, *a, **k: seen.append(features) or {})
    robustness.knn_evaluate(run, str(tmp_path / "train"), str(tmp_path / "val"), num_workers=0, **choice)
    return seen[0].eval()


def every_way(runs, task, tmp_path, monkeypatch, **choice) -> dict:
    """{path: model(x) callable} for one run and one choice of features/pool (none: the defaults)."""
    from tinymim.cli import main

    run = runs / task
    args = [f"--{k}={v}" for k, v in choice.items()]
    out = tmp_path / f"export_{task}_{'_'.join(args) or 'default'}".replace("-", "").replace("=", "")
    assert main(["export", str(run), "--output", str(out), *args]) == 0
    card = (out / "README.md").read_text()
    snippet = card.split("```python\n")[-1].split("```")[0]
    assert "load_file(" in snippet
    space = {}
    exec(snippet.replace(f"'{run.name}/", f"'{run}/"), space)  # the card names the run folder, not its path
    ways = {"load_vit": tinymim.load_vit(run, **choice),
            "timm local-dir": timm.create_model(f"local-dir:{out}", pretrained=True).eval(),
            "model card's plain timm": space["model"],
            "tinymim knn": knn_features(monkeypatch, run, tmp_path, **choice)}
    if not choice:
        ways["load_trained"] = tinymim.load_trained(run).model
    try:
        import onnxruntime as ort
    except ImportError:
        return ways
    from tinymim.evaluate.export import export_onnx

    onnx = out.with_suffix(".onnx")
    export_onnx(run, onnx, **choice)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    ways["onnx"] = lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    return ways


ENCODER_CHOICES = [{}, {"features": "final"}, {"features": "relation-input"}, {"pool": "token"},
                   {"features": "final", "pool": "token"}, {"features": "relation-input", "pool": "token"}]


@pytest.mark.slow  # four tiny runs, a dozen exports
@pytest.mark.parametrize("task,choice", [*(("distill", c) for c in ENCODER_CHOICES),
                                         ("mae", {}), ("mae", {"pool": "token"}),
                                         ("mae", {"features": "relation-input"}),
                                         ("finetune", {}), ("linprobe", {})])
def test_every_way_out_gives_the_same_features(runs, task, choice, tmp_path, monkeypatch):
    default = {"distill": "relation-input", "mae": "final"}.get(task, "final")
    features = choice.get("features", default)
    if features == "auto":
        features = default
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for way, model in every_way(runs, task, tmp_path, monkeypatch, **choice).items():
            got = model(x)
            # tinymim knn scores a classifier by its pre-logits: what its export gives with num_classes=0
            pre_logits = way == "tinymim knn" and task in ("finetune", "linprobe")
            expected = by_hand(runs / task, features, choice.get("pool", "avg"), pre_logits)(x)
            assert got.shape == expected.shape, way
            assert torch.allclose(got, expected, atol=1e-4), (way, (got - expected).abs().max().item())


@pytest.mark.slow
def test_distilled_default_comes_from_trained_parts_and_says_what_it_left_out(runs, tmp_path, caplog):
    """The relation-only student: its last block's attention projection and MLP and its final norm never
    trained (frozen during distillation), so the default features stop before that block, as its k-NN
    monitor did; the export says so in one line, and names what --features final would pass through."""
    from tinymim.cli import main

    trained = tinymim.load_trained(runs / "distill")
    assert trained.features == "relation-input"
    written = load_file(str(trained.weights))  # load_trained keeps the whole student
    assert set(trained.model.state_dict()) == set(written)
    with caplog.at_level("INFO"):
        assert main(["export", str(runs / "distill"), "--output", str(tmp_path / "default")]) == 0
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features:")]
    assert notes == ["features: the tokens entering the last block, which distillation trained; left out, as never "
                     "trained: block 2's attention projection, block 2's MLP and the final norm (--features final "
                     "keeps the whole student, e.g. to fine-tune it elsewhere)"]
    config = json.loads((tmp_path / "default" / "config.json").read_text())
    assert config["model_args"]["depth"] == 1 and config["model_args"]["final_norm"] is False
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["export", str(runs / "distill"), "--output", str(tmp_path / "final"), "--features", "final"]) == 0
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features:")]
    assert len(notes) == 1 and "pass through block 2's attention projection" in notes[0]
    assert "--features relation-input" in notes[0]
    card = (tmp_path / "final" / "README.md").read_text()
    assert "these were never trained, and the features pass through them" in card
    assert tinymim.load_trained(runs / "mae").features == "final"  # MAE trains every part


@pytest.mark.parametrize("targets,untrained", [
    (["loss.relation.weight=1"], ["attention projection", "MLP", "final norm"]),
    (["loss.relation.weight=0", "loss.feature.weight=1", "loss.feature.site=attn"], ["MLP", "final norm"]),
    (["loss.relation.weight=1", "loss.class_token.weight=1"], ["final norm"]),
    (["loss.relation.weight=0", "loss.feature.weight=1", "loss.feature.site=block"], ["final norm"]),
    (["loss.relation.weight=1", "mask_ratio=0.5", "loss.mae.weight=1", "loss.mae.decoder.embed_dim=16",
      "loss.mae.decoder.depth=1", "loss.mae.decoder.num_heads=2"], []),
])
def test_untrained_parts_are_the_parts_distillation_freezes(targets, untrained):
    """untrained_parts (what the export reports and the default features leave out) against the distill
    task itself: the student's parameters it never hands the optimizer."""
    from conftest import SMALL_DISTILL

    from tinymim.models.features import untrained_parts

    cfg = tinymim.load_config("distill", None, [*SMALL_DISTILL, *targets])
    student = tasks.build_task("distill", cfg).get_trainable_module().vit
    frozen = {name.rsplit(".", 1)[0] for name, p in student.named_parameters() if not p.requires_grad}
    names = {"attention projection": "blocks.1.attn.proj", "MLP": "blocks.1.mlp.fc1", "final norm": "norm"}
    assert {part for part, module in names.items() if module in frozen} == set(untrained)
    reported = untrained_parts(cfg.loss, 2)
    assert [part for part in names if any(part in r for r in reported)] == untrained


@pytest.mark.slow
def test_model_card_and_config_hold_no_local_paths(runs, tmp_path):
    """The export is meant for the hub: the teacher and init a run was made from appear by name."""
    from tinymim.evaluate.export import export_timm

    for task in ("distill", "finetune", "linprobe"):
        out = export_timm(runs / task, tmp_path / task)
        for name in ("README.md", "config.json"):
            text = (out / name).read_text()
            assert str(runs) not in text and str(tmp_path) not in text, (task, name)
    card = (tmp_path / "distill" / "README.md").read_text()
    assert "from mae;" in card  # the teacher: the MAE run's folder name
    assert "| initialized from | distill |" in (tmp_path / "finetune" / "README.md").read_text()
    assert "BatchNorm without affine (folded into the head)" in (tmp_path / "linprobe" / "README.md").read_text()


@pytest.mark.slow
def test_choices_that_do_not_apply_are_refused_in_one_line(runs, tmp_path, capsys):
    """--features on a classifier, --block with --features in tinymim knn: one line naming the fix,
    nothing written."""
    from tinymim.cli import main

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
    cases = [
        (["export", str(runs / "finetune"), "--output", str(tmp_path / "out"), "--features", "relation-input"],
         "is a fine-tuned classifier: --features applies to pre-trained encoders"),
        (["export", str(runs / "linprobe"), "--output", str(tmp_path / "out"), "--features", "final"], None),
        (["knn", str(runs / "distill"), "--data", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
          "--block", "2", "--features", "final"], "--block takes the mean patch token entering that block"),
    ]
    for args, message in cases:
        capsys.readouterr()
        if message is None:  # a probe's only features are its pre-logits: "final" is what it exports anyway
            assert main(args) == 0
            continue
        assert main(args) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]
