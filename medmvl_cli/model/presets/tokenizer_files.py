"""The tokenizers that ship inside the package, one per LLM family, and what each one holds.

Each family's tokenizer is a small byte-level BPE (about 3k merges, trained on ``corpus.txt``)
carrying the real family's special tokens, bos / eos / pad choices and chat template, plus the
image placeholders ``<image>`` and ``<image3d>`` as special (never split) tokens. The folders are
written by ``tools/make_tokenizers.py``; this module only describes and finds them (no heavy imports).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medmvl_cli.constants import PLACEHOLDERS
from medmvl_cli.errors import ModelError

TOKENIZERS_ROOT = Path(__file__).resolve().parent / "tokenizers"

# How the text is cut into words before BPE, as each real family does it.
# gpt2: GPT-2's byte-level regex (Phi-2). qwen2 / llama3: the tiktoken-style regexes of those
# models (digits one at a time for Qwen2, up to three at a time for Llama-3).
PRE_TOKENIZER_REGEX = {
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "gpt2": None,  # the ByteLevel pre-tokenizer's own regex
}



@dataclass(frozen=True)
class TokenizerSpec:
    """What one family's preset tokenizer holds. Special tokens get ids after the BPE vocabulary,
    in the order listed (as in the real models, where they sit at the end of the vocabulary)."""

    family: str
    special_tokens: tuple[str, ...]
    bos_token: str | None
    eos_token: str
    pad_token: str
    add_bos: bool  # whether plain `tokenizer(text)` prepends bos (Llama-3 does, the others do not)
    pre_tokenizer: str  # key of PRE_TOKENIZER_REGEX
    nfc: bool = False  # Qwen2 normalises text to NFC first
    unk_token: str | None = None


TOKENIZER_SPECS: dict[str, TokenizerSpec] = {
    "qwen2": TokenizerSpec(
        family="qwen2",
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>") + PLACEHOLDERS,
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        add_bos=False, pre_tokenizer="qwen2", nfc=True,
    ),
    "llama3": TokenizerSpec(
        family="llama3",
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>") + PLACEHOLDERS,
        # eos is the end-of-turn token, as in Llama-3-Instruct, so generation stops after a reply.
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>",
        add_bos=True, pre_tokenizer="llama3",
    ),
    "phi": TokenizerSpec(
        family="phi",
        special_tokens=("<|endoftext|>",) + PLACEHOLDERS,
        # Phi-2 uses <|endoftext|> for everything; pad == eos, so attention masks must come from
        # lengths, never from `input_ids != pad_token_id`.
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", add_bos=False, pre_tokenizer="gpt2",
    ),
    "phi3": TokenizerSpec(
        family="phi3",
        special_tokens=("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
        + PLACEHOLDERS,
        # eos is the end-of-turn token <|end|> (Phi-3 lists it among its generation eos ids), so
        # generation stops after a reply; <|endoftext|> closes a whole conversation and pads.
        bos_token="<s>", eos_token="<|end|>", pad_token="<|endoftext|>",
        add_bos=False, pre_tokenizer="gpt2",
    ),
}

FAMILIES: tuple[str, ...] = tuple(TOKENIZER_SPECS)


def preset_tokenizer_dir(family: str) -> Path:
    """The folder of the tokenizer shipped for ``family`` (qwen2 | llama3 | phi | phi3)."""
    if family not in TOKENIZER_SPECS:
        raise ModelError(
            f"no preset tokenizer for LLM family {family!r}",
            hint=f"known families: {', '.join(FAMILIES)}",
        )
    folder = TOKENIZERS_ROOT / family
    if not (folder / "tokenizer.json").is_file():
        raise ModelError(
            f"the preset tokenizer folder {folder} is missing or incomplete",
            hint="reinstall medmvl, or regenerate it: python tools/make_tokenizers.py",
        )
    return folder


def load_preset_tokenizer(family: str):
    """The preset tokenizer of ``family``, loaded offline with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(preset_tokenizer_dir(family)))
