"""`medmvl import medm-vl`: a MedM-VL checkpoint folder -> a medmvl run folder.

The checkpoint is converted file to file: MedM-VL's settings become a medmvl model config and its
weights are renamed into medmvl's layout (`medm_vl/mapping.py`: every key accounted for, a key with
no place or a weight the model needs that the checkpoint lacks is an error naming it); the
tokenizer gains the `<image>` / `<image3d>` placeholders (the embeddings grow when they must); the
run folder gets recipe.yaml, model/ and FINISHED, and its model is loaded once before the folder
is renamed into place.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medmvl_cli.errors import ModelError
from medmvl_cli.interop.medm_vl.checkpoint import MedmVlCheckpoint, has_tokenizer, llm_config, read_checkpoint
from medmvl_cli.interop.medm_vl.mapping import Branch, Plan, check_weights, plan_import, rename_weights

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- the import
def load_tokenizer(checkpoint: MedmVlCheckpoint, tokenizer_dir: Path | None, llm_dir: Path | None, text_config):
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

    from medmvl_cli.constants import PLACEHOLDERS

    missing = [t for t in PLACEHOLDERS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return {t: tokenizer.convert_tokens_to_ids(t) for t in PLACEHOLDERS}


def branch_settings(branch: Branch) -> dict[str, Any]:
    return {"encoder": branch.arch, "connector": branch.connector}


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


def model_config(checkpoint: MedmVlCheckpoint, plan: Plan, text_config, token_ids: dict[str, int]):
    """The medmvl model config (`MedmvlConfig`) of the imported model."""
    from medmvl_cli.constants import IMAGE_PLACEHOLDER, VOLUME_PLACEHOLDER
    from medmvl_cli.model.configuration import MedmvlConfig

    settings = {b.name: branch_settings(b) for b in plan.branches}
    config = MedmvlConfig(
        text_config=text_config, image=settings.get("image"), image3d=settings.get("image3d"),
        image_token_id=token_ids[IMAGE_PLACEHOLDER], image3d_token_id=token_ids[VOLUME_PLACEHOLDER],
        attn_implementation="sdpa",
    )
    config.architectures = ["MedmvlForConditionalGeneration"]
    return config


def fit_vocabulary(weights: dict[str, torch.Tensor], config, tokenizer, token_ids: dict[str, int],
                   notes: list[str]) -> tuple[dict[str, torch.Size], str, str | None]:
    """Make room for the placeholder ids (growing the embeddings and `config`'s vocab_size when
    needed) and settle the output head; returns (expected weights, the embedding's name, the head's
    name when it is not tied to the embeddings)."""
    expected, embed, head = expected_weights(config)
    tied = bool(getattr(config.text_config, "tie_word_embeddings", False))
    if tied:
        weights.pop(head, None)  # the embedding matrix, by definition
    rows = weights[embed].shape[0] if embed in weights else expected[embed][0]
    needed = max(max(token_ids.values()) + 1, len(tokenizer))
    if embed in weights and needed > rows:
        grow_embeddings(weights, (embed, head), needed, tied)
        config.text_config.vocab_size = needed
        expected, _, _ = expected_weights(config)
        notes.append(f"the embeddings grew from {rows} to {needed} rows for the <image> / <image3d> tokens")
    if tied:
        expected.pop(head)
    return expected, embed, (None if tied else head)


def import_medm_vl(src: Path, out: Path, *, tokenizer_dir: Path | None = None, llm_dir: Path | None = None,
                   image_encoder_dir: Path | None = None, image3d_encoder_dir: Path | None = None,
                   template: str | None = None, branch: str = "auto", num_slices: int = 32,
                   slice_pooling: str = "concat",
                   dtype: str | None = None, allow_approximate: bool = False, overwrite: bool = False) -> Path:
    """Convert the MedM-VL checkpoint in `src` into the run folder `out` (written atomically)."""
    from medmvl_cli.interop.staging import RUN, check_output, staged_folder
    from medmvl_cli.model.llm import resolve_dtype
    from medmvl_cli.runs.folder import write_marker

    out = Path(out)
    check_output(out, overwrite, RUN)
    checkpoint = read_checkpoint(src)
    plan, image_processor = plan_import(
        checkpoint, branch=branch, num_slices=num_slices, slice_pooling=slice_pooling, template=template,
        image_encoder_dir=image_encoder_dir, image3d_encoder_dir=image3d_encoder_dir, allow_approximate=allow_approximate,
    )
    text_config = llm_config(checkpoint, llm_dir)
    tokenizer = load_tokenizer(checkpoint, tokenizer_dir, llm_dir, text_config)
    token_ids = add_placeholders(tokenizer)
    weights, unplaced, origin = rename_weights(checkpoint.weights, plan)
    if dtype is not None:
        target = resolve_dtype(dtype)
        weights = {k: v.to(target) if v.is_floating_point() else v for k, v in weights.items()}
    config = model_config(checkpoint, plan, text_config, token_ids)
    expected, embed, untied_head = fit_vocabulary(weights, config, tokenizer, token_ids, plan.notes)
    check_weights(weights, unplaced, origin, expected, checkpoint.folder, untied_head)
    config.dtype = weights[embed].dtype
    for note in plan.notes:
        logger.info("import: %s", note)
    with staged_folder(out, overwrite, RUN) as staging:
        write_marker(staging)
        write_model(staging / "model", config, weights, data_processor(checkpoint, plan, config, tokenizer, image_processor))
        write_run_files(staging, out, checkpoint, plan)
    logger.info("imported %s into %s", src, out)
    return out


def data_processor(checkpoint: MedmVlCheckpoint, plan: Plan, config, tokenizer, image_processor):
    """The imported model's `MedmvlProcessor`: MedM-VL's prompt format and max_length, the volume
    preprocessing of the plan, the token counts of the model's branches."""
    from medmvl_cli.data.processor import MedmvlProcessor
    from medmvl_cli.model.token_counts import placeholder_lengths_for_config

    volumes = [b.volume for b in plan.branches if b.volume is not None]
    return MedmvlProcessor(tokenizer, plan.template, max_length=int(checkpoint.get("llm_max_length") or 2048),
                           tokens=placeholder_lengths_for_config(config), image_processor=image_processor,
                           volume=volumes[0] if volumes else None)


