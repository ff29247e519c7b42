"""Optional trackers beside metrics.jsonl: an MLflow file store and an offline W&B run each record the
losses of a micro distillation, step for step (read back from their own files)."""
import glob
import json
import os
import struct
from pathlib import Path

import pytest
from conftest import MICRO_DISTILL, with_overrides

from tinymim.core.rundir import RunDir
from tinymim.tasks import load_config, run

MICRO = with_overrides(MICRO_DISTILL, "data.synthetic_size=64", "train.max_steps=6", "train.log_every=1")


def jsonl_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunDir(run_dir).read_metrics() if "loss" in r}


def wandb_history(path: str) -> list[dict]:
    """History records of a .wandb file: LevelDB-log blocks of 32 KiB after a 7-byte W&B header, each
    chunk with a 7-byte header (crc, length, type), protobuf Records inside."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks, out = Path(path).read_bytes(), 7, [], []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += room
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                out.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return out


def test_mlflow_file_store_records_the_losses(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    out = tmp_path / "run"
    run("distill", load_config("distill", None, [*MICRO, "train.loggers=[mlflow]"]), out)
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run_id = (out / "mlflow_run_id").read_text().strip()
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == pytest.approx(jsonl_losses(out)) and len(history) == 6
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.data.params["teacher.target_block"] == "2"


@pytest.mark.slow  # W&B starts its service process
def test_wandb_offline_run_records_the_losses(tmp_path):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    out = tmp_path / "run"
    run("distill", load_config("distill", None, [*MICRO, "train.loggers=[wandb]"]), out)
    files = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    history = {h["_step"]: h["loss"] for h in wandb_history(files[0]) if "loss" in h}
    assert history == pytest.approx(jsonl_losses(out)) and len(history) == 6


def test_unknown_or_missing_logger_is_a_config_error():
    from tinymim.core.config import ConfigError

    with pytest.raises(ConfigError, match="unknown logger"):
        load_config("distill", None, [*MICRO, "train.loggers=[comet]"])
