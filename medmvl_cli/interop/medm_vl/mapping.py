"""How a MedM-VL checkpoint maps onto a medmvl model: its settings onto branches (encoder arch,
connector spec, volume preprocessing), its weight names onto ours, and the checks that every
key has a place and every weight the model needs is there.

Faithfulness decisions (docs/interop.md has the full table):

- `select_layer`: CLIP / SigLIP index transformers' hidden states as medmvl does (0 = embeddings);
  M3D-CLIP's and MedM-CLIP's own ViTs list block outputs only, so their k >= 0 becomes k + 1;
- `select_feature`: `patch` drops CLIP's CLS token in both; MedM-VL's SigLIP `patch` dropped the
  first *patch* (SigLIP has no CLS token), which medmvl cannot do: refused unless
  `allow_approximate` (then every patch is kept);
- the CT-Chest model (a 2D SigLIP over the slices of a volume, attention pooling) becomes a
  `slices` encoder and its connector, pooled over slices as `slice_pooling` says: `concat` (MedM-VL
  from 5a90f80, the weights' release day, to HEAD: the slices' tokens concatenated, (B, N·L, D), one
  attention pooling over all of them) or `mean` (MedM-VL before it, 135db87: the connector on each
  slice, its outputs averaged: `slice_mean: true`); with medmvl's volume preprocessing (HU window
  [-1000, 1000] -> [0, 1], foreground crop, slices x S x S, the encoder's normalisation per slice).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medmvl_cli.config.names import NATIVE_TEMPLATES
from medmvl_cli.errors import ModelError
from medmvl_cli.interop.medm_vl.checkpoint import MedmVlCheckpoint, image3d_encoder_config, vision_config

logger = logging.getLogger(__name__)

# MedM-VL's LLM type -> its prompt layout for that family.
TEMPLATES = {family: f"medmvl-{family}" for family in NATIVE_TEMPLATES}
ENCODERS_2D = ("clip", "siglip")
ENCODERS_3D = {"m3dclip": "m3d_clip", "medmclip": "medm_clip"}
ATTN_POOLING_HEADS = 8  # fixed in MedM-VL's AttnPooling
SPATIAL_POOL = 2  # fixed in MedM-VL's SpatialPooling
SLICE_POOLING = {
    "concat": "the slices' tokens are concatenated and the connector pools them together (MedM-VL 5a90f80, "
              "the weights' release day, to HEAD)",
    "mean": "the connector runs on each slice and its outputs are averaged over slices (MedM-VL before 5a90f80, "
            "135db87)",
}
CT_WINDOW = [-1000.0, 1000.0]
# Buffers older transformers saved that current models rebuild (never weights).
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")


@dataclass
class Branch:
    """How one medmvl branch is made from the checkpoint."""

    name: str  # image | image3d
    encoder: dict[str, Any]  # the recipe section (type, path, select_layer, select_feature, ...)
    arch: dict[str, Any]  # the encoder's arch (config.json of the model)
    connector: dict[str, Any]
    volume: dict[str, Any] | None = None
    renames: list[tuple[str, str]] = field(default_factory=list)  # (source prefix, target prefix)
    dropped: list[str] = field(default_factory=list)  # source prefixes of weights the model never uses


@dataclass
class Plan:
    branches: list[Branch]
    template: str
    notes: list[str] = field(default_factory=list)  # how MedM-VL settings were translated


# ------------------------------------------------------------------------------------------ plan
def connector_spec(checkpoint: MedmVlCheckpoint, source: str, slice_mean: bool) -> dict[str, Any]:
    """The medmvl connector spec of `connector_image` / `connector_image3d`."""
    kind = checkpoint.get(f"{source}_type")
    name = checkpoint.get(f"{source}_name") or ""
    match = re.fullmatch(r"mlp(\d+)x_(gelu|relu)", name)
    if match is None:
        raise ModelError(f"lvlm_{source}_name is {name!r}; MedM-VL's connectors are named mlp<depth>x_gelu",
                         hint="check the checkpoint's config.json")
    mlp = {"depth": int(match.group(1)), "activation": match.group(2)}
    if kind == "mlp":
        spec = {"type": "mlp", **mlp}
    elif kind == "spatial_pooling":
        spec = {"type": "spatial_pooling", "pool": SPATIAL_POOL, **mlp}
    elif kind == "attn_pooling":
        query = checkpoint.weights.get(f"{source}.query")
        if query is None:
            raise ModelError(f"lvlm_{source}_type is attn_pooling but the weights have no {source}.query")
        spec = {"type": "attention_pooling", "num_queries": int(query.shape[0]), "heads": ATTN_POOLING_HEADS, **mlp}
    else:
        raise ModelError(f"lvlm_{source}_type {kind!r} is not a MedM-VL connector",
                         hint="MedM-VL's connectors are mlp, spatial_pooling and attn_pooling")
    if slice_mean:
        spec["slice_mean"] = True
    return spec


def connector_renames(source: str, branch: str) -> list[tuple[str, str]]:
    return [(f"{source}.connector.", f"{branch}_connector.mlp."), (f"{source}.query", f"{branch}_connector.query"),
            (f"{source}.attn.", f"{branch}_connector.attn.")]


def select_feature_2d(kind: str, feature: str, allow_approximate: bool, notes: list[str]) -> str:
    if kind == "siglip" and feature == "patch":
        message = ("MedM-VL's SigLIP select_feature `patch` drops the first patch token (SigLIP has no CLS token); "
                   "medmvl's siglip encoder keeps every patch")
        if not allow_approximate:
            raise ModelError(message, hint="pass --allow-approximate to import it keeping every patch (one token more "
                                           "than the model was trained with)")
        notes.append(message + ": imported keeping every patch (--allow-approximate)")
    return feature


def image_processor(kind: str, folder: Path | None, image_size: int):
    """The 2D encoder folder's image processor (what MedM-VL used), else the backend's defaults."""
    from medmvl_cli.model.encoders.hf_tower import default_image_processor

    if folder is not None and (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(folder))
    logger.warning("no preprocessor_config.json for the %s encoder: using %s defaults at %d px", kind, kind, image_size)
    return default_image_processor(kind, image_size)


def plan_2d(checkpoint: MedmVlCheckpoint, as_slices: bool, as_image: bool, encoder_dir: Path | None,
            num_slices: int, slice_pooling: str, allow_approximate: bool, notes: list[str]):
    """The branches made from MedM-VL's 2D encoder (image, slices or both), and its processor."""
    kind = checkpoint.get("encoder_image_type")
    if kind not in ENCODERS_2D:
        raise ModelError(f"lvlm_encoder_image_type {kind!r} is not one medmvl imports", hint="MedM-VL's 2D encoders are clip and siglip")
    vision, folder = vision_config(checkpoint, kind, encoder_dir)
    if kind == "siglip":
        vision["vision_use_head"] = False  # its pooling head never feeds the features (dropped below)
    processor = image_processor(kind, folder, int(vision["image_size"]))
    layer = int(checkpoint.get("encoder_image_select_layer", -2))
    feature = select_feature_2d(kind, checkpoint.get("encoder_image_select_feature", "patch"), allow_approximate, notes)
    arch = {"type": kind, "select_layer": layer, "select_feature": feature, "vision_config": vision,
            "image_mean": [float(v) for v in processor.image_mean], "image_std": [float(v) for v in processor.image_std]}
    section = {"path": checkpoint.get("encoder_image_name_or_path") or (str(folder) if folder else None),
               "select_layer": layer, "select_feature": feature}
    towers = ["encoder_image.encoder.vision_model.", "encoder_image.encoder."]  # transformers 4.x / 5.x names
    dropped = ["encoder_image.encoder.vision_model.head.", "encoder_image.encoder.head."]  # SigLIP's pooling head
    branches = []
    if as_image:
        branches.append(Branch(
            "image", {"type": kind, **section}, arch, connector_spec(checkpoint, "connector_image", slice_mean=False),
            renames=[(t, "image_encoder.tower.") for t in towers] + connector_renames("connector_image", "image"),
            dropped=dropped,
        ))
    if as_slices:
        side = int(vision["image_size"])
        branches.append(Branch(
            "image3d", {"type": "slices", "base": kind, "num_slices": num_slices, **section},
            {"type": "slices", "base": kind, "num_slices": num_slices, "select_layer": layer, "select_feature": feature,
             "base_arch": arch},
            connector_spec(checkpoint, "connector_image", slice_mean=slice_pooling == "mean"),
            volume={"size": [num_slices, side, side], "window": CT_WINDOW, "spacing": None, "orientation": "LPS",
                    "crop_foreground": True},
            renames=[(t, "image3d_encoder.base.tower.") for t in towers] + connector_renames("connector_image", "image3d"),
            dropped=dropped,
        ))
        notes.append(f"the {kind} encoder runs over {num_slices} slices of each volume; --slice-pooling "
                     f"{slice_pooling}: {SLICE_POOLING[slice_pooling]}")
    return branches, (processor if as_image else None)


