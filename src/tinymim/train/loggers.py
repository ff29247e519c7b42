"""Where a run's metrics go: always RUN_DIR/metrics.jsonl, and on request TensorBoard, Weights & Biases
and MLflow (`train.loggers`, each an optional extra). Only the main process logs.

- W&B: `train.wandb_mode` offline by default (RUN_DIR/wandb, `wandb sync` uploads it later) or online;
  the W&B run id is derived from the run directory, so a resumed run continues the same W&B run. W&B's
  service process writes the offline run's file (run-ID.wandb): it holds every record once the service has
  closed the run, which it does on its own shortly after run.finish() returns and at the latest when the
  process ends (wandb.teardown, W&B's exit hook, waits for it); read or sync it after that.
- MLflow: the tracking URI `train.mlflow_uri`, by default a file store in RUN_DIR/mlruns; the MLflow run
  id is kept in RUN_DIR/mlflow_run_id, so a resumed run continues it.

Closed while an error propagates (the engine closes them in a `finally`), the trackers record how the run
ended: W&B gets the exit status the command will have (75 for a stop to resume, 130 for Ctrl-C, else 1;
W&B shows the run as failed), MLflow the status KILLED (stopped) or FAILED; a run that completes, 0 and
FINISHED.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request

from tinymim.core.config import ConfigError
from tinymim.core.errors import TinymimError
from tinymim.core.files import write_error, write_text
from tinymim.core.rundir import RunDir

LOGGERS = ("tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
             "mlflow": ("mlflow", "mlflow")}  # logger -> (module to import, extra to install)


def check_available(loggers) -> None:
    """Config-time check that the requested loggers' packages are installed."""
    for name in loggers:
        module, extra = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.loggers has {name}, which needs its package: pip install 'tinymim[{extra}]'")


def _ending() -> tuple[int, bool]:
    """(exit status, stopped on request) of the run being closed: (0, False), or while an exception
    propagates (a `finally`), the status the command line will exit with for it."""
    e = sys.exc_info()[1]
    if e is None:
        return 0, False
    if isinstance(e, KeyboardInterrupt):
        return 130, True
    code = int(getattr(e, "exit_code", 1) or 1)
    return code, code != 1  # a TinymimError with its own status (Preempted: 75) is a requested stop


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class _TensorBoard:
    def __init__(self, run: RunDir, config: dict, cfg):
        from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency (tinymim[tensorboard])

        self.writer = SummaryWriter(str(run.path / "tensorboard"))

    def log(self, record: dict) -> None:
        for k, v in _scalars(record).items():
            if k != "epoch":
                self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run: RunDir, config: dict, cfg):
        import wandb  # lazy: optional dependency (tinymim[wandb])

        run_id = hashlib.sha1(str(run.path.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=cfg.wandb_project, name=run.path.name, id=run_id, resume="allow",
                              dir=str(run.path), mode=cfg.wandb_mode, config=config,
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, record: dict) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish(exit_code=_ending()[0])


class _MLflow:
    def __init__(self, run: RunDir, config: dict, cfg):
        from mlflow.tracking import MlflowClient  # lazy: optional dependency (tinymim[mlflow])

        uri = cfg.mlflow_uri or (run.path / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps file stores in maintenance and asks for this opt-in; offline runs need one
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        id_file = run.path / "mlflow_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
        else:
            experiment = self.client.get_experiment_by_name(cfg.mlflow_experiment)
            experiment_id = (experiment.experiment_id if experiment else
                             self.client.create_experiment(cfg.mlflow_experiment))
            self.run_id = self.client.create_run(experiment_id, run_name=run.path.name).info.run_id
            for key, value in _flatten(config).items():
                self.client.log_param(self.run_id, key, json.dumps(value)[:500])
            write_text(id_file, self.run_id + "\n")
        if self.client.get_run(self.run_id).info.status != "RUNNING":  # resumed: running again
            self.client.update_run(self.run_id, status="RUNNING")

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric  # lazy: optional dependency (tinymim[mlflow])

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, record["step"]) for k, v in _scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        code, stopped = _ending()
        self.client.set_terminated(self.run_id, status="FINISHED" if code == 0 else "KILLED" if stopped else "FAILED")


def preflight(cfg) -> None:
    """What can be checked of the trackers before the run writes anything: the MLflow server answers."""
    if "mlflow" in cfg.loggers and (cfg.mlflow_uri or "").startswith(("http://", "https://")):
        _reachable(cfg.mlflow_uri)


def _reachable(uri: str) -> None:
    """A server that does not answer is said at once (MLflow's client retries for minutes)."""
    try:
        urllib.request.urlopen(uri, timeout=10).close()
    except urllib.error.HTTPError:
        pass  # it answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackerError(f"the MLflow server {uri} (train.mlflow_uri) does not answer ({reason}); start it or "
                           "fix the URI, or leave train.mlflow_uri unset for a file store in the run directory") from e


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}
_SETTINGS = {"tensorboard": "the tensorboard install", "wandb": "train.wandb_mode / wandb_project or your W&B login",
             "mlflow": "train.mlflow_uri / mlflow_experiment"}
log = logging.getLogger(__name__)


class TrackerError(TinymimError):
    """A tracker (train.loggers) that cannot start; metrics.jsonl does not need it."""


def _first_line(e: BaseException) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text}"[:300]


class MetricsLogger:
    """metrics.jsonl (one JSON record per line) plus the configured trackers, on the main process."""

    def __init__(self, run: RunDir, enabled: bool, cfg, config: dict | None = None):
        self.enabled, self.path, self.file, self.backends = enabled, run.metrics, None, []
        if not enabled:
            return
        try:
            self.file = open(run.metrics, "a")
        except OSError as e:
            raise write_error(e, run.metrics) from e
        names = list(dict.fromkeys([*(["tensorboard"] if cfg.tensorboard else []), *cfg.loggers]))
        check_available(names)
        self.backends = []
        for name in names:
            try:
                self.backends.append((name, _BACKENDS[name](run, config or {}, cfg)))
            except TinymimError:
                raise
            except Exception as e:  # noqa: BLE001 - a tracker's own failure (server, credentials), said in one line
                raise TrackerError(f"train.loggers: {name} could not start ({_first_line(e)}); fix "
                                   f"{_SETTINGS[name]}, or drop {name} from train.loggers: metrics.jsonl is "
                                   "written without it") from e

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        try:  # one line per write: a kill leaves at most a partial last line, which readers skip
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            raise write_error(e, self.path) from e
        for name, backend in list(self.backends):
            try:
                backend.log(record)
            except Exception as e:  # noqa: BLE001 - a tracker that fails mid-run must not end the run
                log.warning("%s stopped taking metrics (%s); it is dropped for the rest of the run, metrics.jsonl "
                            "keeps every record", name, _first_line(e))
                self.backends.remove((name, backend))

    def close(self) -> None:
        if self.file:
            with contextlib.suppress(OSError):  # a full disk: the error was reported by log()
                self.file.close()
        for name, backend in self.backends:
            try:
                backend.close()
            except Exception as e:  # noqa: BLE001 - the metrics are in metrics.jsonl already
                log.warning("%s did not close cleanly (%s)", name, _first_line(e))



