"""Defects a review of the HTML report, --mlflow, the run registry and the Python API found
(each test fails on the code before its fix)."""
from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.registry import Registry
from lowbit.report.sources import ReportInputs, add_payload, add_run, collect
from lowbit.zoo import build, save_weights, trained_here_path
from tests.test_mlflow_log import _Recorder


class _Mlflow(_Recorder):
    """Stands in for the mlflow package (not a dependency): records every call, and reads them back by name."""

    def called(self, name: str) -> list[tuple]:
        return [args for n, args, _ in self.calls if n == name]


@pytest.fixture
def fake_mlflow(monkeypatch) -> _Mlflow:
    fake = _Mlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    return fake


@pytest.fixture
def fashion(tmp_path, monkeypatch, data_dir):
    """A scratch cache holding a small_cnn_fashion float baseline (seed 0, untrained: fast), and
    the CLI options every command here shares."""
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    save_weights(build("small_cnn_fashion"), trained_here_path("small_cnn_fashion"))
    return ["--model", "small_cnn_fashion", "--data-dir", str(data_dir), "--no-progress", "--no-download",
            "--threads", "1"]


def _artifact(path: Path, metrics: dict) -> Path:
    """A small_cnn_fashion w8a8 .lowbit file with the given saved metrics (random weights: no data needed)."""
    torch.manual_seed(1)
    qm = lowbit.quantize(build("small_cnn_fashion").eval(), "w8a8", calib=torch.randn(64, 1, 28, 28), progress=False)
    return lowbit.save(qm, path, metrics=metrics)


def _accuracy_rows(inputs: ReportInputs) -> list[tuple]:
    return [(a["label"], a["top1"], a["float_top1"]) for a in inputs.accuracy]


# 1. `lowbit report -o LINK` replaced the link (and /dev/stdout) with a regular file
def test_report_out_writes_through_a_symlink(tmp_path, capsys):
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"model": "x", "results": [{"recipe": "w8a8", "top1": 91.0, "float": 91.5}]}))
    (tmp_path / "published").mkdir()
    target = tmp_path / "published" / "report.html"
    target.write_text("old")
    link = tmp_path / "latest.html"
    link.symlink_to(target)
    assert main(["report", str(q), "-o", str(link)]) == 0
    assert link.is_symlink() and link.resolve() == target  # the link is kept ...
    assert target.read_text().startswith("<!DOCTYPE html>")  # ... and the page written where it points
    other = tmp_path / "api.html"
    other.symlink_to(target)
    lowbit.html_report([q], other, title="through")
    assert other.is_symlink() and "<title>through</title>" in target.read_text()


# 2. the report drew the zoo's weights for a run that quantized the user's --weights
def test_report_draws_the_float_weights_the_run_quantized(tmp_path, fashion, monkeypatch, capsys):
    import lowbit.report.html as H

    torch.manual_seed(7)
    mine = save_weights(build("small_cnn_fashion"), tmp_path / "mine.safetensors")  # not the cached baseline
    reg = tmp_path / "runs.sqlite3"
    assert main(["quantize", *fashion, "--weights", str(mine), "--recipe", "w8a8", "--test-limit", "50",
                 "--registry", str(reg)]) == 0
    run = Registry(reg).list()[0]
    drawn = []
    real = H.render
    monkeypatch.setattr(H, "render", lambda inputs, float_model=None, title=None:
                        drawn.append(float_model) or real(inputs, float_model, title))
    out = tmp_path / "r.html"
    report = ["report", str(run["id"]), "--registry", str(reg), "-o", str(out), "--no-download"]
    assert main(report) == 0
    expected = load_file(str(mine))
    assert all(torch.equal(t, expected[k]) for k, t in drawn[0].state_dict().items())
    assert run["weights"] == str(mine.resolve())
    # a run that did not record its weights file (made before the column): the zoo's weights are refused by name
    Registry(reg).update(run["id"], weights=None)
    capsys.readouterr()
    assert main(report) == 2
    err = capsys.readouterr().err
    assert "are not the float weights run 1" in err and run["model_fingerprint"] in err
    assert main([*report, "--weights", str(mine)]) == 0  # the same weights given by hand: accepted
    # the recorded file is gone: said so, not drawn from elsewhere
    Registry(reg).update(run["id"], weights=str(tmp_path / "gone.safetensors"))
    capsys.readouterr()
    assert main(report) == 2
    assert "which is no longer there" in capsys.readouterr().err


