"""CT-RATE's VQA files (CT-CHAT's training and validation data), as published under `dataset/vqa/`.

Files: `vqa/train_vqa.json` (split `train_vqa`) and `vqa/valid_vqa.json` (split `validation_vqa`),
each a JSON list of LLaVA-style records, read the way CT-CHAT's own code reads them
(`llava/train/train.py`, `llava/serve/ctchat_validation_*.py`, `evaluations/evaluate_llm.py`):

    {"id": "...", "image": "valid_1_a_1.nii.gz",
     "conversations": [{"from": "human", "value": "<image>\\n...", "type": "short_answer"},
                       {"from": "gpt", "value": "..."}, ...]}

`image` is the bare volume name (CT-CHAT joins it to its encodings folder); it is found in the
nested volume folders and rewritten as HU with the split's metadata CSV, as the reports are
(`ct_rate.hu_volume`). A record without `image` (CT-CHAT's training code allows them: general
chest-CT questions written from PubMed articles) becomes text-only records. `type` sits on each human turn: `report_generation`, `multiple_choice`
(the question lists "(a) .. (d)", the answer reads "(b) text"), `free_response`, `description`,
`conversation` (long answers), anything else a short answer (CT-CHAT's evaluation groups them so).

Each human / gpt pair becomes one record (`ct-rate-vqa-<id>-q<k>`), the record's earlier pairs
kept before it as the conversation so far: `medmvl infer` asks its last question with that
history, and the reference is its own answer. Counts are per question: a record whose volume is
missing drops each of its questions; an empty question or answer drops it and the questions after
it (their history would be cut); turns that are not human / gpt pairs drop the record (one count). `question_type`: choice for multiple_choice; closed for a yes / no
short answer; open otherwise. The source `type` is kept as `category`. LLaVA's `<image>` tokens
are removed and one `<image3d>` opens the first human turn; CT-CHAT's task tokens
(`<short_answer>`, `<report_generation>`, ...) stay in the question text, as CT-CHAT trains on them.

The train file is large, so it is streamed record by record (`json_list_items`), never read whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from medmvl_cli.data.convert.base import Dropped, Media, text, yes_no_type
from medmvl_cli.data.convert.ct_rate import hu_volume, load_metadata
from medmvl_cli.errors import DataError

FILES = {"train_vqa": ("vqa/train_vqa.json", "train"), "validation_vqa": ("vqa/valid_vqa.json", "validation")}
LONG_TYPES = ("free_response", "description", "conversation", "report_generation")
LLAVA_IMAGE = "<image>"
VOLUME_PLACEHOLDER = "<image3d>"
_CHUNK = 1 << 20
_MAX_ITEM = 64 << 20  # one record larger than this is taken for a broken file
_LAYOUT = "a JSON list of {id, image, conversations: [{from, value, type}, ...]} as CT-RATE publishes it"


def splits(base: Path) -> list[str]:
    return [split for split, (rel, _) in FILES.items() if (base / rel).is_file()]


def rows(base: Path, split: str, media: Media) -> Iterator:
    """One row per question (so read / written / dropped count questions): a record or a Dropped."""
    rel, volume_split = FILES[split]
    path = base / rel
    metadata = load_metadata(base, volume_split)
    for index, item in enumerate(json_list_items(path)):
        yield from _records(item, index, path, base, media, metadata)


def _records(item, index: int, path: Path, base: Path, media: Media, metadata: dict) -> list:
    if not isinstance(item, dict) or "conversations" not in item:
        raise DataError(f"{path}: record {index} is not CT-RATE's VQA layout (keys: "
                        f"{sorted(item) if isinstance(item, dict) else type(item).__name__})",
                        hint=f"give the dataset's own file, unchanged: {_LAYOUT}")
    pairs = _pairs(item["conversations"])
    if not pairs:
        return [Dropped("conversation not in human / gpt pairs")]
    volume = None
    if "image" in item:  # CT-CHAT's general chest-CT knowledge questions have none: kept as text-only
        volume = hu_volume(text(item["image"]), base, media, metadata)
        if isinstance(volume, Dropped):
            return [volume] * len(pairs)
    source_id = text(item.get("id")) or f"{text(item.get('image')).removesuffix('.nii.gz') or 'text'}-{index}"
    history: list[dict] = []
    out: list = []
    for k, (question, answer) in enumerate(pairs):
        ask, reply = _clean(question.get("value")), text(answer.get("value"))
        if not ask or not reply:  # the later questions would lose their history: left out with it
            return out + [Dropped("empty question or answer (and the rest of its conversation)")] * (len(pairs) - k)
        if not history and volume:
            ask = f"{VOLUME_PLACEHOLDER}\n{ask}"
        kind = text(question.get("type"))
        conversation = history + [{"from": "human", "value": ask}, {"from": "gpt", "value": reply}]
        record = {"id": f"ct-rate-vqa-{source_id}-q{k}", **({"image3d": [volume]} if volume else {}),
                  "conversations": conversation, "answer": reply,
                  "question_type": _question_type(kind, reply), "category": kind or "unknown"}
        out.append(record)
        history = conversation
    return out


def _pairs(turns) -> list[tuple[dict, dict]]:
    """(human, gpt) pairs; none when the turns do not alternate so."""
    if not isinstance(turns, list) or len(turns) % 2 or not all(isinstance(t, dict) for t in turns):
        return []
    pairs = list(zip(turns[0::2], turns[1::2]))
    if any(h.get("from") != "human" or g.get("from") != "gpt" for h, g in pairs):
        return []
    return pairs


def _clean(value) -> str:
    """A human turn without LLaVA's <image> token (and the blank line it came with)."""
    return "\n".join(line for line in text(value).replace(LLAVA_IMAGE, "").split("\n") if line.strip()).strip()


def _question_type(kind: str, answer: str) -> str:
    if kind == "multiple_choice":
        return "choice"
    if kind in LONG_TYPES:
        return "open"
    return yes_no_type(answer)


def json_list_items(path: Path) -> Iterator:
    """The items of the JSON list in `path`, one at a time, holding about one item in memory."""
    with open(path, encoding="utf-8-sig") as fh:
        stream = _Stream(fh, path)
        if stream.peek() != "[":
            raise DataError(f"{path}: expected a JSON list at the top", hint=f"give the dataset's own file: {_LAYOUT}")
        stream.pos += 1
        if stream.peek() == "]":
            return
        while True:
            yield stream.value()
            following = stream.peek()
            if following == "]":
                return
            if following != ",":
                raise DataError(f"{path}: not valid JSON (expected ',' or ']' after list item)", hint="re-download the file")
            stream.pos += 1


class _Stream:
    """A text file read in chunks, with a cursor; what lies before the cursor is let go."""

    def __init__(self, fh, path: Path):
        self.fh, self.path, self.buf, self.pos = fh, path, "", 0
        self.decoder = json.JSONDecoder()

    def more(self) -> bool:
        chunk = self.fh.read(_CHUNK)
        if not chunk:
            return False
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        return True

    def peek(self) -> str:
        """The next character that is not white space ("" at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def value(self):
        self.peek()  # raw_decode does not skip leading white space
        while True:
            try:
                item, self.pos = self.decoder.raw_decode(self.buf, self.pos)
                return item
            except json.JSONDecodeError as err:
                if len(self.buf) - self.pos > _MAX_ITEM or not self.more():  # an item cut by the end of the file, or bad JSON
                    raise DataError(f"{self.path}: not valid JSON ({err})", hint="re-download the file") from None
