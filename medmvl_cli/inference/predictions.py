"""`medmvl infer --data ... --out P.jsonl`: every record asked, rows written as each batch ends.

Records ending on a human turn are asked as they are; records ending on an assistant turn are
asked their last question, the earlier turns kept as the conversation so far. The reference is the
record's `answer` when it has one, else that final assistant turn.

Questions are ordered so that batches waste little padding and a volume's questions sit next to
each other (its features are computed once): grouped by volume, groups by length. Each batch's rows
are appended and flushed together; rows already in the output file are skipped (resume), a torn
last line left by a killed run is dropped first. A record whose file fails to load gets a row with
an `error` and the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from medmvl_cli.constants import IMAGE_PLACEHOLDER, VOLUME_PLACEHOLDER
from medmvl_cli.data.annotations import (
    AnnotationFile,
    Record,
    default_root,
    parse_record,
    resolve_media_path,
)
from medmvl_cli.errors import DataError, MedmvlError, RunError, write_failure
from medmvl_cli.inference.generate import GenerationSettings, Predictor, Request

logger = logging.getLogger(__name__)

ROW_KEYS = ("id", "prompt", "prediction", "answer", "question_type", "image", "image3d", "model")


@dataclass
class Question:
    record: Record
    request: Request
    reference: str | None
    prompt: str


def to_question(record: Record, image_root, volume_root) -> Question:
    messages = record.messages()
    reference = record.answer
    if messages and messages[-1]["role"] == "assistant":
        reference = reference if reference is not None else messages[-1]["content"]
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{record.source.describe(record.id)}: nothing to ask (no human turn)",
                        hint="end the record on the human question, or on the gpt answer to it")
    request = Request(
        messages=messages,
        images=[resolve_media_path(p, image_root) for p in record.images],
        volumes=[resolve_media_path(p, volume_root) for p in record.volumes],
    )
    return Question(record, request, reference, messages[-1]["content"])


def _prepare_output(out: Path, annotations: Path, model_name: str, overwrite: bool) -> set[str]:
    """Make `out` ready to append to; returns the ids it already answers.

    A file that is not a medmvl predictions file is never appended to, cut or replaced."""
    if out.exists() and out.resolve() == annotations.resolve():
        raise RunError(f"--out {out} is the annotation file itself", hint="write the predictions to another file")
    if out.is_dir():
        raise RunError(f"--out {out} is a folder", hint="give a file path, e.g. predictions.jsonl")
    if not out.is_file():
        return set()
    rows = _read_rows(out)
    if overwrite:
        out.unlink()
        return set()
    _drop_torn_tail(out)
    models = Counter(row.get("model") for row in rows)
    others = [m for m in models if m != model_name]
    if others:
        raise RunError(f"{out} holds {sum(models[m] for m in others)} row(s) of model {others[0]!r}, "
                       f"not {model_name!r}: resuming would mix two models' answers",
                       hint="pass --overwrite to start it over, or choose another --out")
    return {str(row["id"]) for row in rows}


def _read_rows(out: Path) -> list[dict]:
    """The prediction rows of `out` (a torn last line left by a killed run is ignored); a RunError
    when `out` is anything else, so that it is left as it is."""
    text = out.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends on a newline; else a line a killed run left half-written
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not (isinstance(row, dict) and {"id", "prediction", "model"} <= row.keys()):
                raise ValueError
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            raise _not_predictions(out, f" (line {number} is not a prediction row)") from None
        rows.append(row)
    if torn and not rows:
        raise _not_predictions(out, "")
    return rows


def _not_predictions(out: Path, where: str) -> RunError:
    return RunError(f"--out {out} is not a medmvl predictions file{where}, so it is neither resumed nor replaced",
                    hint="choose another --out; medmvl never appends to or replaces a file it did not write")


def _drop_torn_tail(out: Path) -> None:
    """A run killed while writing may leave half a line: cut the file back to its last full line."""
    with out.open("rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        fh.truncate(keep)
    logger.warning("%s: dropped an incomplete last line (%d bytes) left by an interrupted run", out, len(data) - keep)


def order_for_batching(questions: list[Question], placeholder_lengths: dict[str, int]) -> list[Question]:
    """Questions about the same volumes together (their features are computed once), groups and
    the questions within them by estimated prompt length (less padding in a batch)."""

    def length(q: Question) -> int:
        text = "".join(m["content"] for m in q.request.messages)
        media = sum(text.count(ph) * placeholder_lengths.get(ph, 0) for ph in (IMAGE_PLACEHOLDER, VOLUME_PLACEHOLDER))
        return len(text) // 4 + media  # ~4 characters a token: good enough to order by

    lengths = [length(q) for q in questions]
    # A volume group: the questions about the same volumes; a question without volumes is its own.
    groups = [tuple(str(p) for p in q.request.volumes) or ("", str(i)) for i, q in enumerate(questions)]
    longest: dict[tuple, int] = {}
    for group, size in zip(groups, lengths):
        longest[group] = max(longest.get(group, 0), size)
    order = sorted(range(len(questions)), key=lambda i: (longest[groups[i]], groups[i], lengths[i], i))
    return [questions[i] for i in order]


def predict_file(
    predictor: Predictor, annotations: Path, out: Path, settings: GenerationSettings, *,
    image_root=None, volume_root=None, batch_size: int = 8, overwrite: bool = False,
    use_feature_cache: bool = True, reuse_prefix: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Answer every record of `annotations` into `out`; returns counts {asked, skipped, errors}."""
    annotations, out = Path(annotations), Path(out)
    image_root = default_root(annotations, image_root)
    volume_root = default_root(annotations, volume_root)
    file = AnnotationFile(annotations)
    answered = _prepare_output(out, annotations, predictor.name, overwrite)
    questions, skipped, seen = [], 0, Counter()
    for raw in file:
        record = parse_record(raw)
        seen[record.id] += 1
        if record.id in answered:
            skipped += 1
        else:
            questions.append(to_question(record, image_root, volume_root))
    repeated = [i for i, n in seen.items() if n > 1]
    if repeated:
        logger.warning("%s: %d id(s) occur more than once (%s): rows cannot be told apart, and a resumed "
                       "run skips every record of an id already answered", annotations, len(repeated),
                       ", ".join(map(repr, repeated[:3])))
    questions = order_for_batching(questions, predictor.placeholder_lengths)
    counts = {"asked": 0, "skipped": skipped, "errors": 0}
    if on_progress:
        on_progress(0, len(questions))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sink = out.open("a", encoding="utf-8")
    except OSError as err:
        raise write_failure(out, err, "--out") from None
    with sink:
        for batch, rows in answer_in_batches(predictor, questions, settings, batch_size, use_feature_cache, reuse_prefix):
            _append(sink, rows, out)
            counts["errors"] += sum("error" in row for row in rows)
            counts["asked"] += len(batch)
            if on_progress:
                on_progress(counts["asked"], len(questions))
    return counts