def test_a_registry_made_before_the_weights_column_gains_it(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, command TEXT NOT NULL, argv TEXT NOT NULL, "
               "model TEXT, recipe TEXT, dataset TEXT, model_fingerprint TEXT, data_fingerprint TEXT, "
               "status TEXT NOT NULL, started REAL NOT NULL, finished REAL, seconds REAL, metrics TEXT, "
               "artifacts TEXT, versions TEXT, error TEXT, pid INTEGER)")
    db.execute("INSERT INTO runs (command, argv, status, started) VALUES ('eval', '[]', 'done', 0)")
    db.commit()
    db.close()
    reg = Registry(path)
    assert reg.get(1)["weights"] is None  # the old row is read, the new column empty
    reg.update(1, weights="/w.safetensors")
    assert reg.get(1)["weights"] == "/w.safetensors"
    reg.close()
    Registry(path).close()  # opened again: the column is there, nothing to add


# 3. a --test-limit score read as if it were the full test split
def test_a_test_limit_score_says_so_wherever_it_was_written(tmp_path):
    inputs = ReportInputs()
    add_payload(inputs, {"rows": [{"recipe": "w4a4-lsq", "top1": 16.0, "float_top1": 13.7}],
                         "history": [{"epoch": 1, "train_loss": 1.0}], "full_test_split": False,
                         "test_images": 300}, "t.json")  # train --recipe --test-limit
    add_payload(inputs, {"search": {"method": "hawq", "budget_bits": 5, "plan": {"layers": {}, "meta": {}}, "path": []},
                         "evaluation": {"float_top1": 0.137, "test_images": 200, "full_test_split": False,
                                        "results": [{"recipe": "w4a8", "top1": 12.7, "float": 13.7}]}},
                "s.json")  # search --evaluate --test-limit: the facts sit under "evaluation"
    add_payload(inputs, {"rows": [{"recipe": "w4a4-lsq", "top1": 90.0, "float_top1": 91.0}],
                         "full_test_split": True, "test_images": 10000}, "full.json")
    notes = [a["note"] for a in inputs.accuracy]
    assert notes == ["t.json; first 300 test images, not the full split",
                     "s.json; first 200 test images, not the full split", "full.json"]
    # an artifact whose metrics do not say how many images scored it is not taken for the full split
    unknown = collect([str(_artifact(tmp_path / "u.lowbit", {"top1": 0.5, "float_top1": 0.6}))])
    assert unknown.accuracy[0]["note"].endswith("; test images: unknown")
    limited = collect([str(_artifact(tmp_path / "l.lowbit", {"top1": 0.5, "test_images": 30,
                                                             "full_test_split": False}))])
    assert limited.accuracy[0]["note"].endswith("first 30 test images, not the full split")


