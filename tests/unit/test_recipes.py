"""The recipe system: validation, overrides, every-problem reporting, paths, stage defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medmvl_cli.config.loader import apply_override, check_recipe, load_recipe, parse_override
from medmvl_cli.config.reference import render
from medmvl_cli.errors import RecipeError
from tests.conftest import RECIPES, REPO, TINY_2D

SHIPPED = sorted(RECIPES.rglob("*.yaml"))


def paths(problems):
    return [p.path for p in problems]


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_validates(recipe):
    resolved, problems = check_recipe(recipe)
    assert problems == []
    assert resolved.stage in ("pretrain", "finetune", "lora")
    assert resolved.model.llm.template is not None


def test_shipped_recipes_cover_the_contract():
    names = {str(p.relative_to(RECIPES)) for p in SHIPPED}
    assert {"medmvl-2d/pretrain.yaml", "medmvl-2d/finetune.yaml", "medmvl-2d/lora.yaml"} <= names
    assert any(n.startswith("quickstart/") and "2d" in n for n in names)
    assert any(n.startswith("quickstart/") and "ct" in n for n in names)
    assert {p.name for p in (RECIPES / "deepspeed").glob("*.json")} == {"zero2.json", "zero3.json"}
    for ds in (RECIPES / "deepspeed").glob("*.json"):
        assert json.loads(ds.read_text())["zero_optimization"]["stage"] in (2, 3)


def test_three_mistakes_are_all_reported(write_recipe):
    text = TINY_2D.replace("{type: mlp}", "{type: mlp, depth: 0}").replace(
        "max_length: 256", "max_length: 256, templat: qwen2"
    ) + "train: {lr: -1}\n"
    _, problems = check_recipe(write_recipe(text))
    assert sorted(paths(problems)) == ["model.image.connector.depth", "model.llm.templat", "train.lr"]
    unknown = next(p for p in problems if p.path == "model.llm.templat")
    assert unknown.message == "unknown key" and "'template'" in unknown.hint


def test_unknown_key_inside_a_typed_section_names_its_own_keys(write_recipe):
    text = TINY_2D.replace("{type: clip, preset: tiny}", "{type: clip, preset: tiny, select_layr: -2}")
    _, problems = check_recipe(write_recipe(text))
    assert paths(problems) == ["model.image.encoder.select_layr"]
    assert "select_layer" in problems[0].hint


def test_load_recipe_raises_with_every_problem(write_recipe):
    text = TINY_2D + "train: {lr: 0, batch_size: -2}\n"
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(text))
    assert sorted(paths(err.value.problems)) == ["train.batch_size", "train.lr"]
    assert "train.lr" in err.value.message


@pytest.mark.parametrize(
    "override, where, expected",
    [
        ("train.lr=1e-4", ("train", "lr"), 1e-4),
        ("data.packing=true", ("data", "packing"), True),
        ("data.train.0.weight=2.5", ("data", "train", 0, "weight"), 2.5),
        ("model.image.encoder.select_layer=-1", ("model", "image", "encoder", "select_layer"), -1),
        ("train.report_to=[none]", ("train", "report_to"), ["none"]),
    ],
)
def test_overrides_apply_before_validation(write_recipe, override, where, expected):
    recipe = load_recipe(write_recipe(TINY_2D), [override])
    value = recipe.model_dump()
    for key in where:
        value = value[key]
    assert value == expected


def test_override_appends_a_list_item_and_sets_a_triple(write_recipe):
    recipe = load_recipe(
        write_recipe(TINY_2D),
        ["data.train.1.annotations=more.json", "model.image3d={encoder: {type: vit3d, preset: tiny}, connector: {type: mlp}}",
         "model.image3d.volume.size=[16,32,32]"],
    )
    assert len(recipe.data.train) == 2 and recipe.data.train[1].annotations.endswith("more.json")
    assert recipe.model.image3d.volume.size == (16, 32, 32)


def test_override_type_error_is_a_problem_with_its_path(write_recipe):
    _, problems = check_recipe(write_recipe(TINY_2D), ["train.batch_size=many", "model.image3d.volume.size=[1,2]"])
    assert "train.batch_size" in paths(problems)


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=3", "data.train.5.weight=1"])
def test_bad_override_syntax_is_a_recipe_error(write_recipe, bad):
    with pytest.raises(RecipeError):
        load_recipe(write_recipe(TINY_2D), [bad])


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=runs/x.y") == (["a"], "runs/x.y")
    tree = {"a": [{"b": 1}]}
    apply_override(tree, ["a", "0", "c"], 2)
    assert tree == {"a": [{"b": 1, "c": 2}]}


def test_volume_constraints(write_recipe):
    text = TINY_2D.replace("data:", """  image3d:
    encoder: {type: vit3d, preset: tiny}
    connector: {type: spatial_pooling}
    volume: {size: [32, 256], window: [100, -100], orientation: RAX, spacing: [1, 0, 1]}
