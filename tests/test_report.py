"""The HTML report: μL2Q's error numbers, every figure present and decodable, sources read
from runs, JSON, artifacts and checkpoints, and bad sources named."""
from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.gaussian import optimal_gaussian_step
from lowbit.report.figures import ul2q_errors
from lowbit.report.html import render
from lowbit.report.sources import ReportInputs, collect

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """The ids of images (with their decoded bytes), tables (with their row counts) and sections."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, bytes] = {}
        self.tables: dict[str, int] = {}
        self.sections: list[str] = []
        self.missing = 0
        self._table: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            src = a["src"]
            assert src.startswith("data:image/png;base64,"), "figures are embedded, not linked"
            self.images[a["id"]] = base64.b64decode(src.split(",", 1)[1])
            assert a.get("alt")
        elif tag == "table":
            self._table = a["id"]
            self.tables[self._table] = 0
        elif tag == "tr" and self._table is not None:
            self.tables[self._table] += 1
        elif tag == "section":
            self.sections.append(a["id"])
        elif tag == "p" and a.get("class") == "muted":
            self.missing += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_ul2q_error_numbers_match_the_gaussian_and_a_hand_computed_case():
    # ±1 at one bit: σ = 1, levels ±α₁/2 with α₁/2 = E|φ| = sqrt(2/π), error (1 − sqrt(2/π))²
    table = ul2q_errors([("w", np.array([-1.0, 1.0, -1.0, 1.0]))], max_bits=2)
    assert table[0]["step"] / 2 == pytest.approx(math.sqrt(2 / math.pi), rel=1e-4)
    assert table[0]["measured_mse"]["w"] == pytest.approx((1 - math.sqrt(2 / math.pi)) ** 2, rel=1e-3)
    # Gaussian weights: what is measured is what the Gaussian predicts, at every width
    w = np.random.default_rng(0).normal(0.0, 0.05, 400_000)
    for row in ul2q_errors([("g", w)], max_bits=6):
        assert row["predicted_mse"] == pytest.approx(optimal_gaussian_step(row["bits"], "midrise")[1])
        assert row["measured_mse"]["g"] == pytest.approx(row["predicted_mse"], rel=0.03)
    # Uniform weights are not Gaussian: nothing reaches the 4-bit grid's clip (±8α > √3), so the
    # error is rounding alone, ≈ α²/12 (the edge cells are partly empty), 16% below the prediction
    u = np.random.default_rng(1).uniform(-1, 1, 400_000)
    four = ul2q_errors([("u", u)], max_bits=4)[3]
    assert four["measured_mse"]["u"] == pytest.approx(four["step"] ** 2 / 12, rel=0.05)
    assert four["measured_mse"]["u"] < 0.9 * four["predicted_mse"]
    # an all-zero layer has no σ to standardise by: left out, not a division by zero
    assert ul2q_errors([("z", np.zeros(10))], max_bits=1)[0]["measured_mse"] == {}


def _inputs() -> ReportInputs:
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_top1": 80 + e, "val_top1": 78 + e} for e in (1, 2, 3)]
    search = {"method": "msq", "budget_bits": 1000, "plan": {"layers": {}, "meta": {"mean_w_bits": 3.1}},
              "path": [{"mean_w_bits": 8 - i, "val_accuracy": 0.9 - 0.01 * i} for i in range(5)]}
    layers = [{"name": f"l{i}", "quantizer": "uniform", "w_bits": 4, "a_bits": 4, "weight_sqnr_db": 20.0,
               "output_sqnr_db": 15.0, "drop_alone_pt": 1.0 - 0.1 * i, "recovered_pt": 0.5} for i in range(3)]
    return ReportInputs(model="m", accuracy=[{"label": "w4a4", "top1": 90.1, "float_top1": 91.7, "note": "x"}],
                        layers=[{"name": "l0", "kind": "conv", "params": 10, "w_bits": 8, "a_bits": 8,
                                 "quantizer": "uniform", "a_quantizer": "uniform"}], layers_source="a.lowbit",
                        analysis={"images": 100, "float_top1": 91.0, "quantized_top1": 89.0, "layers": layers},
                        searches=[search], curves=[("run", history)], sources=["test"])


def test_every_figure_and_table_is_in_the_file_and_decodes():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    page = parse(render(_inputs(), model))
    assert page.sections == ["accuracy", "layers", "analysis", "weights", "ul2q", "searches", "qat"]
    assert set(page.images) == {"fig-accuracy", "fig-analysis", "fig-weights", "fig-ul2q", "fig-search-0", "fig-qat"}
    assert all(png.startswith(PNG_MAGIC) and len(png) > 2000 for png in page.images.values())
    # header row + data rows: 1 result, 1 layer, 3 analysed layers, 8 bit widths
    assert page.tables == {"table-accuracy": 2, "table-layers": 2, "table-analysis": 4, "table-ul2q": 9}


def test_what_the_sources_lack_is_said_not_left_blank():
    page = parse(render(ReportInputs(accuracy=[{"label": "w8a8", "top1": 91.0, "float_top1": 91.1, "note": ""}],
                                     sources=["x"])))
    assert set(page.images) == {"fig-accuracy"}
    assert page.missing >= 6  # the "made from" line and one line per missing section
    text = render(ReportInputs(sources=["x"]))
    assert "Not in these sources: the float model (give --model" in text


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(LowbitError, match="at least one source"):
        collect([])
    with pytest.raises(LowbitError, match="no such file or run id"):
        collect([str(tmp_path / "nope.json")])
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(LowbitError, match=r"nothing a report shows \(keys: hello\)"):
        collect([str(tmp_path / "other.json")])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(LowbitError, match="is not a JSON file"):
        collect([str(tmp_path / "broken.json")])
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(LowbitError, match="without metrics.jsonl"):
        collect([str(tmp_path / "ckpt")])
    (tmp_path / "ckpt" / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1}\n{"epoch": 2, "tr')
    with pytest.raises(LowbitError, match="line 2: not JSON"):
        collect([str(tmp_path / "ckpt")])
    with pytest.raises(LowbitError, match="looks like a run id, but there is no run registry"):
        collect(["7"], registry=tmp_path / "none.sqlite3")


def test_a_users_session_ends_in_one_report(tmp_path, capsys, data_dir, monkeypatch):
    """quantize (saving the model) and analyze through the CLI, a QAT checkpoint folder and a
    search result beside them: `lowbit report` takes run ids and files together."""
    from lowbit.cli import main
    from lowbit.registry import Registry
    from lowbit.zoo import build, save_weights, trained_here_path

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    save_weights(build("small_cnn_fashion"), trained_here_path("small_cnn_fashion"))
    reg = tmp_path / "runs.sqlite3"
    common = ["--model", "small_cnn_fashion", "--data-dir", str(data_dir), "--no-progress", "--no-download",
              "--registry", str(reg)]
    assert main(["quantize", "--recipe", "w4a4", "--test-limit", "200", "--save", str(tmp_path / "q"), *common]) == 0
    assert main(["analyze", "--recipe", "w4a4", "--samples", "200", *common]) == 0
    runs = Registry(reg).list()
    assert [r["command"] for r in runs] == ["analyze", "quantize"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    ckpt.joinpath("metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "train_loss": 1 / e, "train_top1": 80 + e,
                                                                  "val_top1": 79 + e}) + "\n" for e in (1, 2)))
    search = tmp_path / "search.json"
    search.write_text(json.dumps({"search": {"method": "hawq", "budget_bits": 5, "plan": {"layers": {}, "meta": {}},
                                             "path": [{"mean_w_bits": 3.0}]}}))
    capsys.readouterr()
    out = tmp_path / "r.html"
    assert main(["report", str(runs[1]["id"]), str(runs[0]["id"]), str(ckpt), str(search), "-o", str(out),
                 "--registry", str(reg), "--data-dir", str(data_dir), "--no-download"]) == 0
    assert "wrote" in capsys.readouterr().out
    page = parse(out.read_text())
    assert set(page.images) == {"fig-accuracy", "fig-analysis", "fig-weights", "fig-ul2q", "fig-search-0", "fig-qat"}
    assert page.tables["table-layers"] == 1 + 4  # the saved model's four quantized layers
    assert page.tables["table-analysis"] == 1 + 4
    # a run that is not there, a run with nothing to show, and a factory model without weights are refused by name
    assert main(["report", "99", "--registry", str(reg)]) == 2
    assert "no run 99" in capsys.readouterr().err
    assert main(["export", "--recipe", "w8a8", "--out", str(tmp_path / "m.onnx"), *common]) == 0
    export_id = Registry(reg).list()[0]["id"]
    capsys.readouterr()
    assert main(["report", str(export_id), "--registry", str(reg), "-o", str(out)]) == 2
    assert "recorded no metrics and no .lowbit file" in capsys.readouterr().err
    assert main(["report", str(ckpt), "--model", "pkg.mod:make", "-o", str(out)]) == 2
    assert "needs --weights" in capsys.readouterr().err


def test_the_python_api_takes_the_same_sources(tmp_path):
    import lowbit

    ckpt = tmp_path / "run"
    ckpt.mkdir()
    ckpt.joinpath("metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 0.5, "train_top1": 90,
                                                          "val_top1": 89}) + "\n")
    out = lowbit.html_report([ckpt], tmp_path / "r.html", title="QAT <run>")
    text = out.read_text()
    assert set(parse(text).images) == {"fig-qat"}
    assert "<title>QAT &lt;run&gt;</title>" in text  # user text is escaped
    assert lowbit.html_report(_inputs(), tmp_path / "s.html").stat().st_size > 10_000


def test_the_analysis_says_which_side_loses_where_the_file_has_it():
    inputs = _inputs()
    assert "weights only" not in render(inputs)  # an analysis written before the split renders as before
    inputs.analysis.update(weights_only_top1=90.5, activations_only_top1=89.25)
    assert "weights only 90.50%, activations only 89.25%" in render(inputs)


def test_weight_sqnr_is_against_the_float_weights_not_the_ones_gptq_put_on_the_grid():
    import lowbit
    from lowbit.report.analyzer import analyze, sqnr_db
    from lowbit.zoo import build

    torch.manual_seed(0)
    model = build("small_cnn").eval()
    x = torch.randn(96, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
    recipe = {"extends": "w4a4", "calibration": {"samples": 64, "batch_size": 32}, "steps": ["calibrate", "gptq"]}
    qm = lowbit.quantize(model, recipe, calib=x[:64], progress=False)
    with torch.no_grad(), qm.float_reference():
        float_w = {r.name: r.layer.weight.clone() for r in qm.layers}
    out = analyze(qm, [(x[64:], y[64:])], progress=False)
    assert out["layers"]
    for row in out["layers"]:
        layer = next(r.layer for r in qm.layers if r.name == row.name)
        with torch.no_grad():
            assert torch.equal(layer.quantized_weight(), layer.weight)  # GPTQ left the weight on its grid
            expected = sqnr_db(float_w[row.name], layer.quantized_weight())
        assert math.isfinite(row.weight_sqnr_db) and row.weight_sqnr_db == pytest.approx(expected)


def test_top1_is_converted_by_where_it_comes_from_not_by_its_size(monkeypatch):
    """Rows hold % and payload-level values fractions: a collapsed model's 0.85 % stays 0.85."""
    from lowbit.report.sources import add_payload

    inputs = ReportInputs()
    add_payload(inputs, {"model": "m", "float_top1": 0.76, "results": [{"recipe": "w2a2", "top1": 0.85, "float": 76.0},
                                                                      {"recipe": "w1a1", "top1": 0.5}]}, "q.json")
    add_payload(inputs, {"rows": [{"recipe": "w1a1-bnn", "top1": 1.0, "float_top1": 0.9}]}, "t.json")
    assert [(a["top1"], a["float_top1"]) for a in inputs.accuracy] == [(0.85, 76.0), (0.5, 76.0), (1.0, 0.9)]
    from matplotlib.axes import Axes

    plotted = []
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, x, y, *a, **k: plotted.append(list(y)) or real_plot(ax, x, y, *a, **k))
    from lowbit.report.figures import search_figure

    search_figure({"method": "msq", "path": [{"mean_w_bits": 8, "val_accuracy": 1.0},
                                             {"mean_w_bits": 4, "val_accuracy": 0.009}], "plan": {}})
    assert plotted[0] == pytest.approx([100.0, 0.9])  # a search's accuracy is a fraction at any size


