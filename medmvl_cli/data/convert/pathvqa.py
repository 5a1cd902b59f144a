"""PathVQA (He et al. 2020), from its parquet release only (hub `flaviagiammarino/path-vqa`:
`data/train-*.parquet`, `data/validation-*.parquet`, `data/test-*.parquet`, columns `image`
({bytes, path}), `question`, `answer`). Closed = yes / no answers, as the card and the PathVQA
paper count them.

The original release stores questions as Python pickles (`qas/train/train_qa.pkl`); unpickling
runs whatever code the file holds, so those are refused with a pointer to the parquet release.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medmvl_cli.data.convert import hf_parquet
from medmvl_cli.data.convert.base import ConvertOptions, Media
from medmvl_cli.errors import DataError

NAME = "pathvqa"
_COLUMNS = ConvertOptions(image_column="image", question_column="question", answer_column="answer")


def splits(src: Path, options: ConvertOptions) -> list[str]:
    pickles = [src] if src.suffix == ".pkl" else sorted(src.rglob("*.pkl"))
    has_parquet = src.suffix == ".parquet" or any(src.rglob("*.parquet"))
    if pickles and not has_parquet:
        raise DataError(
            f"{pickles[0]}: PathVQA's pickled release is not read (unpickling a file can run any code in it)",
            hint="download the parquet release instead: huggingface.co/datasets/flaviagiammarino/path-vqa "
                 "(`hf download flaviagiammarino/path-vqa --repo-type dataset --local-dir path-vqa`)",
        )
    return hf_parquet.splits(src, _COLUMNS)


def rows(src: Path, split: str, media: Media, options: ConvertOptions) -> Iterator:
    return hf_parquet.rows(src, split, media, _COLUMNS, prefix=NAME)
