"""Recipe loading: YAML -> dotted overrides -> validation -> paths -> stage defaults.

Every problem is collected with its dotted key path before anything is raised, so that
`medmvl config check` can list them all at once.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from medmvl_cli.config.problems import Problem, RawRecipe
from medmvl_cli.config.schema import Recipe
from medmvl_cli.errors import RecipeError


# ------------------------------------------------------------------------------------------ YAML
class _RecipeYamlLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, but a key written twice in one mapping is an error, not a silent
    override (PyYAML keeps the last one). Merge keys (``<<: *base``) may still be overridden."""

    def __init__(self, stream):
        super().__init__(stream)
        self.key_paths: dict[int, list[str]] = {}
        self.duplicates: list[tuple[int, Problem]] = []  # (line, problem)

    def construct_document(self, node):
        self.key_paths = _key_paths(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self._find_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def _find_duplicates(self, node: yaml.MappingNode) -> None:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first_line:
                path = ".".join([*self.key_paths.get(id(node), []), str(key)])
                self.duplicates.append((line, Problem(path, f"written twice (lines {first_line[key]} and {line})")))
            else:
                first_line[key] = line


def _key_paths(root: yaml.Node) -> dict[int, list[str]]:
    """The key path of every mapping node (by id), for naming duplicates."""
    paths: dict[int, list[str]] = {}
    stack: list[tuple[yaml.Node, list[str]]] = [(root, [])]
    while stack:
        node, path = stack.pop()
        if id(node) in paths:  # an alias to a node already seen
            continue
        paths[id(node)] = path
        if isinstance(node, yaml.MappingNode):
            stack += [(value, path + [str(key.value)]) for key, value in node.value if isinstance(key, yaml.ScalarNode)]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(item, path + [str(i)]) for i, item in enumerate(node.value)]
    return paths


def load_yaml(text: str, where: str) -> Any:
    """Parse recipe YAML; RecipeError naming every key written twice, with its lines."""
    loader = _RecipeYamlLoader(text)
    try:
        tree = loader.get_single_data()
    finally:
        loader.dispose()
    duplicates = [problem for _, problem in sorted(loader.duplicates, key=lambda d: d[0])]
    if duplicates:
        lines = "\n".join(f"  - {p}" for p in duplicates)
        raise RecipeError(f"{where}: {len(duplicates)} key(s) written twice\n{lines}",
                          hint="delete the copy you do not mean; YAML would silently keep the last",
                          problems=duplicates)
    return tree


# ------------------------------------------------------------------------------------- overrides
def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001); the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(
            f"override {item!r} is not KEY=VALUE",
            hint="write dotted keys, e.g. train.lr=1e-4 or data.train.0.annotations=train.json",
        )
    try:
        parsed = load_yaml(value, f"override {item!r}") if value != "" else None
    except yaml.YAMLError as err:
        raise RecipeError(f"override {item!r}: value is not valid YAML ({err.problem})") from None
    # YAML 1.1 reads 1e-4 as a string; users mean a number.
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(c in parsed.lower() for c in ".e") else parsed
        except ValueError:
            pass
    return key.split("."), parsed


def apply_override(tree: dict, keys: list[str], value: Any) -> None:
    """Set `value` at the dotted `keys` in `tree`, creating mappings and appending list items."""
    node: Any = tree
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) > len(node):
                raise RecipeError(
                    f"override {'.'.join(keys)}: {where!r} indexes a list of {len(node)} item(s)",
                    hint=f"use an index from 0 to {len(node)} ({len(node)} appends)",
                )
            index = int(key)
            if index == len(node):
                node.append(None if last else {})
            if last:
                node[index] = value
            else:
                if node[index] is None:
                    node[index] = {}
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                if node.get(key) is None:
                    node[key] = [] if keys[depth + 1].isdigit() else {}
                node = node[key]
        else:
            raise RecipeError(f"override {'.'.join(keys)}: {'.'.join(keys[:depth])!r} is a value, not a section")


