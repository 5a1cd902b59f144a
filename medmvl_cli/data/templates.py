"""Chat templates: a conversation becomes input ids and labels, masked exactly by construction.

A template renders a conversation as a list of text segments, each either *prompt* (masked with
``IGNORE_INDEX``) or *answer* (an assistant reply plus its end-of-turn token, trained). Adjacent
segments of the same kind are joined and each joined segment is tokenised on its own, so the
labels are the answer segments' own ids: nothing is rendered as one string and split again, and no
"tokenization mismatch" can silently zero a sample. Placeholders (``<image>``, ``<image3d>``) in a
human turn become ``placeholder_lengths[...]`` copies of that placeholder's token id.

Registry (``get_template``): the native formats ``qwen2`` (ChatML), ``llama3``, ``phi`` (Phi-2's
"Instruct:/Output:"), ``phi3``; ``plain`` (captioning / pretraining: image tokens, caption, eos);
and MedM-VL's own prompt format ``medmvl-qwen2`` / ``-llama3`` / ``-phi`` / ``-phi3``
("<system> USER: {q} ASSISTANT: {a}<eos>"). Each template also gives the Jinja chat template that
renders the same text (``jinja``), so HF ``apply_chat_template`` reproduces the training ids.
See docs/templates.md.
"""

from __future__ import annotations

import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

from medmvl_cli.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, PLACEHOLDERS, VOLUME_PLACEHOLDER
from medmvl_cli.data.turns import CHAT_ROLES, SYSTEM_FIRST, turn_order
from medmvl_cli.errors import DataError, ModelError

logger = logging.getLogger(__name__)

# Typed content parts (HF processors' convention) and the placeholder each media part stands for.
PART_PLACEHOLDERS = {"image": IMAGE_PLACEHOLDER, "volume": VOLUME_PLACEHOLDER}
_PARTS_HINT = ('content is a string, or a list of parts: {"type": "text", "text": "..."}, {"type": "image"} '
               '(a 2D image, rendered as <image>), {"type": "volume"} (a 3D volume, rendered as <image3d>); '
               'media parts may carry "url" / "path" / "image" keys, which the template ignores')
# Longest first, so "<image3d>" is never read as "<image>" followed by text.
_PLACEHOLDER_RE = re.compile("(" + "|".join(re.escape(p) for p in sorted(PLACEHOLDERS, key=len, reverse=True)) + ")")


QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."
# MedM-VL's (Vicuna's) system prompt, lvlm/dataset/template/*_template.py.
MEDMVL_DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_ROLE_HINT = 'turns are {"from": "human" | "gpt" | "system", "value": "..."}: an optional leading system turn, then human and gpt turns alternating, starting with human'


@dataclass
class Encoded:
    """One encoded conversation. ``labels[i]`` is ``input_ids[i]`` where trained, else -100."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


# --------------------------------------------------------------------------- conversations


def content_text(content, where: str = "message") -> str:
    """A message's ``content`` as the text the templates render.

    A string is returned as it is. A list of typed parts is joined in order: a text part gives its
    text, an ``image`` part ``<image>`` and a ``volume`` part ``<image3d>``, each followed by a
    newline unless it is the last part, so ``[{"type": "image"}, {"type": "text", "text": q}]``
    renders as ``<image>``, a newline and ``q``: the LLaVA / MedM-VL layout the models are trained on. The
    Jinja templates apply the same rule (``_CONTENT_MACRO``).
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: content is {type(content).__name__}, not text or a list of parts", hint=_PARTS_HINT)
    pieces = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif kind in PART_PLACEHOLDERS:
            pieces.append(PART_PLACEHOLDERS[kind] + ("\n" if i < len(content) - 1 else ""))
        else:
            shown = kind if kind is not None else type(part).__name__
            raise DataError(f"{where}: content part {i} ({shown!r}) is not a text, image or volume part",
                            hint=_PARTS_HINT)
    return "".join(pieces)


