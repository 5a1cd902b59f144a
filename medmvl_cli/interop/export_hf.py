"""`medmvl export --format hf-llava`: a model folder transformers' LLaVA loads with no medmvl code.

A 2D stack that *is* LLaVA (a CLIP or SigLIP tower, an `mlp` connector of depth 2 with GELU, a
causal LM whose output head has no bias) is written as `LlavaForConditionalGeneration` +
`LlavaProcessor`:

- `config.json`: `LlavaConfig` with our vision config, the LLM's config, `vision_feature_layer` =
  `select_layer`, `vision_feature_select_strategy` `default` (CLIP, CLS dropped) or `full` (SigLIP,
  or CLIP with `cls_patch`), `image_token_index` = the tokenizer's `<image>` id and
  `image_seq_length` = tokens per image;
- the weights under the names transformers 5.x writes: `vision_tower.*`,
  `multi_modal_projector.linear_{1,2}.*`, `language_model.model.*`, `language_model.lm_head.weight`
  (left out when tied to the embeddings); a LoRA adapter is merged first;
- `generation_config.json`: the template's stop tokens as `eos_token_id`;
- the tokenizer (with `<image>`), the processor (`patch_size`, `num_additional_image_tokens`,
  `vision_feature_select_strategy`) and our chat template (`jinja` of the run's template).

`transformers4=True` writes what transformers 4.x loads instead (see `llava_transformers4.py`).
Anything that is not LLaVA (a 3D branch, pooling connectors, depth != 2, no GELU) is refused with
every reason listed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from medmvl_cli.constants import IMAGE_PLACEHOLDER
from medmvl_cli.errors import ModelError

logger = logging.getLogger(__name__)

LLAVA_ENCODERS = ("clip", "siglip")
SHARD_SIZE = "2GB"


def llava_problems(model) -> list[str]:
    """Why `model` cannot be written as transformers' LLaVA (empty when it can)."""
    config = model.config
    problems = []
    if config.image3d is not None:
        kind = config.image3d["encoder"]["type"]
        problems.append(f"it has a 3D branch (model.image3d, a {kind} encoder); LLaVA takes 2D images only")
    if config.image is None:
        problems.append("it has no 2D branch (model.image); LLaVA needs a CLIP or SigLIP image encoder")
        return problems
    encoder, connector = config.image["encoder"], config.image["connector"]
    if encoder["type"] not in LLAVA_ENCODERS:
        problems.append(f"its 2D encoder is {encoder['type']!r}; LLaVA's vision tower is clip or siglip")
    if connector["type"] != "mlp":
        problems.append(f"its 2D connector is {connector['type']!r}; LLaVA's projector is an mlp (one token per patch)")
    else:
        if int(connector.get("depth", 2)) != 2:
            problems.append(f"its mlp connector has depth {connector.get('depth')}; LLaVA's projector has exactly 2 Linear layers")
        if connector.get("activation", "gelu") != "gelu":
            problems.append(f"its mlp connector uses {connector.get('activation')}; LLaVA's projector uses gelu")
        if connector.get("slice_mean"):
            problems.append("its connector averages over slices (slice_mean); LLaVA has no slices")
    llm = model.llm
    head = getattr(llm, "get_output_embeddings", lambda: None)()
    if head is None or not getattr(llm, "base_model_prefix", ""):
        problems.append(f"its LLM ({type(llm).__name__}) has no base model + output head that LLaVA can hold")
    elif getattr(head, "bias", None) is not None:
        problems.append(f"its LLM's output head has a bias ({type(llm).__name__}, e.g. Phi-2); LLaVA's lm_head has none")
    return problems


def check_llava(model, source: Path) -> None:
    problems = llava_problems(model)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ModelError(
            f"{source} cannot be exported as transformers' LLaVA:\n{listed}",
            hint="export it with --format medmvl (loaded by medmvl infer / demo); hf-llava fits 2D clip / siglip + "
                 "mlp (depth 2, gelu) models only",
        )


def select_strategy(encoder_arch: dict) -> tuple[str, int]:
    """(LLaVA's vision_feature_select_strategy, the processor's num_additional_image_tokens)."""
    if encoder_arch["type"] == "clip":
        return ("default" if encoder_arch["select_feature"] == "patch" else "full"), 1
    return "full", 0  # SigLIP has no CLS token: every token is a patch