def answer_in_batches(predictor: Predictor, questions: list[Question], settings: GenerationSettings,
                      batch_size: int, use_feature_cache: bool = True,
                      reuse_prefix: bool = True) -> Iterator[tuple[list[Question], list[dict]]]:
    """(batch, its prediction rows) for `questions` in batches of `batch_size`, in the given order;
    `reuse_prefix`: a volume's questions in a batch prefill their shared prompt prefix once; with the
    feature cache, the next batch's volumes are read on a background thread while a batch generates."""
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        if use_feature_cache:  # this batch's volumes (the first batch's) and the next batch's
            predictor.read_ahead([q.request for q in questions[start:start + 2 * batch_size]])
        yield batch, _answer(predictor, batch, settings, use_feature_cache, reuse_prefix)


def _append(sink, rows: list[dict], out: Path) -> None:
    """One write per batch, then to disk: a kill loses at most the batch being generated."""
    try:
        sink.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        sink.flush()
        os.fsync(sink.fileno())
    except OSError as err:
        try:
            sink.close()  # drops what the full disk refused; closes the file (a second close is a no-op)
        except OSError:
            pass
        raise write_failure(out, err, "--out",
                            then="run the same command again to answer the rest (rows written so far are kept)") from None


def _row(question: Question, model_name: str, prediction: str | None = None, error: str | None = None) -> dict:
    record = question.record
    row = {
        "id": record.id, "prompt": question.prompt, "prediction": prediction, "answer": question.reference,
        "question_type": record.question_type, "image": list(record.images), "image3d": list(record.volumes),
        "model": model_name,
    }
    if error is not None:
        row["error"] = error
    return row


def _answer(predictor: Predictor, batch: list[Question], settings, use_feature_cache, reuse_prefix) -> list[dict]:
    try:
        answers = predictor.generate([q.request for q in batch], settings, use_feature_cache=use_feature_cache,
                                     reuse_prefix=reuse_prefix)
        return [_row(q, predictor.name, a) for q, a in zip(batch, answers)]
    except MedmvlError as err:
        if len(batch) == 1:
            return [_failed(predictor, batch[0], err)]
    # A record failed to load: answer one by one, so only that record carries the error.
    rows = []
    for question in batch:
        try:
            answer = predictor.generate([question.request], settings, use_feature_cache=use_feature_cache)[0]
            rows.append(_row(question, predictor.name, answer))
        except MedmvlError as err:
            rows.append(_failed(predictor, question, err))
    return rows


def _failed(predictor: Predictor, question: Question, err: MedmvlError) -> dict:
    logger.warning("record %r: %s", question.record.id, err.message)
    return _row(question, predictor.name, error=err.message)
