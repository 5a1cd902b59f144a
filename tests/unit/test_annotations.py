"""Annotation files: MedM-VL's own files as they are, JSON vs JSONL, locations in every error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medmvl_cli.data import annotations as ann
from medmvl_cli.data.annotations import (
    KNOWN_KEYS,
    AnnotationFile,
    Issue,
    RawRecord,
    Source,
    conversation_problems,
    default_root,
    detect_format,
    parse_record,
    path_problem,
    read_records,
    resolve_media_path,
    schema_problems,
)
from medmvl_cli.errors import DataError
from tests.conftest import REFERENCE

REFERENCE_FILES = ("pretrain_2d", "pretrain_3d", "finetune_2d", "finetune_3d", "inference_2d", "inference_3d")


def _record(rid="r1", **extra):
    rec = {
        "id": rid,
        "image": ["a.png"],
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "A chest film."},
        ],
    }
    rec.update(extra)
    return rec


def _raw(data, index=0, line=None):
    return RawRecord(data, Source("f.json", index, line))


# --------------------------------------------------------------------------------- reference files
@pytest.mark.parametrize("name", REFERENCE_FILES)
def test_reference_files_parse_as_is(name):
    path = REFERENCE / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"reference file {path} not present")
    inference = name.startswith("inference")
    records = read_records(path, require_answer=not inference)
    raw = json.loads(path.read_text())
    assert len(records) == len(raw) == 5
    for record, data in zip(records, raw):
        assert record.id == data["id"]
        assert list(record.images) == data.get("image", [])
        assert list(record.volumes) == data.get("image3d", [])
        assert record.answer == data.get("answer")
        assert [t.speaker for t in record.conversations] == [c["from"] for c in data["conversations"]]
        assert record.ends_on_user is inference
        assert record.source.file == str(path) and record.line is not None
        # Keys medmvl does not use survive (finetune_2d has data_source / domain / task).
        assert [t.value for t in record.conversations] == [c["value"] for c in data["conversations"]]
        assert record.question_type == data.get("question_type")
        assert dict(record.extra) == {k: v for k, v in data.items() if k not in KNOWN_KEYS}
    if name == "inference_3d":
        assert records[0].answer.startswith("(b) ")


def test_reference_records_give_chat_messages():
    path = REFERENCE / "finetune_3d.json"
    if not path.is_file():
        pytest.skip("reference files not present")
    record = read_records(path)[0]
    messages = record.messages()
    assert [m["role"] for m in messages[:2]] == ["user", "assistant"]
    assert messages[0]["content"].startswith("<image3d>")


# ------------------------------------------------------------------------------------ JSON / JSONL
def test_json_and_jsonl_detected_by_content_not_extension(tmp_path):
    records = [_record("a"), _record("b"), _record("c")]
    as_list = tmp_path / "looks_like.jsonl"  # a JSON list behind a .jsonl name
    as_list.write_text(json.dumps(records, indent=4))
    as_lines = tmp_path / "looks_like.json"  # JSONL behind a .json name
    as_lines.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert detect_format(as_list) == "json"
    assert detect_format(as_lines) == "jsonl"
    ids = lambda p: [r.id for r in read_records(p)]  # noqa: E731
    assert ids(as_list) == ids(as_lines) == ["a", "b", "c"]


def test_line_numbers_in_json_and_jsonl(tmp_path):
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("\n" + json.dumps(_record("a")) + "\n\n" + json.dumps(_record("b")) + "\n")
    assert [(r.index, r.line) for r in AnnotationFile(jsonl).records()] == [(0, 2), (1, 4)]
    js = tmp_path / "x.json"
    js.write_text("[\n" + ",\n".join(json.dumps(r, indent=2) for r in [_record("a"), _record("b")]) + "\n]\n")
    lines = [r.line for r in AnnotationFile(js).records()]
    text = js.read_text().splitlines()
    assert lines[0] == 2 and text[lines[1] - 1].strip().startswith("{")
    assert '"b"' in "\n".join(text[lines[1] - 1: lines[1] + 1])


def test_random_access_matches_iteration(tmp_path):
    for fmt in ("json", "jsonl"):
        path = tmp_path / f"x.{fmt}"
        records = [_record(f"r{i}") for i in range(7)]
        path.write_text(json.dumps(records) if fmt == "json" else "\n".join(json.dumps(r) for r in records))
        file = AnnotationFile(path)
        assert len(file) == 7
        assert [file[i].data["id"] for i in range(7)] == [r.data["id"] for r in file]
        assert file[-1].source.index == 6 and file[3].source.line == (4 if fmt == "jsonl" else 1)


def test_jsonl_records_are_parsed_once(tmp_path, monkeypatch):
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(json.dumps(_record(f"r{i}")) for i in range(50)))
    calls = []
    real = json.loads
    monkeypatch.setattr(ann.json, "loads", lambda s, *a, **k: calls.append(1) or real(s, *a, **k))
    file = AnnotationFile(path)
    assert len(list(file.records())) == 50
    assert len(calls) <= 51  # format detection may peek at the first line
    assert len(file) == 50  # the offset index came from the same pass
    assert len(calls) <= 51


def test_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_record("a")).encode() + b"\n")
    assert [r.id for r in read_records(path)] == ["a"]
    path2 = tmp_path / "bom.json"
    path2.write_bytes(b"\xef\xbb\xbf" + json.dumps([_record("a")]).encode())
    assert [r.id for r in read_records(path2)] == ["a"]


@pytest.mark.parametrize("content, needle", [
    ("", "empty"),
    ("   \n", "empty"),
    ('{\n  "id": "a",\n  "conversations": []\n}\n', "single JSON object"),
    ("hello", "not a JSON list or JSONL"),
    ('[{"id": "a"} {"id": "b"}]', "line 1"),
])
def test_broken_files_raise_dataerror_naming_the_file(tmp_path, content, needle):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        list(AnnotationFile(path))
    assert str(path) in err.value.message and needle in err.value.message


def test_missing_file_raises(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        AnnotationFile(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------------ errors
def test_errors_carry_file_index_id_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    bad = _record("broken-one")
    bad["conversations"][1]["from"] = "robot"
    path.write_text("\n".join([json.dumps(_record("ok")), "", json.dumps(bad)]) + "\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    message = err.value.message
    for part in (str(path), "record 1", "line 3", "'broken-one'", "robot"):
        assert part in message


def test_errors_in_json_lists_carry_the_line_too(tmp_path):
    path = tmp_path / "train.json"
    bad = _record("no-placeholder")
    bad["conversations"][0]["value"] = "What is shown?"
    path.write_text(json.dumps([_record("ok"), bad], indent=2))
    with pytest.raises(DataError) as err:
        read_records(path)
    assert "record 1 (line " in err.value.message and "'no-placeholder'" in err.value.message
    assert "0 <image> placeholder(s)" in err.value.message


def test_a_bad_jsonl_line_names_its_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(_record("a")) + "\n{not json\n")
    raws = list(AnnotationFile(path))
    assert raws[1].error is not None and "line 2" in raws[1].error
    with pytest.raises(DataError, match="line 2"):
        read_records(path)


# ----------------------------------------------------------------------------------------- schema
def test_paths_may_be_a_string_or_a_list():
    record, issues = schema_problems(_raw(_record(image="x.png", image3d=["a.nii.gz", "b.nii.gz"])))
    assert not issues
    assert record.images == ("x.png",) and record.volumes == ("a.nii.gz", "b.nii.gz")


def test_schema_problems_are_all_listed():
    data = {"id": ["x"], "image": 3, "conversations": [{"from": "human", "value": 5}, "oops"],
            "answer": {"a": 1}, "question_type": "maybe"}
    record, issues = schema_problems(_raw(data))
    messages = " | ".join(i.message for i in issues)
    assert record is None  # no usable turn at all
    for part in ("`id`", "`image`", "turn 0", "turn 1", "`answer`", "`question_type`"):
        assert part in messages
    assert {i.kind for i in issues} == {"schema"}


def test_missing_conversations_and_not_an_object():
    _, issues = schema_problems(_raw({"id": "x"}))
    assert issues == [Issue("schema", "missing `conversations`")]
    _, issues = schema_problems(_raw([1, 2]))
    assert issues[0].kind == "schema" and "JSON object" in issues[0].message


def test_numbers_as_ids_and_answers_are_read_as_text():
    record, issues = schema_problems(_raw(_record(rid=7, answer=3)))
    assert not issues and record.id == "7" and record.answer == "3"


def test_roles_and_system_turn():
    data = _record(conversations=[
        {"from": "system", "value": "Be brief."},
        {"from": "user", "value": "<image>\nQ?"},
        {"from": "assistant", "value": "A."},
    ])
    record = parse_record(_raw(data), require_answer=True)
    assert [m["role"] for m in record.messages()] == ["system", "user", "assistant"]


@pytest.mark.parametrize("turns, kind", [
    ([("human", "<image>\nQ"), ("human", "Q2"), ("gpt", "A")], "alternation"),
    ([("gpt", "A"), ("human", "<image>\nQ")], "alternation"),
    ([("human", "<image>\nQ"), ("gpt", "A"), ("system", "late")], "alternation"),
    ([("human", "<image>\nQ"), ("gpt", "  ")], "empty_answer"),
    ([("human", ""), ("gpt", "A"), ("human", "<image>"), ("gpt", "B")], "empty_turn"),
    ([("human", "<image>\nQ"), ("gpt", "see <image>")], "placeholder"),
    ([("human", "<image>\nQ"), ("gpt", "A"), ("human", "more?")], "unanswered"),
    ([("human", "<image> <image>\nQ"), ("gpt", "A")], "placeholder"),
])
def test_conversation_problems(turns, kind):
    data = _record(conversations=[{"from": f, "value": v} for f, v in turns])
    record, issues = schema_problems(_raw(data))
    assert not issues
    kinds = {i.kind for i in conversation_problems(record, require_answer=True)}
    assert kind in kinds


def test_inference_records_may_end_on_the_human_turn():
    data = _record(conversations=[{"from": "human", "value": "<image>\nQ?"}], answer="yes", question_type="closed")
    record = parse_record(_raw(data), require_answer=False)
    assert record.ends_on_user and record.answer == "yes" and record.question_type == "closed"
    with pytest.raises(DataError, match="training record"):
        parse_record(_raw(data), require_answer=True)


def test_image3d_is_not_counted_as_image():
    data = {"id": "v", "image3d": ["ct.nii.gz"], "conversations": [
        {"from": "human", "value": "<image3d>\nQ?"}, {"from": "gpt", "value": "A"}]}
    record, _ = schema_problems(_raw(data))
    assert conversation_problems(record) == []


# ------------------------------------------------------------------------------------------- paths
def test_path_resolution(tmp_path):
    assert resolve_media_path("a/b.png", tmp_path) == tmp_path / "a" / "b.png"
    assert resolve_media_path("/abs/b.png", tmp_path) == Path("/abs/b.png")
    with pytest.raises(DataError, match="absolute"):
        resolve_media_path("/abs/b.png", tmp_path, strict=True, where="f.json: record 3")
    with pytest.raises(DataError, match="climbs out"):
        resolve_media_path("../b.png", tmp_path, strict=True)
    assert resolve_media_path("a/../b.png", tmp_path, strict=True) == tmp_path / "a/../b.png"
    assert path_problem("x/../../y.png")[0] == "escapes_root"
    assert path_problem("x/y.png") is None
    ann_file = tmp_path / "sub" / "train.json"
    assert default_root(ann_file, None) == ann_file.resolve().parent
    assert default_root(ann_file, "/data") == Path("/data")


@pytest.mark.parametrize("speakers,slip", [
    (["human", "gpt", "human", "gpt"], None),
    (["system", "human", "gpt"], None),
    (["human", "human", "gpt"], 1),
    (["gpt", "human"], 0),
    (["human", "gpt", "system"], 2),
])
def test_the_checker_and_the_templates_share_one_turn_order_rule(speakers, slip):
    from medmvl_cli.data.templates import get_template
    from medmvl_cli.data.turns import SPEAKER_ROLES, turn_order

    found = turn_order([SPEAKER_ROLES[s] for s in speakers])
    assert (found[0][0] if found else None) == slip
    record, _ = schema_problems(RawRecord({"id": "r", "conversations": [{"from": s, "value": "x"} for s in speakers]},
                                          Source("f.jsonl", 0)))
    issues = [i for i in conversation_problems(record, require_answer=False) if i.kind == "alternation"]
    assert (f"turn {slip}:" in issues[0].message) if slip is not None else not issues
    messages = [{"role": SPEAKER_ROLES[s], "content": "x"} for s in speakers]
    if slip is None:
        return
    with pytest.raises(DataError, match=f"turn {slip} "):
        get_template("plain").encode(None, messages, {})
