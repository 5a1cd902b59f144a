"""Records to token ids: the chat template, placeholder expansion and the one truncation point.

A sequence leaves here at its final length (image placeholders expanded to the token count of the
model's encoder + connector), so the collator only pads. Over-long samples are never cut silently:
they are dropped and counted by id, or, with `truncate_answers`, only the answer tail is cut, and
never through image tokens or down to no trained token at all. A turn whose character count alone
rules it out (`limits.turn_char_limit`) is dropped before the tokenizer sees it: tokenising a 50 MB
line would take gigabytes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from medmvl_cli.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, VOLUME_PLACEHOLDER
from medmvl_cli.data.annotations import Record
from medmvl_cli.data.limits import overlong_reason, overlong_turn
from medmvl_cli.data.templates import ChatTemplate, Encoded

logger = logging.getLogger(__name__)


@dataclass
class EncodedRecord:
    """A record's token ids and labels at their final length."""

    record: Record
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodingReport:
    """What happened to the records of a file on their way to token ids."""

    kept: int = 0
    truncated: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> ids
    lengths: list[int] = field(default_factory=list)

    def drop(self, reason: str, record_id: str) -> None:
        self.dropped.setdefault(reason, []).append(record_id)

    def log(self, what: str) -> None:
        total = self.kept + sum(len(v) for v in self.dropped.values())
        logger.info("%s: %d of %d records kept, %d truncated", what, self.kept, total, len(self.truncated))
        for reason, ids in self.dropped.items():
            shown = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
            logger.warning("%s: dropped %d record(s), %s: %s", what, len(ids), reason, shown)
        if self.truncated:
            shown = ", ".join(self.truncated[:10]) + (" ..." if len(self.truncated) > 10 else "")
            logger.warning("%s: cut the answer tail of %d record(s): %s", what, len(self.truncated), shown)


def fit_to_length(
    encoded: Encoded, max_length: int, placeholder_ids: Iterable[int], truncate_answers: bool
) -> tuple[Encoded | None, str | None]:
    """The one truncation point. Returns (encoded, None) or (None, why it was dropped)."""
    ids, labels = encoded.input_ids, encoded.labels
    if not any(label != IGNORE_INDEX for label in labels):
        return None, "no answer tokens to train on"
    if len(ids) <= max_length:
        return encoded, None
    if not truncate_answers:
        return None, f"longer than model.llm.max_length ({max_length} tokens)"
    placeholders = set(placeholder_ids)
    if any(token in placeholders for token in ids[max_length:]):
        return None, "image tokens beyond model.llm.max_length (image tokens are never cut)"
    if not any(label != IGNORE_INDEX for label in labels[:max_length]):
        return None, "the answer starts beyond model.llm.max_length"
    return Encoded(input_ids=ids[:max_length], labels=labels[:max_length]), None


@dataclass
class TextEncoding:
    """One conversation as token ids, after the one truncation rule.

    ``length``: the tokens before truncation (None: a turn too long to tokenise at all, ``detail``
    says which); ``dropped``: why the rule refuses the sample (None: kept, perhaps with its answer
    tail cut)."""

    input_ids: list[int]
    labels: list[int]
    length: int | None
    dropped: str | None = None
    detail: str | None = None

    @property
    def truncated(self) -> bool:
        return self.dropped is None and self.length is not None and len(self.input_ids) < self.length


def encode_conversation(
    messages: list[dict], tokenizer, template: ChatTemplate, placeholder_lengths: dict[str, int], max_length: int,
    *, add_generation_prompt: bool = False, truncate_answers: bool = False,
) -> TextEncoding:
    """The chat template, each placeholder expanded to its token count, then the one truncation
    rule; a prompt for generation only has its length checked. A turn too long to tokenise is
    refused before the tokenizer sees it."""
    texts = (m.get("content") for m in messages)
    overlong = overlong_turn((t for t in texts if isinstance(t, str)), max_length)
    if overlong is not None:
        return TextEncoding([], [], None, overlong_reason(max_length), overlong)
    encoded = template.encode(tokenizer, messages, placeholder_lengths, add_generation_prompt=add_generation_prompt)
    length = len(encoded.input_ids)
    if add_generation_prompt:
        too_long = f"prompt longer than model.llm.max_length ({max_length} tokens)" if length > max_length else None
        return TextEncoding(encoded.input_ids, encoded.labels, length, too_long)
    placeholder_ids = [tokenizer.convert_tokens_to_ids(p) for p in (IMAGE_PLACEHOLDER, VOLUME_PLACEHOLDER)]
    fitted, reason = fit_to_length(encoded, max_length, placeholder_ids, truncate_answers)
    if fitted is None:
        return TextEncoding(encoded.input_ids, encoded.labels, length, reason)
    return TextEncoding(fitted.input_ids, fitted.labels, length)


def encode_records(
    records: Iterable[Record],
    tokenizer,
    template: ChatTemplate,
    placeholder_lengths: dict[str, int],
    max_length: int,
    truncate_answers: bool = False,
    complete_with_answer: bool = False,
) -> tuple[list[EncodedRecord], EncodingReport]:
    """Encode training records; every drop and cut is in the report (and nothing is lost silently).

    `complete_with_answer`: a record ending on the human turn gets its `answer` as the reply
    (evaluation files are inference files with references)."""
    report = EncodingReport()
    out: list[EncodedRecord] = []
    for record in records:
        messages = training_messages(record, complete_with_answer)
        encoding = encode_conversation(messages, tokenizer, template, placeholder_lengths, max_length,
                                       truncate_answers=truncate_answers)
        if encoding.length is not None:
            report.lengths.append(encoding.length)
        if encoding.dropped is not None:
            report.drop(encoding.dropped, record.id)
            continue
        if encoding.truncated:
            report.truncated.append(record.id)
        report.kept += 1
        out.append(EncodedRecord(record, encoding.input_ids, encoding.labels))
    return out, report


def training_messages(record: Record, complete_with_answer: bool = False) -> list[dict]:
    """A record's messages; with `complete_with_answer`, one ending on the human turn gets its
    `answer` as the reply."""
    messages = record.messages()
    if complete_with_answer and record.ends_on_user and record.answer:
        messages.append({"role": "assistant", "content": record.answer})
    return messages
