"""The training dataset: records turned into model inputs by the model's processor, per item.

Records are measured once, up front, with the processor's own encoding (lengths are needed by the
length-grouped sampler and over-long samples must be reported before training, not found mid-run).
Each item is then made by the processor's one call (text, images, volumes, train-time augmentation)
in `__getitem__`, in DataLoader workers. A record whose file fails to load stops the run
with its id, or with `skip_bad_records` is skipped and counted; it is never replaced by another.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from medmvl_cli.data.annotations import default_root, read_records, resolve_media_path
from medmvl_cli.data.encoding import EncodedRecord, encode_records, training_messages
from medmvl_cli.data.limits import TooLargeError
from medmvl_cli.errors import DataError

logger = logging.getLogger(__name__)

SKIPPED = "skipped_record"


@dataclass
class DatasetSource:
    """One annotation file with its media roots and sampling weight (a recipe `data.train` item)."""

    annotations: str
    image_root: str | None = None
    volume_root: str | None = None
    weight: float = 1.0


@dataclass
class Item:
    encoded: EncodedRecord
    images: list[Path]
    volumes: list[Path]
    source_index: int


class LVLMDataset(torch.utils.data.Dataset):
    """Map-style dataset of encoded records; `lengths` and `source_indices` feed the sampler.
    `train` turns on the recipe's volume augmentations."""

    def __init__(self, items: list[Item], processor, *, train: bool = True, truncate_answers: bool = False,
                 skip_bad_records: bool = False, complete_with_answer: bool = False):
        self.items = items
        self.processor = processor
        self.train = train
        self.truncate_answers = truncate_answers
        self.skip_bad_records = skip_bad_records
        self.complete_with_answer = complete_with_answer

    @classmethod
    def from_sources(
        cls, sources: Sequence[DatasetSource], processor, *, train: bool = True, truncate_answers: bool = False,
        skip_bad_records: bool = False, require_answer: bool = True,
    ) -> LVLMDataset:
        """Records of every source that the processor's truncation rule keeps (drops and cuts logged)."""
        items: list[Item] = []
        for index, source in enumerate(sources):
            records = read_records(source.annotations, require_answer=require_answer)
            encoded, report = encode_records(records, processor.tokenizer, processor.template, processor.tokens,
                                             processor.max_length, truncate_answers,
                                             complete_with_answer=not require_answer)
            report.log(Path(source.annotations).name)
            image_root = default_root(source.annotations, source.image_root)
            volume_root = default_root(source.annotations, source.volume_root)
            for enc in encoded:
                items.append(Item(
                    encoded=enc,
                    images=[resolve_media_path(p, image_root) for p in enc.record.images],
                    volumes=[resolve_media_path(p, volume_root) for p in enc.record.volumes],
                    source_index=index,
                ))
        if not items:
            names = ", ".join(s.annotations for s in sources) or "(none)"
            raise DataError(f"no trainable records in {names}",
                            hint="check `data.train` in the recipe and run `medmvl data validate` on each file")
        return cls(items, processor, train=train, truncate_answers=truncate_answers,
                   skip_bad_records=skip_bad_records, complete_with_answer=not require_answer)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> list[int]:
        return [len(item.encoded) for item in self.items]

    @property
    def source_indices(self) -> list[int]:
        return [item.source_index for item in self.items]

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        record = item.encoded.record
        try:
            inputs = self.processor(training_messages(record, self.complete_with_answer), images=item.images,
                                    volumes=item.volumes, add_generation_prompt=False, train=self.train,
                                    truncate_answers=self.truncate_answers)
        except DataError as err:
            if self.skip_bad_records:
                logger.warning("skipping record %r (%s): %s", record.id, record.source.describe(), err.message)
                return {SKIPPED: record.id}
            fix = ("if the file is genuine, raise data.max_voxels / data.max_pixels in the recipe; else remove "
                   "the record" if isinstance(err, TooLargeError) else "fix or remove the record")
            raise DataError(
                f"{record.source.describe(record.id)}: {err.message}",
                hint=f"{fix} (`medmvl data validate` lists every bad file), "
                     "or set data.skip_bad_records=true to skip such records and count them",
            ) from None
        return {
            "id": record.id,
            "input_ids": inputs["input_ids"][0],
            "labels": inputs["labels"][0],
            "pixel_values": inputs.get("pixel_values"),
            "volumes": inputs.get("volumes"),
        }