def test_report_on_a_saved_artifact_names_its_architecture(tmp_path, capsys, monkeypatch):
    """`lowbit report x.lowbit`: the artifact's arch is {name, kwargs}; the report takes its name
    (title, float model from the zoo) and reads its metrics as fractions."""
    import lowbit
    from lowbit.cli import main
    from lowbit.deploy.artifact import save
    from lowbit.zoo import build, save_weights, trained_here_path

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    save_weights(build("small_cnn_fashion"), trained_here_path("small_cnn_fashion"))
    qm = lowbit.quantize(build("small_cnn_fashion").eval(), "w8a8", calib=torch.randn(64, 1, 28, 28), progress=False)
    path = save(qm, tmp_path / "b.lowbit", metrics={"top1": 0.004, "float_top1": 0.6})
    inputs = collect([str(path)])
    assert inputs.model == "small_cnn_fashion"
    assert [(a["top1"], a["float_top1"]) for a in inputs.accuracy] == [(pytest.approx(0.4), pytest.approx(60.0))]
    out = tmp_path / "r.html"
    assert main(["report", str(path), "-o", str(out), "--no-download"]) == 0
    text = out.read_text()
    assert "<title>lowbit report: small_cnn_fashion</title>" in text
    assert "fig-weights" in parse(text).images  # the zoo model's float weights were found by that name
