"""Annotation files in the MedM-VL / LLaVA format (CONTRACT §1), read as they are.

A file is a JSON list of records or JSONL (one record a line); which one is told by the content,
not the extension. Files are read once, record by record: iterating parses each record exactly
once, and `AnnotationFile.offsets()` keeps byte / character spans for random access without holding
parsed records in memory.

Two layers:
- `AnnotationFile` yields `RawRecord`s: the decoded JSON value (or why it did not decode) and
  where it came from (file, index, line).
- `parse_record` turns one into a typed `Record`, or lists every structural problem
  (`schema_problems`). Semantic checks (turn order, placeholder counts) are `conversation_problems`;
  `medmvl data validate` runs them all and reports every problem, the dataset raises on the first.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from medmvl_cli.constants import IMAGE_PLACEHOLDER, VOLUME_PLACEHOLDER
from medmvl_cli.data.turns import SPEAKER_ROLES, SYSTEM_FIRST, turn_order
from medmvl_cli.errors import DataError

log = logging.getLogger(__name__)

QUESTION_TYPES = ("closed", "open", "choice")
KNOWN_KEYS = frozenset({"id", "image", "image3d", "conversations", "answer", "question_type"})

FileFormat = Literal["json", "jsonl"]
_WS = re.compile(r"[ \t\n\r]*")


# ------------------------------------------------------------------------------------- locations
@dataclass(frozen=True)
class Source:
    """Where a record came from: its file, its 0-based position, and its 1-based first line."""

    file: str
    index: int
    line: int | None = None

    def describe(self, record_id: str | None = None) -> str:
        where = f"{self.file}: record {self.index}"
        if self.line is not None:
            where += f" (line {self.line})"
        if record_id is not None:
            where += f", id {record_id!r}"
        return where


@dataclass(frozen=True)
class Issue:
    """One problem found in a record: a short machine-readable `kind` and a message for people."""

    kind: str
    message: str


def record_error(source: Source, record_id: str | None, issues: list[Issue], hint: str | None = None) -> DataError:
    """A DataError naming file, index, line and id, listing `issues`."""
    lines = "; ".join(i.message for i in issues)
    return DataError(
        f"{source.describe(record_id)}: {lines}",
        hint=hint or f"fix the record, or run `medmvl data validate {source.file}` to list every problem",
    )


# ---------------------------------------------------------------------------------------- records
class Turn(NamedTuple):
    """One conversation turn: the role as written (`human`, `gpt`, ...) and its text."""

    speaker: str
    value: str

    @property
    def role(self) -> str:
        """The chat role: user | assistant | system."""
        return SPEAKER_ROLES[self.speaker]


@dataclass(frozen=True, slots=True)
class Record:
    """One annotation record. Paths are as written in the file (see `resolve_media_path`)."""

    id: str
    conversations: tuple[Turn, ...]
    images: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    answer: str | None = None
    question_type: str | None = None
    extra: dict = field(default_factory=dict)
    source: Source = Source("<memory>", 0)

    @property
    def file(self) -> str:
        return self.source.file

    @property
    def index(self) -> int:
        return self.source.index

    @property
    def line(self) -> int | None:
        return self.source.line

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages: [{"role": "user" | "assistant" | "system", "content": ...}]."""
        return [{"role": t.role, "content": t.value} for t in self.conversations]

    @property
    def ends_on_user(self) -> bool:
        """True for an inference prompt (the last turn is the human's)."""
        return bool(self.conversations) and self.conversations[-1].role == "user"


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A decoded JSON value and where it came from; `error` says why a JSONL line did not decode."""

    data: Any
    source: Source
    error: str | None = None

    @property
    def id(self) -> str | None:
        """The record's id if it has a usable one (for messages), else None."""
        if isinstance(self.data, dict):
            value = self.data.get("id")
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                return str(value)
        return None


