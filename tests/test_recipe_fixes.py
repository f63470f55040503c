"""Recipe reading fixes: plan paths next to the recipe file, file encodings, channel axes,
duplicate YAML keys and composed-name spelling."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowbit.errors import RecipeError
from lowbit.recipes.recipe import Recipe, load_recipe


def _plan(path: Path, bits: int) -> None:
    json.dump({"layers": {"3": {"w_bits": bits}}}, path.open("w"))


# 1. plan paths


@pytest.fixture
def plan_dirs(tmp_path, monkeypatch):
    """A recipe folder with its own plan, and a working directory holding a different plan of the same name."""
    rec, cwd = tmp_path / "rec", tmp_path / "cwd"
    rec.mkdir()
    cwd.mkdir()
    _plan(rec / "myplan.json", 3)
    _plan(cwd / "myplan.json", 7)
    monkeypatch.chdir(cwd)
    return rec, cwd


def test_a_recipe_files_relative_plan_is_read_next_to_the_file(plan_dirs):
    rec, _ = plan_dirs
    (rec / "usesplan.yaml").write_text("extends: w4a4\nplan: myplan.json\n")
    recipe = load_recipe(str(rec / "usesplan.yaml"))
    assert recipe.plan.layers == {"3": {"w_bits": 3}}
    # `lowbit train` reloads the source as a dict from the working directory: the same plan
    assert Recipe.from_dict(recipe.source).plan.layers == {"3": {"w_bits": 3}}


def test_a_base_files_plan_stays_next_to_the_base(plan_dirs):
    rec, cwd = plan_dirs
    (rec / "base.yaml").write_text("extends: w4a4\nplan: myplan.json\n")
    (cwd / "top.yaml").write_text(f"extends: {rec / 'base.yaml'}\nweights: {{bits: 5}}\n")
    assert load_recipe("top.yaml").plan.layers == {"3": {"w_bits": 3}}


def test_a_plan_not_next_to_the_file_is_read_from_the_working_directory_as_extends_is(plan_dirs):
    rec, _ = plan_dirs
    (rec / "myplan.json").unlink()
    (rec / "usesplan.yaml").write_text("extends: w4a4\nplan: myplan.json\n")
    assert load_recipe(str(rec / "usesplan.yaml")).plan.layers == {"3": {"w_bits": 7}}
    (rec / "elsewhere.yaml").write_text("extends: w4a4\nplan: nowhere.json\n")
    with pytest.raises(RecipeError, match=r"plan file nowhere\.json does not exist"):
        load_recipe(str(rec / "elsewhere.yaml"))


def test_dict_recipes_and_absolute_plans_keep_their_paths(plan_dirs):
    rec, _ = plan_dirs
    assert load_recipe({"extends": "w4a4", "plan": "myplan.json"}).plan.layers == {"3": {"w_bits": 7}}
    (rec / "abs.yaml").write_text(f"extends: w4a4\nplan: {Path.cwd() / 'myplan.json'}\n")
    assert load_recipe(str(rec / "abs.yaml")).plan.layers == {"3": {"w_bits": 7}}


# 2. encodings


def test_a_non_utf8_recipe_file_is_a_recipe_error_naming_it(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes('extends: w4a4\ndescription: "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin1\.yaml is not UTF-8"):
        load_recipe(str(path))


@pytest.mark.parametrize("name,text", [("bom.toml", 'extends = "w4a4"\n[weights]\nbits = 3\n'),
                                       ("bom.yaml", "extends: w4a4\nweights: {bits: 3}\n")])
def test_recipe_files_with_a_byte_order_mark_load(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    recipe = load_recipe(str(path))
    assert (recipe.name, recipe.weights.spec.bits) == ("bom", 3)


# 3. channel axes


@pytest.mark.parametrize("section,axis,message", [
    ("weights", 1, r"weights\.ch_axis=1: per-channel weight grids are per output channel \(axis 0"),
    ("weights", 5, r"weights\.ch_axis=5"),
    ("activations", 1, r"activations\.ch_axis=1: activations are quantized per tensor"),
])
def test_a_channel_axis_the_layers_would_ignore_is_refused(section, axis, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe({"extends": "w4a8", section: {"ch_axis": axis}})


def test_channel_axis_zero_and_stored_recipes_still_load():
    recipe = load_recipe({"extends": "w4a8", "weights": {"ch_axis": 0}, "activations": {"ch_axis": 0}})
    assert recipe.weights.spec.ch_axis == 0
    stored = load_recipe("w4a4").to_dict()  # what an artifact's metadata carries, ch_axis 0 included
    assert stored["weights"]["ch_axis"] == 0
    assert Recipe.from_dict(stored).to_dict() == stored


# 4. duplicate YAML keys


@pytest.mark.parametrize("text,message", [
    ("extends: w4a4\nweights: {bits: 4}\nweights: {bits: 2}\n", r"dup\.yaml: key 'weights' is given twice \(lines 2 and 3\)"),
    ("extends: w4a4\nweights:\n  bits: 4\n  bits: 2\n", r"dup\.yaml: key 'bits' is given twice \(lines 3 and 4\)"),
])
def test_duplicate_yaml_keys_are_refused_naming_key_and_lines(tmp_path, text, message):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(path))


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("extends: w4a4\nweights: &w {bits: 4, estimator: minmax}\n"
                    "activations: {<<: *w, bits: 6, signed: false, symmetric: false, per_channel: false}\n")
    recipe = load_recipe(str(path))
    assert (recipe.activations.spec.bits, recipe.activations.estimator) == (6, "minmax")


# 5. composed names


@pytest.mark.parametrize("name,message", [
    ("w4a4+lsq+kd+kd", r"'kd' is written twice"),
    ("w4a4+lsq+lsq", r"'lsq' is written twice"),
    ("w04a04", r"'w04' has a leading zero; write 'w4'"),
    ("w4a08", r"'a08' has a leading zero; write 'a8'"),
])
def test_composed_names_refuse_repeated_words_and_leading_zeros(name, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(name)