def plan_3d(checkpoint: MedmVlCheckpoint, encoder_dir: Path | None, notes: list[str]) -> Branch:
    from medmvl_cli.model.encoders import m3d_clip, medm_clip
    from medmvl_cli.model.encoders.released_weights import optional_size

    source_kind = checkpoint.get("encoder_image3d_type")
    if source_kind not in ENCODERS_3D:
        raise ModelError(f"lvlm_encoder_image3d_type {source_kind!r} is not one medmvl imports",
                         hint="MedM-VL's 3D encoders are m3dclip and medmclip")
    kind = ENCODERS_3D[source_kind]
    released, folder = image3d_encoder_config(checkpoint, encoder_dir)
    layer = int(checkpoint.get("encoder_image3d_select_layer", -1))
    if layer >= 0:
        notes.append(f"{source_kind} select_layer {layer} (an index into its block outputs) is select_layer {layer + 1} "
                     "here (0 = the patch embeddings)")
        layer += 1
    feature = checkpoint.get("encoder_image3d_select_feature", "patch")
    if kind == "m3d_clip":
        sizes = {k: optional_size(released, k, v) for k, v in m3d_clip.M3D_DEFAULTS.items()}
        sizes = {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()}
        text_prefixes, unused = m3d_clip.TEXT_PREFIXES, m3d_clip.UNUSED_VISION_KEYS
    else:
        sizes = medm_clip._sizes(released)
        text_prefixes, unused = medm_clip.TEXT_PREFIXES, medm_clip.UNUSED_VISION_KEYS
    arch = {"type": kind, "select_layer": layer, "select_feature": feature, **sizes}
    prefix = "encoder_image3d.encoder."
    return Branch(
        "image3d", {"type": kind, "path": checkpoint.get("encoder_image3d_name_or_path") or (str(folder) if folder else None),
                    "select_layer": layer, "select_feature": feature}, arch,
        connector_spec(checkpoint, "connector_image3d", slice_mean=False),
        volume={"size": list(sizes["img_size"]), "window": CT_WINDOW, "spacing": None, "orientation": "LPS",
                "crop_foreground": True},
        renames=[(prefix + "vision_encoder.", "image3d_encoder.vit.")] + connector_renames("connector_image3d", "image3d"),
        dropped=[prefix + p for p in text_prefixes] + [prefix + "vision_encoder." + k for k in unused],
    )


