"""Answering questions about images and volumes with a saved model: one code path for
`medmvl infer` (single and batch), the quickstart and the demo.

Prompts go through the same chat template and placeholder expansion as training, with the
generation prompt appended. Batches are left-padded, so every row's last prompt token sits at the
same position and generation starts for all rows at once. A volume's encoder features are computed
once and reused for every question about it (CT-RATE files ask 3-5 questions per volume).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medmvl_cli.data.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_VOXELS

logger = logging.getLogger(__name__)


@dataclass
class GenerationSettings:
    """Decoding settings shared by single and batch inference; greedy unless temperature > 0."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def kwargs(self, pad_token_id: int, stop_token_ids: list[int]) -> dict:
        out = {
            "max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": self.sampling,
            "pad_token_id": pad_token_id, "eos_token_id": stop_token_ids,
        }
        if self.sampling:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=None)
        else:
            # None, not the model's generation_config values: greedy must not warn or sample.
            out.update(temperature=None, top_p=None, top_k=None)
        return out


@dataclass
class Request:
    """One question: the conversation so far (ending on the user), and its media files."""

    messages: list[dict]
    images: list[Path] = field(default_factory=list)
    volumes: list[Path] = field(default_factory=list)
    # Feature-cache keys, one per volume (e.g. a content hash); empty: each file's identity.
    volume_keys: list[str] = field(default_factory=list)

    def feature_keys(self) -> list[str]:
        return list(self.volume_keys) if self.volume_keys else [file_identity(p) for p in self.volumes]


def file_identity(path: Path) -> str:
    """A volume's path with the size and modification time of its files: a file rewritten in
    place gets a new key, so cached features never outlive the file they came from."""
    from medmvl_cli.data.volume_io import source_files

    resolved = Path(path).resolve()
    stamps = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in source_files(resolved)] if resolved.exists() else []
    return f"{resolved}|{hash(tuple(stamps))}"