# ----------------------------------------------------------------------------------- file reading
def detect_format(path: Path | str) -> FileFormat:
    """`json` (a list) or `jsonl`, from the first non-blank character and the first line."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    text = head.decode("utf-8-sig", errors="replace").lstrip(" \t\r\n")
    if not text:
        raise DataError(f"{path}: the annotation file is empty", hint="write a JSON list or JSONL of records")
    if text[0] == "[":
        return "json"
    if text[0] == "{":
        first = _first_line(path)
        try:
            json.loads(first)
        except (json.JSONDecodeError, RecursionError):  # the line-by-line reader reports it
            # One pretty-printed object rather than one record a line?
            try:
                whole = json.loads(path.read_text(encoding="utf-8-sig"))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                whole = None
            if isinstance(whole, dict):
                raise DataError(
                    f"{path}: holds a single JSON object, not a list of records",
                    hint="wrap the record in [ ] (a JSON list), or write one record per line (JSONL)",
                ) from None
        return "jsonl"
    raise DataError(
        f"{path}: not a JSON list or JSONL (starts with {text[:20]!r})",
        hint="an annotation file is a JSON list of records, or one JSON record per line",
    )


# json's decoder recurses once per nesting level: past about a thousand it raises RecursionError.
_TOO_DEEP = "nested too deeply (about a thousand levels or more) for the JSON parser"


def _first_line(path: Path) -> str:
    """The first non-blank line, whole: one JSONL record may be longer than any fixed head."""
    with open(path, "rb") as fh:
        for raw in fh:
            line = raw.decode("utf-8-sig", errors="replace").strip()
            if line:
                return line
    return ""


def _not_json(err: Exception) -> str:
    """Why a JSONL line did not decode, for its RawRecord."""
    return _TOO_DEEP if isinstance(err, RecursionError) else getattr(err, "msg", str(err))


def _json_error(path: Path, text: str, err: json.JSONDecodeError) -> DataError:
    return DataError(
        f"{path}: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg})",
        hint="fix the JSON syntax there (a missing comma or bracket is typical)",
    )


def _decode_record(decoder: json.JSONDecoder, text: str, pos: int, source: Source) -> tuple[Any, int]:
    """One record of a JSON list; a record nested too deeply to decode stops the file, named."""
    try:
        return decoder.raw_decode(text, pos)
    except RecursionError:
        raise DataError(
            f"{source.describe()}: {_TOO_DEEP}",
            hint="fix or remove that record (no annotation needs more than a few levels of nesting)",
        ) from None


class AnnotationFile:
    """A lazily read annotation file.

    Iterating yields `RawRecord`s, decoding each record once. `len()` and `[i]` use an offset
    index (built on first use by a scan that does not parse JSONL records) for random access.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(
                f"annotation file {self.path} does not exist" + (" (it is a folder)" if self.path.is_dir() else ""),
                hint="give the path of a .json or .jsonl annotation file",
            )
        self.format: FileFormat = detect_format(self.path)
        self._offsets: list[tuple[int, int, int]] | None = None  # (start, end, line)
        self._text: str | None = None  # JSON lists only

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[RawRecord]:
        return self._iter_jsonl() if self.format == "jsonl" else self._iter_json()

    def _iter_jsonl(self) -> Iterator[RawRecord]:
        name, index, offsets = str(self.path), 0, []
        with open(self.path, "rb") as fh:
            pos = 0
            for lineno, raw in enumerate(fh, start=1):
                start, pos = pos, pos + len(raw)
                stripped = raw.strip()
                if not stripped:
                    continue
                if lineno == 1 and stripped.startswith(b"\xef\xbb\xbf"):
                    stripped = stripped[3:]
                offsets.append((start, pos, lineno))
                source = Source(name, index, lineno)
                index += 1
                try:
                    yield RawRecord(json.loads(stripped.decode("utf-8")), source)
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
                    yield RawRecord(None, source, error=f"line {lineno} is not valid JSON ({_not_json(err)})")
        self._offsets = offsets

    def _load_text(self) -> str:
        if self._text is None:
            self._text = self.path.read_text(encoding="utf-8-sig")
        return self._text

    def _iter_json(self) -> Iterator[RawRecord]:
        text, name = self._load_text(), str(self.path)
        decoder = json.JSONDecoder()
        offsets: list[tuple[int, int, int]] = []
        try:
            pos = _WS.match(text, 0).end()
            pos = _WS.match(text, pos + 1).end()  # past "["
            line, counted = 1, 0
            if text.startswith("]", pos):
                pos = _WS.match(text, pos + 1).end()
            else:
                while True:
                    line += text.count("\n", counted, pos)
                    counted = pos
                    data, end = _decode_record(decoder, text, pos, Source(name, len(offsets), line))
                    offsets.append((pos, end, line))
                    yield RawRecord(data, Source(name, len(offsets) - 1, line))
                    pos = _WS.match(text, end).end()
                    if text.startswith(",", pos):
                        pos = _WS.match(text, pos + 1).end()
                        continue
                    if text.startswith("]", pos):
                        pos = _WS.match(text, pos + 1).end()
                        break
                    raise json.JSONDecodeError("expected ',' or ']' after a record", text, pos)
            if pos != len(text):
                raise json.JSONDecodeError("extra data after the list", text, pos)
        except json.JSONDecodeError as err:
            raise _json_error(self.path, text, err) from None
        self._offsets = offsets

    # -- random access --------------------------------------------------------------------------
    def offsets(self) -> list[tuple[int, int, int]]:
        """(start, end, line) of every record: bytes for JSONL, characters for JSON lists."""
        if self._offsets is None:
            if self.format == "jsonl":
                self._offsets = self._scan_jsonl()
            else:
                for _ in self._iter_json():
                    pass
        assert self._offsets is not None
        return self._offsets

    def _scan_jsonl(self) -> list[tuple[int, int, int]]:
        offsets, pos = [], 0
        with open(self.path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                start, pos = pos, pos + len(raw)
                if raw.strip():
                    offsets.append((start, pos, lineno))
        return offsets

    def __len__(self) -> int:
        return len(self.offsets())

    def __getitem__(self, index: int) -> RawRecord:
        offsets = self.offsets()
        if index < 0:
            index += len(offsets)
        start, end, line = offsets[index]
        source = Source(str(self.path), index, line)
        if self.format == "json":
            return RawRecord(json.loads(self._load_text()[start:end]), source)
        with open(self.path, "rb") as fh:
            fh.seek(start)
            raw = fh.read(end - start).strip()
        if index == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            return RawRecord(json.loads(raw.decode("utf-8")), source)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            return RawRecord(None, source, error=f"line {line} is not valid JSON ({_not_json(err)})")

    def records(self) -> Iterator[Record]:
        """Every record parsed and checked (`parse_record`); raises DataError on the first bad one."""
        for raw in self:
            yield parse_record(raw)


# ---------------------------------------------------------------------------------------- parsing
def _path_list(data: dict, key: str, issues: list[Issue]) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        issues.append(Issue("schema", f"`{key}` must be a path or a list of non-empty paths (got {_short(value)})"))
        return ()
    return tuple(value)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scalar_text(data: dict, key: str, issues: list[Issue]) -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a count written as 3 means "3"
    issues.append(Issue("schema", f"`{key}` must be a string (got {_short(value)})"))
    return None


def _turns(data: dict, issues: list[Issue]) -> tuple[Turn, ...]:
    if "conversations" not in data:
        issues.append(Issue("schema", "missing `conversations`"))
        return ()
    convs = data["conversations"]
    if not isinstance(convs, list):
        issues.append(Issue("schema", f"`conversations` must be a list of turns (got {_short(convs)})"))
        return ()
    if not convs:
        issues.append(Issue("schema", "`conversations` is empty"))
        return ()
    turns = []
    for i, turn in enumerate(convs):
        if type(turn) is dict:  # the common case, checked cheaply: 100k-record files are usual
            speaker, value = turn.get("from"), turn.get("value")
            if type(value) is str and speaker in SPEAKER_ROLES:
                turns.append(Turn(speaker, value))
                continue
        if not isinstance(turn, dict):
            issues.append(Issue("schema", f"turn {i} must be an object with `from` and `value` (got {_short(turn)})"))
            continue
        speaker, value = turn.get("from"), turn.get("value")
        bad = False
        if not isinstance(speaker, str):
            issues.append(Issue("schema", f"turn {i}: `from` must be a string (got {_short(speaker)})"))
            bad = True
        elif speaker not in SPEAKER_ROLES:
            issues.append(Issue("role", f"turn {i}: unknown role {speaker!r}; use human/user, gpt/assistant or system"))
            bad = True
        if not isinstance(value, str):
            issues.append(Issue("schema", f"turn {i}: `value` must be a string (got {_short(value)})"))
            bad = True
        if not bad:
            turns.append(Turn(speaker, value))
    return tuple(turns)


def schema_problems(raw: RawRecord) -> tuple[Record | None, list[Issue]]:
    """Build the `Record` and list structural problems (types, missing keys, unknown roles).

    The record is None when it cannot be built at all (not JSON, not an object, no usable turns).
    """
    if raw.error is not None:
        return None, [Issue("json", raw.error)]
    data = raw.data
    if not isinstance(data, dict):
        return None, [Issue("schema", f"a record must be a JSON object (got {_short(data)})")]
    issues: list[Issue] = []
    rid = data.get("id")
    if rid is None:
        issues.append(Issue("schema", "missing `id`"))
        rid = f"#{raw.source.index}"
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        issues.append(Issue("schema", f"`id` must be a non-empty string (got {_short(rid)})"))
        rid = f"#{raw.source.index}"
    images = _path_list(data, "image", issues)
    volumes = _path_list(data, "image3d", issues)
    turns = _turns(data, issues)
    answer = _scalar_text(data, "answer", issues)
    qtype = _scalar_text(data, "question_type", issues)
    if qtype is not None and qtype not in QUESTION_TYPES:
        issues.append(Issue("schema", f"`question_type` must be closed, open or choice (got {qtype!r})"))
    extra = {k: v for k, v in data.items() if k not in KNOWN_KEYS}
    if not turns:
        return None, issues
    record = Record(str(rid), turns, images, volumes, answer, qtype, extra, raw.source)
    return record, issues


def conversation_problems(record: Record, *, require_answer: bool = True) -> list[Issue]:
    """Turn order, empty turns and placeholder counts.

    `require_answer`: a training record must end on the assistant's turn; inference records may
    end on the human's.
    """
    issues: list[Issue] = []
    turns = record.conversations
    answered = False
    out_of_order = dict(turn_order([SPEAKER_ROLES[t.speaker] for t in turns]))
    for i, turn in enumerate(turns):
        role = SPEAKER_ROLES[turn.speaker]
        answered = answered or role == "assistant"
        if out_of_order.get(i) == SYSTEM_FIRST:
            issues.append(Issue("alternation", f"turn {i}: a system turn may only come first"))
        elif i in out_of_order:
            who = "human" if out_of_order[i] == "user" else "gpt"
            issues.append(Issue("alternation", f"turn {i}: expected a {who} turn, got {turn.speaker!r} (turns must alternate, human first)"))
        if role == "system":
            continue
        if not turn.value.strip():
            kind = "empty_answer" if role == "assistant" else "empty_turn"
            issues.append(Issue(kind, f"turn {i} ({turn.speaker}) is empty"))
        if role == "assistant" and (IMAGE_PLACEHOLDER in turn.value or VOLUME_PLACEHOLDER in turn.value):
            issues.append(Issue("placeholder", f"turn {i} ({turn.speaker}) holds an image placeholder; only human turns may"))
    if require_answer and not answered:
        issues.append(Issue("unanswered", "no gpt turn: a training record needs the answer"))
    elif require_answer and turns and turns[-1].role == "user":
        issues.append(Issue("unanswered", "the last turn is human's: a training record ends on the gpt answer"))
    text = "\n".join(t.value for t in turns)
    for token, paths, key in ((IMAGE_PLACEHOLDER, record.images, "image"), (VOLUME_PLACEHOLDER, record.volumes, "image3d")):
        count = text.count(token)
        if count != len(paths):
            issues.append(Issue(
                "placeholder",
                f"{count} {token} placeholder(s) in the conversation but {len(paths)} path(s) in `{key}`",
            ))
    return issues


def parse_record(raw: RawRecord, *, require_answer: bool | None = None) -> Record:
    """A checked `Record`, or DataError (file, index, line, id and every problem).

    `require_answer`: None checks structure and placeholders only; True also requires the record
    to end on the gpt answer (training); False allows a final human turn (inference).
    """
    record, issues = schema_problems(raw)
    if record is not None:
        conv = conversation_problems(record, require_answer=bool(require_answer))
        if require_answer is None:
            conv = [i for i in conv if i.kind != "unanswered"]
        issues += conv
    if issues:
        raise record_error(raw.source, raw.id, issues)
    assert record is not None
    return record


def read_records(path: Path | str, *, require_answer: bool | None = None) -> list[Record]:
    """Every record of an annotation file, checked; raises DataError on the first bad one."""
    file = AnnotationFile(path)
    return [parse_record(raw, require_answer=require_answer) for raw in file]


# ------------------------------------------------------------------------------------------ paths
PathProblem = Literal["absolute_path", "escapes_root"]


def path_problem(path: str, root: str | Path | None = None) -> tuple[PathProblem, str] | None:
    """Why a path breaks `--strict-paths`, or None: absolute, climbing out of its root with `..`,
    or (given `root`) leading out of it through a symlink, which is resolved without being opened."""
    if os.path.isabs(path) or path.startswith("~"):
        return "absolute_path", f"{path!r} is absolute; strict paths must be relative to the root"
    norm = os.path.normpath(path)
    if norm == ".." or norm.startswith(".." + os.sep):
        return "escapes_root", f"{path!r} climbs out of its root folder"
    if root is not None:
        base = Path(root).resolve()
        if not (base / path).resolve().is_relative_to(base):
            return "escapes_root", f"{path!r} is a symlink (or lies in a linked folder) leading out of its root folder"
    return None


def resolve_media_path(
    path: str, root: str | Path | None, *, strict: bool = False, where: str | None = None
) -> Path:
    """The file a record's path names: relative paths against `root`, absolute ones as they are.

    With `strict`, absolute paths and paths escaping `root` (by `..` or a symlink) raise DataError
    (named by `where`).
    """
    if strict:
        problem = path_problem(path, root)
        if problem is not None:
            raise DataError(
                f"{where + ': ' if where else ''}{problem[1]}",
                hint="write paths relative to --image-root / --volume-root, or drop --strict-paths",
            )
    expanded = Path(path).expanduser()
    if expanded.is_absolute() or root is None:
        return expanded
    return Path(root) / expanded


def default_root(annotations: Path | str, root: str | Path | None) -> Path:
    """The root given, else the folder of the annotation file."""
    return Path(root) if root is not None else Path(annotations).resolve().parent
