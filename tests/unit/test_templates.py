"""Chat templates: exact label masks, placeholder expansion, agreement with the shipped Jinja
templates (HF apply_chat_template) and with MedM-VL's own prompt and mask construction."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from medmvl_cli.config.names import NATIVE_TEMPLATES
from medmvl_cli.constants import IGNORE_INDEX
from medmvl_cli.data.templates import (
    MEDMVL_DEFAULT_SYSTEM,
    TEMPLATES,
    count_placeholders,
    get_template,
)
from medmvl_cli.errors import DataError, ModelError
from medmvl_cli.model.presets.tokenizer_files import FAMILIES, load_preset_tokenizer

ANNOTATIONS = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "medm-vl-annotations"

MEDMVL_EOS = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>", "phi": "<|endoftext|>", "phi3": "<|endoftext|>"}
# What each template trains for an answer a: lead + a + end (end None: the tokenizer's eos).
TRAINED = {
    "qwen2": ("", "<|im_end|>"), "llama3": ("", "<|eot_id|>"), "phi": (" ", "<|endoftext|>"),
    "phi3": ("", "<|end|>"), "plain": ("", None),
    **{f"medmvl-{f}": (" ", eos) for f, eos in MEDMVL_EOS.items()},
}
GENERATION_SUFFIX = {
    "qwen2": "<|im_start|>assistant\n", "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "phi": "Output:", "phi3": "<|assistant|>\n", **{f"medmvl-{f}": "ASSISTANT:" for f in MEDMVL_EOS},
}
# Every template with the tokenizers it is meant for: native and MedM-VL ones with their own
# family, plain with all of them.
PAIRS = [(f, f) for f in FAMILIES] + [(f"medmvl-{f}", f) for f in FAMILIES] + [("plain", f) for f in FAMILIES]
LENGTHS = {"<image>": 5, "<image3d>": 7}


@pytest.fixture(scope="module")
def tokenizers():
    return {f: load_preset_tokenizer(f) for f in FAMILIES}


def msg(role, content):
    return {"role": role, "content": content}


MULTI_TURN = [
    msg("user", "<image>\nIs there a pleural effusion?"),
    msg("assistant", "Yes, a small left pleural effusion."),
    msg("user", "Is the heart enlarged?"),
    msg("assistant", "No, the heart size is normal."),
    msg("user", "Where is the nodule?"),
    msg("assistant", "A 6 mm nodule in the right upper lobe (series 3, image 42)."),
]
PLACEHOLDER_CASES = {
    "start": "<image>\nWhat is shown?",
    "middle": "Compare the film <image> with the prior one.",
    "end": "Describe this scan.\n<image3d>",
    "several": "<image><image3d> first, then <image> and <image3d>\nany change?<image>",
    "adjacent-text": "before<image>after<image3d>x",
}


def trained_runs(enc):
    runs, current = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(tid)
    if current:
        runs.append(current)
    return runs


def expected_answers(name, tok, answers):
    lead, end = TRAINED[name]
    return [lead + a + (tok.eos_token if end is None else end) for a in answers]


def assert_labels(name, tok, enc, answers):
    """Labels are input ids or -100; decoding the trained tokens gives each answer + its end token."""
    assert len(enc.input_ids) == len(enc.labels)
    assert all(lab in (IGNORE_INDEX, tid) for tid, lab in zip(enc.input_ids, enc.labels))
    expected = expected_answers(name, tok, answers)
    runs = [tok.decode(r, skip_special_tokens=False) for r in trained_runs(enc)]
    if name == "plain":
        # Human turns without placeholders vanish in plain, so answers can touch: cut at eos.
        trained = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
        runs, cur = [], []
        for t in trained:
            cur.append(t)
            if t == tok.eos_token_id:
                runs.append(tok.decode(cur, skip_special_tokens=False))
                cur = []
        assert not cur
    assert runs == expected


def hf_ids(tok, template, messages, add_generation_prompt=False):
    out = tok.apply_chat_template(
        messages, chat_template=template.jinja(tok), tokenize=True, return_dict=True,
        add_generation_prompt=add_generation_prompt, return_assistant_tokens_mask=True,
    )
    return out["input_ids"], out["assistant_masks"]


def test_registry_names_and_unknown_name():
    assert set(TEMPLATES) == {"qwen2", "llama3", "phi", "phi3", "plain",
                              "medmvl-qwen2", "medmvl-llama3", "medmvl-phi", "medmvl-phi3"}
    assert get_template("qwen2").name == "qwen2"
    assert NATIVE_TEMPLATES == FAMILIES  # each preset tokenizer family has its native template
    with pytest.raises(DataError) as err:
        get_template("vicuna")
    assert "vicuna" in str(err.value) and "medmvl-phi3" in str(err.value)


def test_schema_lists_the_same_templates():
    from medmvl_cli.config.names import TEMPLATES as RECIPE_TEMPLATES

    assert set(TEMPLATES) == set(RECIPE_TEMPLATES)


@pytest.mark.parametrize("name,family", PAIRS)
@pytest.mark.parametrize("with_system", [False, True])
def test_multi_turn_labels_are_exactly_the_answers(tokenizers, name, family, with_system):
    tok, tmpl = tokenizers[family], get_template(name)
    messages = ([msg("system", "You are a careful radiologist.")] if with_system else []) + MULTI_TURN
    enc = tmpl.encode(tok, messages, LENGTHS)
    assert_labels(name, tok, enc, [m["content"] for m in MULTI_TURN if m["role"] == "assistant"])
    image_id = tok.convert_tokens_to_ids("<image>")
    assert enc.input_ids.count(image_id) == 5 and image_id not in enc.labels


@pytest.mark.parametrize("name,family", [p for p in PAIRS if p[0] != "plain"])
def test_answers_are_trimmed_where_the_template_trims(tokenizers, name, family):
    tok, tmpl = tokenizers[family], get_template(name)
    enc = tmpl.encode(tok, [msg("user", "  Effusion?  "), msg("assistant", "  No.  ")], {})
    trims = name not in ("qwen2", "phi3")  # ChatML and Phi-3 keep text as given
    assert_labels(name, tok, enc, ["No." if trims else "  No.  "])


@pytest.mark.parametrize("name,family", PAIRS)
@pytest.mark.parametrize("case", sorted(PLACEHOLDER_CASES))
def test_placeholders_expand_anywhere_in_a_human_turn(tokenizers, name, family, case):
    tok, tmpl = tokenizers[family], get_template(name)
    question = PLACEHOLDER_CASES[case]
    messages = [msg("user", question), msg("assistant", "Normal study.")]
    enc = tmpl.encode(tok, messages, LENGTHS)
    ids = {p: tok.convert_tokens_to_ids(p) for p in LENGTHS}
    counts = count_placeholders(messages)
    for p, tid in ids.items():
        assert enc.input_ids.count(tid) == counts[p] * LENGTHS[p]
        assert tid not in enc.labels
    assert_labels(name, tok, enc, ["Normal study."])
    # Expansion only repeats the placeholder id: collapsing it gives the length-1 encoding.
    one = tmpl.encode(tok, messages, {p: 1 for p in LENGTHS})
    assert _collapse(enc.input_ids, ids, LENGTHS) == one.input_ids
    # And the placeholder runs sit where the text has them, in order.
    order = [tid for tid in one.input_ids if tid in ids.values()]
    assert order == [ids[p] for p in re.findall(r"<image3d>|<image>", question)]


def _collapse(input_ids, ids, lengths):
    out, i = [], 0
    by_id = {tid: lengths[p] for p, tid in ids.items()}
    while i < len(input_ids):
        tid = input_ids[i]
        out.append(tid)
        if tid in by_id:
            assert input_ids[i:i + by_id[tid]] == [tid] * by_id[tid]
            i += by_id[tid]
        else:
            i += 1
    return out


@pytest.mark.parametrize("name,family", PAIRS)
def test_generation_prompt_ends_with_the_assistant_prefix(tokenizers, name, family):
    tok, tmpl = tokenizers[family], get_template(name)
    history = MULTI_TURN[:3]
    prompt = tmpl.encode(tok, history, LENGTHS, add_generation_prompt=True)
    text = tok.decode(prompt.input_ids, skip_special_tokens=False)
    if name == "plain":
        assert text.endswith("<image>" * 5 + MULTI_TURN[1]["content"] + tok.eos_token)
    else:
        assert text.endswith(GENERATION_SUFFIX[name])
    # Trained answers of the history stay trained; nothing of the new prompt is.
    assert_labels(name, tok, prompt, [MULTI_TURN[1]["content"]])
    # Training ids of the full conversation start with exactly the inference prompt.
    full = tmpl.encode(tok, MULTI_TURN[:4], LENGTHS)
    assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids


@pytest.mark.parametrize("name,family", PAIRS)
def test_generation_prompt_needs_a_final_human_turn(tokenizers, name, family):
    with pytest.raises(DataError, match="ends on a human turn"):
        get_template(name).encode(tokenizers[family], MULTI_TURN[:2], {}, add_generation_prompt=True)


@pytest.mark.parametrize("name,family", PAIRS)
@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("generate", [False, True])
def test_ids_and_mask_equal_apply_chat_template(tokenizers, name, family, with_system, generate):
    """The Jinja template shipped with a model reproduces the training ids and labels, so HF
    inference on an exported model sees what training saw."""
    tok, tmpl = tokenizers[family], get_template(name)
    messages = ([msg("system", "Answer briefly.")] if with_system else []) + MULTI_TURN
    if generate:
        messages = messages[:-1]
    for lengths in ({"<image>": 1, "<image3d>": 1},):
        enc = tmpl.encode(tok, messages, lengths, add_generation_prompt=generate)
        ids, mask = hf_ids(tok, tmpl, messages, add_generation_prompt=generate)
        assert enc.input_ids == ids
        assert [int(lab != IGNORE_INDEX) for lab in enc.labels] == mask


# The typed-part form of MULTI_TURN (HF processors' convention) and of a volume question.
def text(t):
    return {"type": "text", "text": t}


TYPED_MULTI_TURN = [
    msg("user", [{"type": "image", "url": "film.png"}, text("Is there a pleural effusion?")]),
    msg("assistant", [text("Yes, a small left pleural effusion.")]),
    msg("user", [text("Is the heart enlarged?")]),
    msg("assistant", "No, the heart size is normal."),
    msg("user", [text("Where is the nodule?")]),
    msg("assistant", [text("A 6 mm nodule "), text("in the right upper lobe (series 3, image 42).")]),
]
TYPED_CASES = [  # (typed content, the string it stands for)
    ([{"type": "volume"}, text("Describe this scan.")], "<image3d>\nDescribe this scan."),
    ([text("Compare "), {"type": "image"}, text("with the prior.")], "Compare <image>\nwith the prior."),
    ([text("Describe this scan.\n"), {"type": "volume", "path": "ct.nii.gz"}], "Describe this scan.\n<image3d>"),
    ([{"type": "image", "image": None}, {"type": "volume"}, text("any change?")], "<image>\n<image3d>\nany change?"),
]


@pytest.mark.parametrize("name,family", PAIRS)
@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("generate", [False, True])
def test_typed_parts_give_the_ids_and_mask_of_the_string_form(tokenizers, name, family, with_system, generate):
    """Content as a list of typed parts encodes (in Python and through the Jinja template) to
    exactly the ids and mask of the same conversation written as strings."""
    tok, tmpl = tokenizers[family], get_template(name)
    system = [msg("system", [text("Answer briefly.")])] if with_system else []
    typed, plain = system + TYPED_MULTI_TURN, ([msg("system", "Answer briefly.")] if with_system else []) + MULTI_TURN
    if generate:
        typed, plain = typed[:-1], plain[:-1]
    lengths = {"<image>": 1, "<image3d>": 1}
    expected = tmpl.encode(tok, plain, lengths, add_generation_prompt=generate)
    assert tmpl.encode(tok, typed, lengths, add_generation_prompt=generate) == expected
    ids, mask = hf_ids(tok, tmpl, typed, add_generation_prompt=generate)
    assert ids == expected.input_ids
    assert [int(lab != IGNORE_INDEX) for lab in expected.labels] == mask


@pytest.mark.parametrize("name,family", PAIRS)
@pytest.mark.parametrize("typed,string", TYPED_CASES)
def test_image_and_volume_parts_render_as_their_placeholders(tokenizers, name, family, typed, string):
    tok, tmpl = tokenizers[family], get_template(name)
    as_parts, as_text = [msg("user", typed), msg("assistant", "Normal.")], [msg("user", string), msg("assistant", "Normal.")]
    assert tmpl.encode(tok, as_parts, LENGTHS) == tmpl.encode(tok, as_text, LENGTHS)
    assert count_placeholders(as_parts) == count_placeholders(as_text)
    assert hf_ids(tok, tmpl, as_parts) == hf_ids(tok, tmpl, as_text)


@pytest.mark.parametrize("content", [
    [{"type": "audio"}], [{"text": "no type"}], ["a bare string"], [{"type": "text", "text": 3}], {"type": "text"},
])
def test_unknown_parts_are_refused(tokenizers, content):
    tok, tmpl = tokenizers["qwen2"], get_template("qwen2")
    with pytest.raises(DataError, match="message 0"):
        tmpl.encode(tok, [msg("user", content)], LENGTHS, add_generation_prompt=True)
    if isinstance(content, list) and isinstance(content[0], dict) and "type" in content[0] and content[0]["type"] != "text":
        from jinja2.exceptions import TemplateError

        with pytest.raises(TemplateError, match="text, image or volume"):
            hf_ids(tok, tmpl, [msg("user", content)], add_generation_prompt=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_native_template_is_the_one_shipped_with_the_tokenizer(tokenizers, family):
    tok, tmpl = tokenizers[family], get_template(family)
    assert tok.chat_template == tmpl.jinja(tok)
    text_only = [msg("user", "Is there a pneumothorax?"), msg("assistant", "No pneumothorax."),
                 msg("user", "Any fracture?"), msg("assistant", "No acute fracture.")]
    for messages, gen in ((text_only, False), (text_only[:3], True),
                          ([msg("system", "Be concise.")] + text_only, False)):
        # The tokenizer's own template, no chat_template argument.
        out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=gen)
        assert tmpl.encode(tok, messages, {}, add_generation_prompt=gen).input_ids == out["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_default_system_prompts(tokenizers, family):
    tok = tokenizers[family]
    plain_q = [msg("user", "Any effusion?"), msg("assistant", "No.")]
    native = tok.decode(get_template(family).encode(tok, plain_q, {}).input_ids)
    medmvl = tok.decode(get_template(f"medmvl-{family}").encode(tok, plain_q, {}).input_ids)
    if family == "qwen2":
        assert native.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    else:
        assert "system" not in native and "Be" not in native
    assert MEDMVL_DEFAULT_SYSTEM + " USER: Any effusion?" in medmvl
    own = [msg("system", "  Be terse.  ")] + plain_q
    medmvl_own = tok.decode(get_template(f"medmvl-{family}").encode(tok, own, {}).input_ids)
    assert "Be terse. USER: Any effusion?" in medmvl_own and MEDMVL_DEFAULT_SYSTEM not in medmvl_own
    native_own = tok.decode(get_template(family).encode(tok, own, {}).input_ids)
    assert "Be terse." in native_own and "helpful assistant" not in native_own


@pytest.mark.parametrize("family", FAMILIES)
def test_medmvl_prompt_string_is_medmvls(tokenizers, family):
    tok, eos = tokenizers[family], MEDMVL_EOS[family]
    messages = [msg("user", "<image>\nWhat is shown? "), msg("assistant", " A chest X-ray."),
                msg("user", "Any effusion?"), msg("assistant", "No.")]
    enc = get_template(f"medmvl-{family}").encode(tok, messages, {"<image>": 1})
    bos = "<|begin_of_text|>" if family == "llama3" else ""
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == (
        f"{bos}{MEDMVL_DEFAULT_SYSTEM} USER: <image>\nWhat is shown? ASSISTANT: A chest X-ray.{eos}"
        f"USER: Any effusion? ASSISTANT: No.{eos}"
    )
    # MedM-VL always ends a final human turn with "ASSISTANT:", generating or not.
    last = get_template(f"medmvl-{family}").encode(tok, messages[:3], {"<image>": 1})
    assert tok.decode(last.input_ids, skip_special_tokens=False).endswith(f"{eos}USER: Any effusion? ASSISTANT:")


def test_plain_keeps_only_placeholders_and_caption(tokenizers):
    tok = tokenizers["llama3"]
    enc = get_template("plain").encode(
        tok, [msg("system", "ignored"), msg("user", "Summarise <image3d> please.\n<image>"),
              msg("assistant", " Normal chest CT. ")], {"<image>": 2, "<image3d>": 3})
    assert tok.decode(enc.input_ids, skip_special_tokens=False) == (
        "<|begin_of_text|>" + "<image3d>" * 3 + "<image>" * 2 + "Normal chest CT.<|eot_id|>"
    )
    qwen = tokenizers["qwen2"]
    enc = get_template("plain").encode(qwen, [msg("user", "<image>"), msg("assistant", "A CT.")], {"<image>": 1})
    assert qwen.decode(enc.input_ids, skip_special_tokens=False) == "<image>A CT.<|im_end|>"


@pytest.mark.parametrize("name,family", PAIRS)
def test_stop_token_ids(tokenizers, name, family):
    tok, tmpl = tokenizers[family], get_template(name)
    stops = tmpl.stop_token_ids(tok)
    lead, end = TRAINED[name]
    end_id = tok.convert_tokens_to_ids(tok.eos_token if end is None else end)
    assert stops[0] == end_id and tok.eos_token_id in stops


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name,family", PAIRS)
@pytest.mark.parametrize("messages", [
    [msg("doctor", "q"), msg("assistant", "a")],
    [msg("user", "q"), msg("user", "q2")],
    [msg("assistant", "a")],
    [msg("user", "q"), msg("assistant", "a"), msg("assistant", "a2")],
    [msg("user", "q"), msg("system", "s")],
    [],
    [msg("user", "q"), msg("assistant", "see <image>")],
    [msg("system", "<image3d>"), msg("user", "q")],
])
def test_encode_rejects_bad_conversations(tokenizers, name, family, messages):
    with pytest.raises(DataError):
        get_template(name).encode(tokenizers[family], messages, LENGTHS)


def test_missing_placeholder_length_and_wrong_tokenizer(tokenizers):
    with pytest.raises(DataError, match="<image3d>"):
        get_template("qwen2").encode(tokenizers["qwen2"], [msg("user", "<image3d> q")], {"<image>": 4})
    with pytest.raises(ModelError, match="<\\|im_start\\|>"):
        get_template("qwen2").encode(tokenizers["phi"], [msg("user", "q")], {})
    with pytest.raises(ModelError, match="<\\|eot_id\\|>"):
        get_template("medmvl-llama3").encode(tokenizers["qwen2"], [msg("user", "q")], {})


# --------------------------------------------------------------------------- MedM-VL's data


def _annotation_records():
    if not ANNOTATIONS.is_dir():
        return []
    return [(f.name, r) for f in sorted(ANNOTATIONS.glob("*.json")) for r in json.loads(f.read_text())]


needs_annotations = pytest.mark.skipif(not _annotation_records(), reason=f"no MedM-VL annotations at {ANNOTATIONS}")


def as_messages(record: dict, source="record") -> list[dict]:
    """A MedM-VL record's turns as chat messages, through the annotation reader."""
    from medmvl_cli.data.annotations import RawRecord, Source, parse_record

    return parse_record(RawRecord(record, Source(str(source), 0))).messages()


