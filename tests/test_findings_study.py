"""benchmarks/experiments/findings.py: each finding's arms differ from the default arm only in the setting the
finding is about (planned configs compared key by key), and the verdict rule."""
import argparse

import pytest
from conftest import SHARED_TEACHERS

from tinymim.core.config import diff_configs
from tinymim.pipeline.planning import PipelineConfig, plan

TEACHER = SHARED_TEACHERS / "cifar10_mae_vit192x6"


# arm -> the only config keys (dotted prefixes) in which it may differ from the default arm
EXPECTED = {
    "feature": {"loss.relation.weight", "loss.feature.weight", "loss.feature.site"},
    "class_token": {"loss.relation.weight", "loss.class_token.weight"},
    "block5": {"teacher.target_block"}, "block4": {"teacher.target_block"},
    "masked": {"mask_ratio"}, "masked_mae": {"mask_ratio", "loss.mae.weight"},
    "student_dp0": {"student.drop_path_rate"}, "teacher_dp01": {"teacher.drop_path_rate"},
    "sequential": {"teacher.checkpoint", "teacher.model.embed_dim", "teacher.model.num_heads",
                   "teacher.relation_heads"},
}


@pytest.mark.slow  # the shared teacher
def test_each_arm_differs_from_the_default_arm_only_in_its_setting(tmp_path, benchmark_module):
    if not (TEACHER / "config.yaml").is_file():
        pytest.skip(f"the shared teacher is not present: {TEACHER}")
    findings = benchmark_module("findings")
    args = argparse.Namespace(teacher=TEACHER, seeds=[0], small=[48, 4, 2], medium=[96, 6, 3], pretrain_images=100,
                              pretrain_epochs=1, finetune_images=100, finetune_epochs=1, test=tmp_path / "test")
    stages = findings.study(args, tmp_path / "train")
    configs = {s.name: c for s, _, c in plan(PipelineConfig(overrides=["data.name=folder", f"data.root={tmp_path}"],
                                                            stages=stages), tmp_path / "out")}
    assert set(EXPECTED) | {"relation"} == set(findings.ARMS)
    for arm, allowed in EXPECTED.items():
        changed = set(diff_configs(configs["relation_s0"], configs[f"{arm}_s0"]))
        assert changed and changed <= allowed, (arm, changed)
    # findings 1 and 6 are fine-tuned alike: only the init differs
    for arm in ("feature", "class_token", "sequential"):
        changed = set(diff_configs(configs["finetune_relation_s0"], configs[f"finetune_{arm}_s0"]))
        assert changed == {"init"}, (arm, changed)
    # every arm a finding names exists
    for _, _, _, pairs, _, _ in findings.FINDINGS:
        assert all(a in findings.ARMS for pair in pairs for a in pair)


def test_verdict_uses_twice_the_standard_error_of_the_difference(benchmark_module):
    verdict = benchmark_module("findings").verdict
    assert verdict([2.0, 2.1, 1.9], [1.0, 1.1, 0.9])[0] == "yes"
    assert verdict([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])[0] == "no"
    # gap 0.1, s.e. sqrt(2 * 0.01 / 3) = 0.0816: 2 s.e. 0.163 > 0.1
    v, gap, se = verdict([1.1, 1.2, 1.0], [1.0, 1.1, 0.9])
    assert v == "within noise" and gap == pytest.approx(0.1) and se == pytest.approx((2 * 0.01 / 3) ** 0.5)
