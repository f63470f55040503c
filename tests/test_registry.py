"""The run registry: rows through a run's life, two processes writing at once, the CLI recording and reading."""
import json
import multiprocessing as mp
import sqlite3

import pytest

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.registry import Registry, headline


def test_a_run_goes_from_running_to_done_with_its_fields(tmp_path):
    reg = Registry(tmp_path / "r.sqlite3")
    run = reg.start("quantize", ["quantize", "--recipe", "w4a4"], model="resnet20", recipe="w4a4")
    assert reg.get(run)["status"] == "running" and reg.get(run)["finished"] is None
    reg.update(run, metrics={"float_top1": 0.9173, "results": [{"recipe": "w4a4", "top1": 87.9}]},
               model_fingerprint="abc", artifacts={"save": "out/"})
    reg.finish(run, "done")
    row = reg.get(run)
    assert row["status"] == "done" and row["seconds"] >= 0 and row["argv"][-1] == "w4a4"
    assert row["versions"]["lowbit"] and row["artifacts"] == {"save": "out/"}
    assert headline(row["metrics"]) == "float 91.73, w4a4 87.9"
    with pytest.raises(LowbitError, match="finishes as one of"):
        reg.finish(run, "running")
    with pytest.raises(LowbitError, match="unknown field"):
        reg.update(run, colour="red")
    with pytest.raises(LowbitError, match="no run 99"):
        reg.get(99)


def test_bad_registry_paths_are_named(tmp_path):
    with pytest.raises(LowbitError, match="is a directory"):
        Registry(tmp_path)
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(LowbitError, match="cannot be opened as SQLite"):
        Registry(junk)


def _writer(path: str, tag: str, n: int) -> None:
    reg = Registry(path)
    for i in range(n):
        run = reg.start("bench", [tag, str(i)])
        reg.update(run, metrics={"i": i})
        reg.finish(run, "done")
    reg.close()


def test_two_processes_write_at_once(tmp_path):
    path = str(tmp_path / "shared.sqlite3")
    Registry(path).close()  # created (WAL) before both start
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, tag, 40)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = sqlite3.connect(path).execute("SELECT argv, status FROM runs").fetchall()
    assert len(rows) == 80 and {s for _, s in rows} == {"done"}
    assert sorted(json.loads(a)[0] for a, _ in rows) == ["a"] * 40 + ["b"] * 40


def test_cli_records_runs_and_reads_them_back(tmp_path, capsys, data_dir, models_dir, monkeypatch):
    import lowbit.cli as cli

    reg = tmp_path / "cli.sqlite3"
    common = ["--data-dir", str(data_dir), "--models-dir", str(models_dir), "--no-progress", "--no-download",
              "--registry", str(reg)]
    assert main(["quantize", "--recipe", "w8a8", "--test-limit", "100", *common]) == 0
    assert main(["eval", "--model", "resnet7", *common]) == 2
    assert main(["eval", "--test-limit", "50", "--no-registry", *common]) == 0
    monkeypatch.setattr(cli, "cmd_eval", lambda args: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["eval", "--test-limit", "50", *common]) == 130
    capsys.readouterr()
    runs = Registry(reg).list()
    assert [(r["command"], r["status"]) for r in runs] == [("eval", "interrupted"), ("eval", "failed"),
                                                           ("quantize", "done")]
    quantized = runs[-1]
    assert quantized["recipe"] == "w8a8" and quantized["dataset"] == "cifar10"
    assert len(quantized["model_fingerprint"]) == 16 and quantized["data_fingerprint"].startswith("cifar10:")
    assert quantized["metrics"]["results"][0]["recipe"] == "w8a8"
    assert "unknown model 'resnet7'" in runs[1]["error"]
    assert main(["runs", "--registry", str(reg)]) == 0
    listing = capsys.readouterr().out
    assert "quantize" in listing and "interrupted" in listing and "w8a8" in listing
    assert main(["runs", "show", str(quantized["id"]), "--registry", str(reg)]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == quantized["id"]
    assert main(["runs", "compare", "1", "2", "--registry", str(reg)]) == 0
    assert "model_fingerprint" in capsys.readouterr().out
    assert main(["runs", "show", "1", "2", "--registry", str(reg)]) == 2
    assert main(["runs", "--registry", str(tmp_path / "none.sqlite3")]) == 2
    assert "no run registry at" in capsys.readouterr().err
