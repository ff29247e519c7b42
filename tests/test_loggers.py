"""Optional trackers beside metrics.jsonl: an MLflow file store and an offline W&B run each record the
losses of a micro distillation, step for step (read back from their own files), and how a run ended."""
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


def wandb_records(path: str) -> list:
    """The protobuf Records of a .wandb file: LevelDB-log blocks of 32 KiB after a 7-byte W&B header, each
    chunk with a 7-byte header (crc, length, type)."""
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
            out.append(record)
    return out


def wandb_history(path: str) -> list[dict]:
    """The history records of a .wandb file, as key -> value."""
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]


def wandb_exit_codes(path: str) -> list[int]:
    return [r.exit.exit_code for r in wandb_records(path) if r.WhichOneof("record_type") == "exit"]


def finished_wandb_file(run_dir: Path) -> str:
    """The offline run's .wandb file, complete: W&B's service process writes it out when it closes the run,
    shortly after run.finish() returns (later on a busy machine: read at once, the file held its 7-byte
    header alone 2 times in 15 with both cores busy). wandb.teardown() waits for the service to end, as
    W&B's exit hook does when a tinymim command exits; a new wandb.init starts a new service."""
    import wandb

    wandb.teardown()
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


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
    path = finished_wandb_file(out)
    history = {h["_step"]: h["loss"] for h in wandb_history(path) if "loss" in h}
    assert history == pytest.approx(jsonl_losses(out)) and len(history) == 6
    assert wandb_exit_codes(path) == [0]  # finished


def test_unknown_or_missing_logger_is_a_config_error():
    from tinymim.core.config import ConfigError

    with pytest.raises(ConfigError, match="unknown logger"):
        load_config("distill", None, [*MICRO, "train.loggers=[comet]"])


def _close_while_raising(logger, error: BaseException) -> None:
    """Close `logger` as the engine's `finally` does while `error` propagates."""
    try:
        try:
            raise error
        finally:
            logger.close()
    except type(error):
        pass


@pytest.mark.slow  # W&B starts its service process
def test_a_stopped_or_failed_run_is_not_recorded_as_finished(tmp_path):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    from tinymim.core.preempt import Preempted
    from tinymim.train.config import TrainConfig
    from tinymim.train.loggers import MetricsLogger

    cfg = TrainConfig(loggers=["wandb"])
    codes = {}
    for name, error in (("stopped", Preempted("stopped on SIGTERM")), ("failed", RuntimeError("a bug")),
                        ("interrupted", KeyboardInterrupt())):
        (tmp_path / name).mkdir()
        logger = MetricsLogger(RunDir(tmp_path / name), True, cfg, {})
        logger.log({"step": 1, "loss": 0.5})
        _close_while_raising(logger, error)
        codes[name] = wandb_exit_codes(finished_wandb_file(tmp_path / name))
    assert codes == {"stopped": [75], "failed": [1], "interrupted": [130]}  # the command's exit status


def test_mlflow_records_a_stopped_run_as_killed_and_running_again_when_resumed(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    from tinymim.core.preempt import Preempted
    from tinymim.train.config import TrainConfig
    from tinymim.train.loggers import MetricsLogger

    cfg, run_dir = TrainConfig(loggers=["mlflow"]), RunDir(tmp_path)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    logger = MetricsLogger(run_dir, True, cfg, {})
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()

    def status() -> str:
        return client.get_run(run_id).info.status

    _close_while_raising(logger, Preempted("stopped on SIGTERM"))
    assert status() == "KILLED"
    logger = MetricsLogger(run_dir, True, cfg, {})  # resumed
    assert status() == "RUNNING"
    _close_while_raising(logger, RuntimeError("a bug"))
    assert status() == "FAILED"
    MetricsLogger(run_dir, True, cfg, {}).close()
    assert status() == "FINISHED"
