"""`MedmvlProcessor`: everything on the data side a model needs, in one object saved beside it.

As transformers' `LlavaProcessor` does for LLaVA, the processor holds the tokenizer, the chat
template, the 2D image processor (with the DICOM window applied before it), the volume pipeline
(MONAI, built once from the validated `VolumeConfig`), `max_length` and how many LLM tokens each
placeholder expands to. Calling it turns conversations and their media into the model's inputs;
training (the dataset), `infer` / the demo / the server (`Predictor`) and the Python API all go
through that call, so prompts, placeholder expansion, truncation and pixel values cannot drift
apart between them.

On disk (`save_pretrained`): the tokenizer files with the template's `chat_template.jinja`, the
image processor's `preprocessor_config.json`, and `processor_config.json` holding the rest. A model
folder written before `processor_config.json` existed kept these settings in `config.json`
(`template`, `max_length`, `image.window`, `image3d.volume`): `from_pretrained` reads them there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medmvl_cli.constants import IGNORE_INDEX
from medmvl_cli.data.encoding import TextEncoding, encode_conversation
from medmvl_cli.data.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_VOXELS
from medmvl_cli.data.templates import Encoded, get_template
from medmvl_cli.errors import DataError, MedmvlError, ModelError
from medmvl_cli.model.configuration import PROCESSOR_CONFIG

logger = logging.getLogger(__name__)

PROCESSOR_CLASS = "MedmvlProcessor"
Media = str | Path | Any  # a file path, or (images) a PIL image / (volumes) a preprocessed (1, D, H, W) tensor


class MedmvlProcessor:
    """Tokenizer + chat template + image processor + volume pipeline of one model (see module doc)."""

    def __init__(self, tokenizer, template: str, *, max_length: int, tokens: dict[str, int],
                 image_processor=None, image_window: Sequence[float] | None = None, volume: Any = None):
        from medmvl_cli.config.schema import VolumeConfig

        self.tokenizer = tokenizer
        self.template_name = template
        self.template = get_template(template)
        self.max_length = int(max_length)
        self.tokens = dict(tokens)  # placeholder -> LLM tokens it expands to, e.g. {"<image>": 16}
        self.image_processor = image_processor
        self.image_window = (float(image_window[0]), float(image_window[1])) if image_window else None
        self.volume = volume if volume is None or isinstance(volume, VolumeConfig) else VolumeConfig.model_validate(volume)
        self.volume_pipeline = None
        if self.volume is not None:
            from medmvl_cli.data.volume_transforms import VolumePipeline

            self.volume_pipeline = VolumePipeline(self.volume)
        self.stop_token_ids = self.template.stop_token_ids(tokenizer)
        # Llama-style tokenizers have no pad token; any id does, the attention mask hides it.
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.stop_token_ids or [0])[0]
        self.max_voxels, self.max_pixels = DEFAULT_MAX_VOXELS, DEFAULT_MAX_PIXELS
        self._cache = None

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_recipe(cls, recipe: Any, token_counts: dict[str, int], tokenizer=None,
                    image_processor=None) -> MedmvlProcessor:
        """The processor of the model a resolved recipe describes. ``token_counts``: tokens per
        placeholder (`model.token_counts.placeholder_lengths`); ``tokenizer`` / ``image_processor``:
        those `build_model` returned (default: the recipe LLM's tokenizer, no image processor)."""
        spec = recipe.model
        return cls(
            tokenizer if tokenizer is not None else recipe_tokenizer(recipe),
            spec.llm.template or "plain",
            max_length=spec.llm.max_length,
            tokens=token_counts,
            image_processor=image_processor,
            image_window=spec.image.window if spec.image is not None else None,
            volume=spec.image3d.volume if spec.image3d is not None else None,
        )

    def set_limits(self, max_voxels: int = DEFAULT_MAX_VOXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
                   cache_dir: str | None = None) -> MedmvlProcessor:
        """Refuse files whose headers declare more voxels / pixels; ``cache_dir``: read preprocessed
        volumes from (and write them to) a `VolumeCache`. Run settings, not saved."""
        self.max_voxels, self.max_pixels = max_voxels, max_pixels
        self._cache = None
        if cache_dir is not None and self.volume is not None:
            from medmvl_cli.data.volume_cache import VolumeCache

            self._cache = VolumeCache(cache_dir, max_voxels)
        return self

    # ------------------------------------------------------------------------------ on disk
    def to_dict(self) -> dict[str, Any]:
        return {
            "processor_class": PROCESSOR_CLASS,
            "template": self.template_name,
            "max_length": self.max_length,
            "tokens": dict(self.tokens),
            "image_window": list(self.image_window) if self.image_window else None,
            "volume": self.volume.model_dump(mode="json") if self.volume is not None else None,
        }

    def save_pretrained(self, folder: str | Path) -> Path:
        """Tokenizer (with the template's Jinja chat template, so HF tools format prompts the way the
        model was trained), the image processor's own file, and `processor_config.json`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.chat_template = self.template.jinja(self.tokenizer)
        self.tokenizer.save_pretrained(folder)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(folder)
        (folder / PROCESSOR_CONFIG).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> MedmvlProcessor:
        """The processor saved in a model folder (or, for folders saved before it existed, the same
        settings read from `config.json`)."""
        from medmvl_cli.model.builder import load_tokenizer_and_image_processor

        folder = Path(folder)
        settings = _read_settings(folder)
        tokenizer, image_processor = load_tokenizer_and_image_processor(folder, _read_json(folder / "config.json"))
        return cls(tokenizer, settings["template"], max_length=settings["max_length"], tokens=settings["tokens"],
                   image_processor=image_processor, image_window=settings.get("image_window"),
                   volume=settings.get("volume"))

    def check_model(self, model, where: Any) -> None:
        """Refuse a model whose branches expand placeholders to other token counts than this processor's."""
        from medmvl_cli.model.token_counts import placeholder_lengths

        expected = placeholder_lengths(model)
        if expected != self.tokens:
            raise ModelError(f"{where}: the processor expands placeholders to {self.tokens} tokens but the model "
                             f"takes {expected}", hint="save the model and its processor together (save_model)")

    # ------------------------------------------------------------------------------ text
    def encode(self, messages: list[dict], *, add_generation_prompt: bool | None = None,
               truncate_answers: bool = False) -> TextEncoding:
        """Token ids and labels of one conversation: the chat template, each placeholder expanded to
        its token count, and the one truncation rule (`encoding.fit_to_length`); a prompt for
        generation (the default when the last turn is the user's) only has its length checked."""
        if add_generation_prompt is None:
            add_generation_prompt = bool(messages) and messages[-1].get("role") == "user"
        return encode_conversation(messages, self.tokenizer, self.template, self.tokens, self.max_length,
                                   add_generation_prompt=add_generation_prompt, truncate_answers=truncate_answers)

    def decode(self, ids, **kwargs) -> str:
        """Generated ids (one row) as text, special tokens skipped and stripped."""
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(ids, **kwargs).strip()

    def batch_decode(self, rows, **kwargs) -> list[str]:
        return [self.decode(row, **kwargs) for row in rows]

    # ------------------------------------------------------------------------------ media
    def images(self, images: Sequence[Media]) -> torch.Tensor | None:
        """(N, 3, H, W) pixel values of image files (DICOM windowed first) or PIL images; None for none."""
        if not images:
            return None
        from medmvl_cli.data.image_io import read_image

        if self.image_processor is None:
            raise DataError(f"{images[0]}: the model has no 2D branch to read images with",
                            hint="use a model with `model.image`, or drop the image from the record")
        pictures = [read_image(i, window=self.image_window, max_pixels=self.max_pixels) if isinstance(i, (str, Path))
                    else i for i in images]
        return self.image_processor(images=pictures, return_tensors="pt")["pixel_values"]

    def volumes(self, volumes: Sequence[Media], train: bool = False) -> torch.Tensor | None:
        """(N, 1, D, H, W) in [0, 1] from volume files (or preprocessed tensors); ``train`` adds the
        recipe's augmentations; None for none."""
        if not volumes:
            return None
        if self.volume_pipeline is None:
            raise DataError(f"{volumes[0]}: the model has no 3D branch to read volumes with",
                            hint="use a model with `model.image3d`, or drop the volume from the record")
        tensors = []
        for item in volumes:
            if isinstance(item, torch.Tensor):
                tensor = self.volume_pipeline.augment(item) if train else item
            elif self._cache is not None:
                # The cache holds eval-mode tensors; train-time augmentations are applied on top.
                tensor = self._cache.load(item, self.volume_pipeline.params).float()
                tensor = self.volume_pipeline.augment(tensor) if train else tensor
            else:
                tensor = self.volume_pipeline.load(item, train=train, max_voxels=self.max_voxels)
            tensors.append(tensor.float())
        return torch.stack(tensors)

    # ------------------------------------------------------------------------------ the call
    def __call__(self, messages: list[dict] | list[list[dict]], images: Sequence[Media] = (),
                 volumes: Sequence[Media] = (), *, add_generation_prompt: bool | None = None,
                 train: bool = False, truncate_answers: bool = False) -> dict[str, torch.Tensor]:
        """Model inputs for one conversation or a batch of them, with their media in placeholder order.

        For generation (conversations ending on the user): ``input_ids`` and ``attention_mask``
        left-padded, so every row's prompt ends at the same position. For training (conversations
        ending on the assistant): right-padded, with ``labels`` (answers only). ``pixel_values``
        (N, 3, H, W) and ``volumes`` (N, 1, D, H, W) when given. A conversation the truncation rule
        refuses raises DataError naming why."""
        batch = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        encodings = []
        for conversation in batch:
            encoding = self.encode(conversation, add_generation_prompt=add_generation_prompt,
                                   truncate_answers=truncate_answers)
            if encoding.length is None:
                raise DataError(f"the question: {encoding.detail}",
                                hint=f"shorten the prompt; the model reads at most {self.max_length} tokens")
            generating = add_generation_prompt if add_generation_prompt is not None else (
                conversation[-1].get("role") == "user")
            if encoding.dropped and not generating:
                raise DataError(f"the conversation: {encoding.dropped}",
                                hint=f"shorten it; the model reads at most {self.max_length} tokens")
            encodings.append(encoding)
        left = add_generation_prompt if add_generation_prompt is not None else batch[-1][-1].get("role") == "user"
        inputs = self.pad(encodings, left=left, labels=not left)
        pixel_values, volume_values = self.images(list(images)), self.volumes(list(volumes), train=train)
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values
        if volume_values is not None:
            inputs["volumes"] = volume_values
        return inputs

    def pad(self, encodings: Sequence[TextEncoding | Encoded], *, left: bool,
            labels: bool = False) -> dict[str, torch.Tensor]:
        """Stack encodings into (B, L) ``input_ids`` / ``attention_mask`` (/ ``labels``), padded
        on the left (generation) or the right (training)."""
        longest = max(len(e.input_ids) for e in encodings)
        input_ids = torch.full((len(encodings), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        label_ids = torch.full_like(input_ids, IGNORE_INDEX)
        for row, encoding in enumerate(encodings):
            n = len(encoding.input_ids)
            span = slice(longest - n, longest) if left else slice(0, n)
            input_ids[row, span] = torch.tensor(encoding.input_ids, dtype=torch.long)
            attention_mask[row, span] = 1
            label_ids[row, span] = torch.tensor(encoding.labels, dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels:
            out["labels"] = label_ids
        return out


# ---------------------------------------------------------------------------------- helpers
def recipe_tokenizer(recipe: Any):
    """The recipe LLM's tokenizer (a preset's shipped one, or the one in `model.llm.path`)."""
    llm = recipe.model.llm
    try:
        if llm.preset is not None:
            from medmvl_cli.config.names import PRESET_TEMPLATES
            from medmvl_cli.model.presets.tokenizer_files import load_preset_tokenizer

            return load_preset_tokenizer(PRESET_TEMPLATES[llm.preset])
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(llm.path)
    except MedmvlError:
        raise
    except Exception as err:
        raise ModelError(f"cannot load the tokenizer of {llm.path or llm.preset}: {err}",
                         hint="check model.llm.path points at a local HF folder with tokenizer files") from err


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot be read ({err})", hint="save the model again, or restore the file") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object", hint="save the model again, or restore the file")
    return data


def _read_settings(folder: Path) -> dict:
    """processor_config.json's settings; for older folders, the same read off config.json."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not a medmvl model folder (no config.json)",
                         hint="point at a run's model/ folder, e.g. runs/NAME/model")
    if (folder / PROCESSOR_CONFIG).is_file():
        settings = _read_json(folder / PROCESSOR_CONFIG)
        missing = [k for k in ("template", "max_length", "tokens") if k not in settings]
        if missing:
            raise ModelError(f"{folder / PROCESSOR_CONFIG}: lacks {', '.join(missing)}",
                             hint="save the model again, or restore the file")
        return settings
    return legacy_settings(folder)


def legacy_settings(folder: Path) -> dict:
    """A model folder from before `processor_config.json`: its `config.json` held the chat template,
    max_length, the 2D branch's DICOM window and the 3D branch's volume preprocessing."""
    from medmvl_cli.model.configuration import MedmvlConfig, register
    from medmvl_cli.model.token_counts import placeholder_lengths_for_config

    raw = _read_json(folder / "config.json")
    if not raw.get("template"):
        raise ModelError(f"{folder}: neither {PROCESSOR_CONFIG} nor a chat template in config.json",
                         hint="save the model again with this version of medmvl")
    register()
    config = MedmvlConfig.from_pretrained(str(folder))
    image, image3d = raw.get("image") or {}, raw.get("image3d") or {}
    return {"template": raw["template"], "max_length": int(raw.get("max_length") or 2048),
            "tokens": placeholder_lengths_for_config(config), "image_window": image.get("window"),
            "volume": image3d.get("volume")}