def count_placeholders(messages: list[dict]) -> dict[str, int]:
    """How many times each placeholder occurs in the conversation (any role)."""
    counts = dict.fromkeys(PLACEHOLDERS, 0)
    for i, m in enumerate(messages):
        for p in _PLACEHOLDER_RE.findall(content_text(m.get("content") or "", f"message {i}")):
            counts[p] += 1
    return counts


def _check_order(roles: list[str], where: str) -> None:
    if not roles:
        raise DataError(f"{where}: the conversation is empty", hint=_ROLE_HINT)
    out_of_order = turn_order(roles)
    for i, role in enumerate(roles):
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: turn {i} has role {role!r}; roles are {', '.join(CHAT_ROLES)}", hint=_ROLE_HINT)
        if (i, SYSTEM_FIRST) in out_of_order:
            raise DataError(f"{where}: turn {i} is a system turn; only the first turn may be one", hint=_ROLE_HINT)
    if roles == ["system"]:
        raise DataError(f"{where}: the conversation has a system turn and nothing else", hint=_ROLE_HINT)
    if out_of_order:
        i, expected = out_of_order[0]
        said = "human" if expected == "user" else "gpt"
        raise DataError(f"{where}: turn {i} is a {roles[i]} turn where a {said} turn was expected", hint=_ROLE_HINT)


def _text_messages(messages: list[dict], add_generation_prompt: bool) -> list[dict]:
    """Checked messages with each ``content`` as text (typed parts rendered by ``content_text``)."""
    if not isinstance(messages, list):
        raise DataError("messages must be a list of {'role', 'content'} dicts", hint=_ROLE_HINT)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), (str, list)):
            raise DataError(f"message {i} is not a {{'role', 'content'}} dict with text or typed-part content",
                            hint=_PARTS_HINT)
    messages = [dict(m, content=content_text(m["content"], f"message {i}")) for i, m in enumerate(messages)]
    _check_order([m.get("role") for m in messages], "conversation")
    for i, m in enumerate(messages):
        if m["role"] != "user" and _PLACEHOLDER_RE.search(m["content"]):
            raise DataError(
                f"message {i} ({m['role']}) contains an image placeholder",
                hint="<image> / <image3d> may appear only in human turns",
            )
    if add_generation_prompt and messages[-1]["role"] != "user":
        raise DataError(
            "a generation prompt needs a conversation that ends on a human turn",
            hint="drop the last assistant turn, or encode without add_generation_prompt",
        )
    return messages


# --------------------------------------------------------------------------- tokenisation


def _token_id(tokenizer, token: str, why: str) -> int:
    """The id of a token the tokenizer must hold as one piece; ModelError when it does not."""
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token", None)
    if tid is None or (unk is not None and token != unk and tid == tokenizer.unk_token_id):
        raise ModelError(
            f"the tokenizer has no {token!r} token ({why})",
            hint=f"use a template made for this LLM, or add it: tokenizer.add_special_tokens({{'additional_special_tokens': [{token!r}]}})",
        )
    return tid