def write_model(folder: Path, config, weights: dict[str, torch.Tensor], processor) -> None:
    """The medmvl model folder, then loaded once to prove it loads."""
    from huggingface_hub import save_torch_state_dict

    from medmvl_cli.inference.load import load

    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    save_torch_state_dict(weights, folder, max_shard_size="2GB", metadata={"format": "pt"})
    processor.save_pretrained(folder)
    model, _ = load(folder, dtype=config.dtype, device=None)
    del model


def recipe_tree(checkpoint: MedmVlCheckpoint, plan: Plan, out: Path) -> dict[str, Any]:
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


def write_run_files(staging: Path, out: Path, checkpoint: MedmVlCheckpoint, plan: Plan) -> None:
    from medmvl_cli import __version__
    from medmvl_cli.config.loader import dump_recipe
    from medmvl_cli.config.resolve import resolve_stage
    from medmvl_cli.config.schema import Recipe
    from medmvl_cli.runs.folder import RECIPE, RunFolder, git_revision

    recipe, _ = resolve_stage(Recipe.model_validate(recipe_tree(checkpoint, plan, out)), "finetune")
    header = [f"# medmvl {__version__}, git {git_revision()}",
              f"# imported by `medmvl import medm-vl` from {checkpoint.folder.absolute()}; model/ holds its weights",
              *(f"# - {note}" for note in plan.notes)]
    (staging / RECIPE).write_text("\n".join(header) + "\n" + dump_recipe(recipe), encoding="utf-8")
    RunFolder(staging).mark_finished()