def llava_config_dict(model, image_token_id: int) -> dict[str, Any]:
    """The `LlavaConfig` of `model` (a dict, as transformers 5.x writes it)."""
    from transformers import LlavaConfig

    encoder = model.config.image["encoder"]
    strategy, _ = select_strategy(encoder)
    text = model.llm.config.to_dict()
    text.pop("_name_or_path", None)
    config = LlavaConfig(
        vision_config=dict(encoder["vision_config"]),
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=model.num_tokens("image"),
        vision_feature_layer=int(encoder["select_layer"]),
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(model.llm.config.tie_word_embeddings),
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = model.dtype
    return config.to_dict()


def llava_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under the on-disk names transformers 5.x's LLaVA writes."""
    llm = model.llm
    base = f"llm.{llm.base_model_prefix}."
    head = "llm." + next(name for name, module in llm.named_modules() if module is llm.get_output_embeddings()) + "."
    tied = bool(llm.config.tie_word_embeddings)
    projector = {"image_connector.mlp.0.": "multi_modal_projector.linear_1.",
                 "image_connector.mlp.2.": "multi_modal_projector.linear_2."}
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in model.state_dict().items():
        if key.startswith(base):
            name = "language_model.model." + key[len(base):]
        elif key.startswith(head):
            if tied:
                continue
            name = "language_model.lm_head." + key[len(head):]
        elif key.startswith("image_encoder.tower."):
            name = "vision_tower." + key[len("image_encoder.tower."):]
        else:
            prefix = next((p for p in projector if key.startswith(p)), None)
            if prefix is None:
                unmapped.append(key)
                continue
            name = projector[prefix] + key[len(prefix):]
        out[name] = value.detach().contiguous()
    if unmapped:
        raise ModelError(f"weights with no place in LLaVA: {', '.join(unmapped[:8])}",
                         hint="export with --format medmvl")
    return out


def generation_config(tokenizer, template) -> dict[str, Any]:
    """Greedy decoding that stops where medmvl infer stops (the template's stop tokens)."""
    config = {"do_sample": False, "eos_token_id": template.stop_token_ids(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if tokenizer.bos_token_id is not None:
        config["bos_token_id"] = tokenizer.bos_token_id
    return config


def write_weights(state: dict[str, torch.Tensor], folder: Path) -> None:
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(state, folder, max_shard_size=SHARD_SIZE, metadata={"format": "pt"})


def export_hf_llava(model_dir: Path, out: Path, *, overwrite: bool = False, transformers4: bool = False,
                    dtype: str | None = None) -> Path:
    """Write the LLaVA folder of the medmvl model in `model_dir` to `out` (atomically); returns `out`."""
    from transformers import GenerationConfig, LlavaProcessor

    from medmvl_cli.inference.load import load
    from medmvl_cli.interop.export_native import saved_dtype
    from medmvl_cli.interop.llava_transformers4 import convert_folder_for_transformers4
    from medmvl_cli.interop.staging import EXPORT, check_output, staged_folder, write_export_manifest

    check_output(Path(out), overwrite, EXPORT)  # before the slow load
    model, ours = load(model_dir, dtype=dtype or saved_dtype(model_dir), device=None, merge_lora=True)
    tokenizer, image_processor, template = ours.tokenizer, ours.image_processor, ours.template
    check_llava(model, model_dir)
    if ours.image_window:
        logger.warning("the model windows DICOM images to %s before its processor; LLaVA's processor takes RGB "
                       "images: window DICOM files the same way first", list(ours.image_window))
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if image_token_id != model.config.image_token_id:
        raise ModelError(
            f"{model_dir}: the tokenizer's <image> id is {image_token_id} but the model's is {model.config.image_token_id}",
            hint="the model folder is inconsistent; export from the run's own model/ folder",
        )
    chat_template = template.jinja(tokenizer)
    tokenizer.chat_template = chat_template
    encoder = model.config.image["encoder"]
    strategy, additional = select_strategy(encoder)
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
        patch_size=int(encoder["vision_config"]["patch_size"]), vision_feature_select_strategy=strategy,
        num_additional_image_tokens=additional, image_token=IMAGE_PLACEHOLDER,
    )
    with staged_folder(out, overwrite, EXPORT) as staging:
        (staging / "config.json").write_text(json.dumps(llava_config_dict(model, image_token_id), indent=2) + "\n")
        GenerationConfig(**generation_config(tokenizer, template)).save_pretrained(staging)
        write_weights(llava_state_dict(model), staging)
        processor.save_pretrained(staging)
        if transformers4:
            convert_folder_for_transformers4(staging)
        write_export_manifest(staging)
    logger.info("exported %s as transformers %s LLaVA to %s", model_dir, "4.x" if transformers4 else "5.x", out)
    return out

