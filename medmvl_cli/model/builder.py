"""From a recipe to a model, and a saved model folder back to one.

- `build_model(recipe)`: loads the LLM and the encoders from their folders / presets, adds the
  placeholder tokens, sizes the connectors, and returns (model, tokenizer, image processor or None).
- `save_model(model, folder, processor)`: the self-contained folder a run's `model/` is:
  config.json (the architecture), safetensors, `llm_adapter/` for a LoRA-wrapped LLM, and the
  processor's files (`data.processor.MedmvlProcessor.save_pretrained`: tokenizer with its chat
  template, the 2D image processor, `processor_config.json`).
- `load_model(folder)`: the model back, with no path to the original folders (its processor:
  `MedmvlProcessor.from_pretrained(folder)`; both at once: `medmvl_cli.load`).

Which parts train is set afterwards by `trainable.apply_trainable` (and `apply_lora`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medmvl_cli.constants import IMAGE_PLACEHOLDER, VOLUME_PLACEHOLDER
from medmvl_cli.errors import ModelError
from medmvl_cli.model.configuration import PROCESSOR_CONFIG, MedmvlConfig, register
from medmvl_cli.model.encoders import encoder_from_recipe
from medmvl_cli.model.encoders.base import mark_loaded
from medmvl_cli.model.encoders.hf_tower import image_processor_from_arch, tower_folder
from medmvl_cli.model.llm import (
    check_attn_implementation,
    encoder_attn_implementation,
    ensure_placeholder_tokens,
    is_peft_model,
    llm_folder,
    load_llm,
    resolve_dtype,
)
from medmvl_cli.model.lvlm import MedmvlForConditionalGeneration
from medmvl_cli.model.weight_files import check_safetensors

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = "2GB"
# config.json keys of folders saved before the processor had its own file.
LEGACY_DATA_KEYS = ("template", "max_length")


def build_model(
    recipe: Any, *, dtype: str | torch.dtype | None = None
) -> tuple[MedmvlForConditionalGeneration, Any, Any | None]:
    """(model, tokenizer, image processor of the 2D branch or None) for a validated recipe
    (`load_recipe`). `dtype` overrides `model.llm.dtype` (e.g. float32 master weights for mixed
    precision training). With `init_from`, the earlier run's model is loaded instead (a LoRA
    adapter merged into the LLM) and checked against the recipe."""
    if getattr(recipe, "init_from", None):
        return _from_earlier_run(recipe, dtype)
    spec = recipe.model
    dtype = resolve_dtype(dtype if dtype is not None else spec.llm.dtype)
    attn = check_attn_implementation(spec.llm.attn_implementation)
    # Loading leaves the global RNG as it was, so the connectors get the same random weights
    # however the LLM and the towers load: plainly, or sharded inside DeepSpeed ZeRO-3's
    # zero.Init, which draws random numbers for the weights it then overwrites.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        llm, tokenizer = load_llm(llm_folder(spec.llm), dtype, attn)
        token_ids = ensure_placeholder_tokens(tokenizer, llm)
        encoders, settings, image_processor = _load_encoders(spec, encoder_attn_implementation(attn))
    llm.config._name_or_path = ""  # a saved model keeps no path back to the LLM's folder
    mark_loaded(llm)
    config = MedmvlConfig(
        text_config=llm.config,
        image=settings.get("image"),
        image3d=settings.get("image3d"),
        image_token_id=token_ids[IMAGE_PLACEHOLDER],
        image3d_token_id=token_ids[VOLUME_PLACEHOLDER],
        # Without it the config would reset the shared LLM config's attention kernel to None.
        attn_implementation=attn,
    )
    model = MedmvlForConditionalGeneration(
        config, llm=llm, image_encoder=encoders.get("image"), image3d_encoder=encoders.get("image3d")
    )
    model.to(dtype)
    log_summary(model)
    return model, tokenizer, image_processor


def materialise_presets(recipe: Any) -> None:
    """Write the recipe's built-in presets to the cache now, as plain single-process models.

    A training run calls this before its TrainingArguments exist: under DeepSpeed ZeRO-3,
    transformers would build (and save) a preset's random model partitioned across the ranks."""
    llm_folder(recipe.model.llm)
    for branch in (recipe.model.image, recipe.model.image3d):
        if branch is not None and branch.encoder.type != "vit3d":  # vit3d presets are built in code
            tower_folder(branch.encoder)


