"""LLaVA-Med's answer normalisation, reproduced rule for rule, and the yes / no rule built on it.

Both the converters (a record's question kind) and the metrics (closed accuracy) use them, so they
sit on the data side.

LLaVA-Med (`llava/eval/eval_metrics/glossary.py`, `normalize_word`) normalises both the prediction
and the reference before its closed accuracy and open recall. Its rules, in order:

1. Punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is *removed* when it stands
   next to a space anywhere in the input text (or when the text holds a digit-comma-digit such as
   ``1,000``: then every one of them is removed), otherwise it is *replaced by a space*. Both tests
   look at the original text, not at the text as the loop has rewritten it so far.
   Apostrophes, colons, ``% * # & ~ ^ | $`` are kept.
2. Periods not followed by a digit are removed (``3.5`` keeps its period, ``end.`` and ``5.`` lose
   theirs) -- but at most 32 per call: LLaVA-Med passes ``re.UNICODE`` (32) where ``re.sub`` expects
   its ``count``. Its pattern's ``(?!<=\\d)`` is a lookahead, not the lookbehind it was meant to be,
   so it never stops a match.
3. Lower-case, split on whitespace; number words ``none zero one ... ten`` become digits.
4. The articles ``a``, ``an``, ``the`` are dropped (after step 3).
5. Words found in the contraction table get their apostrophes (``dont`` -> ``don't``).
6. Words are joined with single spaces and any comma left is removed.

The capitalised keys of LLaVA-Med's contraction table (``Im``, ``Ive``, ``Id've``, ``I'dve``) never
match a lower-cased word and its identity entries (``let's``, ``she's``) change nothing: both are
left out below. One entry goes the "wrong" way (``somebody'd`` -> ``somebodyd``); kept, as it acts.
"""

from __future__ import annotations

import re

#: Characters handled by rule 1, in LLaVA-Med's order (the order does not change the result).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

#: Rule 3: number words (and "none") to digits.
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

#: Rule 4.
ARTICLES = frozenset({"a", "an", "the"})

# Rule 5, as "written-without-apostrophes=>written-with" pairs (the VQA evaluation's table, which
# LLaVA-Med reuses). Only the entries that can fire on lower-cased words are listed.
_CONTRACTION_PAIRS = """
aint=>ain't arent=>aren't cant=>can't couldve=>could've couldnt=>couldn't
couldn'tve=>couldn't've couldnt've=>couldn't've didnt=>didn't doesnt=>doesn't dont=>don't
hadnt=>hadn't hadnt've=>hadn't've hadn'tve=>hadn't've hasnt=>hasn't havent=>haven't
hed=>he'd hed've=>he'd've he'dve=>he'd've hes=>he's howd=>how'd howll=>how'll hows=>how's
isnt=>isn't itd=>it'd itd've=>it'd've it'dve=>it'd've itll=>it'll maam=>ma'am
mightnt=>mightn't mightnt've=>mightn't've mightn'tve=>mightn't've mightve=>might've
mustnt=>mustn't mustve=>must've neednt=>needn't notve=>not've oclock=>o'clock oughtnt=>oughtn't
ow's'at=>'ow's'at 'ows'at=>'ow's'at 'ow'sat=>'ow's'at shant=>shan't shed've=>she'd've
she'dve=>she'd've shouldve=>should've shouldnt=>shouldn't shouldnt've=>shouldn't've
shouldn'tve=>shouldn't've somebody'd=>somebodyd somebodyd've=>somebody'd've
somebody'dve=>somebody'd've somebodyll=>somebody'll somebodys=>somebody's someoned=>someone'd
someoned've=>someone'd've someone'dve=>someone'd've someonell=>someone'll someones=>someone's
somethingd=>something'd somethingd've=>something'd've something'dve=>something'd've
somethingll=>something'll thats=>that's thered=>there'd thered've=>there'd've
there'dve=>there'd've therere=>there're theres=>there's theyd=>they'd theyd've=>they'd've
they'dve=>they'd've theyll=>they'll theyre=>they're theyve=>they've twas=>'twas wasnt=>wasn't
wed've=>we'd've we'dve=>we'd've weve=>we've werent=>weren't whatll=>what'll whatre=>what're
whats=>what's whatve=>what've whens=>when's whered=>where'd wheres=>where's whereve=>where've
whod=>who'd whod've=>who'd've who'dve=>who'd've wholl=>who'll whos=>who's whove=>who've
whyll=>why'll whyre=>why're whys=>why's wont=>won't wouldve=>would've wouldnt=>wouldn't
wouldnt've=>wouldn't've wouldn'tve=>wouldn't've yall=>y'all yall'll=>y'all'll y'allll=>y'all'll
yall'd've=>y'all'd've y'alld've=>y'all'd've y'all'dve=>y'all'd've youd=>you'd youd've=>you'd've
you'dve=>you'd've youll=>you'll youre=>you're youve=>you've
"""
CONTRACTIONS = dict(pair.split("=>") for pair in _CONTRACTION_PAIRS.split())

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
#: Rule 2's accidental cap (``re.UNICODE`` == 32 passed as ``count``).
PERIOD_STRIP_LIMIT = 32


def normalize_answer(text: str) -> str:
    """Normalise `text` exactly as LLaVA-Med's ``normalize_word`` does (rules in the module doc).

    >>> normalize_answer("Yes, there are two nodules.")
    'yes there are 2 nodules'
    """
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        # Tested on the original text, as LLaVA-Med does.
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=PERIOD_STRIP_LIMIT)
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words).replace(",", "")


YES_NO = ("yes", "no")


def is_yes_no(answer: str) -> bool:
    """The reference answer is yes or no (after normalisation)."""
    return normalize_answer(answer) in YES_NO