def _adds_bos(tokenizer) -> bool:
    """Whether plain ``tokenizer(text)`` prepends bos (Llama-3 does; Qwen2, Phi do not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == bos


_checked_segmenting: set[str] = set()


def _warn_if_segmenting_changes_ids(tokenizer) -> None:
    """SentencePiece-style tokenizers (Metaspace / Prepend) mark the start of every string they
    encode, so a segment encoded alone can start with an extra "▁" that the whole rendered string
    would not have. Masks stay exact; only agreement with apply_chat_template may be lost."""
    key = f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}"
    if key in _checked_segmenting:
        return
    _checked_segmenting.add(key)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = f"{backend.normalizer!r} {backend.pre_tokenizer!r}" if backend is not None else ""
    if "Metaspace" in parts or "Prepend" in parts:
        logger.warning(
            "tokenizer %s is SentencePiece-style: each answer is tokenised on its own, so its first "
            "token may differ from what apply_chat_template gives (labels stay exact)", key,
        )


def _placeholder_ids(tokenizer, chunk: str, placeholder_lengths: dict[str, int]) -> list[int]:
    if chunk not in placeholder_lengths:
        raise DataError(
            f"the conversation uses {chunk} but the model has no {chunk} input",
            hint=f"use a model with a {'3D' if chunk == VOLUME_PLACEHOLDER else '2D'} branch, or remove {chunk} from the record",
        )
    n = placeholder_lengths[chunk]
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"placeholder_lengths[{chunk!r}] must be a positive int, got {n!r}")
    return [_token_id(tokenizer, chunk, "image placeholder")] * n


def _encode_segments(tokenizer, prefix_ids: list[int], segments: list[tuple[str, bool]],
                     placeholder_lengths: dict[str, int]) -> Encoded:
    # Join neighbours of the same kind first: a segment boundary is a tokenisation boundary, and
    # the only ones wanted are between prompt and answer (and those fall where the rendered
    # string's own word split falls, so the ids match apply_chat_template).
    merged: list[list] = []
    for text, trained in segments:
        if not text:
            continue
        if merged and merged[-1][1] == trained:
            merged[-1][0] += text
        else:
            merged.append([text, trained])
    # Cut each segment at its placeholders; every text chunk is encoded on its own (as HF does
    # around added tokens), all of them in one batch call.
    chunks: list[tuple[str, bool]] = []
    for text, trained in merged:
        chunks.extend((c, trained) for c in _PLACEHOLDER_RE.split(text) if c)
    texts = [c for c, _ in chunks if c not in PLACEHOLDERS]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    input_ids = list(prefix_ids)
    labels = [IGNORE_INDEX] * len(prefix_ids)
    for chunk, trained in chunks:
        ids = _placeholder_ids(tokenizer, chunk, placeholder_lengths) if chunk in PLACEHOLDERS else next(encoded)
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    return Encoded(input_ids=input_ids, labels=labels)


def _fill(fmt: str, content: str) -> str:
    before, after = fmt.split("{content}")
    return before + content + after


# --------------------------------------------------------------------------- templates

BosRule = Literal["never", "always", "auto"]


class ChatTemplate(ABC):
    """Base class. Subclasses render a conversation as ``(text, trained)`` segments."""

    name: str = ""
    description: str = ""
    bos: BosRule = "never"  # auto: prepend bos when the tokenizer itself would (MedM-VL, LLaVA do)
    trim: bool = False  # strip each turn's text, as the real template does
    required_tokens: tuple[str, ...] = ()
    stop_tokens: tuple[str, ...] = ()

    def encode(self, tokenizer, messages: list[dict], placeholder_lengths: dict[str, int],
               add_generation_prompt: bool = False) -> Encoded:
        """Input ids and labels of ``messages``; answers and their end tokens are the only labels.

        With ``add_generation_prompt`` the ids end with the assistant prefix (inference); the
        conversation must then end on a user turn. ``content`` is text or typed parts
        (``content_text``).
        """
        placeholder_lengths = placeholder_lengths or {}
        messages = _text_messages(messages, add_generation_prompt)
        for token in self.required_tokens:
            _token_id(tokenizer, token, f"template {self.name!r} needs it")
        _warn_if_segmenting_changes_ids(tokenizer)
        segments = self._segments(tokenizer, messages, add_generation_prompt)
        return _encode_segments(tokenizer, self._bos_ids(tokenizer), segments, placeholder_lengths)

    @abstractmethod
    def answer_text(self, content: str, tokenizer) -> str:
        """The exact text trained for one assistant reply (reply plus its end-of-turn token)."""
        ...

    @abstractmethod
    def jinja(self, tokenizer=None) -> str:
        """The Jinja chat template that renders the same text (for HF folders). ``tokenizer``
        decides the bos of ``auto`` templates (none when omitted)."""
        ...

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Ids that end a generated reply: the template's end-of-turn tokens, then eos."""
        ids = []
        for token in self.stop_tokens:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is not None and tid != getattr(tokenizer, "unk_token_id", None) and tid not in ids:
                ids.append(tid)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
        return ids

    @abstractmethod
    def _segments(self, tokenizer, messages, add_generation_prompt) -> list[tuple[str, bool]]:
        ...

    def _clean(self, text: str) -> str:
        return text.strip() if self.trim else text

    def _bos_ids(self, tokenizer) -> list[int]:
        if self.bos == "never" or (self.bos == "auto" and not _adds_bos(tokenizer)):
            return []
        if tokenizer.bos_token_id is None:
            raise ModelError(f"template {self.name!r} starts with bos but the tokenizer has no bos token",
                             hint="use a template made for this LLM")
        return [tokenizer.bos_token_id]

    def _jinja_bos(self, tokenizer) -> str:
        return "{{- bos_token }}" if self.bos == "auto" and tokenizer is not None and _adds_bos(tokenizer) else ""

    def __repr__(self) -> str:
        return f"<ChatTemplate {self.name}>"