def _load_encoders(spec: Any, attn_implementation: str) -> tuple[dict[str, Any], dict[str, dict], Any | None]:
    """The recipe's encoders by branch, their saved settings, and the 2D image processor (or None)."""
    settings: dict[str, dict] = {}
    encoders: dict[str, Any] = {}
    image_processor = None
    if spec.image is not None:
        encoder = encoder_from_recipe(spec.image.encoder, attn_implementation=attn_implementation)
        image_processor = getattr(encoder, "image_processor", None) or image_processor_from_arch(encoder.arch)
        encoders["image"] = encoder
        settings["image"] = {"encoder": encoder.arch, "connector": spec.image.connector.model_dump(mode="json")}
    if spec.image3d is not None:
        encoder = encoder_from_recipe(spec.image3d.encoder, volume=spec.image3d.volume,
                                      attn_implementation=attn_implementation)
        encoders["image3d"] = encoder
        settings["image3d"] = {"encoder": encoder.arch, "connector": spec.image3d.connector.model_dump(mode="json")}
    return encoders, settings, image_processor


def log_summary(model: MedmvlForConditionalGeneration) -> None:
    from medmvl_cli.model.trainable import parameter_counts

    for branch in ("image", "image3d"):
        encoder = getattr(model, f"{branch}_encoder")
        if encoder is not None:
            logger.info("%s branch: %s -> %s connector -> %d LLM tokens", branch, encoder.describe(),
                        getattr(model, f"{branch}_connector").type, model.num_tokens(branch))
    for name, (total, trainable) in parameter_counts(model).items():
        logger.info("%-18s %12s parameters (%s trainable)", name, f"{total:,}", f"{trainable:,}")


def save_model(
    model: MedmvlForConditionalGeneration,
    folder: str | Path,
    processor: Any = None,
    *,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    state_dict: dict | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write the self-contained model folder (see module docstring); returns it.

    `processor`: the model's `MedmvlProcessor` (anything with `save_pretrained`), saved beside it.
    `state_dict`: the weights to write instead of the model's own (e.g. gathered from DeepSpeed
    ZeRO-3; same keys as `model.state_dict()`). `dtype`: store floating-point weights in this dtype
    (e.g. bfloat16 after float32 training); None keeps the model's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size}
    if dtype is not None:
        target = resolve_dtype(dtype)
        weights = state_dict if state_dict is not None else model.state_dict()
        state_dict = {k: v.to(target) if v.is_floating_point() else v for k, v in weights.items()}
        model.config.dtype = target
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    model.save_pretrained(folder, **kwargs)
    if processor is not None:
        processor.save_pretrained(folder)
    logger.info("saved the model to %s", folder)
    return folder


