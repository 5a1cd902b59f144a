"""`medmvl import medm-vl`: a MedM-VL checkpoint folder -> a medmvl run folder.

The checkpoint is converted file to file: MedM-VL's settings become a medmvl model config, its
weights are renamed into medmvl's layout (every key accounted for: a key with no place, or a
weight the model needs that the checkpoint lacks, is an error naming it), the tokenizer gains the
`<image>` / `<image3d>` placeholders, and the run folder gets recipe.yaml, model/ and FINISHED.
The model folder is loaded once before the run is renamed into place.

Semantics kept faithful (docs/interop.md has the full table):

- prompt format: `medmvl-<llm type>` (MedM-VL's "<system> USER: ... ASSISTANT:"), `--template`
  to choose another (required for `llama`, which has no MedM-VL template here);
- `select_layer`: CLIP / SigLIP index transformers' hidden states as medmvl does (0 = embeddings);
  M3D-CLIP's and MedM-CLIP's own ViTs list block outputs only, so their k >= 0 becomes k + 1;
- `select_feature`: `patch` drops CLIP's CLS token in both; MedM-VL's SigLIP `patch` dropped the
  first *patch* (SigLIP has no CLS token), which medmvl cannot do: refused unless
  `allow_approximate` (then every patch is kept);
- the CT-Chest model (a 2D SigLIP over the slices of a volume, attention pooling, connector
  outputs averaged over slices) becomes a `slices` encoder with a `slice_mean` connector and
  MedM-VL's preprocessing (HU window [-1000, 1000], foreground crop, 32 x S x S, the encoder's
  normalisation per slice).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from medmvl_cli.errors import ModelError
from medmvl_cli.interop.medmvl_checkpoint import (
    MedmvlCheckpoint,
    has_tokenizer,
    image3d_encoder_config,
    llm_config,
    read_checkpoint,
    vision_config,
)

logger = logging.getLogger(__name__)

TEMPLATES = {"qwen2": "medmvl-qwen2", "llama3": "medmvl-llama3", "phi": "medmvl-phi", "phi3": "medmvl-phi3"}
ENCODERS_2D = ("clip", "siglip")
ENCODERS_3D = {"m3dclip": "m3d_clip", "medmclip": "medm_clip"}
ATTN_POOLING_HEADS = 8  # fixed in MedM-VL's AttnPooling
SPATIAL_POOL = 2  # fixed in MedM-VL's SpatialPooling
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
    volume: Optional[dict[str, Any]] = None
    renames: list[tuple[str, str]] = field(default_factory=list)  # (source prefix, target prefix)
    dropped: list[str] = field(default_factory=list)  # source prefixes of weights the model never uses


@dataclass
class Plan:
    branches: list[Branch]
    template: str
    notes: list[str] = field(default_factory=list)  # how MedM-VL settings were translated


# ------------------------------------------------------------------------------------------ plan
def connector_spec(checkpoint: MedmvlCheckpoint, source: str, slice_mean: bool) -> dict[str, Any]:
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


def plan_2d(checkpoint: MedmvlCheckpoint, as_slices: bool, as_image: bool, encoder_dir: Optional[Path],
            num_slices: int, allow_approximate: bool, notes: list[str]):
    """The branches made from MedM-VL's 2D encoder (image, slices or both), and its processor."""
    from medmvl_cli.model.encoders.hf_tower import default_image_processor

    kind = checkpoint.get("encoder_image_type")
    if kind not in ENCODERS_2D:
        raise ModelError(f"lvlm_encoder_image_type {kind!r} is not one medmvl imports", hint="MedM-VL's 2D encoders are clip and siglip")
    vision, folder = vision_config(checkpoint, kind, encoder_dir)
    if kind == "siglip":
        vision["vision_use_head"] = False  # its pooling head never feeds the features (dropped below)
    processor = None
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(folder))
    else:
        logger.warning("no preprocessor_config.json for the %s encoder: using %s defaults at %d px",
                       kind, kind, vision["image_size"])
        processor = default_image_processor(kind, int(vision["image_size"]))
    layer = int(checkpoint.get("encoder_image_select_layer", -2))
    feature = select_feature_2d(kind, checkpoint.get("encoder_image_select_feature", "patch"), allow_approximate, notes)
    arch = {"type": kind, "select_layer": layer, "select_feature": feature, "vision_config": vision,
            "image_mean": [float(v) for v in processor.image_mean], "image_std": [float(v) for v in processor.image_std]}
    path = checkpoint.get("encoder_image_name_or_path") or str(folder)
    tower_sources = ["encoder_image.encoder.vision_model.", "encoder_image.encoder."]
    dropped = ["encoder_image.encoder.vision_model.head.", "encoder_image.encoder.head."]  # SigLIP's pooling head
    branches = []
    if as_image:
        branches.append(Branch(
            "image", {"type": kind, "path": path, "select_layer": layer, "select_feature": feature}, arch,
            connector_spec(checkpoint, "connector_image", slice_mean=False),
            renames=[(s, "image_encoder.tower.") for s in tower_sources] + connector_renames("connector_image", "image"),
            dropped=dropped,
        ))
    if as_slices:
        side = int(vision["image_size"])
        slices_arch = {"type": "slices", "base": kind, "num_slices": num_slices, "select_layer": layer,
                       "select_feature": feature, "base_arch": arch}
        branches.append(Branch(
            "image3d", {"type": "slices", "base": kind, "path": path, "num_slices": num_slices, "select_layer": layer,
                        "select_feature": feature}, slices_arch,
            connector_spec(checkpoint, "connector_image", slice_mean=True),
            volume={"size": [num_slices, side, side], "window": CT_WINDOW, "spacing": None, "orientation": "LPS",
                    "crop_foreground": True},
            renames=[(s, "image3d_encoder.base.tower.") for s in tower_sources]
            + connector_renames("connector_image", "image3d"),
            dropped=dropped,
        ))
        notes.append(f"the {kind} encoder runs over {num_slices} slices of each volume; the connector's outputs are "
                     "averaged over slices (MedM-VL CT-Chest)")
    return branches, (processor if as_image else None)


