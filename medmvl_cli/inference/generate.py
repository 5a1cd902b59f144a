"""Answering questions about images and volumes with a saved model: one code path for
`medmvl infer` (single and batch), the quickstart and the demo.

Prompts go through the same chat template and placeholder expansion as training, with the
generation prompt appended. Batches are left-padded. A volume's encoder features are computed
once and reused for every question about it (CT-RATE files ask 3-5 questions per volume).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from medmvl_cli.errors import RunError

logger = logging.getLogger(__name__)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1

    def kwargs(self, pad_token_id: int, stop_token_ids: list[int]) -> dict:
        sampling = self.temperature > 0
        out = {
            "max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": sampling,
            "pad_token_id": pad_token_id, "eos_token_id": stop_token_ids,
        }
        if sampling:
            out.update(temperature=self.temperature, top_p=self.top_p)
        else:
            out.update(temperature=None, top_p=None, top_k=None)
        return out


@dataclass
class Request:
    """One question: the conversation so far (ending on the user), and its media files."""

    messages: list[dict]
    images: list[Path] = field(default_factory=list)
    volumes: list[Path] = field(default_factory=list)


def resolve_model_dir(model: Optional[str]) -> Path:
    """--model, else $MEDMVL_MODEL, else the newest finished run under ./runs; a run folder or its model/."""
    from medmvl_cli.engine.run_folder import newest_finished_run

    chosen = model or os.environ.get("MEDMVL_MODEL")
    if chosen is None:
        run = newest_finished_run(Path("runs"))
        if run is None:
            raise RunError(
                "no model given and no finished run under ./runs",
                hint="train one (`medmvl finetune recipes/quickstart/tiny-2d.yaml`), import one "
                     "(`medmvl import medm-vl SRC --out runs/NAME`), or pass --model / set MEDMVL_MODEL",
            )
        chosen = str(run)
    path = Path(chosen)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file():
        return path
    raise RunError(f"--model {chosen}: neither a run folder with model/ nor a model folder",
                   hint="point --model at runs/NAME (a finished run) or at a folder written by `medmvl export`")


class Predictor:
    """A loaded model with its tokenizer, template and preprocessing."""

    def __init__(self, model_dir: Path, feature_cache_size: int = 64):
        import torch

        from medmvl_cli.config.schema import VolumeConfig
        from medmvl_cli.data.media import MediaLoader
        from medmvl_cli.data.templates import get_template
        from medmvl_cli.engine.stages import placeholder_lengths
        from medmvl_cli.model.builder import load_model

        self.model_dir = Path(model_dir)
        self.model, self.tokenizer, image_processor = load_model(self.model_dir)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.template = get_template(self.model.config.template)
        config = self.model.config
        self.media = MediaLoader(
            image_processor=image_processor,
            image_window=config.image.get("window") if config.image else None,
            volume_config=VolumeConfig.model_validate(config.image3d["volume"]) if config.image3d else None,
            train=False,
        )
        self.placeholder_lengths = placeholder_lengths(self.model)
        self._volume_features: OrderedDict = OrderedDict()
        self._cache_size = feature_cache_size
        self.cache_hits = 0

    @property
    def name(self) -> str:
        return self.model_dir.parent.name if self.model_dir.name == "model" else self.model_dir.name

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.template.encode(self.tokenizer, messages, self.placeholder_lengths,
                                    add_generation_prompt=True).input_ids

    def _volume_embeds(self, paths: Sequence[Path]):
        """Connector outputs for each volume, computed once per file while it stays in the cache."""
        import torch

        out = []
        for path in paths:
            key = str(Path(path).resolve())
            if key in self._volume_features:
                self._volume_features.move_to_end(key)
                self.cache_hits += 1
            else:
                volume = self.media.volumes([path]).to(self.device, self.model.dtype)
                with torch.no_grad():
                    self._volume_features[key] = self.model.encode_volumes(volume)
                if len(self._volume_features) > self._cache_size:
                    self._volume_features.popitem(last=False)
            out.append(self._volume_features[key])
        return torch.cat(out) if out else None

    def generate(self, requests: Sequence[Request], settings: GenerationSettings,
                 streamer=None, use_feature_cache: bool = True) -> list[str]:
        """Answers for a batch of requests (left-padded), in order."""
        import torch

        prompts = [self.prompt_ids(r.messages) for r in requests]
        longest = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, longest - len(prompt):] = 1
        images = [p for r in requests for p in r.images]
        volumes = [p for r in requests for p in r.volumes]
        extra = {}
        if images:
            extra["pixel_values"] = self.media.images(images).to(self.device, self.model.dtype)
        if volumes:
            if use_feature_cache:
                extra["volume_embeds"] = self._volume_embeds(volumes)
            else:
                extra["volumes"] = self.media.volumes(volumes).to(self.device, self.model.dtype)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                streamer=streamer, **extra,
                **settings.kwargs(self.tokenizer.pad_token_id, self.template.stop_token_ids(self.tokenizer)),
            )
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in output]

    def stream(self, request: Request, settings: GenerationSettings, on_text: Callable[[str], None]) -> str:
        """Generate one answer, calling `on_text` with each new piece of text as it is produced."""
        from transformers import TextStreamer

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                if text:
                    on_text(text)

        streamer = _Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        return self.generate([request], settings, streamer=streamer)[0]