class FormatTemplate(ChatTemplate):
    """A template made of per-role format strings (``{content}`` marks the turn's text)."""

    def __init__(self, name: str, description: str, *, system: str, user: str, assistant_prefix: str,
                 answer: str, assistant_suffix: str = "", generation_prefix: str | None = None,
                 conversation_end: str = "", default_system: str | None = None, trim: bool = False,
                 bos: BosRule = "never", prompt_after_last_user: bool = False,
                 required_tokens: tuple[str, ...] = (), stop_tokens: tuple[str, ...] = (), jinja: str = ""):
        self.name, self.description = name, description
        self.system_format, self.user_format = system, user
        self.assistant_prefix, self.answer_format, self.assistant_suffix = assistant_prefix, answer, assistant_suffix
        self.generation_prefix = assistant_prefix if generation_prefix is None else generation_prefix
        self.conversation_end = conversation_end  # after the last turn, unless generating
        self.default_system = default_system
        self.trim, self.bos = trim, bos
        # MedM-VL always follows a final human turn with "ASSISTANT:", generating or not.
        self.prompt_after_last_user = prompt_after_last_user
        self.required_tokens, self.stop_tokens = required_tokens, stop_tokens
        self._jinja = jinja

    def answer_text(self, content: str, tokenizer=None) -> str:
        return _fill(self.answer_format, self._clean(content))

    def jinja(self, tokenizer=None) -> str:
        return _CONTENT_MACRO + self._jinja_bos(tokenizer) + self._jinja

    def _segments(self, tokenizer, messages, add_generation_prompt):
        segments: list[tuple[str, bool]] = []
        system = self.default_system
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        if system is not None:
            segments.append((_fill(self.system_format, self._clean(system)), False))
        for m in messages:
            if m["role"] == "user":
                segments.append((_fill(self.user_format, self._clean(m["content"])), False))
            else:
                segments.append((self.assistant_prefix, False))
                segments.append((self.answer_text(m["content"]), True))
                segments.append((self.assistant_suffix, False))
        ends_on_user = messages[-1]["role"] == "user"
        if add_generation_prompt or (ends_on_user and self.prompt_after_last_user):
            segments.append((self.generation_prefix, False))
        else:
            segments.append((self.conversation_end, False))
        return segments


class PlainTemplate(ChatTemplate):
    """LLaVA's "plain" format for pretraining the connector: each human turn contributes only its
    placeholders (its text is dropped, as LLaVA and MedM-VL do), each reply is trained followed by
    eos. No system prompt, no role words."""

    name = "plain"
    description = "captioning / pretraining: image tokens + caption + eos"
    bos = "auto"
    trim = True

    def answer_text(self, content: str, tokenizer) -> str:
        if tokenizer.eos_token is None:
            raise ModelError("template 'plain' ends each caption with eos but the tokenizer has none",
                             hint="set tokenizer.eos_token")
        return self._clean(content) + tokenizer.eos_token

    def stop_token_ids(self, tokenizer) -> list[int]:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def jinja(self, tokenizer=None) -> str:
        return _CONTENT_MACRO + self._jinja_bos(tokenizer) + PLAIN_JINJA

    def _segments(self, tokenizer, messages, add_generation_prompt):
        segments: list[tuple[str, bool]] = []
        for m in messages:
            if m["role"] == "user":
                segments.append(("".join(_PLACEHOLDER_RE.findall(m["content"])), False))
            elif m["role"] == "assistant":
                segments.append((self.answer_text(m["content"], tokenizer), True))
        return segments


