"""--mlflow: a command's facts reach MLflow (checked against a stand-in module that records
the calls), a missing mlflow stops the command before it runs, and payloads flatten right."""
from __future__ import annotations

import sys
import types

from lowbit.mlflow_log import flat_metrics


def test_payloads_flatten_to_metrics_and_epoch_series():
    payload = {"float_top1": 0.9173, "model": "resnet20", "full_test_split": True, "bad": float("nan"),
               "results": [{"recipe": "w4a4", "top1": 89.6, "drop_pt": 2.1, "quant_s": 4.0}],
               "history": [{"epoch": 1, "train_loss": 0.5, "val_top1": 97.7}, {"epoch": 2, "train_loss": 0.4}]}
    metrics, series = flat_metrics(payload)
    assert metrics == {"float_top1": 0.9173, "w4a4.top1": 89.6, "w4a4.drop_pt": 2.1, "w4a4.quant_s": 4.0}
    assert series == [("train_loss", 0.5, 1), ("val_top1", 97.7, 1), ("train_loss", 0.4, 2)]
    assert flat_metrics(None) == ({}, [])


class _Recorder(types.ModuleType):
    """Stands in for the mlflow package: records what lowbit calls."""

    def __init__(self):
        super().__init__("mlflow")
        self.calls = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        recorder = self

        def call(*args, **kwargs):
            recorder.calls.append((name, args, kwargs))
        return call

    def start_run(self, **kwargs):
        self.calls.append(("start_run", (), kwargs))
        return _Ctx(types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1")))


class _Ctx:
    def __init__(self, run):
        self.run = run

    def __enter__(self):
        return self.run

    def __exit__(self, *exc):
        return False


def test_a_command_is_logged_to_mlflow(monkeypatch, tmp_path, capsys, data_dir, models_dir):
    from lowbit.cli import main

    fake = _Recorder()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    out = tmp_path / "e.json"
    assert main(["eval", "--test-limit", "100", "--data-dir", str(data_dir), "--models-dir", str(models_dir),
                 "--no-download", "--no-progress", "--json", str(out), "--mlflow", "file:///somewhere"]) == 0
    assert "logged to MLflow (file:///somewhere) as run r1" in capsys.readouterr().err
    called = {name: (args, kwargs) for name, args, kwargs in fake.calls}
    assert called["set_tracking_uri"][0] == ("file:///somewhere",)
    assert called["set_tags"][0][0]["lowbit.status"] == "done"
    assert called["log_params"][0][0]["model"] == "resnet20"
    logged = called["log_metrics"][0][0]
    assert 0.8 < logged["top1"] <= 1.0 and logged["wall_seconds"] > 0
    assert called["log_artifact"][0] == (str(out),)


def test_without_mlflow_the_command_stops_before_it_runs(monkeypatch, tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.registry import Registry

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    reg = tmp_path / "r.sqlite3"
    Registry(reg).close()
    assert main(["eval", "--registry", str(reg), "--mlflow", "file:///x", "--no-download"]) == 2
    assert "--mlflow needs the mlflow package: pip install mlflow" in capsys.readouterr().err
    assert Registry(reg).list() == []  # stopped at the door: no run was started


def test_a_tracking_server_that_refuses_is_named_and_the_run_stays_done(monkeypatch, tmp_path, capsys, data_dir,
                                                                       models_dir):
    from lowbit.cli import main
    from lowbit.registry import Registry

    fake = _Recorder()

    def refuse(uri):
        raise RuntimeError("store is in maintenance mode")
    fake.set_tracking_uri = refuse
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    reg = tmp_path / "r.sqlite3"
    assert main(["eval", "--test-limit", "50", "--data-dir", str(data_dir), "--models-dir", str(models_dir),
                 "--no-download", "--no-progress", "--registry", str(reg), "--mlflow", "file:///y"]) == 2
    err = capsys.readouterr().err
    assert "MLflow at file:///y did not take the run (RuntimeError: store is in maintenance mode)" in err
    assert "the command itself finished" in err
    assert [r["status"] for r in Registry(reg).list()] == ["done"]


def test_metric_names_are_ones_mlflow_takes_and_bench_rows_are_keyed_by_engine_and_runtime():
    """A composed or planned recipe's '+' (and a bench engine's '|') would make MLflow refuse
    the whole batch; bench rows have no recipe, and were dropped."""
    import re

    valid = re.compile(r"^[/\w.\- ]*$")  # MLflow's name rule (2.x adds ':')
    payload = {"float_top1": 0.9173, "results": [{"recipe": "w3a3+adaquant", "top1": 85.1},
                                                 {"recipe": "w4a4+plan:v2", "top1": 90.0}]}
    metrics, _ = flat_metrics(payload)
    assert metrics == {"float_top1": 0.9173, "w3a3_adaquant.top1": 85.1, "w4a4_plan_v2.top1": 90.0}
    bench = {"threads": 1, "rows": [{"engine": "float", "runtime": "ort", "top1": 91.7, "latency_b1_ms": 1.5},
                                    {"engine": "lowbit w8a8+gptq", "runtime": "openvino", "top1": 91.6,
                                     "file_kb": None}]}
    metrics, _ = flat_metrics(bench)
    assert metrics == {"threads": 1.0, "float_ort.top1": 91.7, "float_ort.latency_b1_ms": 1.5,
                       "lowbit w8a8_gptq_openvino.top1": 91.6}
    assert all(valid.match(k) for k in metrics)