def plan_3d(checkpoint: MedmvlCheckpoint, encoder_dir: Optional[Path], notes: list[str]) -> Branch:
    from medmvl_cli.model.encoders import m3d_clip, medm_clip
    from medmvl_cli.model.encoders.released import optional_size

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
        "image3d", {"type": kind, "path": checkpoint.get("encoder_image3d_name_or_path") or str(folder),
                    "select_layer": layer, "select_feature": feature}, arch,
        connector_spec(checkpoint, "connector_image3d", slice_mean=False),
        volume={"size": list(sizes["img_size"]), "window": CT_WINDOW, "spacing": None, "orientation": "LPS",
                "crop_foreground": True},
        renames=[(prefix + "vision_encoder.", "image3d_encoder.vit.")] + connector_renames("connector_image3d", "image3d"),
        dropped=[prefix + p for p in text_prefixes] + [prefix + "vision_encoder." + k for k in unused],
    )


def plan_import(checkpoint: MedmvlCheckpoint, *, branch: str = "auto", num_slices: int = 32,
                template: Optional[str] = None, image_encoder_dir: Optional[Path] = None,
                image3d_encoder_dir: Optional[Path] = None, allow_approximate: bool = False):
    """(the plan, the 2D image processor or None) for a checkpoint."""
    from medmvl_cli.data.templates import get_template

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
                                      image_encoder_dir, num_slices, allow_approximate, notes)
    if has_3d:
        branches.append(plan_3d(checkpoint, image3d_encoder_dir, notes))
    return Plan(branches, template, notes), processor


