"""`medmvl infer --data ... --out P.jsonl`: every record asked, rows written as each batch ends.

Records ending on a human turn are asked as they are; records ending on an assistant turn are
asked their last question, that answer becoming the reference. Rows already in the output file
are skipped (resume); a record whose file fails to load gets a row with an `error` and the run
goes on.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from medmvl_cli.data.annotations import AnnotationFile, Record, default_root, parse_record, resolve_media_path
from medmvl_cli.errors import DataError, MedmvlError
from medmvl_cli.inference.generate import GenerationSettings, Predictor, Request

logger = logging.getLogger(__name__)


@dataclass
class Question:
    record: Record
    request: Request
    reference: Optional[str]
    prompt: str


def to_question(record: Record, image_root, volume_root) -> Question:
    messages = record.messages()
    reference = record.answer
    if messages and messages[-1]["role"] == "assistant":
        reference = reference if reference is not None else messages[-1]["content"]
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{record.source.describe(record.id)}: nothing to ask (no human turn)")
    request = Request(
        messages=messages,
        images=[resolve_media_path(p, image_root) for p in record.images],
        volumes=[resolve_media_path(p, volume_root) for p in record.volumes],
    )
    return Question(record, request, reference, messages[-1]["content"])


def done_ids(out: Path) -> set[str]:
    """Ids already answered in an output file (a torn last line from a crash is ignored)."""
    ids = set()
    if out.is_file():
        for line in out.read_text(encoding="utf-8").splitlines():
            try:
                ids.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                continue
    return ids


def _row(question: Question, model_name: str, prediction: Optional[str] = None, error: Optional[str] = None) -> dict:
    record = question.record
    row = {
        "id": record.id, "prompt": question.prompt, "prediction": prediction, "answer": question.reference,
        "question_type": record.question_type, "image": list(record.images), "image3d": list(record.volumes),
        "model": model_name,
    }
    if error is not None:
        row["error"] = error
    return row


def predict_file(
    predictor: Predictor, annotations: Path, out: Path, settings: GenerationSettings, *,
    image_root=None, volume_root=None, batch_size: int = 8, overwrite: bool = False,
    use_feature_cache: bool = True, on_progress: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """Answer every record of `annotations` into `out`; returns counts {asked, skipped, errors}."""
    image_root = default_root(annotations, image_root)
    volume_root = default_root(annotations, volume_root)
    if overwrite:
        out.unlink(missing_ok=True)
    answered = done_ids(out)
    questions = []
    for raw in AnnotationFile(annotations):
        record = parse_record(raw)
        if record.id not in answered:
            questions.append(to_question(record, image_root, volume_root))
    # Shared volumes next to each other (their features are reused), then by prompt length.
    questions.sort(key=lambda q: (str(q.request.volumes[:1]), len(q.prompt)))
    counts = {"asked": 0, "skipped": len(answered), "errors": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as sink:
        for start in range(0, len(questions), batch_size):
            batch = questions[start:start + batch_size]
            rows = _answer(predictor, batch, settings, use_feature_cache)
            for row in rows:
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                counts["errors"] += "error" in row
            sink.flush()
            os.fsync(sink.fileno())
            counts["asked"] += len(batch)
            if on_progress:
                on_progress(counts["asked"], len(questions))
    return counts


def _answer(predictor: Predictor, batch: list[Question], settings, use_feature_cache) -> list[dict]:
    try:
        answers = predictor.generate([q.request for q in batch], settings, use_feature_cache=use_feature_cache)
        return [_row(q, predictor.name, a) for q, a in zip(batch, answers)]
    except MedmvlError:
        pass
    # A record failed to load: answer one by one, so only that record carries the error.
    rows = []
    for question in batch:
        try:
            answer = predictor.generate([question.request], settings, use_feature_cache=use_feature_cache)[0]
            rows.append(_row(question, predictor.name, answer))
        except MedmvlError as err:
            logger.warning("record %r: %s", question.record.id, err.message)
            rows.append(_row(question, predictor.name, error=err.message))
    return rows