def read_recipe(path: Path | str, overrides: Iterable[str] = ()) -> RawRecipe:
    """Read a recipe file and apply KEY=VALUE overrides (no validation yet)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist", hint="give the path of a .yaml recipe, e.g. recipes/quickstart/tiny-2d.yaml")
    try:
        tree = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of keys, not a {type(tree).__name__}")
    overridden = set()
    for item in overrides:
        keys, value = parse_override(item)
        apply_override(tree, keys, value)
        overridden.add(".".join(keys))
    return RawRecipe(tree=tree, source=path.resolve(), overridden=overridden)


# ------------------------------------------------------------------------------------ validation
def _unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional / Union / Annotated / list / tuple annotations."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None), list, tuple):
        return [t for arg in typing.get_args(annotation) for t in _unwrap(arg)]
    return [annotation]


def _models(annotation: Any) -> list[type[BaseModel]]:
    return [t for t in _unwrap(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]


def _tag_of(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("type")
    if field is not None and typing.get_origin(field.annotation) is typing.Literal:
        return typing.get_args(field.annotation)[0]
    return None


def _walk(loc: tuple) -> tuple[list[str], list[type[BaseModel]]]:
    """Map a pydantic error location to the user's key path and the section class at its parent.

    Discriminator tags (the `clip` in `model.image.encoder.clip.path`) are not keys: they are
    dropped from the path and select the union member instead.
    """
    keys: list[str] = []
    candidates: list[type[BaseModel]] = [Recipe]
    parents: list[type[BaseModel]] = [Recipe]
    for item in loc:
        if isinstance(item, int):
            keys.append(str(item))
            continue
        tagged = [m for m in candidates if _tag_of(m) == item]
        if tagged and len(candidates) > 1:
            candidates = tagged
            continue
        parents = candidates
        keys.append(str(item))
        field = next((m.model_fields[item] for m in candidates if item in m.model_fields), None)
        candidates = _models(field.annotation) if field is not None else []
    return keys, parents


# What other trainers (HF Trainer, LLaVA, LLaMA-Factory, torchtune, Lightning) call medmvl's keys.
KEY_ALIASES: dict[str, str] = {
    **dict.fromkeys(("learning_rate",), "train.lr"),
    **dict.fromkeys(("num_epochs", "num_train_epochs", "n_epochs", "max_epochs"), "train.epochs"),
    **dict.fromkeys(("per_device_train_batch_size", "train_batch_size", "micro_batch_size",
                     "batch_size_per_device"), "train.batch_size"),
    **dict.fromkeys(("gradient_accumulation_steps", "accumulate_grad_batches"), "train.grad_accum"),
    **dict.fromkeys(("lr_scheduler_type", "scheduler"), "train.lr_scheduler"),
    **dict.fromkeys(("warmup_steps",), "train.warmup_ratio"),
    **dict.fromkeys(("gradient_clipping", "clip_grad_norm", "gradient_clip_val"), "train.max_grad_norm"),
    **dict.fromkeys(("enable_activation_checkpointing",), "train.gradient_checkpointing"),
    **dict.fromkeys(("model_max_length", "max_seq_length", "max_seq_len", "cutoff_len"), "model.llm.max_length"),
    **dict.fromkeys(("model_name_or_path",), "model.llm.path"),
    **dict.fromkeys(("bf16", "fp16", "torch_dtype"), "model.llm.dtype"),
    **dict.fromkeys(("lora_r", "lora_rank"), "lora.r"),
    **dict.fromkeys(("lora_alpha",), "lora.alpha"),
    **dict.fromkeys(("lora_dropout",), "lora.dropout"),
    **dict.fromkeys(("lora_target", "lora_target_modules"), "lora.target_modules"),
    **dict.fromkeys(("dataloader_num_workers",), "data.num_workers"),
    **dict.fromkeys(("group_by_modality_length",), "data.group_by_length"),
    **dict.fromkeys(("data_path",), "data.train.N.annotations"),
    **dict.fromkeys(("image_folder",), "data.train.N.image_root"),
}


def _moved_key(name: str, path: str) -> str | None:
    """Where medmvl keeps a key written under another name or in another section, if known."""
    from medmvl_cli.config.reference import key_paths

    if name in KEY_ALIASES:
        return KEY_ALIASES[name]
    homes = [p for p in key_paths() if p.rsplit(".", 1)[-1] == name and p != path]
    return homes[0] if len(homes) == 1 else None


def _problem_from_error(err: dict) -> Problem:
    keys, parents = _walk(tuple(err["loc"]))
    path = ".".join(keys)
    kind = err["type"]
    if kind == "extra_forbidden":
        known = sorted({name for model in parents for name in model.model_fields})
        moved = _moved_key(keys[-1], path)
        close = difflib.get_close_matches(keys[-1], known, n=1, cutoff=0.6)
        if moved is not None:
            hint = f"did you mean {moved}?"
        elif close:
            hint = f"did you mean {close[0]!r}?"
        else:
            hint = f"known keys here: {', '.join(known)}"
        return Problem(path, "unknown key", hint)
    if kind == "missing" and keys[-1].isdigit():
        return Problem(".".join(keys[:-1]), "has too few values")
    if kind == "missing":
        return Problem(path, "required key is missing")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return Problem(path + ".type" if path else "type", err["msg"])
    message = err["msg"].removeprefix("Value error, ")
    if "input" in err and kind not in ("model_type", "dict_type") and not isinstance(err["input"], (dict, list)):
        message += f" (got {err['input']!r})"
    return Problem(path, message)


def validate_tree(tree: dict) -> tuple[Recipe | None, list[Problem]]:
    """Validate a raw recipe tree; returns the recipe (or None) and every problem found."""
    try:
        return Recipe.model_validate(tree), []
    except ValidationError as err:
        return None, [_problem_from_error(e) for e in err.errors()]


def check_recipe(
    path: Path | str, overrides: Iterable[str] = (), stage: str | None = None
) -> tuple[Recipe | None, list[Problem]]:
    """Load, validate and resolve; returns the resolved recipe (None if not valid) and all problems."""
    from medmvl_cli.config.resolve import cross_check, resolve_paths, resolve_stage

    raw = read_recipe(path, overrides)
    recipe, problems = validate_tree(raw.tree)
    problems += cross_check(raw.tree, stage)
    if recipe is None or problems:
        return None, _unique(problems)
    recipe = resolve_paths(recipe, raw)
    recipe, stage_problems = resolve_stage(recipe, stage)
    return (recipe if not stage_problems else None), stage_problems


def load_recipe(path: Path | str, overrides: Iterable[str] = (), stage: str | None = None) -> Recipe:
    """Load a recipe ready to run, or raise RecipeError listing every problem."""
    recipe, problems = check_recipe(path, overrides, stage)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise RecipeError(
            f"{path}: {len(problems)} problem(s)\n{lines}",
            hint=f"fix the keys above; `medmvl config check {path}` lists them again",
            problems=problems,
        )
    assert recipe is not None
    return recipe


def _unique(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.path, p.message) not in seen:
            seen.add((p.path, p.message))
            out.append(p)
    return out


def _type_first(node: Any) -> Any:
    if isinstance(node, dict):
        ordered = {"type": node["type"]} if "type" in node else {}
        ordered.update((k, _type_first(v)) for k, v in node.items() if k != "type")
        return ordered
    if isinstance(node, list):
        return [_type_first(v) for v in node]
    return node


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, in schema order with `type` first, None values kept (they are meaningful)."""
    tree = _type_first(recipe.model_dump(mode="json"))
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=None, width=100)