# --------------------------------------------------------------------------------------- weights
def rename_weights(source: dict[str, torch.Tensor], plan: Plan) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our weights, source keys with no place) under the plan's renames; `llm.*` keeps its names.
    Within each branch the longest matching prefix wins; a key may feed several branches (--as both)."""
    groups = [[("llm.", "llm.")]] + [branch.renames for branch in plan.branches]
    dropped = tuple(p for branch in plan.branches for p in branch.dropped)
    out: dict[str, torch.Tensor] = {}
    unplaced = []
    for key, value in source.items():
        if key.startswith(dropped) or key.endswith(_BUFFER_SUFFIXES):
            continue
        placed = False
        for group in groups:
            match = max((r for r in group if key.startswith(r[0])), key=lambda r: len(r[0]), default=None)
            if match is not None:
                out[match[1] + key[len(match[0]):]] = value
                placed = True
        if not placed:
            unplaced.append(key)
    return out, unplaced


def _shorten(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_weights(ours: dict[str, torch.Tensor], unplaced: list[str], expected: dict[str, torch.Size],
                  source: Path, untied_head: Optional[str]) -> None:
    """Every expected weight present with its shape; every source key placed. ModelError otherwise.
    `untied_head`: the output head's name when the LLM does not tie it to the embeddings."""
    problems = []
    missing = set(expected) - set(ours)
    unexpected = sorted(unplaced) + sorted(set(ours) - set(expected))
    if missing:
        problems.append(f"missing: {_shorten(missing)}")
    if unexpected:
        problems.append(f"unexpected: {_shorten(unexpected)}")
    mismatched = [f"{k} {tuple(ours[k].shape)} (expected {tuple(v)})" for k, v in expected.items()
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


# ----------------------------------------------------------------------------------- the import
def load_tokenizer(checkpoint: MedmvlCheckpoint, tokenizer_dir: Optional[Path], llm_dir: Optional[Path], text_config):
    """The LLM's tokenizer: saved beside the weights, else --tokenizer, else the --llm folder's."""
    from transformers import AutoTokenizer

    candidates = [checkpoint.folder, tokenizer_dir, llm_dir]
    name = checkpoint.get("llm_name_or_path")
    if name and Path(name).expanduser().is_dir():
        candidates.append(Path(name).expanduser())
    folder = next((Path(c) for c in candidates if c is not None and has_tokenizer(Path(c))), None)
    if folder is None:
        raise ModelError(f"{checkpoint.folder} holds no tokenizer files and none was given",
                         hint="pass --tokenizer DIR (the LLM's tokenizer MedM-VL was trained with)")
    try:
        # The LLM's config, not the folder's config.json (model_type lvlm, unknown to transformers).
        return AutoTokenizer.from_pretrained(str(folder), config=text_config)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a tokenizer from {folder} ({err})") from None


def add_placeholders(tokenizer) -> dict[str, int]:
    """`<image>` / `<image3d>` as single special tokens (MedM-VL used ids outside the vocabulary)."""
    from tokenizers import AddedToken

    from medmvl_cli.model.llm import PLACEHOLDERS

    missing = [t for t in PLACEHOLDERS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return {t: tokenizer.convert_tokens_to_ids(t) for t in PLACEHOLDERS}


def branch_settings(branch: Branch) -> dict[str, Any]:
    from medmvl_cli.config.schema import VolumeConfig

    if branch.name == "image":
        return {"encoder": branch.arch, "connector": branch.connector, "window": None}
    volume = VolumeConfig.model_validate(branch.volume).model_dump(mode="json")
    return {"encoder": branch.arch, "connector": branch.connector, "volume": volume}


def expected_weights(config) -> tuple[dict[str, torch.Size], str, str]:
    """(name -> shape of every weight the model loads, the embedding's name, the output head's name),
    from the model built on the meta device (no memory, no init)."""
    from medmvl_cli.model.lvlm import MedmvlForConditionalGeneration

    with torch.device("meta"):
        model = MedmvlForConditionalGeneration(config)
    modules = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    embed = modules[id(model.llm.get_input_embeddings())] + ".weight"
    head = modules[id(model.llm.get_output_embeddings())] + ".weight"
    return {k: v.shape for k, v in model.state_dict().items()}, embed, head


def grow_embeddings(weights: dict[str, torch.Tensor], names: tuple[str, str], rows: int, tied: bool) -> None:
    """Add rows (the mean of the others) to the embedding and output head for new placeholder ids.
    The placeholders' embeddings are always replaced by image features; their head rows score the
    mean of all logits, so they are never the greedy choice."""
    for name in names[:1] if tied else names:
        if name not in weights:
            continue  # reported as missing by check_weights
        old = weights[name]
        extra = old.float().mean(dim=0, keepdim=True).to(old.dtype).expand(rows - old.shape[0], -1)
        weights[name] = torch.cat([old, extra])


def import_medm_vl(src: Path, out: Path, *, tokenizer_dir: Optional[Path] = None, llm_dir: Optional[Path] = None,
                   image_encoder_dir: Optional[Path] = None, image3d_encoder_dir: Optional[Path] = None,
                   template: Optional[str] = None, branch: str = "auto", num_slices: int = 32,
                   dtype: Optional[str] = None, allow_approximate: bool = False, overwrite: bool = False) -> Path:
    """Convert the MedM-VL checkpoint in `src` into the run folder `out` (written atomically)."""
    from medmvl_cli.interop.staging import check_output, staged_folder
    from medmvl_cli.model.configuration import MedmvlConfig
    from medmvl_cli.model.llm import IMAGE3D_TOKEN, IMAGE_TOKEN, resolve_dtype

    out = Path(out)
    check_output(out, overwrite, looks_like_run, "a medmvl run folder")
    checkpoint = read_checkpoint(src)
    plan, processor = plan_import(
        checkpoint, branch=branch, num_slices=num_slices, template=template, image_encoder_dir=image_encoder_dir,
        image3d_encoder_dir=image3d_encoder_dir, allow_approximate=allow_approximate,
    )
    text_config = llm_config(checkpoint, llm_dir)
    tokenizer = load_tokenizer(checkpoint, tokenizer_dir, llm_dir, text_config)
    token_ids = add_placeholders(tokenizer)
    weights, unplaced = rename_weights(checkpoint.weights, plan)
    if dtype is not None:
        target = resolve_dtype(dtype)
        weights = {k: v.to(target) if v.is_floating_point() else v for k, v in weights.items()}
    settings = {b.name: branch_settings(b) for b in plan.branches}
    config = MedmvlConfig(
        text_config=text_config, image=settings.get("image"), image3d=settings.get("image3d"),
        image_token_id=token_ids[IMAGE_TOKEN], image3d_token_id=token_ids[IMAGE3D_TOKEN], template=plan.template,
        max_length=int(checkpoint.get("llm_max_length") or 2048), attn_implementation="sdpa",
    )
    expected, embed, head = expected_weights(config)
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    if tied:
        expected.pop(head)
        weights.pop(head, None)  # the embedding matrix, by definition
    rows = weights[embed].shape[0] if embed in weights else expected[embed][0]
    needed = max(max(token_ids.values()) + 1, len(tokenizer))
    if embed in weights and needed > rows:
        grow_embeddings(weights, (embed, head), needed, tied)
        config.text_config.vocab_size = needed
        expected, _, _ = expected_weights(config)
        if tied:
            expected.pop(head)
        plan.notes.append(f"the embeddings grew from {rows} to {needed} rows for the <image> / <image3d> tokens")
    check_weights(weights, unplaced, expected, checkpoint.folder, None if tied else head)
    config.architectures = ["MedmvlForConditionalGeneration"]
    config.dtype = weights[embed].dtype
    for note in plan.notes:
        logger.info("import: %s", note)
    with staged_folder(out, overwrite, looks_like_run, "a medmvl run folder") as staging:
        write_model(staging / "model", config, weights, tokenizer, processor)
        write_run_files(staging, out, checkpoint, plan)
    logger.info("imported %s into %s", src, out)
    return out


def write_model(folder: Path, config, weights: dict[str, torch.Tensor], tokenizer, processor) -> None:
    """The medmvl model folder, then loaded once to prove it loads."""
    from huggingface_hub import save_torch_state_dict

    from medmvl_cli.data.templates import get_template
    from medmvl_cli.model.builder import load_model

    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    save_torch_state_dict(weights, folder, max_shard_size="2GB", metadata={"format": "pt"})
    tokenizer.chat_template = get_template(config.template).jinja(tokenizer)
    tokenizer.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    model = load_model(folder, dtype=config.dtype)[0]
    del model


def recipe_tree(checkpoint: MedmvlCheckpoint, plan: Plan, out: Path) -> dict[str, Any]:
    """The recipe that describes the imported model (the paths are where MedM-VL took its parts)."""
    model: dict[str, Any] = {"llm": {
        "path": checkpoint.get("llm_name_or_path") or str(checkpoint.folder), "template": plan.template,
        "max_length": int(checkpoint.get("llm_max_length") or 2048),
    }}
    for branch in plan.branches:
        section = {"encoder": {k: v for k, v in branch.encoder.items() if v is not None},
                   "connector": branch.connector}
        if branch.encoder.get("path") is None:
            section["encoder"]["path"] = str(checkpoint.folder)
        if branch.volume is not None:
            section["volume"] = branch.volume
        model[branch.name] = section
    return {"stage": "finetune", "output_dir": str(out.absolute()), "model": model}


def write_run_files(staging: Path, out: Path, checkpoint: MedmvlCheckpoint, plan: Plan) -> None:
    from medmvl_cli import __version__
    from medmvl_cli.config.loader import dump_recipe
    from medmvl_cli.config.resolve import resolve_stage
    from medmvl_cli.config.schema import Recipe
    from medmvl_cli.engine.run_folder import RECIPE, RunFolder, git_revision

    recipe, _ = resolve_stage(Recipe.model_validate(recipe_tree(checkpoint, plan, out)), "finetune")
    header = [f"# medmvl {__version__}, git {git_revision()}",
              f"# imported by `medmvl import medm-vl` from {checkpoint.folder.absolute()}; model/ holds its weights",
              *(f"# - {note}" for note in plan.notes)]
    (staging / RECIPE).write_text("\n".join(header) + "\n" + dump_recipe(recipe), encoding="utf-8")
    RunFolder(staging).mark_finished()


def looks_like_run(path: Path) -> bool:
    """A run folder medmvl wrote (recipe.yaml or FINISHED), which --overwrite may replace."""
    return (path / "recipe.yaml").is_file() or (path / "FINISHED").is_file()
