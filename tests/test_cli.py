"""The lowbit command end to end on small real data."""
import json

import pytest

from lowbit.cli import main


def test_recipes_lists_builtins(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ["w8a8", "w6a6", "w4a8", "w4a4", "w3a3", "w2a4"]:
        assert name in out


def test_quantize_writes_table_and_json(tmp_path, capsys, data_dir, models_dir):
    out = tmp_path / "r.json"
    code = main(["quantize", "--recipe", "w8a8,w4a8", "--test-limit", "300", "--data-dir", str(data_dir),
                 "--models-dir", str(models_dir), "--json", str(out), "--no-progress", "--no-download"])
    assert code == 0
    text = capsys.readouterr().out
    assert "NOT the full split" in text and "w4a8" in text
    payload = json.loads(out.read_text())
    assert payload["test_images"] == 300 and not payload["full_test_split"]
    assert [r["recipe"] for r in payload["results"]] == ["w8a8", "w4a8"]
    w8 = payload["results"][0]
    assert abs(w8["drop_pt"]) < 2 and w8["compression"] > 3.5


def test_bad_input_gives_exit_code_2(capsys, data_dir, models_dir, tmp_path):
    assert main(["quantize", "--recipe", "w9a9", "--test-limit", "10", "--data-dir", str(data_dir),
                 "--models-dir", str(models_dir), "--no-progress"]) == 2
    assert "recipe 'w9a9': weight bits must be 1-8" in capsys.readouterr().err  # a composed name, bits checked
    assert main(["quantize", "--recipe", "w4a4-fast", "--test-limit", "10", "--data-dir", str(data_dir),
                 "--models-dir", str(models_dir), "--no-progress"]) == 2
    assert "unknown recipe 'w4a4-fast'" in capsys.readouterr().err
    assert main(["eval", "--data-dir", str(tmp_path), "--models-dir", str(models_dir), "--no-progress",
                 "--no-download"]) == 2
    err = capsys.readouterr().err
    assert "cifar10" in err and "LOWBIT_DATA_DIR" in err
    assert main(["eval", "--model", "resnet7", "--no-progress", "--no-download"]) == 2
    assert "resnet20" in capsys.readouterr().err


def test_train_then_quantize_small_cnn(tmp_path, capsys, data_dir):
    weights = tmp_path / "cnn.safetensors"
    assert main(["train", "--model", "small_cnn", "--epochs", "1", "--train-limit", "3000", "--data-dir",
                 str(data_dir), "--out", str(weights), "--no-progress"]) == 0
    line = capsys.readouterr().out
    top1 = float(line.split("test top-1 ")[1].split("%")[0])
    assert top1 > 85.0 and weights.exists()
    assert main(["quantize", "--model", "small_cnn", "--weights", str(weights), "--recipe", "w8a8",
                 "--test-limit", "200", "--data-dir", str(data_dir), "--no-progress"]) == 0
    assert "small_cnn on mnist" in capsys.readouterr().out


def test_counts_and_directories_are_checked_by_name(capsys, data_dir, models_dir, tmp_path):
    import pytest

    for option, value in (("--test-limit", "0"), ("--test-limit", "-3"), ("--threads", "0"), ("--test-limit", "x")):
        with pytest.raises(SystemExit) as exc:
            main(["eval", option, value, "--no-progress"])
        assert exc.value.code == 2
        assert f"argument {option}: must be a positive integer" in capsys.readouterr().err
    typo = tmp_path / "sahred"
    assert main(["eval", "--data-dir", str(typo), "--models-dir", str(models_dir), "--no-progress",
                 "--no-download"]) == 2
    assert f"data_dir argument '{typo}' does not exist" in capsys.readouterr().err
    assert main(["eval", "--models-dir", str(typo), "--no-progress", "--no-download"]) == 2
    assert f"models_dir argument '{typo}' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--onnx", __file__, "--runtime", "tensorrt"])
    assert "unknown runtime 'tensorrt'" in capsys.readouterr().err


def test_export_then_eval_in_both_runtimes(tmp_path, capsys, data_dir, models_dir):
    onnx_path = tmp_path / "m.onnx"
    common = ["--data-dir", str(data_dir), "--models-dir", str(models_dir), "--no-progress", "--no-download"]
    assert main(["export", "--recipe", "w8a8", "--out", str(onnx_path), *common]) == 0
    capsys.readouterr()
    scores = {}
    for runtime in ("ort", "openvino"):
        report = tmp_path / f"{runtime}.json"
        assert main(["eval", "--onnx", str(onnx_path), "--runtime", runtime, "--test-limit", "500",
                     "--json", str(report), *common]) == 0
        assert f"({runtime})" in capsys.readouterr().out
        scores[runtime] = 100 * json.loads(report.read_text())["top1"]
    assert scores["ort"] > 85 and abs(scores["ort"] - scores["openvino"]) <= 1.0