def test_cli_results_record_how_many_test_images_they_counted(tmp_path, fashion, capsys):
    """quantize --save's artifact and train's payload carry the test-split facts the report reads."""
    assert main(["quantize", *fashion, "--recipe", "w8a8", "--test-limit", "40", "--no-registry",
                 "--save", str(tmp_path / "q")]) == 0
    metrics = lowbit.load(tmp_path / "q" / "w8a8.lowbit").meta["metrics"]
    assert metrics["test_images"] == 40 and metrics["full_test_split"] is False
    out = tmp_path / "t.json"
    assert main(["train", *fashion, "--recipe", "w4a4-lsq", "--epochs", "1", "--train-limit", "96",
                 "--val-samples", "32", "--batch-size", "32", "--test-limit", "40", "--no-registry",
                 "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["test_images"] == 40 and payload["full_test_split"] is False
    inputs = collect([str(out)])
    assert inputs.accuracy[0]["note"].endswith("first 40 test images, not the full split")


def _small_cnn_analysis():
    """An untrained small CNN at W4A4 and lowbit.analyze's result on random images it labels itself."""
    torch.manual_seed(0)
    model = build("small_cnn").eval()
    x = torch.randn(96, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
    qm = lowbit.quantize(model, {"extends": "w4a4", "calibration": {"samples": 64, "batch_size": 32}}, calib=x[:64],
                         progress=False)
    result = lowbit.analyze(qm, [(x[64:], y[64:])], progress=False)
    return model, result


# 4. lowbit.analyze's result (LayerSensitivity objects) crashed html_report; json needs plain rows
def test_the_analyzers_result_goes_to_the_report_and_to_json(tmp_path):
    model, result = _small_cnn_analysis()
    out = lowbit.html_report(ReportInputs(analysis=result, sources=["api"]), tmp_path / "a.html")
    text = out.read_text()
    assert 'id="fig-analysis"' in text
    assert text.count("<tr>", text.index('id="table-analysis"')) == 1 + len(result["layers"])
    from lowbit.report.analyzer import analysis_payload

    assert json.loads(json.dumps(analysis_payload(result)))["layers"][0]["name"] == result["layers"][0].name


def test_html_report_takes_the_analyzers_result_as_it_is(tmp_path):
    """As the README says: `lowbit.html_report(result, ...)`, alone or beside other sources; anything that
    is neither a source nor an analysis is refused by name (a dict had been read as a run id, a list item
    as a file name)."""
    model, result = _small_cnn_analysis()
    for sources in (result, [result]):
        text = lowbit.html_report(sources, tmp_path / "a.html", model=model).read_text()
        table = text[text.index('id="table-analysis"'):]
        assert table[:table.index("</table>")].count("<tr>") == 1 + len(result["layers"])
    with pytest.raises(lowbit.LowbitError, match="shows one lowbit.analyze result, got 2"):
        lowbit.html_report([result, result], tmp_path / "b.html")
    with pytest.raises(lowbit.LowbitError, match="got float 1.5"):
        lowbit.html_report([1.5], tmp_path / "c.html")


# 5. train from scratch accepted --json, --test-limit and --mlflow and did nothing with them
def test_training_from_scratch_honours_json_test_limit_and_mlflow(tmp_path, fashion, fake_mlflow, monkeypatch,
                                                                   capsys):
    import lowbit.report.html as H

    reg, out, weights = tmp_path / "runs.sqlite3", tmp_path / "s.json", tmp_path / "w.safetensors"
    assert main(["train", *fashion, "--epochs", "1", "--train-limit", "64", "--test-limit", "30", "--out",
                 str(weights), "--json", str(out), "--registry", str(reg), "--mlflow", "file:///x"]) == 0
    assert "first 30 test images (NOT the full split)" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["test_images"] == 30 and payload["full_test_split"] is False and 0 <= payload["top1"] <= 1
    logged = fake_mlflow.called("log_metrics")[0][0]
    assert logged["top1"] == payload["top1"] and logged["test_images"] == 30
    # the run's report draws the weights it trained, not the zoo's baseline
    drawn = []
    real = H.render
    monkeypatch.setattr(H, "render", lambda inputs, float_model=None, title=None:
                        drawn.append((inputs, float_model)) or real(inputs, float_model, title))
    assert main(["report", "1", "--registry", str(reg), "-o", str(tmp_path / "r.html"), "--no-download"]) == 0
    inputs, model = drawn[0]
    trained = load_file(str(weights))
    assert all(torch.equal(t, trained[k]) for k, t in model.state_dict().items())
    assert _accuracy_rows(inputs) == [("small_cnn_fashion (float)", None, pytest.approx(100 * payload["top1"]))]


# 6. search --mlflow logged no results
def test_a_searchs_evaluation_and_plan_size_are_flattened():
    from lowbit.mlflow_log import flat_metrics

    payload = {"model": "m", "search": {"method": "hawq", "budget_bits": 1000, "calibrations": 3, "seconds": 2.0,
                                        "path": [], "plan": {"layers": {}, "meta": {"mean_w_bits": 5.97,
                                                                                    "weight_compression": 5.36}}},
               "evaluation": {"float_top1": 0.137, "test_images": 300, "full_test_split": False,
                              "results": [{"recipe": "w4a8", "top1": 12.67}, {"recipe": "w4a8+hawq", "top1": 14.0}]}}
    metrics, _ = flat_metrics(payload)
    assert metrics["float_top1"] == 0.137 and metrics["test_images"] == 300
    assert metrics["w4a8.top1"] == 12.67 and metrics["w4a8_hawq.top1"] == 14.0
    assert metrics["plan.mean_w_bits"] == 5.97 and metrics["plan.weight_compression"] == 5.36
    assert metrics["search.budget_bits"] == 1000


# 7. under torchrun every process made its own registry row and MLflow run
@pytest.mark.parametrize("rank, runs", [("1", 0), ("0", 1)])
def test_only_rank_zero_records_the_run(tmp_path, fashion, fake_mlflow, monkeypatch, capsys, rank, runs):
    monkeypatch.setenv("RANK", rank)
    reg = tmp_path / "runs.sqlite3"
    Registry(reg).close()
    assert main(["eval", *fashion, "--test-limit", "20", "--registry", str(reg), "--mlflow", "file:///x"]) == 0
    assert len(Registry(reg).list()) == runs
    assert len(fake_mlflow.called("start_run")) == runs


# 8. MLflow params: argparse's default model, no dataset, and eval's input file uploaded as an output
def test_mlflow_gets_the_model_and_dataset_the_command_resolved(tmp_path, fashion, fake_mlflow, capsys):
    art = _artifact(tmp_path / "m.lowbit", {"top1": 0.5})
    out = tmp_path / "e.json"
    assert main(["eval", "--lowbit", str(art), *fashion[2:], "--test-limit", "20", "--no-registry",
                 "--json", str(out), "--mlflow", "file:///x"]) == 0
    assert fake_mlflow.called("log_params")[0][0] == {"model": "small_cnn_fashion", "dataset": "fashion-mnist"}
    assert fake_mlflow.called("log_artifact") == [(str(out),)]  # the --json it wrote, not the .lowbit it read
    payload = json.loads(out.read_text())
    assert payload["deployed"] == "lowbit" and payload["arch"] == "small_cnn_fashion"


# 9. analyze logged its top-1s in %, quantize and eval as fractions, under the same key
def test_analyze_logs_its_top1s_as_fractions(fake_mlflow):
    from lowbit.mlflow_log import log_run

    payload = {"model": "m", "recipe": "w4a4", "float_top1": 99.0, "quantized_top1": 98.0, "weights_only_top1": 98.5,
               "activations_only_top1": 97.5, "images": 200, "layers": []}
    log_run("file:///x", "analyze", [], status="done", seconds=1.0, payload=payload, artifacts={}, params={})
    logged = fake_mlflow.called("log_metrics")[0][0]
    assert logged["float_top1"] == pytest.approx(0.99) and logged["quantized_top1"] == pytest.approx(0.98)
    assert logged["weights_only_top1"] == pytest.approx(0.985) and logged["images"] == 200
    log_run("file:///x", "quantize", [], status="done", seconds=1.0, payload={"float_top1": 0.9173}, artifacts={},
            params={})
    assert fake_mlflow.called("log_metrics")[1][0]["float_top1"] == 0.9173  # already a fraction: as it is


# 10. `lowbit eval` output was refused by the report
def test_eval_output_is_an_accuracy_row():
    inputs = ReportInputs()
    add_payload(inputs, {"model": "small_cnn_fashion", "dataset": "fashion-mnist", "top1": 0.125, "test_images": 200,
                         "full_test_split": False}, "e.json")
    add_payload(inputs, {"model": "/x/w8a8.lowbit", "dataset": "fashion-mnist", "top1": 0.12, "test_images": 200},
                "d.json")  # eval --lowbit, written before the "deployed" key: the file is its model
    assert _accuracy_rows(inputs) == [("small_cnn_fashion (float)", None, 12.5), ("/x/w8a8.lowbit", 12.0, None)]
    assert inputs.model == "small_cnn_fashion"  # a file path is not a model name
    assert inputs.accuracy[1]["note"] == "d.json; 200 test images (whether the full split: not recorded)"
    from lowbit.report.html import render

    assert 'id="fig-accuracy"' in render(inputs)


# 11. the same result twice: the run's row and its saved artifact's
def test_a_saved_result_is_shown_once(tmp_path):
    art = _artifact(tmp_path / "r18_model.lowbit", {"top1": 0.18214, "float_top1": 0.12777})
    inputs = ReportInputs()
    add_run(inputs, {"id": 1, "command": "train", "recipe": "w4a4-lsq", "status": "done", "model": "small_cnn_fashion",
                     "metrics": {"rows": [{"recipe": "w4a4-lsq", "top1": 18.21, "float_top1": 12.78}]},
                     "artifacts": {"save": str(art)}})
    assert [a["label"] for a in inputs.accuracy] == ["w4a4-lsq (QAT)"]
    assert inputs.layers  # the artifact still gives the layer table
    # a --json and the artifact it saved, given side by side: the rounded row and the exact one are one result
    q = tmp_path / "q.json"
    art = _artifact(tmp_path / "w8a8.lowbit", {"top1": 0.133333, "float_top1": 0.136667})
    q.write_text(json.dumps({"model": "small_cnn_fashion", "float_top1": 0.136667, "full_test_split": True,
                             "results": [{"recipe": "w8a8", "top1": 13.33, "float": 13.67}]}))
    assert [a["label"] for a in collect([str(q), str(art)]).accuracy] == ["w8a8"]


# 12. quantize(device=...) accepted and ignored for a recipe that does not train
def test_quantize_refuses_a_device_it_would_ignore():
    model = build("small_cnn").eval()
    with pytest.raises(LowbitError, match=r"no `qat` step: .* device='cuda' would be ignored"):
        lowbit.quantize(model, "w8a8", calib=torch.randn(8, 1, 28, 28), progress=False, device="cuda")
    with pytest.raises(LowbitError, match="'no-such-device' is not a device name torch knows"):
        lowbit.quantize(model, "w8a8", calib=torch.randn(8, 1, 28, 28), progress=False, device="no-such-device")


# 13. evaluate on a model whose output is not (N, classes): raw IndexError / AttributeError
class _OneD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        return self.fc(x).squeeze(1)


class _Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), self.fc(x)


@pytest.mark.parametrize("model, says", [(_OneD(), r"has shape \(8,\); evaluate needs class scores of shape \(8, "),
                                         (_Heads(), "is a tuple, not a tensor")])
def test_evaluate_names_an_output_it_cannot_count(model, says):
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with pytest.raises(LowbitError, match=says):
        lowbit.evaluate(model, [(x, y)])


# 14. html_report("q.json") read the name character by character; model="resnet20" a raw AttributeError
def test_html_report_takes_one_source_and_names_a_model_that_is_not_one(tmp_path):
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"model": "m", "float_top1": 0.9173, "results": [{"recipe": "w8a8", "top1": 91.6}]}))
    for source in (str(q), q):
        text = lowbit.html_report(source, tmp_path / "r.html").read_text()
        assert 'id="table-accuracy"' in text and str(q) in text
    with pytest.raises(LowbitError, match=r"\(a torch\.nn\.Module\), got str 'resnet20'"):
        lowbit.html_report([q], tmp_path / "r.html", model="resnet20")