data:""")
    _, problems = check_recipe(write_recipe(text))
    assert sorted(paths(problems)) == sorted([
        "model.image3d.volume.size", "model.image3d.volume.window",
        "model.image3d.volume.orientation", "model.image3d.volume.spacing",
    ])


def test_cross_field_checks(write_recipe):
    text = "stage: lora\n" + TINY_2D + "trainable: {image3d_encoder: full, image3d_connector: full}\n"
    _, problems = check_recipe(write_recipe(text), stage="finetune")
    assert sorted(paths(problems)) == ["stage", "trainable.image3d_connector", "trainable.image3d_encoder"]
    assert "medmvl lora" in next(p for p in problems if p.path == "stage").hint


def test_a_model_needs_a_branch_and_one_llm_source(write_recipe):
    text = "model:\n  llm: {preset: tiny-qwen2, path: /somewhere}\n"
    _, problems = check_recipe(write_recipe(text))
    assert any(p.path == "model.llm" and "exactly one" in p.message for p in problems)


@pytest.mark.parametrize(
    "stage, llm, encoder, connector, template",
    [
        ("pretrain", "frozen", "frozen", "full", "plain"),
        ("finetune", "full", "frozen", "full", "qwen2"),
        ("lora", "lora", "frozen", "full", "qwen2"),
    ],
)
def test_stage_defaults(write_recipe, stage, llm, encoder, connector, template):
    recipe = load_recipe(write_recipe(TINY_2D), stage=stage)
    assert recipe.stage == stage
    assert (recipe.trainable.llm, recipe.trainable.image_encoder, recipe.trainable.image_connector) == (llm, encoder, connector)
    assert recipe.trainable.image3d_encoder is None  # no 3D branch, nothing to train there
    assert recipe.model.llm.template == template
    assert (recipe.lora is not None) == (stage == "lora")


def test_trainable_overrides_stage_defaults_key_by_key(write_recipe):
    recipe = load_recipe(write_recipe(TINY_2D + "trainable: {image_encoder: full}\n"), stage="pretrain")
    assert (recipe.trainable.llm, recipe.trainable.image_encoder, recipe.trainable.image_connector) == ("frozen", "full", "full")
    recipe = load_recipe(write_recipe(TINY_2D + "trainable: {llm: lora}\n"), stage="finetune")
    assert recipe.lora.r == 128 and recipe.lora.target_modules == "all-linear"


def test_template_from_a_local_llm_folder(write_recipe, tmp_path):
    llm = tmp_path / "my-llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"model_type": "llama"}))
    text = TINY_2D.replace("{preset: tiny-qwen2, max_length: 256}", "{path: my-llm}")
    recipe = load_recipe(write_recipe(text))
    assert recipe.model.llm.path == str(llm.resolve())
    assert recipe.model.llm.template == "llama3"


def test_paths_resolve_against_the_recipe_and_overrides_against_the_cwd(write_recipe, tmp_path, monkeypatch):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    text = TINY_2D.replace("{type: clip, preset: tiny}", "{type: siglip, path: google/siglip-base-patch16-256}")
    recipe = load_recipe(write_recipe(text), ["data.train.0.image_root=imgs"])
    assert recipe.output_dir == str(tmp_path / "runs" / "tiny")
    assert recipe.data.train[0].annotations == str(tmp_path / "data" / "train.json")
    assert recipe.data.train[0].image_root == str(cwd / "imgs")
    assert recipe.model.image.encoder.path == "google/siglip-base-patch16-256"  # a hub id stays one


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="line"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(listy)


def test_docs_recipes_md_is_generated_from_the_schema():
    committed = (REPO / "docs" / "recipes.md").read_text()
    assert committed == render(), "docs/recipes.md is stale: python -m medmvl_cli.config.reference > docs/recipes.md"
    for key in ("model.image3d.volume.size", "train.lr", "lora.target_modules", "data.train.N.weight"):
        assert f"`{key}`" in committed


MEDMVL_RECIPES = [p for p in SHIPPED if p.parent.name.startswith("medmvl-")]


@pytest.mark.parametrize("recipe", MEDMVL_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_medmvl_recipes_follow_medm_vls_release_day_scripts(recipe):
    """Each names the MedM-VL script (5a90f80) it follows, cites lines, and keeps what those scripts
    set: SigLIP-base-p16-256-multilingual or M3D-CLIP at their last layer, the stage's trainable parts."""
    import re

    text = recipe.read_text()
    assert re.search(r"5a90f80 scripts/train/\S+\.sh", text) and re.search(r"# :\d+", text)
    loaded, problems = check_recipe(recipe)
    assert problems == []
    branch = loaded.model.image or loaded.model.image3d
    assert branch.encoder.select_layer == -1
    if branch.encoder.type in ("siglip", "slices"):
        assert branch.encoder.path == "google/siglip-base-patch16-256-multilingual"
        assert branch.encoder.select_feature == "cls_patch"
    if branch.connector.type == "attention_pooling":
        assert branch.connector.num_queries == 256 and not branch.connector.slice_mean  # the release-day code
    trainable = loaded.trainable.model_dump()
    encoder = trainable["image_encoder" if loaded.model.image else "image3d_encoder"]
    assert encoder == {"pretrain": "frozen", "finetune": "full", "lora": "frozen"}[loaded.stage]


BENCHMARKS = sorted((RECIPES / "benchmarks").glob("*.yaml"))


def test_benchmark_recipes_cover_the_papers():
    assert {p.stem for p in BENCHMARKS} >= {"vqa-rad", "slake", "pathvqa", "m3d-vqa"}


@pytest.mark.parametrize("recipe", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_recipe_reads_data_in_converts_layout(recipe):
    """Each benchmark reads what `medmvl data convert` writes (annotations beside their media);
    building it shrunken is tests/unit/test_recipes_shrunk.py's."""
    full = load_recipe(recipe)
    assert full.model.llm.template == "medmvl-qwen2"
    for spec in [*full.data.train, *full.data.eval]:
        assert Path(spec.annotations).parent == Path(spec.image_root or spec.volume_root)  # convert's layout