def plan_import(checkpoint: MedmVlCheckpoint, *, branch: str = "auto", num_slices: int = 32,
                slice_pooling: str = "concat", template: str | None = None, image_encoder_dir: Path | None = None,
                image3d_encoder_dir: Path | None = None, allow_approximate: bool = False):
    """(the plan, the 2D image processor or None) for a checkpoint."""
    from medmvl_cli.data.templates import get_template

    if slice_pooling not in SLICE_POOLING:
        raise ModelError(f"slice pooling {slice_pooling!r} is not one MedM-VL used",
                         hint=f"use one of {', '.join(SLICE_POOLING)}")
    notes: list[str] = []
    llm_type = checkpoint.get("llm_type")
    if template is None:
        if llm_type not in TEMPLATES:
            raise ModelError(f"lvlm_llm_type {llm_type!r} has no MedM-VL prompt format here",
                             hint=f"pass --template (one of {', '.join(TEMPLATES.values())}, or a native template)")
        template = TEMPLATES[llm_type]
    get_template(template)
    has_2d = checkpoint.get("encoder_image_type") is not None
    has_3d = checkpoint.get("encoder_image3d_type") is not None
    if not has_2d and not has_3d:
        raise ModelError(f"{checkpoint.folder}/config.json names no encoder (lvlm_encoder_image_type / _image3d_type)")
    if branch == "auto":
        # MedM-VL feeds volumes through the 2D encoder when there is no 3D one; its attention
        # pooling connector is there only for that (CT-Chest).
        branch = "slices" if has_2d and not has_3d and checkpoint.get("connector_image_type") == "attn_pooling" else "2d"
    if branch in ("slices", "both") and has_3d:
        raise ModelError("the checkpoint has its own 3D encoder: its 2D encoder cannot also be imported as slices",
                         hint="use --as 2d (or auto)")
    if branch != "2d" and not has_2d:
        raise ModelError(f"--as {branch} needs MedM-VL's 2D encoder, which this checkpoint lacks", hint="use --as auto")
    branches: list[Branch] = []
    processor = None
    if has_2d:
        branches, processor = plan_2d(checkpoint, branch in ("slices", "both"), branch in ("2d", "both"),
                                      image_encoder_dir, num_slices, slice_pooling, allow_approximate, notes)
    if has_3d:
        branches.append(plan_3d(checkpoint, image3d_encoder_dir, notes))
    return Plan(branches, template, notes), processor


