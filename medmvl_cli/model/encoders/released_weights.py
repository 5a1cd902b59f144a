"""Reading released encoder weights (M3D-CLIP, MedM-CLIP, saved vit3d) strictly by key name.

A released checkpoint holds a whole CLIP model; only its vision tower is wanted. Keys outside the
vision tower are dropped only when they are known to belong elsewhere (text tower, projection
heads, logit scale); within the vision tower every key must match the module exactly, by name and
shape. A missing or unexpected key is an error naming the keys, never a silent random init.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from medmvl_cli.errors import ModelError
from medmvl_cli.model.weight_files import check_safetensors

logger = logging.getLogger(__name__)

# Weight files looked for in a folder, in order. `.bin` files are read with weights_only=True.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pretrained_ViT.bin")


def read_config(folder: Path) -> dict:
    """The folder's config.json as a dict ({} when absent)."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{path} is not valid JSON ({err})") from None


def read_state_dict(folder: Path, what: str) -> tuple[dict[str, torch.Tensor], Path]:
    """All tensors of the first weight file found in `folder` (sharded safetensors included)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{what}: weights folder {folder} does not exist", hint="set `path` to a local folder holding the released weights")
    check_safetensors(folder, what, hint="restore the encoder folder (download or copy it again)")
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path)), path
        if name.endswith(".index.json"):
            from safetensors.torch import load_file

            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(str(folder / shard)))
            return state, path
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as err:  # a pickle holding more than tensors
            raise ModelError(
                f"{what}: {path} cannot be read as plain tensors ({type(err).__name__})",
                hint="convert it to safetensors; medmvl never unpickles arbitrary objects",
            ) from None
    raise ModelError(
        f"{what}: no weights in {folder}",
        hint=f"expected one of {', '.join(WEIGHT_FILES)}",
    )


def _shorten(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_vision_weights(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: Path,
    what: str,
    prefix: str,
    ignored_prefixes: tuple[str, ...] = (),
    unused_vision_keys: tuple[str, ...] = (),
) -> None:
    """Load the `prefix`-ed keys of `state` into `module`, strictly.

    ``ignored_prefixes``: keys of other towers that are dropped (text encoder, projections).
    ``unused_vision_keys``: vision keys the release must hold but the feature path never reads
    (e.g. a final norm after the selected layer); they are checked, then dropped.
    When no key carries ``prefix``, the file is taken as the bare vision tower (M3D's
    pretrained_ViT.bin).
    """
    if prefix and not any(k.startswith(prefix) for k in state):
        prefix = ""
    vision: dict[str, torch.Tensor] = {}
    foreign: list[str] = []
    for key, value in state.items():
        if prefix and key.startswith(prefix):
            vision[key[len(prefix):]] = value
        elif prefix and key.startswith(ignored_prefixes):
            continue
        elif prefix:
            foreign.append(key)
        else:
            vision[key] = value
    expected = module.state_dict()
    wanted = set(expected) | set(unused_vision_keys)
    missing = wanted - set(vision)
    unexpected = set(vision) - wanted
    problems = []
    if missing:
        problems.append(f"missing vision keys: {_shorten(prefix + k for k in missing)}")
    if unexpected:
        problems.append(f"unexpected vision keys: {_shorten(prefix + k for k in unexpected)}")
    if foreign:
        problems.append(f"keys of no known tower: {_shorten(foreign)}")
    mismatched = [
        f"{prefix}{k} {tuple(vision[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items() if k in vision and vision[k].shape != v.shape
    ]
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched[:5])}")
    if problems:
        raise ModelError(
            f"{what}: the weights in {source} do not fit the encoder: " + " | ".join(problems),
            hint="check that the folder holds the released checkpoint and that its config.json sizes are right",
        )
    module.load_state_dict({k: vision[k] for k in expected}, strict=True)
    logger.info("%s: loaded %d tensors from %s", what, len(expected), source)


def optional_size(config: dict, key: str, default):
    """A size from a released config.json, as a tuple when it is a list."""
    value = config.get(key, default)
    return tuple(value) if isinstance(value, list) else value