def test_bench_times_every_engine_in_both_runtimes(tmp_path, capsys, data_dir, models_dir):
    report = tmp_path / "bench.json"
    assert main(["bench", "--runtime", "ort,openvino", "--repeats", "2", "--test-limit", "200", "--threads", "1",
                 "--json", str(report), "--data-dir", str(data_dir), "--models-dir", str(models_dir),
                 "--no-progress", "--no-download"]) == 0
    rows = json.loads(report.read_text())["rows"]
    engines = {(r["engine"], r["runtime"]) for r in rows}
    assert engines == {("float", "pytorch"), ("float", "ort"), ("float", "openvino"), ("lowbit w8a8", "ort"),
                       ("lowbit w8a8", "openvino"), ("ort quantize_static", "ort"),
                       ("ort quantize_static", "openvino")}
    by = {(r["engine"], r["runtime"]): r for r in rows}
    assert by[("float", "ort")]["b64_vs_float_ort"] == 1.0 and by[("float", "openvino")]["b64_vs_float_openvino"] == 1.0
    assert abs(by[("lowbit w8a8", "ort")]["top1"] - by[("float", "ort")]["top1"]) <= 3.0
    assert by[("lowbit w8a8", "ort")]["file_kb"] < by[("float", "ort")]["file_kb"] / 3


def test_a_model_without_published_weights_uses_the_float_baseline_trained_here(tmp_path, capsys, data_dir,
                                                                               monkeypatch):
    import torch

    from lowbit.zoo import build, save_weights, trained_here_path

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    save_weights(build("small_cnn_fashion"), trained_here_path("small_cnn_fashion"))  # as if trained before
    assert str(trained_here_path("small_cnn_fashion")).startswith(str(tmp_path))
    assert main(["quantize", "--model", "small_cnn_fashion", "--recipe", "w8a8", "--test-limit", "100",
                 "--data-dir", str(data_dir), "--no-progress", "--no-download"]) == 0
    captured = capsys.readouterr()
    assert "small_cnn_fashion on fashion-mnist" in captured.out
    assert "training its float baseline" not in captured.err  # the cached baseline, not a new one


def test_save_names_each_recipes_file_apart_and_refuses_two_of_one_name(tmp_path, capsys):
    from lowbit.cli import artifact_stem

    assert [artifact_stem(n) for n in ("exp.1", "exp.2", "dir/my.recipe.yaml", "w4a4+gptq")] == [
        "exp.1", "exp.2", "my.recipe", "w4a4+gptq"]  # Path.stem made the first two one file, "exp"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same.yaml").write_text("extends: w8a8\n")
    recipes = f"{tmp_path / 'a' / 'same.yaml'},{tmp_path / 'b' / 'same.yaml'}"
    assert main(["quantize", "--recipe", recipes, "--save", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "--save would write same.lowbit for more than one recipe" in capsys.readouterr().err


def test_eval_of_an_artifact_takes_its_dataset_from_it_and_the_registry_keeps_absolute_paths(
        tmp_path, capsys, data_dir, monkeypatch):
    """`eval --lowbit` of a Fashion-MNIST model took the dataset of --model's default (CIFAR-10) and failed on the
    shapes; the registry stored `--save out` as given, which `lowbit report N` could not find from elsewhere."""
    import torch

    from lowbit.registry import Registry
    from lowbit.zoo import build, save_weights, trained_here_path

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    save_weights(build("small_cnn_fashion"), trained_here_path("small_cnn_fashion"))
    monkeypatch.chdir(tmp_path)
    common = ["--data-dir", str(data_dir), "--no-progress", "--no-download", "--test-limit", "50"]
    assert main(["quantize", "--model", "small_cnn_fashion", "--recipe", "w8a8", "--save", "out", *common]) == 0
    run = Registry().list(1)[0]
    assert run["artifacts"]["save"] == str(tmp_path / "out")
    capsys.readouterr()
    assert main(["eval", "--lowbit", str(tmp_path / "out" / "w8a8.lowbit"), "--json", "e.json", *common]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["dataset"] == "fashion-mnist"


def test_train_refuses_a_weights_file_name_it_cannot_write_before_training(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "small_cnn", "--epochs", "1", "--out", "w.pt"])
    assert exc.value.code == 2
    assert "w.pt: weights are written as safetensors" in capsys.readouterr().err
