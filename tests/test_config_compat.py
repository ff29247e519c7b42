"""Runs stored before tinymim gained a config key are the same runs: resumed and reused, not retrained."""
import pytest
import yaml

from tinymim.core.config import ConfigError, diff_configs
from tinymim.core.rundir import RunDir


def test_keys_added_since_a_run_are_no_difference(tmp_path):
    stored = {"model": {"name": "vit_custom", "depth": 4}, "train": {"lr": 1e-3}}
    now = {"model": {"name": "vit_custom", "depth": 4, "dist_token": False}, "train": {"lr": 1e-3},
           "distillation": {"teacher": None}}
    assert diff_configs(stored, now) == {"distillation": (None, {"teacher": None}), "model.dist_token": (None, False)}
    assert diff_configs(stored, now, new_keys_ok=True) == {}
    run = RunDir(tmp_path)
    run.config.write_text(yaml.safe_dump(stored))
    run.check_config(now)  # resumes
    with pytest.raises(ConfigError, match="model.depth"):  # a real change still stops it
        run.check_config({**now, "model": {**now["model"], "depth": 6}})
    with pytest.raises(ConfigError, match="another kind of run"):  # a section the new config lacks
        run.check_config({"model": now["model"]})
