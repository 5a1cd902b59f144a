"""Reading a predictions JSONL (CONTRACT §5) for scoring, with errors that name the line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medmvl_cli.data.annotations import QUESTION_TYPES
from medmvl_cli.errors import DataError


@dataclass(frozen=True)
class PredictionRow:
    """One line of a predictions file, checked. `line` is 1-based."""

    line: int
    id: str | None
    prediction: str | None  # None only when `error` is set
    answer: str | None  # None when the row carries no usable reference
    question_type: str | None  # "closed" | "open" | "choice" as given, or None
    error: str | None
    model: str | None


def read_predictions(path: Path) -> list[PredictionRow]:
    """Parse every line of `path`; raise DataError naming the file and line of the first bad one."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"Predictions file not found: {path}",
            hint="Pass the JSONL written by `medmvl infer --data ANNOTATIONS --out PREDICTIONS.jsonl`.",
        )
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a predictions file.", hint="Pass the .jsonl file itself.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}).",
            hint="Predictions must be UTF-8 JSONL, one JSON object a line.",
        ) from None
    # Split on "\n" only: str.splitlines() would also cut at U+2028 etc., legal inside JSON strings.
    lines = text.split("\n")
    rows = [_parse_line(path, number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not rows:
        raise DataError(
            f"{path} holds no predictions.",
            hint="Run `medmvl infer --data ANNOTATIONS --out PREDICTIONS.jsonl` first (or check you passed the right file).",
        )
    return rows


def _parse_line(path: Path, number: int, line: str) -> PredictionRow:
    where = f"{path}, line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where}: not valid JSON ({err.msg} at column {err.colno}).",
            hint=f"Each line must hold one JSON object. Fix or delete line {number} "
            "(a run stopped mid-write can leave a cut-off last line; `medmvl infer` resumes it).",
        ) from None
    except RecursionError:  # json recurses once per nesting level
        raise DataError(f"{where}: nested too deeply (about a thousand levels or more) for the JSON parser.",
                        hint=f"Fix or delete line {number}: a prediction row is one flat JSON object.") from None
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a JSON object, found {type(record).__name__}.",
            hint='Each line must be an object such as {"id": ..., "prediction": ..., "answer": ...}.',
        )
    rid = record.get("id")
    where = f"{where} (id {rid!r})" if rid is not None else where
    error = record.get("error")
    prediction = record.get("prediction")
    if error in (None, ""):
        error = None
        if prediction is None:
            raise DataError(
                f"{where}: no `prediction` (and no `error`).",
                hint="Every row needs the model's text in `prediction`, or an `error` message. "
                "Re-run `medmvl infer` for this record or delete the line.",
            )
        if not isinstance(prediction, str):
            raise DataError(
                f"{where}: `prediction` must be a string, found {type(prediction).__name__}.",
                hint="Write the generated text as a JSON string.",
            )
    else:
        error = str(error)
        prediction = prediction if isinstance(prediction, str) else None
    return PredictionRow(
        line=number,
        id=None if rid is None else str(rid),
        prediction=prediction,
        answer=_answer(record.get("answer"), where),
        question_type=_question_type(record.get("question_type"), where),
        error=error,
        model=None if record.get("model") is None else str(record.get("model")),
    )


def _answer(value, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(
            f"{where}: `answer` must be a string, found {type(value).__name__}.",
            hint="Write the reference answer as a JSON string (or leave `answer` out: the row is then not scored).",
        )
    value = str(value)
    return value if value.strip() else None


def _question_type(value, where: str) -> str | None:
    if value is None or value == "":
        return None
    kind = str(value).strip().lower()
    if kind not in QUESTION_TYPES:
        raise DataError(
            f"{where}: `question_type` is {value!r}.",
            hint="Use `closed`, `open` or `choice`, or leave the field out and medmvl infers it "
            "(yes/no and multiple-choice answers are closed).",
        )
    return kind