# 15. edge values: an all-zero model, unescaped text, Infinity in a --json file
def test_report_edge_values_render(tmp_path):
    from lowbit.report.html import render

    zero = nn.Linear(4, 2)
    nn.init.zeros_(zero.weight)
    text = render(ReportInputs(sources=["x"]), zero)  # no layer has a σ to standardise by: no measured error
    assert 'id="table-ul2q"' in text
    analysis = {"images": "<script>alert(1)</script>", "float_top1": 99.0, "quantized_top1": 98.0,
                "layers": [{"name": "l0", "quantizer": "uniform", "w_bits": 4, "a_bits": 4, "weight_sqnr_db": None,
                            "output_sqnr_db": 1.0, "drop_alone_pt": 0.5, "recovered_pt": 0.5}]}
    text = render(ReportInputs(analysis=analysis, sources=["x"]))
    assert "<script>" not in text and "&lt;script&gt;alert(1)" in text


def test_json_output_is_strict_json(tmp_path, capsys):
    """An analyzed layer that keeps float weights has an infinite weight SQNR: written as null, since
    the bare token Infinity is refused by strict JSON parsers."""
    from lowbit.cli import _emit

    out = tmp_path / "a.json"
    args = argparse.Namespace(json=out)
    _emit(args, {"float_top1": 99.0, "layers": [{"name": "conv2", "weight_sqnr_db": math.inf, "x": -math.inf,
                                                 "y": math.nan, "output_sqnr_db": 40.5}]}, [{"name": "conv2"}])

    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    layer = json.loads(out.read_text(), parse_constant=refuse)["layers"][0]
    assert layer == {"name": "conv2", "weight_sqnr_db": None, "x": None, "y": None, "output_sqnr_db": 40.5}
    assert args._payload["layers"][0]["weight_sqnr_db"] is None  # what the registry and MLflow get too