# --------------------------------------------------------------------------------------- weights
def rename_weights(source: dict[str, torch.Tensor], plan: Plan) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """(our weights, source keys with no place, our key -> its source key) under the plan's renames;
    `llm.*` keeps its names. Within each branch the longest matching prefix wins; a key may feed
    several branches (--as both)."""
    groups = [[("llm.", "llm.")]] + [branch.renames for branch in plan.branches]
    dropped = tuple(p for branch in plan.branches for p in branch.dropped)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unplaced = []
    for key, value in source.items():
        if key.startswith(dropped) or key.endswith(_BUFFER_SUFFIXES):
            continue
        placed = False
        for group in groups:
            match = max((r for r in group if key.startswith(r[0])), key=lambda r: len(r[0]), default=None)
            if match is not None:
                target = match[1] + key[len(match[0]):]
                out[target], origin[target] = value, key
                placed = True
        if not placed:
            unplaced.append(key)
    return out, unplaced, origin


def _shorten(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_weights(ours: dict[str, torch.Tensor], unplaced: list[str], origin: dict[str, str],
                  expected: dict[str, torch.Size], source: Path, untied_head: str | None) -> None:
    """Every expected weight present with its shape; every source key placed. ModelError otherwise,
    naming source keys (and our names for the weights the checkpoint lacks).
    `untied_head`: the output head's name when the LLM does not tie it to the embeddings."""
    problems = []
    missing = set(expected) - set(ours)
    unexpected = sorted(unplaced) + sorted(f"{origin.get(k, k)} (as {k})" for k in set(ours) - set(expected))
    if missing:
        problems.append(f"missing: {_shorten(missing)}")
    if unexpected:
        problems.append(f"unexpected: {_shorten(unexpected)}")
    mismatched = [f"{origin.get(k, k)} {tuple(ours[k].shape)} (expected {tuple(v)})" for k, v in expected.items()
                  if k in ours and tuple(ours[k].shape) != tuple(v)]
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched[:5])}")
    if problems:
        hint = "the checkpoint does not match its config.json (or the encoder / LLM config given)"
        if any("lora_" in k or "base_model.model" in k for k in unexpected):
            hint = "the checkpoint holds an unmerged LoRA adapter: merge it (MedM-VL's recipe save does) and import again"
        elif untied_head is not None and untied_head in missing:
            hint = f"the LLM does not tie its embeddings (tie_word_embeddings: false), so {untied_head} is needed"
        raise ModelError(f"{source}: the weights do not fit the model: " + " | ".join(problems), hint=hint)