class Predictor:
    """A loaded model with its processor (tokenizer, template, image and volume preprocessing).

    A LoRA adapter is merged into the LLM at load (as LLaVA's loader does): the answers are the
    adapter's, decoding is as fast as the plain model's. `volumes_encoded` and `cache_hits` count
    volume encoder runs and reuses of cached features, `prefix_tokens_reused` the prompt tokens
    not prefilled again thanks to `reuse_prefix`. Files are refused from their headers above
    `max_voxels` / `max_pixels`, turns from their length above the model's max_length allows.
    """

    def __init__(self, model_dir: Path, feature_cache_size: int = 64, device: str | None = None,
                 max_voxels: int = DEFAULT_MAX_VOXELS, max_pixels: int = DEFAULT_MAX_PIXELS):
        from medmvl_cli.inference.load import load
        from medmvl_cli.inference.prefix_cache import PrefixStore

        self.model_dir = Path(model_dir)
        model, processor = load(self.model_dir, device=device or "auto", merge_lora=True)
        self._attach(model, processor, feature_cache_size, max_voxels, max_pixels)
        # Loaded weights never change: prefixes may outlive a batch (not so for `for_model`).
        self._prefix_store = PrefixStore()

    @classmethod
    def for_model(cls, model, processor, name: str, feature_cache_size: int = 64,
                  max_voxels: int = DEFAULT_MAX_VOXELS, max_pixels: int = DEFAULT_MAX_PIXELS) -> Predictor:
        """A predictor over a model in memory, where it is (generation metrics while training), with
        its processor (a copy: its own limits, no volume cache); the caller sets train / eval mode."""
        import copy

        predictor = cls.__new__(cls)
        predictor.model_dir = Path(name)
        predictor._attach(model, copy.copy(processor), feature_cache_size, max_voxels, max_pixels)
        return predictor

    def _attach(self, model, processor, feature_cache_size: int, max_voxels: int, max_pixels: int) -> None:
        self.model, self.processor = model, processor.set_limits(max_voxels, max_pixels)
        self.device = next(model.parameters()).device
        self._volume_features: OrderedDict = OrderedDict()
        self._cache_size = feature_cache_size
        self._reading: OrderedDict = OrderedDict()  # feature key -> Future of its preprocessed volume
        self._reader = None
        self.read_ahead_enabled: bool | None = None  # None: where a core is free for it (`reads_ahead`)
        self.cache_hits = 0
        self.volumes_encoded = 0
        self.prefix_tokens_reused = 0
        self._prefix_store = None

    @property
    def name(self) -> str:
        return self.model_dir.parent.name if self.model_dir.name == "model" else self.model_dir.name

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def placeholder_lengths(self) -> dict[str, int]:
        return self.processor.tokens

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids; a turn too long to tokenise for the model raises DataError first."""
        return self.processor(messages, add_generation_prompt=True)["input_ids"][0].tolist()

    def clear_feature_cache(self) -> None:
        """Forget the cached volume features, the volumes read ahead and the stored prompt prefixes."""
        self._volume_features.clear()
        for future in self._reading.values():
            future.cancel()
        self._reading.clear()
        if self._prefix_store is not None:
            self._prefix_store.clear()

    @property
    def reads_ahead(self) -> bool:
        """Whether `read_ahead` reads: `read_ahead_enabled` if set, else where a core is free for
        the reader, the model computing on an accelerator or torch using fewer threads than the CPUs
        medmvl may run on. (On a CPU whose every core computes, the reader only slows the model:
        measured 0.84-0.91x on 2 cores with 2 torch threads, 1.12x with 1.)"""
        if self.read_ahead_enabled is not None:
            return self.read_ahead_enabled
        import torch

        from medmvl_cli.threads import available_cpus

        return self.device.type != "cpu" or available_cpus() >= torch.get_num_threads() + 1

    def read_ahead(self, requests: Sequence[Request]) -> None:
        """Start reading and preprocessing, on a background thread, the volumes of `requests` whose
        features are neither cached nor being read: `predict_file` hands it the next batch, whose files
        are then read while this batch generates (file reading, decompression and resampling release
        the GIL). A read that fails raises when its batch uses it, as a read in the batch would. At
        most `feature_cache_size` volumes wait, the oldest dropped first. Only where `reads_ahead`."""
        from concurrent.futures import ThreadPoolExecutor

        if self.processor.volume_pipeline is None or not self.reads_ahead:
            return
        for request in requests:
            for path, key in zip(request.volumes, request.feature_keys()):
                if key in self._volume_features or key in self._reading:
                    continue
                if self._reader is None:
                    self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medmvl-read-ahead")
                self._reading[key] = self._reader.submit(self.processor.volumes, [path])
        while len(self._reading) > self._cache_size:
            self._reading.popitem(last=False)[1].cancel()

    def _volume_embeds(self, paths: Sequence[Path], keys: Sequence[str]):
        """(len(paths), tokens, llm_width) connector outputs; the volumes whose keys are not in the
        cache are read and encoded together, once each, and kept while they stay among the recent ones."""
        import torch

        missing = list(dict.fromkeys(k for k in keys if k not in self._volume_features))
        fresh = {}
        if missing:
            path_of = dict(zip(keys, paths))
            # A volume read ahead comes as its preprocessed tensor, which `volumes` passes through.
            items = [self._reading.pop(k).result()[0] if k in self._reading else path_of[k] for k in missing]
            volumes = self.processor.volumes(items).to(self.device, self.model.dtype)
            with torch.no_grad():
                features = self.model.encode_volumes(volumes)
            self.volumes_encoded += len(missing)
            fresh = {k: features[i:i + 1] for i, k in enumerate(missing)}
        self.cache_hits += len(keys) - len(missing)
        out = []
        for key in keys:
            if key in fresh:
                self._volume_features[key] = fresh[key]
            self._volume_features.move_to_end(key)
            out.append(self._volume_features[key])
        while len(self._volume_features) > self._cache_size:
            self._volume_features.popitem(last=False)
        return torch.cat(out)

    def generate(self, requests: Sequence[Request], settings: GenerationSettings,
                 streamer=None, use_feature_cache: bool = True, reuse_prefix: bool = False) -> list[str]:
        """Answers for a batch of requests (left-padded), in order."""
        output, _ = self.generate_ids(requests, settings, streamer=streamer, use_feature_cache=use_feature_cache,
                                      reuse_prefix=reuse_prefix)
        return self.processor.batch_decode(output)

    def generate_ids(self, requests: Sequence[Request], settings: GenerationSettings, streamer=None,
                     use_feature_cache: bool = True, stopping_criteria=None, reuse_prefix: bool = False):
        """(generated ids (B, new), prompt lengths) for a batch of requests, left-padded.
        ``stopping_criteria`` (an HF ``StoppingCriteriaList``) may end rows early (per-row limits).
        ``reuse_prefix``: questions about the same media prefill their shared prompt prefix once
        (`prefix_cache.py`; the same answers, faster), and a loaded model keeps the last prefix of
        the most recent media for later batches; not with beam search, and not where it cannot
        pay (`reuse_pays`: one row, or too short a shared prefix): the plain batch then runs."""
        import torch

        from medmvl_cli.inference.prefix_cache import generate_with_plan, plan_shared_prefixes, reuse_pays

        images = [p for r in requests for p in r.images]
        volumes = [p for r in requests for p in r.volumes]
        inputs = self.processor([r.messages for r in requests], images=images,
                                volumes=() if use_feature_cache else volumes, add_generation_prompt=True)
        attention_mask = inputs["attention_mask"]
        prompts = [row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], attention_mask)]
        input_ids, attention_mask = inputs["input_ids"].to(self.device), attention_mask.to(self.device)
        media = {}
        if "pixel_values" in inputs:
            media["pixel_values"] = inputs["pixel_values"].to(self.device, self.model.dtype)
        if volumes and use_feature_cache:
            media["volume_embeds"] = self._volume_embeds(volumes, [k for r in requests for k in r.feature_keys()])
        elif volumes:
            media["volumes"] = inputs["volumes"].to(self.device, self.model.dtype)
            self.volumes_encoded += len(volumes)
        generation = settings.kwargs(self.processor.pad_token_id, self.processor.stop_token_ids)
        if stopping_criteria is not None:
            generation["stopping_criteria"] = stopping_criteria
        plan = None
        if reuse_prefix and settings.num_beams == 1:
            keys = [self._media_key(r) for r in requests]
            plan = plan_shared_prefixes(prompts, keys, self._prefix_store)
            plan = plan if reuse_pays(plan, prompts) else None  # else the plain batch is as fast or faster
        with torch.no_grad():
            if plan is None:
                output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                             streamer=streamer, **media, **generation)
            else:
                self.prefix_tokens_reused += plan.tokens_saved()
                output = generate_with_plan(self.model, plan, self.model.embed_inputs(input_ids, **media), attention_mask,
                                            self._prefix_store, prompts, streamer=streamer, **generation)
        return output, [len(p) for p in prompts]

    @staticmethod
    def _media_key(request: Request) -> tuple:
        """What a request's media are, files rewritten in place included: questions with equal
        keys see the same features (empty without media)."""
        if not (request.images or request.volumes):
            return ()
        return tuple(file_identity(p) for p in request.images), tuple(request.feature_keys())

    def stream(self, request: Request, settings: GenerationSettings, on_text: Callable[[str], None]) -> str:
        """Generate one answer, calling `on_text` with each new piece of text as it is produced
        (word by word; beam search only knows its answer at the end: one piece then)."""
        if settings.num_beams > 1:
            answer = self.generate([request], settings)[0]
            if answer:
                on_text(answer)
            return answer
        from transformers import TextStreamer

        started = False

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                nonlocal started
                if not started:  # the final answer is stripped: so is what is shown
                    text = text.lstrip()
                    started = bool(text)
                if text:
                    on_text(text)

        streamer = _Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        return self.generate([request], settings, streamer=streamer)[0]
