"""TensorBoard HParams for a sweep: the sweep directory is one logdir whose HParams dashboard compares its runs.

`SummaryWriter.add_hparams` writes into a NEW sub-run (a timestamped folder), so every run would appear
twice. Instead, with the hparams plugin's own summary API (tensorboard.plugins.hparams.summary):
- each run's own `tb/` directory (where the trainer writes its scalars) gets a session start (the run's
  hyper-parameters), final scalars `final/<metric>` and `final/train_loss`, and a session end (its status);
- the sweep directory itself gets ONE experiment summary (every hyper-parameter with its grid values and the
  metrics), replaced atomically whenever the sweep is (re)submitted.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from harness.core.status import COMPLETED, DIVERGED

EXPERIMENT_FILE = "events.out.tfevents.sweep-hparams"
SESSION_FILE = "events.out.tfevents.session-hparams"


def _writer(directory: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(directory))


def _value(v):
    if v is None or isinstance(v, bool) or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return str(v)


def metric_tags(test_metric: str) -> list[str]:
    return [f"final/{test_metric}", "final/train_loss", "final/diverged"]


def _write_events(directory: Path, name: str, fill) -> None:
    """Write one events file with `fill(writer)` and move it into `directory` as `name`, atomically
    (a rewrite replaces the old file instead of adding a second session or experiment)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hparams-", dir=directory))
    try:
        writer = _writer(tmp)
        fill(writer)
        writer.close()
        (event,) = tmp.glob("events.out.tfevents.*")
        os.replace(event, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _summary(tag: str, **plugin_data):
    """A Summary holding HParamsPluginData, built from the plugin's protos (its summary module needs TensorFlow)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(**plugin_data)
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(content))])


def write_experiment(sweep_dir: Path, domains: dict[str, list], test_metric: str, description: str = "") -> None:
    """The sweep's experiment summary: hyper-parameters with their discrete domains, and the final metrics."""
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata

    infos = []
    for name, values in domains.items():
        values = list(dict.fromkeys(_value(v) for v in values if v is not None))
        if not values:
            continue
        if all(isinstance(v, bool) for v in values):
            kind, pb = "DATA_TYPE_BOOL", [struct_pb2.Value(bool_value=v) for v in values]
        elif all(isinstance(v, float) for v in values):
            kind, pb = "DATA_TYPE_FLOAT64", [struct_pb2.Value(number_value=v) for v in values]
        else:
            kind, pb = "DATA_TYPE_STRING", [struct_pb2.Value(string_value=str(v)) for v in values]
        infos.append(api_pb2.HParamInfo(name=name, type=api_pb2.DataType.Value(kind),
                                        domain_discrete=struct_pb2.ListValue(values=pb)))
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=tag.split("/", 1)[1])
               for tag in metric_tags(test_metric)]
    summary = _summary(metadata.EXPERIMENT_TAG, experiment=api_pb2.Experiment(
        description=description, time_created_secs=time.time(), hparam_infos=infos, metric_infos=metrics))
    _write_events(Path(sweep_dir), EXPERIMENT_FILE, lambda w: w._get_file_writer().add_summary(summary))


def write_session(run_dir: Path, hparams: dict, result: dict) -> None:
    """One run's session (hyper-parameters, final metrics, status) into its own tb/ directory."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for k, v in hparams.items():
        v = _value(v)
        if isinstance(v, bool):
            start.hparams[k].bool_value = v
        elif isinstance(v, float):
            start.hparams[k].number_value = v
        elif v is not None:
            start.hparams[k].string_value = str(v)
    step = int(result.get("steps") or 0)
    metric = result.get("test_metric")
    status = "STATUS_SUCCESS" if result.get("status") == COMPLETED else "STATUS_FAILURE"

    def fill(writer):
        fw = writer._get_file_writer()
        fw.add_summary(_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start), step)
        for tag, value in ((f"final/{metric}", result.get(metric)), ("final/train_loss", result.get("train_loss")),
                           ("final/diverged", 1.0 if result.get("status") == DIVERGED else 0.0)):
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(tag, value, step)
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(status), end_time_secs=time.time())
        fw.add_summary(_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end), step)

    _write_events(Path(run_dir) / "tb", SESSION_FILE, fill)