@needs_annotations
@pytest.mark.parametrize("name,family", PAIRS)
def test_every_medmvl_record_encodes(tokenizers, name, family):
    tok, tmpl = tokenizers[family], get_template(name)
    records = _annotation_records()
    assert len(records) >= 30
    for source, record in records:
        messages = as_messages(record, source)
        generate = messages[-1]["role"] == "user"
        enc = tmpl.encode(tok, messages, LENGTHS, add_generation_prompt=generate)
        counts = count_placeholders(messages)
        for key in ("image", "image3d"):
            files = record.get(key) or []
            assert counts[f"<{key}>"] == len([files] if isinstance(files, str) else files), (source, record["id"])
            tid = tok.convert_tokens_to_ids(f"<{key}>")
            assert enc.input_ids.count(tid) == counts[f"<{key}>"] * LENGTHS[f"<{key}>"]
            assert tid not in enc.labels
        answers = [m["content"].strip() if tmpl.trim else m["content"] for m in messages if m["role"] == "assistant"]
        assert_labels(name, tok, enc, answers)


def _medmvl_reference(tok, conversations, eos):
    """MedM-VL's Template.encode (lvlm/dataset/template/base.py), restated on lists: the prompt
    string, its ids (split at placeholders, bos once at the start), and its round-splitting mask.
    Placeholders are one id each (MedM-VL uses -200 / -201)."""
    specials = {"<image>": -200, "<image3d>": -201}
    questions, answers, first_not_q = [], [], 0
    for i, m in enumerate(conversations):
        if i == 0 and m["from"] != "human":
            first_not_q = 1
            continue
        (questions if i % 2 == first_not_q else answers).append(m["value"])
    if len(questions) == len(answers) + 1:
        answers.append("")
    prompt = ""
    for i, (q, a) in enumerate(zip(questions, answers)):
        if i == 0:
            prompt += MEDMVL_DEFAULT_SYSTEM + " "
        prompt += "USER: " + q.strip() + " "
        prompt += ("ASSISTANT: " + a.strip() + eos) if a.strip() else "ASSISTANT:"
    offset = 1 if tok("test string").input_ids[0] == tok.bos_token_id else 0

    def ids_of(text):
        out = []
        for chunk in re.split("(<image>|<image3d>)", text):
            if chunk in specials:
                out.append(specials[chunk])
            elif chunk:
                if not out and offset:
                    out.append(tok.bos_token_id)
                out.extend(tok(chunk).input_ids[offset:])
        return out

    input_ids = ids_of(prompt)
    labels, cur, sep = list(input_ids), 0, " ASSISTANT:"
    eos_len = len(tok.encode(eos))
    for idx, rou in enumerate(prompt.split(eos)):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        rou_len = len(ids_of(rou)) + 1
        instruction_len = len(ids_of(parts[0] + sep))
        if eos_len > 1 and idx != 0:
            rou_len, instruction_len = rou_len - 1, instruction_len - 1
        labels[cur: cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += rou_len
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    return prompt, input_ids, labels


@needs_annotations
@pytest.mark.parametrize("family", FAMILIES)
def test_medmvl_templates_match_medmvls_own_encoding(tokenizers, family):
    """On MedM-VL's example records, medmvl-<llm> gives MedM-VL's ids and MedM-VL's labels."""
    tok, eos = tokenizers[family], MEDMVL_EOS[family]
    tmpl = get_template(f"medmvl-{family}")
    ids = {"<image>": tok.convert_tokens_to_ids("<image>"), "<image3d>": tok.convert_tokens_to_ids("<image3d>")}
    back = {-200: ids["<image>"], -201: ids["<image3d>"]}
    checked = 0
    for _, record in _annotation_records():
        messages = as_messages(record)
        prompt, ref_ids, ref_labels = _medmvl_reference(tok, record["conversations"], eos)
        enc = tmpl.encode(tok, messages, {"<image>": 1, "<image3d>": 1})
        assert enc.input_ids == [back.get(t, t) for t in ref_ids], prompt
        if messages[-1]["role"] == "assistant":
            assert enc.labels == [back.get(t, t) for t in ref_labels], prompt
            checked += 1
    assert checked >= 20
