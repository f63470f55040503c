"""Recipes as data: built-ins, YAML/TOML files, dicts, inheritance."""
import pytest

from lowbit import builtin_names, load_recipe
from lowbit.errors import RecipeError


def test_builtins_exist_and_parse():
    names = builtin_names()
    for required in ["w8a8", "w6a6", "w4a8", "w4a4", "w3a3", "w2a4"]:
        assert required in names
    r = load_recipe("w2a4")
    assert (r.weights.spec.bits, r.activations.spec.bits) == (2, 4)
    assert r.weights.spec.per_channel and not r.activations.spec.per_channel
    assert r.first_last_bits == 8 and r.steps[0][0] == "calibrate"


def test_yaml_and_toml_files_agree(tmp_path):
    y = tmp_path / "mine.yaml"
    y.write_text("weights: {bits: 5, estimator: cosine}\nactivations: {bits: 6, estimator: percentile, "
                 "estimator_options: {q: 99.9}}\nsteps: [calibrate]\n")
    t = tmp_path / "mine.toml"
    t.write_text('steps = ["calibrate"]\n[weights]\nbits = 5\nestimator = "cosine"\n'
                 '[activations]\nbits = 6\nestimator = "percentile"\nestimator_options = {q = 99.9}\n')
    a, b = load_recipe(y), load_recipe(t)
    assert a.to_dict() == b.to_dict()
    assert a.name == "mine" and a.activations.estimator_options == {"q": 99.9}


