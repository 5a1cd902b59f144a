"""From a valid recipe to the one that runs: cross-field checks, paths, stage defaults.

Stage defaults for `trainable` (a recipe's values override them key by key):

| stage    | llm    | encoders | connectors | template default |
|----------|--------|----------|------------|------------------|
| pretrain | frozen | frozen   | full       | plain            |
| finetune | full   | frozen   | full       | the LLM's        |
| lora     | lora   | frozen   | full       | the LLM's        |
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medmvl_cli.config.names import PRESET_TEMPLATES
from medmvl_cli.config.problems import Problem, RawRecipe
from medmvl_cli.config.schema import STAGES, LoraConfig, Recipe

STAGE_DEFAULTS: dict[str, dict[str, str]] = {
    "pretrain": {"llm": "frozen", "encoder": "frozen", "connector": "full"},
    "finetune": {"llm": "full", "encoder": "frozen", "connector": "full"},
    "lora": {"llm": "lora", "encoder": "frozen", "connector": "full"},
}
DEEPSPEED_PRESETS = ("zero2", "zero3")
MODEL_TYPE_TEMPLATES = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama3", "phi": "phi", "phi3": "phi3"}


def _get(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def cross_check(tree: dict, stage: str | None) -> list[Problem]:
    """Checks that span sections, run on the raw tree so they are reported beside field errors."""
    problems: list[Problem] = []
    recipe_stage = tree.get("stage")
    if stage is not None and recipe_stage in STAGES and recipe_stage != stage:
        problems.append(Problem(
            "stage", f"the recipe says stage {recipe_stage!r} but it is run by `medmvl {stage}`",
            hint=f"run `medmvl {recipe_stage}` or remove `stage` from the recipe",
        ))
    trainable = tree.get("trainable") if isinstance(tree.get("trainable"), dict) else {}
    model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
    for branch in ("image", "image3d"):
        if model.get(branch) is None:
            for part in ("encoder", "connector"):
                key = f"{branch}_{part}"
                if trainable.get(key) is not None:
                    problems.append(Problem(
                        f"trainable.{key}", f"is set but the model has no `model.{branch}` branch",
                        hint=f"add `model.{branch}` or remove `trainable.{key}`",
                    ))
    problems += _tracker_problems(_get(tree, "train", "report_to"))
    problems += _best_checkpoint_problems(tree)
    deepspeed = _get(tree, "distributed", "deepspeed")
    if isinstance(deepspeed, str) and deepspeed not in DEEPSPEED_PRESETS and not deepspeed.endswith(".json"):
        problems.append(Problem(
            "distributed.deepspeed", f"{deepspeed!r} is neither a preset nor a .json file",
            hint="use zero2, zero3 or the path of a DeepSpeed config .json",
        ))
    return problems


def _best_checkpoint_problems(tree: dict) -> list[Problem]:
    """`train.keep_best` needs evaluations during the run, each one with a checkpoint to return to."""
    train = tree.get("train") if isinstance(tree.get("train"), dict) else {}
    problems = []
    metric, generate = train.get("metric_for_best"), train.get("eval_generate", True)
    if metric not in (None, "loss") and generate is False:
        problems.append(Problem("train.metric_for_best", f"{metric!r} is scored from generated answers, "
                                "but train.eval_generate is false", hint="set train.eval_generate: true, or use loss"))
    if train.get("keep_best") is not True:
        return problems
    eval_steps, save_steps = train.get("eval_steps"), train.get("save_steps", 500)
    if not _get(tree, "data", "eval"):
        problems.append(Problem("train.keep_best", "needs evaluations, but data.eval is empty",
                                hint="add data.eval: [{annotations: val.json}], or set keep_best: false"))
    elif not isinstance(eval_steps, int):
        problems.append(Problem("train.keep_best", "needs evaluations during the run, but train.eval_steps is null",
                                hint="set train.eval_steps (and train.save_steps to a multiple of it)"))
    elif isinstance(save_steps, int) and save_steps % eval_steps:
        problems.append(Problem("train.save_steps", f"is {save_steps}, not a multiple of train.eval_steps "
                                f"({eval_steps}): an evaluation could be the best with no checkpoint to return to",
                                hint=f"set train.save_steps to a multiple of {eval_steps}"))
    return problems


def _tracker_problems(names: Any) -> list[Problem]:
    """A tracker whose package is not installed is a recipe problem naming the pip install."""
    from medmvl_cli.config.trackers import missing_package

    problems = []
    for index, name in enumerate(names if isinstance(names, list) else []):
        package = missing_package(name) if isinstance(name, str) else None
        if package is not None:
            problems.append(Problem(
                f"train.report_to.{index}", f"tracker {name!r} needs the {package} package, which is not installed",
                hint=f"pip install {package}, or remove {name!r} from train.report_to",
            ))
    return problems


# ------------------------------------------------------------------------------------------ paths
def _looks_local(value: str, base: Path) -> bool:
    """A model path is local if it exists beside the recipe or is written as a path; else a hub id."""
    return value.startswith((".", "/", "~")) or (base / value).exists()


def _resolve(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    return str((base / Path(value).expanduser()).resolve())


def resolve_paths(recipe: Recipe, raw: RawRecipe) -> Recipe:
    """Relative paths resolve against the recipe's folder; paths given as overrides, against the CWD."""
    recipe_dir = raw.source.parent if raw.source else Path.cwd()

    def base(key: str) -> Path:
        return Path.cwd() if key in raw.overridden else recipe_dir

    recipe = recipe.model_copy(deep=True)
    recipe.output_dir = _resolve(recipe.output_dir, base("output_dir"))
    recipe.init_from = _resolve(recipe.init_from, base("init_from"))
    for split in ("train", "eval"):
        for index, spec in enumerate(getattr(recipe.data, split)):
            for key in ("annotations", "image_root", "volume_root"):
                setattr(spec, key, _resolve(getattr(spec, key), base(f"data.{split}.{index}.{key}")))
    recipe.data.cache_dir = _resolve(recipe.data.cache_dir, base("data.cache_dir"))
    deepspeed = recipe.distributed.deepspeed
    if deepspeed is not None and deepspeed not in DEEPSPEED_PRESETS:
        recipe.distributed.deepspeed = _resolve(deepspeed, base("distributed.deepspeed"))
    parts = [("model.llm.path", recipe.model.llm)]
    for branch in ("image", "image3d"):
        if getattr(recipe.model, branch) is not None:
            parts.append((f"model.{branch}.encoder.path", getattr(recipe.model, branch).encoder))
    for key, section in parts:
        value = getattr(section, "path", None)
        if value is not None and _looks_local(value, base(key)):
            section.path = _resolve(value, base(key))
    return recipe