# --------------------------------------------------------------------------- Jinja sources
# Each renders exactly the segments above; {% generation %} marks the trained text so that
# apply_chat_template(return_assistant_tokens_mask=True) gives the same mask. Every template
# starts with _CONTENT_MACRO, which renders a string or typed parts as content_text does.

_CONTENT_MACRO = r"""{%- macro render_content(content) %}
{%- if content is string %}
{{- content }}
{%- else %}
{%- for part in content %}
{%- if part['type'] == 'text' %}
{{- part['text'] }}
{%- elif part['type'] == 'image' or part['type'] == 'volume' %}
{{- '<image>' if part['type'] == 'image' else '<image3d>' }}
{%- if not loop.last %}
{{- '\n' }}
{%- endif %}
{%- else %}
{{- raise_exception('content parts are text, image or volume; got ' + part['type'] | string) }}
{%- endif %}
{%- endfor %}
{%- endif %}
{%- endmacro %}
"""

QWEN2_JINJA = r"""{%- for message in messages %}
{%- if loop.first and messages[0]['role'] != 'system' %}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- if message['role'] == 'assistant' %}
{{- '<|im_start|>assistant\n' }}
{%- generation %}
{{- render_content(message['content']) + '<|im_end|>' }}
{%- endgeneration %}
{{- '\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\n' + render_content(message['content']) + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

LLAMA3_JINJA = r"""{{- bos_token }}
{%- for message in messages %}
{%- if message['role'] == 'assistant' %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- generation %}
{{- render_content(message['content']) | trim + '<|eot_id|>' }}
{%- endgeneration %}
{%- else %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + render_content(message['content']) | trim + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

PHI_JINJA = r"""{%- for message in messages %}
{%- if message['role'] == 'system' %}
{{- render_content(message['content']) | trim + '\n' }}
{%- elif message['role'] == 'user' %}
{{- 'Instruct: ' + render_content(message['content']) | trim + '\n' }}
{%- else %}
{{- 'Output:' }}
{%- generation %}
{{- ' ' + render_content(message['content']) | trim + '<|endoftext|>' }}
{%- endgeneration %}
{{- '\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- 'Output:' }}
{%- endif %}
"""

PHI3_JINJA = r"""{%- for message in messages %}
{%- if message['role'] == 'assistant' %}
{{- '<|assistant|>\n' }}
{%- generation %}
{{- render_content(message['content']) + '<|end|>' }}
{%- endgeneration %}
{{- '\n' }}
{%- else %}
{{- '<|' + message['role'] + '|>\n' + render_content(message['content']) + '<|end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|assistant|>\n' }}
{%- else %}
{{- '<|endoftext|>' }}
{%- endif %}
"""

PLAIN_JINJA = r"""{%- for message in messages %}
{%- if message['role'] == 'user' %}
{%- for part in render_content(message['content']).split('<image')[1:] %}
{%- if part.startswith('3d>') %}
{{- '<image3d>' }}
{%- elif part.startswith('>') %}
{{- '<image>' }}
{%- endif %}
{%- endfor %}
{%- elif message['role'] == 'assistant' %}
{%- generation %}
{{- render_content(message['content']) | trim + eos_token }}
{%- endgeneration %}
{%- endif %}
{%- endfor %}
"""

_MEDMVL_JINJA = r"""{%- if messages[0]['role'] == 'system' %}
{%- set system = render_content(messages[0]['content']) | trim %}
{%- set loop_messages = messages[1:] %}
{%- else %}
{%- set system = "@SYSTEM@" %}
{%- set loop_messages = messages %}
{%- endif %}
{{- system + ' ' }}
{%- for message in loop_messages %}
{%- if message['role'] == 'user' %}
{{- 'USER: ' + render_content(message['content']) | trim + ' ' }}
{%- if loop.last %}
{{- 'ASSISTANT:' }}
{%- endif %}
{%- else %}
{{- 'ASSISTANT:' }}
{%- generation %}
{{- ' ' + render_content(message['content']) | trim + '@EOS@' }}
{%- endgeneration %}
{%- endif %}
{%- endfor %}
"""


def _medmvl(llm: str, eos: str) -> FormatTemplate:
    # MedM-VL (lvlm/dataset/template/base.py + <llm>_template.py): system + " ", then per round
    # "USER: {q} " and "ASSISTANT: {a}<eos>" with q and a stripped, "ASSISTANT:" to generate; the
    # mask covers everything up to " ASSISTANT:", so " {a}<eos>" is trained. Difference: MedM-VL
    # drops a system turn found in the data; here it replaces the default system prompt.
    return FormatTemplate(
        f"medmvl-{llm}", f"MedM-VL's prompt format with {llm}'s end token {eos}",
        system="{content} ", user="USER: {content} ", assistant_prefix="ASSISTANT:",
        answer=" {content}" + eos, default_system=MEDMVL_DEFAULT_SYSTEM, trim=True, bos="auto",
        prompt_after_last_user=True, required_tokens=(eos,), stop_tokens=(eos,),
        jinja=_MEDMVL_JINJA.replace("@SYSTEM@", MEDMVL_DEFAULT_SYSTEM).replace("@EOS@", eos),
    )


_ALL: tuple[ChatTemplate, ...] = (
    FormatTemplate(
        "qwen2", "Qwen2 ChatML, default system prompt 'You are a helpful assistant.'",
        system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", answer="{content}<|im_end|>", assistant_suffix="\n",
        default_system=QWEN2_DEFAULT_SYSTEM, required_tokens=("<|im_start|>", "<|im_end|>"),
        stop_tokens=("<|im_end|>", "<|endoftext|>"), jinja=QWEN2_JINJA,
    ),
    FormatTemplate(
        "llama3", "Llama-3 Instruct header format",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n", answer="{content}<|eot_id|>",
        trim=True, bos="always",
        required_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        stop_tokens=("<|eot_id|>", "<|end_of_text|>"), jinja=LLAMA3_JINJA,
    ),
    FormatTemplate(
        "phi", "Phi-2's 'Instruct: ... / Output: ...' format",
        system="{content}\n", user="Instruct: {content}\n", assistant_prefix="Output:",
        answer=" {content}<|endoftext|>", assistant_suffix="\n", trim=True,
        required_tokens=("<|endoftext|>",), stop_tokens=("<|endoftext|>",), jinja=PHI_JINJA,
    ),
    FormatTemplate(
        "phi3", "Phi-3 <|user|> / <|assistant|> format",
        system="<|system|>\n{content}<|end|>\n", user="<|user|>\n{content}<|end|>\n",
        assistant_prefix="<|assistant|>\n", answer="{content}<|end|>", assistant_suffix="\n",
        conversation_end="<|endoftext|>",
        required_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
        stop_tokens=("<|end|>", "<|endoftext|>"), jinja=PHI3_JINJA,
    ),
    PlainTemplate(),
    _medmvl("qwen2", "<|im_end|>"),
    _medmvl("llama3", "<|eot_id|>"),
    _medmvl("phi", "<|endoftext|>"),
    _medmvl("phi3", "<|endoftext|>"),
)

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in _ALL}


def get_template(name: str) -> ChatTemplate:
    """The template called ``name``; DataError listing the known names otherwise."""
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown chat template {name!r}", hint=f"known templates: {', '.join(TEMPLATES)}") from None