def load_model(
    folder: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str = "sdpa",
    adapter_trainable: bool = False,
    merge_lora: bool = False,
) -> MedmvlForConditionalGeneration:
    """The model in a folder written by `save_model`. A LoRA adapter in the folder comes back on
    the LLM (trainable if `adapter_trainable`), or merged into its weights with `merge_lora`."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} is not a medmvl model folder (no config.json)",
            hint="point at a run's model/ folder, e.g. runs/NAME/model",
        )
    check_safetensors(folder, "model", hint=f"the model in {folder} is damaged: train or export it again, "
                                            "or restore it from a backup")
    register()
    try:
        config = MedmvlConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as err:
        raise ModelError(f"{folder}/config.json is not a medmvl config ({err})") from None
    if config.model_type != MedmvlConfig.model_type:
        raise ModelError(f"{folder} holds a {config.model_type!r} model, not a medmvl one")
    model = MedmvlForConditionalGeneration.from_pretrained(
        str(folder), dtype=resolve_dtype(dtype), attn_implementation=check_attn_implementation(attn_implementation),
        adapter_trainable=adapter_trainable,
    )
    drop_legacy_settings(model.config)
    if merge_lora and is_peft_model(model.llm):
        model.llm = model.llm.merge_and_unload()
        model.config.llm_adapter = None
        logger.info("merged the LoRA adapter of %s into the LLM", folder)
    return model


def load_tokenizer_and_image_processor(folder: str | Path, config: Any) -> tuple[Any, Any | None]:
    """The tokenizer and (with a 2D branch) the image processor saved beside a model; `config`: its
    `MedmvlConfig`, or config.json as a dict."""
    from transformers import AutoImageProcessor, AutoTokenizer

    folder = Path(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise ModelError(f"{folder}: cannot load the tokenizer ({err})",
                         hint="point at a model folder written by medmvl (tokenizer files beside config.json)") from None
    image = config.get("image") if isinstance(config, dict) else config.image
    if image is None:
        return tokenizer, None
    if (folder / "preprocessor_config.json").is_file():
        return tokenizer, AutoImageProcessor.from_pretrained(str(folder))
    logger.warning("%s has no preprocessor_config.json: rebuilding the image processor from config.json", folder)
    return tokenizer, image_processor_from_arch(image["encoder"])


def drop_legacy_settings(config: MedmvlConfig) -> None:
    """Forget the data-side keys a config.json saved before `processor_config.json` held (the
    processor reads them from the file); the config keeps the architecture alone."""
    for key in LEGACY_DATA_KEYS:
        config.__dict__.pop(key, None)
    for branch, key in (("image", "window"), ("image3d", "volume")):
        settings = config.branch(branch)
        if settings is not None:
            settings.pop(key, None)


def _from_earlier_run(recipe: Any, dtype: str | torch.dtype | None = None):
    source = Path(recipe.init_from)
    folder = source / "model" if (source / "model" / "config.json").is_file() else source
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"init_from: {source} holds no model (neither {source}/model/config.json nor {source}/config.json)",
            hint="run the earlier stage first (e.g. medmvl pretrain), or fix init_from",
        )
    spec = recipe.model
    saved_size = saved_volume_size(folder)
    model = load_model(
        folder, dtype=dtype if dtype is not None else spec.llm.dtype,
        attn_implementation=spec.llm.attn_implementation, merge_lora=True,
    )
    tokenizer, image_processor = load_tokenizer_and_image_processor(folder, model.config)
    for branch in ("image", "image3d"):
        wanted, saved = getattr(spec, branch), model.config.branch(branch)
        if (wanted is None) != (saved is None):
            raise ModelError(
                f"init_from {folder}: the recipe {'has' if wanted else 'lacks'} model.{branch} but the earlier model "
                f"{'has' if saved else 'lacks'} it",
                hint="init_from needs the same branches, encoders and connectors as the earlier run",
            )
        if wanted is None:
            continue
        for part in ("encoder", "connector"):
            if getattr(wanted, part).type != saved[part]["type"]:
                raise ModelError(
                    f"init_from {folder}: model.{branch}.{part}.type is {getattr(wanted, part).type!r} but the earlier "
                    f"model has {saved[part]['type']!r}",
                    hint="init_from needs the same encoders and connectors as the earlier run",
                )
        if branch == "image3d" and saved_size is not None and list(wanted.volume.size) != list(saved_size):
            raise ModelError(
                f"init_from {folder}: model.image3d.volume.size is {list(wanted.volume.size)} but the earlier model "
                f"was trained on {list(saved_size)}",
                hint="keep the volume size of the earlier run",
            )
    logger.info("init_from: starting from the weights of %s", folder)
    return model, tokenizer, image_processor


def saved_volume_size(folder: Path) -> list | None:
    """The volume size a saved model was trained on: `processor_config.json`'s, or (folders saved
    before it existed) `config.json`'s; None without a 3D branch."""
    import json

    for name, keys in ((PROCESSOR_CONFIG, ("volume",)), ("config.json", ("image3d", "volume"))):
        path = folder / name
        if path.is_file():
            value: Any = json.loads(path.read_text(encoding="utf-8"))
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            return value.get("size") if isinstance(value, dict) else None
    return None