# ----------------------------------------------------------------------------------------- stages
def llm_template(recipe: Recipe) -> str | None:
    """The native chat template of the recipe's LLM, or None if its family cannot be told."""
    llm = recipe.model.llm
    if llm.preset is not None:
        return PRESET_TEMPLATES[llm.preset]
    config = Path(llm.path) / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type", "")
        if model_type in MODEL_TYPE_TEMPLATES:
            return MODEL_TYPE_TEMPLATES[model_type]
    name = Path(llm.path).name.lower().replace("-", "").replace("_", "").replace(".", "")
    for marker, template in (("qwen", "qwen2"), ("llama3", "llama3"), ("phi3", "phi3"), ("phi", "phi")):
        if marker in name:
            return template
    return None


def resolve_stage(recipe: Recipe, stage: str | None) -> tuple[Recipe, list[Problem]]:
    """Fill `stage`, `trainable`, `lora` and `model.llm.template` with the stage defaults."""
    problems: list[Problem] = []
    recipe = recipe.model_copy(deep=True)
    recipe.stage = stage or recipe.stage or "finetune"
    defaults = STAGE_DEFAULTS[recipe.stage]
    trainable = recipe.trainable
    trainable.llm = trainable.llm or defaults["llm"]
    for branch in ("image", "image3d"):
        present = getattr(recipe.model, branch) is not None
        for part in ("encoder", "connector"):
            key = f"{branch}_{part}"
            if present and getattr(trainable, key) is None:
                setattr(trainable, key, defaults[part])
    if trainable.llm == "lora" and recipe.lora is None:
        recipe.lora = LoraConfig()
    if recipe.model.llm.template is None:
        template = "plain" if recipe.stage == "pretrain" else llm_template(recipe)
        if template is None:
            problems.append(Problem(
                "model.llm.template", f"cannot tell the chat template of {recipe.model.llm.path}",
                hint="set model.llm.template to qwen2, llama3, phi or phi3",
            ))
        else:
            recipe.model.llm.template = template
    return recipe, problems