def test_extends_overrides_only_what_it_names():
    r = load_recipe({"extends": "w4a4", "activations": {"estimator": "bn"}})
    assert r.activations.spec.bits == 4 and r.activations.estimator == "bn"
    assert r.weights.estimator == load_recipe("w4a4").weights.estimator


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("weights: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="bn"):
        load_recipe({"weights": {"estimator": "bn"}})
    with pytest.raises(RecipeError, match="calibration.samples"):
        load_recipe({"calibration": {"samples": 0}})


def test_extends_cycle_through_two_files_is_named(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\nweights: {bits: 4}\n")  # relative to a.yaml, not the cwd
    b.write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match=r"extends itself through a cycle: a.yaml -> b.yaml -> a.yaml"):
        load_recipe(a)
    selfish = tmp_path / "self.yaml"
    selfish.write_text(f"extends: {selfish}\n")
    with pytest.raises(RecipeError, match="cycle: self.yaml -> self.yaml"):
        load_recipe(selfish)
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(RecipeError, match="is a directory"):
        load_recipe(tmp_path / "dir.yaml")


def test_extends_reads_a_sibling_file_and_chains(tmp_path):
    (tmp_path / "base.yaml").write_text("extends: w4a4\nactivations: {estimator: percentile}\n")
    top = tmp_path / "top.yaml"
    top.write_text("extends: base.yaml\nweights: {bits: 3}\n")
    r = load_recipe(top)
    assert (r.weights.spec.bits, r.activations.spec.bits, r.activations.estimator) == (3, 4, "percentile")


def test_builtins_use_the_integer_runtime_layout():
    for name in builtin_names():
        r = load_recipe(name)
        if r.activations.quantizer in ("bnn", "xnor"):  # signs of signed tensors: no int8 QDQ form (Where in ONNX)
            assert r.relu == "hardtanh" and r.activations.spec.grid == "midrise" and not r.quantize_adds, name
            assert r.shortcut in ("real", "bireal"), name  # residual streams stay real-valued
            continue
        assert r.activations.spec.signed is False and r.activations.spec.symmetric is False, name
        if r.overrides == [{"pattern": "*", "a_bits": 32}]:  # float activations (W*A32): nothing to add in int8
            assert not r.quantize_adds, name
            continue
        assert r.quantize_adds and r.add_bits == 8, name
    assert load_recipe("w8a8-int8").to_dict() | {"name": "w8a8", "description": ""} == \
        load_recipe("w8a8").to_dict() | {"description": ""}
    with pytest.raises(RecipeError, match="add_bits"):
        load_recipe({"add_bits": 9})


def test_composed_names_build_recipes_from_bits_and_words():
    r = load_recipe("w3a3+adaquant")
    assert (r.weights.spec.bits, r.activations.spec.bits) == (3, 3)
    assert [s for s, _ in r.steps] == ["calibrate", "adaquant"]
    assert [s for s, _ in load_recipe("w4a4+gptq+bias_correction").steps] == ["calibrate", "gptq", "bias_correction"]
    plain = load_recipe("w5a5")  # no words: the plain built-ins' steps and layout
    assert plain.steps == load_recipe("w4a4").steps and plain.weights.spec.bits == 5
    assert plain.first_last_bits == 8 and plain.weights.spec.per_channel
    qat = load_recipe("w2a2+lsq+kd")
    assert (qat.weights.quantizer, qat.activations.quantizer, qat.weights.spec.grid) == ("lsq", "lsq+", "midrise")
    assert qat.steps[-1] == ("qat", {"kd": {"temperature": 4.0, "weight": 0.5}})
    ternary = load_recipe("w2a32+twn")
    assert (ternary.weights.quantizer, ternary.weights.spec.grid) == ("twn", "midtread")
    assert ternary.to_dict()["overrides"][0]["a_bits"] == 32  # float activations everywhere
    assert not load_recipe("w4a4").description.startswith("composed")  # a built-in of the same name wins
    assert load_recipe("w4a32").description.startswith("composed")


@pytest.mark.parametrize("name,message", [
    ("w9a4", "weight bits must be 1-8"),
    ("w4a1", "w1a1-bnn"),
    ("w4a4+foo", "unknown word 'foo'; known: adaquant"),
    ("w4a4+kd", "'kd' distils a training step"),
    ("w4a4+lsq+pact", "one training word only"),
    ("w4a4+gptq+gptq", "written twice"),
    ("w2a32+xnor", "recipe 'w2a32\\+xnor': weights.quantizer 'xnor' needs weights: {bits: 1"),
])
def test_composed_name_errors_say_what_is_wrong(name, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(name)


def test_a_composed_recipe_quantizes_at_its_bits(mnist_cnn):
    import lowbit

    model, calib, test = mnist_cnn
    qm = lowbit.quantize(model, "w5a6+bias_correction", calib=calib, progress=False)
    inner = [r for r in qm.layers if r.w_bits != 8]
    assert inner and all(r.w_bits == 5 for r in inner)
    assert qm.meta["recipe"]["name"] == "w5a6+bias_correction"


def test_recipes_command_explains_the_grammar(capsys):
    from lowbit.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "w{W}a{A}[+word...]" in out and "adaquant" in out and "kd" in out


def test_every_step_function_default_is_its_schema_default():
    """A step's omitted parameter takes the step function's default, not the schema's: the two
    must agree (bias correction's `samples` once read 512 in the function and 1024 in the
    schema, so `lowbit recipes --explain` named a default that never ran)."""
    import inspect

    from lowbit.recipes.schema import step_schemas
    from lowbit.steps import STEPS

    for step, params in step_schemas().items():
        signature = inspect.signature(STEPS[step]).parameters
        for p in params:
            if p.name in signature and signature[p.name].default is not inspect.Parameter.empty:
                fn_default = signature[p.name].default
                assert (fn_default or None) == (p.default or None), (step, p.name, fn_default, p.default)


@pytest.mark.parametrize(("section", "message"), [
    ({"estimator": "percentile", "estimator_options": {"q": "99.9"}}, r"estimator_options.q must be a float"),
    ({"estimator": "kl", "estimator_options": {"bins": "x"}}, r"estimator_options.bins must be a int"),
    ({"estimator": "mse", "estimator_options": {"q": 99.0}}, r"estimator 'mse' takes \['ends'\], not \['q'\]"),
    ({"estimator": "minmax", "estimator_options": {"bins": 8}}, r"estimator 'minmax' takes no options"),
    ({"estimator": "percentile", "estimator_options": {"q": float("nan")}}, r"q must be a float"),
])
def test_estimator_options_are_checked_when_the_recipe_is_read(section, message):
    """They failed only after the calibration passes (a wrong type reported as an unknown option), or never."""
    with pytest.raises(RecipeError, match=message):
        load_recipe({"extends": "w4a4", "activations": section})


def test_extends_adds_overrides_keeps_null_sections_replaces_plans_and_renames_edits(tmp_path):
    """An override on an a32 built-in replaced its `a_bits: 32` override (4-bit activations under the built-in's
    name); an all-commented section (null) reset to the defaults (W8A8 described as W4A4); a bare plan merged into
    a saved-form one was ignored; a dict inheriting the base's name and description claimed the base's method."""
    r = load_recipe({"extends": "w3a32-kmeans", "overrides": [{"pattern": "layer3.*", "w_bits": 4}]})
    assert r.overrides == [{"pattern": "*", "a_bits": 32}, {"pattern": "layer3.*", "w_bits": 4}]
    assert r.name == "w3a32-kmeans-edited" and r.description == "w3a32-kmeans with its overrides changed"
    (tmp_path / "nulls.yaml").write_text("extends: w4a4\nweights:\n  # bits: 3\nactivations:\n")
    r = load_recipe(str(tmp_path / "nulls.yaml"))
    assert (r.weights.spec.bits, r.activations.spec.bits, r.name) == (4, 4, "nulls")
    assert r.description == load_recipe("w4a4").description  # nothing changed
    (tmp_path / "base.yaml").write_text("extends: w4a4\nplan: {format: lowbit-plan/1, layers: {layer1.0.conv1: "
                                        "{w_bits: 2}}, meta: {}}\n")
    (tmp_path / "top.yaml").write_text("extends: base.yaml\nplan: {layer2.0.conv1: {w_bits: 3}}\n")
    assert load_recipe(str(tmp_path / "top.yaml")).plan.layers == {"layer2.0.conv1": {"w_bits": 3}}
    r = load_recipe({"extends": "w4a4-adaround", "steps": ["calibrate", "usp"], "fold_bn": False})
    assert r.name == "w4a4-adaround-edited" and "adaround" not in r.description.split(" with ")[1]
    assert load_recipe({"extends": "w4a4", "name": "mine"}).name == "mine"
    assert load_recipe({"extends": "w4a4"}).name == "w4a4"  # nothing changed: still the built-in


def test_the_composed_word_usp_keeps_bn_apart():
    r = load_recipe("w4a4+usp")
    assert r.fold_bn is False and [n for n, _ in r.steps] == ["calibrate", "usp"]


def test_seeds_beyond_what_a_generator_takes_are_refused_by_name():
    with pytest.raises(RecipeError, match="calibration.seed must be an integer from 0 to 2"):
        load_recipe({"extends": "w4a4", "calibration": {"seed": 2**63}})
    with pytest.raises(RecipeError, match="seed"):
        load_recipe({"extends": "w4a4", "steps": ["calibrate", {"adaround": {"seed": 2**64}}]})
    with pytest.raises(RecipeError, match="kmeans.joint .* needs hessian: fisher"):
        load_recipe({"extends": "w4a4", "steps": ["calibrate", {"kmeans": {"joint": True}}]})
