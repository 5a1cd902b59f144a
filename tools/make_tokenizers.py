"""Regenerate the preset tokenizers shipped in ``tokenizers/<family>/``.

    python tools/make_tokenizers.py            # rewrite all four folders
    python tools/make_tokenizers.py --check    # exit 1 if a folder would change
    python tools/make_tokenizers.py --out DIR  # write elsewhere

Each family gets a byte-level BPE trained on ``corpus.txt`` (deterministic: same corpus, same
merges), its family's pre-tokenizer, special tokens (ids after the BPE vocabulary), bos / eos / pad
and native chat template (from ``medmvl_cli.data.templates``), saved with ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from medmvl_cli.model.presets.tokenizer_files import (
    FAMILIES,
    PRE_TOKENIZER_REGEX,
    TOKENIZER_SPECS,
    TOKENIZERS_ROOT,
    TokenizerSpec,
)

logger = logging.getLogger(__name__)

CORPUS = TOKENIZERS_ROOT.parent / "corpus.txt"
BPE_VOCAB_SIZE = 3072  # merges + the 256 byte symbols, before special tokens


def corpus_lines() -> list[str]:
    return [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tokenizer(spec: TokenizerSpec, lines: list[str]):
    """A ``PreTrainedTokenizerFast`` for one family, trained on ``lines``."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from medmvl_cli.data.templates import get_template

    tok = Tokenizer(models.BPE())
    if spec.nfc:
        tok.normalizer = normalizers.NFC()
    regex = PRE_TOKENIZER_REGEX[spec.pre_tokenizer]
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
        for t in spec.special_tokens
    ])
    if spec.add_bos:
        bos_id = tok.token_to_id(spec.bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos_token} $A", pair=f"{spec.bos_token} $A {spec.bos_token} $B",
            special_tokens=[(spec.bos_token, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec.bos_token, eos_token=spec.eos_token,
        pad_token=spec.pad_token, unk_token=spec.unk_token, clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = get_template(spec.family).jinja()
    return tokenizer


def write_all(out_root: Path, families: tuple[str, ...] = FAMILIES) -> dict[str, Path]:
    lines = corpus_lines()
    written = {}
    for family in families:
        folder = out_root / family
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer = build_tokenizer(TOKENIZER_SPECS[family], lines)
        tokenizer.save_pretrained(str(folder))
        written[family] = folder
        logger.info("%s: %d tokens -> %s", family, len(tokenizer), folder)
    return written


def folder_fingerprint(folder: Path) -> dict:
    """What must not drift: the vocabulary, merges, added tokens and chat template."""
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {
        "vocab": data["model"]["vocab"],
        "merges": data["model"]["merges"],
        "added_tokens": [(t["id"], t["content"], t["special"]) for t in data["added_tokens"]],
        "pre_tokenizer": data["pre_tokenizer"],
        "post_processor": data["post_processor"],
        "specials": {k: config.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "chat_template": (folder / "chat_template.jinja").read_text(encoding="utf-8"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TOKENIZERS_ROOT, help="root folder (default: the package's)")
    parser.add_argument("--check", action="store_true", help="compare with the shipped folders, write nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.check:
        write_all(args.out)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_all(Path(tmp))
        stale = [f for f, folder in fresh.items()
                 if not (TOKENIZERS_ROOT / f / "tokenizer.json").is_file()
                 or folder_fingerprint(folder) != folder_fingerprint(TOKENIZERS_ROOT / f)]
    if stale:
        logger.error("out of date: %s (run python tools/make_tokenizers.py)", ", ".join(stale))
        return 1
    logger.info("all preset tokenizers are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
