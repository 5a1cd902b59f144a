"""`medmvl infer` end to end on one tiny two-branch (2D + 3D) run trained a few steps.

The tiny model says nearly the same words whatever it is asked, so where answers are compared
(left padding, the feature cache, LoRA merging) the logits of every generated step are compared
too: they differ from one question to the next, so a wrong position or mask would show.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medmvl_cli.cli.app import app
from medmvl_cli.cli.infer_cmd import DEFAULT_PROMPTS
from medmvl_cli.inference.generate import GenerationSettings, Predictor, Request
from medmvl_cli.inference.predictions import ROW_KEYS, predict_file
from medmvl_cli.runs.resolve import choose_model

runner = CliRunner()

MAX_NEW = 6
PRESENCE = "<image3d>\nIs there a lesion in the lungs on this CT?"
REPORT = "<image3d>\nWrite a short report for this chest CT."


@pytest.fixture(scope="module")
def run(run_2d3d) -> Path:
    return run_2d3d


@pytest.fixture(scope="module")
def predictor(run) -> Predictor:
    return Predictor(run / "model")


@pytest.fixture
def fresh(predictor) -> Predictor:
    """The shared predictor with an empty feature cache and zeroed counters."""
    predictor.clear_feature_cache()
    predictor.cache_hits = predictor.volumes_encoded = 0
    return predictor


def _turns(*texts: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def questions(tmp_path_factory, synth_data) -> Path:
    """15 records: 2D, 3D (each volume asked three questions), two-branch, multi-turn; ending on
    the human turn (reference: `answer`) or on the gpt turn (reference: `answer` if given, else the
    gpt turn). Paths are relative to the synth folder (--image-root / --volume-root)."""
    test_2d = json.loads((synth_data / "test_2d.json").read_text())
    test_3d = json.loads((synth_data / "test_3d.json").read_text())
    records = list(test_2d)
    for r in test_3d:
        records.append(r)
        records.append({"id": f"{r['id']}-presence", "image3d": r["image3d"], "conversations": _turns(PRESENCE),
                        "question_type": "closed"})
        records.append({"id": f"{r['id']}-report", "image3d": r["image3d"],
                        "conversations": _turns(REPORT, "Consolidation in one lung.")})
    first = test_2d[0]
    question = first["conversations"][0]["value"]
    records.append({"id": "gpt-with-answer", "image": first["image"], "answer": first["answer"],
                    "conversations": _turns(question, f"The lesion is in the {first['answer']} quadrant.")})
    records.append({"id": "multi-turn", "image": first["image"], "answer": "no",
                    "conversations": _turns(question, first["answer"], "Is there a second lesion?")})
    records.append({"id": "both", "image": first["image"], "image3d": test_3d[0]["image3d"], "answer": "yes",
                    "conversations": _turns("<image>\n<image3d>\nDo the film and the CT show the same side?")})
    path = tmp_path_factory.mktemp("questions") / "questions.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def _records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in json.loads(path.read_text())}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _batch(run, annotations, out, synth_data, *extra) -> list[str]:
    return ["infer", "--model", str(run), "--data", str(annotations), "--out", str(out), "-q",
            "--image-root", str(synth_data), "--volume-root", str(synth_data), "--max-new-tokens", str(MAX_NEW), *extra]


def _request(record: dict, root: Path) -> Request:
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in record["conversations"]]
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return Request(messages, [root / p for p in record.get("image", [])], [root / p for p in record.get("image3d", [])])


def _flat(panel: str) -> str:
    """An error panel's text on one line (no box, single spaces)."""
    return " ".join(panel.translate(str.maketrans("│╭╮╰╯─", "      ")).split())


@contextmanager
def step_logits(predictor: Predictor):
    """The LLM's next-token logits (B, vocab) at every decoding step, in order."""
    steps: list[torch.Tensor] = []
    head = predictor.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: steps.append(out[:, -1].detach().float().clone()))
    try:
        yield steps
    finally:
        handle.remove()


GREEDY = GenerationSettings(max_new_tokens=MAX_NEW)


# ------------------------------------------------------------------------------------ one question
@pytest.mark.parametrize("kind,suffix", [("image", ".png"), ("image", ".jpg"), ("volume", ".nii.gz"), ("volume", ".npy")])
def test_one_image_or_volume_answer_on_stdout_model_on_stderr(run, predictor, synth_data, tmp_path, kind, suffix):
    if kind == "image":
        path = synth_data / "images" / "test-00000.png"
        if suffix == ".jpg":
            from PIL import Image

            Image.open(path).convert("RGB").save(tmp_path / "film.jpg", quality=95)
            path = tmp_path / "film.jpg"
    else:
        path = synth_data / "volumes" / "test-00000.nii.gz"
        if suffix == ".npy":
            import numpy as np

            from medmvl_cli.data.volume_io import read_volume

            np.save(tmp_path / "ct.npy", np.asarray(read_volume(path).array, dtype=np.int16))  # HU, D x H x W
            path = tmp_path / "ct.npy"
    result = runner.invoke(app, ["infer", "--model", str(run), f"--{kind}", str(path), "--max-new-tokens", str(MAX_NEW)])
    assert result.exit_code == 0, result.output
    placeholder = "image3d" if kind == "volume" else "image"
    request = Request([{"role": "user", "content": DEFAULT_PROMPTS[placeholder]}],
                      **{"images" if kind == "image" else "volumes": [path]})
    expected = predictor.generate([request], GREEDY)[0]
    assert expected and result.stdout == expected + "\n"  # the default prompt, greedy
    assert "model:" not in result.stdout
    assert f"model: {run / 'model'} (--model)" in result.stderr.replace("\n", "")


def test_a_prompt_and_both_branches_in_one_question(run, predictor, synth_data):
    image, volume = synth_data / "images" / "test-00001.png", synth_data / "volumes" / "test-00001.nii.gz"
    result = runner.invoke(app, ["infer", "--model", str(run), "--image", str(image), "--volume", str(volume),
                                 "--prompt", "Do they agree?", "--max-new-tokens", str(MAX_NEW)])
    assert result.exit_code == 0, result.output
    request = Request([{"role": "user", "content": "<image>\n<image3d>\nDo they agree?"}], [image], [volume])
    assert result.stdout.strip() == predictor.generate([request], GREEDY)[0]
    with step_logits(predictor) as steps:
        predictor.generate([request], GenerationSettings(max_new_tokens=1))
        predictor.generate([Request(request.messages, [synth_data / "images" / "test-00000.png"], [volume])],
                           GenerationSettings(max_new_tokens=1))
    assert (steps[0] - steps[1]).abs().max() > 1e-4  # the image is seen


def test_stream_hands_out_pieces_that_make_the_answer(predictor, synth_data):
    pieces: list[str] = []
    request = Request([{"role": "user", "content": "<image>\nDescribe it."}], [synth_data / "images" / "test-00000.png"])
    torch.manual_seed(0)
    answer = predictor.stream(request, GenerationSettings(max_new_tokens=12, temperature=3.0), pieces.append)
    assert len(pieces) > 1 and "".join(pieces).strip() == answer  # shown as generated, not at the end
    beams: list[str] = []
    assert predictor.stream(request, GenerationSettings(max_new_tokens=4, num_beams=2), beams.append) == "".join(beams)


# ------------------------------------------------------------------------------------ which model
def _link_run(runs: Path, name: str, run: Path, finished_at: float | None) -> Path:
    folder = runs / name
    folder.mkdir(parents=True)
    (folder / "model").symlink_to(run / "model", target_is_directory=True)
    if finished_at is not None:
        (folder / "FINISHED").write_text("medmvl\n")
        os.utime(folder / "FINISHED", (finished_at, finished_at))
    return folder


def test_model_from_env_else_the_newest_finished_run(run, synth_data, tmp_path, monkeypatch):
    monkeypatch.delenv("MEDMVL_MODEL", raising=False)
    now = time.time()
    _link_run(tmp_path / "runs", "old", run, now - 100)
    _link_run(tmp_path / "runs", "new", run, now - 10)
    _link_run(tmp_path / "runs", "crashed", run, None)  # newer, but not finished
    assert choose_model(None) == (Path("runs/new/model"), "the newest finished run under ./runs")
    monkeypatch.setenv("MEDMVL_MODEL", "")  # set but empty: as if unset
    assert choose_model(None)[0] == Path("runs/new/model")
    monkeypatch.setenv("MEDMVL_MODEL", str(tmp_path / "runs" / "old"))
    assert choose_model(None) == (tmp_path / "runs" / "old" / "model", "from $MEDMVL_MODEL")
    assert choose_model(str(run / "model")) == (run / "model", "--model")  # the flag first
    result = runner.invoke(app, ["infer", "--image", str(synth_data / "images" / "test-00000.png"), "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert f"model: {tmp_path / 'runs' / 'old' / 'model'} (from $MEDMVL_MODEL)" in result.stderr.replace("\n", "")
    monkeypatch.setenv("MEDMVL_MODEL", str(tmp_path / "nowhere"))
    wrong = runner.invoke(app, ["infer", "--image", str(synth_data / "images" / "test-00000.png")])
    assert wrong.exit_code == 1 and "$MEDMVL_MODEL" in _flat(wrong.stderr) and "does not exist" in _flat(wrong.stderr)


def test_without_a_model_the_error_says_how_to_get_one(synth_data, tmp_path, monkeypatch):
    monkeypatch.delenv("MEDMVL_MODEL", raising=False)
    image = str(synth_data / "images" / "test-00000.png")
    result = runner.invoke(app, ["infer", "--image", image])
    assert result.exit_code == 1 and not result.stdout
    text = _flat(result.stderr)
    assert "no model" in text and "no finished run under ./runs" in text
    for how in ("medmvl finetune", "medmvl import medm-vl", "--model", "MEDMVL_MODEL"):
        assert how in text, how
    (tmp_path / "runs" / "half").mkdir(parents=True)
    result = runner.invoke(app, ["infer", "--image", image])
    assert result.exit_code == 1 and "half did not finish" in _flat(result.stderr)


# ------------------------------------------------------------------------------------ stages
def test_lora_and_pretrain_runs_answer(run, predictor, synth_data, tmp_path):
    from medmvl_cli.inference.load import load
    from medmvl_cli.model.builder import save_model
    from medmvl_cli.model.trainable import apply_lora

    model, processor = load(run / "model", dtype="auto", device=None)
    apply_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    torch.manual_seed(0)
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # a trained adapter is not zero
    lora_dir = save_model(model, tmp_path / "runs" / "lora" / "model", processor)
    assert (lora_dir / "llm_adapter" / "adapter_model.safetensors").is_file()
    image = synth_data / "images" / "test-00000.png"
    request = Request([{"role": "user", "content": "<image>\nWhere?"}], [image])
    ids = torch.tensor([predictor.prompt_ids(request.messages)])
    pixels = predictor.processor.images([image])
    with torch.no_grad():
        adapter_logits = model.eval()(input_ids=ids, pixel_values=pixels).logits[0, -1]
        base_logits = predictor.model(input_ids=ids, pixel_values=pixels).logits[0, -1]
    merged = Predictor(lora_dir)  # merges the adapter at load
    with step_logits(merged) as steps:
        merged.generate([request], GenerationSettings(max_new_tokens=1))
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter matters ...
    torch.testing.assert_close(steps[0][0], adapter_logits, atol=1e-4, rtol=1e-4)  # ... and is what answers
    answer = runner.invoke(app, ["infer", "--model", str(lora_dir.parent), "--image", str(image), "--max-new-tokens", "4"])
    assert answer.exit_code == 0 and answer.stdout.strip(), answer.output

    plain = tmp_path / "runs" / "pretrain" / "model"  # a pretrain run: the same model, template plain
    shutil.copytree(run / "model", plain)
    config = json.loads((plain / "processor_config.json").read_text())
    config["template"] = "plain"
    (plain / "processor_config.json").write_text(json.dumps(config))
    answer = runner.invoke(app, ["infer", "--model", str(plain.parent), "--volume",
                                 str(synth_data / "volumes" / "test-00000.nii.gz"), "--max-new-tokens", "4"])
    assert answer.exit_code == 0, answer.output


# ------------------------------------------------------------------------------------ batch
def test_batch_rows_hold_every_key_and_the_right_reference(run, predictor, questions, synth_data, tmp_path):
    out = tmp_path / "preds" / "p.jsonl"
    result = runner.invoke(app, _batch(run, questions, out, synth_data, "--batch-size", "4"))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out) and "15 asked" in result.stderr and "0 error(s)" in result.stderr
    rows, records = _rows(out), _records(questions)
    assert sorted(r["id"] for r in rows) == sorted(records)
    for row in rows:
        assert set(ROW_KEYS) <= set(row) and "error" not in row, row
        record = records[row["id"]]
        assert row["model"] == run.name and row["prediction"]
        assert row["image"] == record.get("image", []) and row["image3d"] == record.get("image3d", [])
        assert row["question_type"] == record.get("question_type")
        asked = [t for t in record["conversations"] if t["from"] == "human"][-1]["value"]
        assert row["prompt"] == asked
    by_id = {r["id"]: r for r in rows}
    assert by_id["synth3d-test-00000"]["answer"] == records["synth3d-test-00000"]["answer"]  # ends on human
    assert by_id["synth3d-test-00000-presence"]["answer"] is None  # ends on human, no reference
    assert by_id["synth3d-test-00000-report"]["answer"] == "Consolidation in one lung."  # ends on gpt: that answer
    assert by_id["gpt-with-answer"]["answer"] == records["gpt-with-answer"]["answer"]  # `answer` wins
    assert by_id["multi-turn"]["answer"] == "no" and by_id["multi-turn"]["prompt"] == "Is there a second lesion?"
    # Batched, left-padded, in length order: the same answers as asked one at a time.
    for rid in ("synth2d-test-00000", "synth3d-test-00001-report", "multi-turn", "both"):
        alone = predictor.generate([_request(records[rid], synth_data)], GREEDY)[0]
        assert by_id[rid]["prediction"] == alone, rid
    plain = tmp_path / "plain.jsonl"  # the shared prefixes prefilled with every question: the same bytes
    assert runner.invoke(app, _batch(run, questions, plain, synth_data, "--batch-size", "4", "--no-prefix-cache")).exit_code == 0
    assert plain.read_bytes() == out.read_bytes()

    again = runner.invoke(app, _batch(run, questions, out, synth_data))  # resume: nothing left to ask
    assert again.exit_code == 0 and "0 asked" in again.stderr and "15 already in" in again.stderr
    assert _rows(out) == rows
    shorter = runner.invoke(app, _batch(run, questions, out, synth_data, "--overwrite", "--max-new-tokens", "1"))
    assert shorter.exit_code == 0 and "15 asked" in shorter.stderr
    rows = _rows(out)
    assert sorted(r["id"] for r in rows) == sorted(records)  # started over: each id once
    assert all(len(predictor.tokenizer(r["prediction"]).input_ids) <= 1 for r in rows)
    scored = runner.invoke(app, ["eval", str(out), "--json"])  # the rows are what `medmvl eval` reads
    assert scored.exit_code == 0, scored.output


def test_a_file_that_fails_to_load_gives_an_error_row_and_the_rest_are_answered(run, questions, synth_data, tmp_path):
    records = json.loads(questions.read_text())
    records[0]["image"] = ["images/missing.png"]
    records[4]["image3d"] = ["volumes/missing.nii.gz"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(records))
    out = tmp_path / "p.jsonl"
    result = runner.invoke(app, _batch(run, broken, out, synth_data, "--batch-size", "4"))
    assert result.exit_code == 0, result.output
    assert "2 error(s)" in result.stderr
    rows = {r["id"]: r for r in _rows(out)}
    assert len(rows) == len(records)
    for bad, name in ((records[0]["id"], "missing.png"), (records[4]["id"], "missing.nii.gz")):
        assert rows[bad]["prediction"] is None and name in rows[bad]["error"]
    assert all(r["prediction"] and "error" not in r for i, r in rows.items() if i not in (records[0]["id"], records[4]["id"]))


def test_a_killed_batch_run_resumes_writing_each_id_once(run, synth_data, tmp_path):
    base = json.loads((synth_data / "test_2d.json").read_text()) + json.loads((synth_data / "test_3d.json").read_text())
    records = [dict(r, id=f"{r['id']}-{k}") for k in range(3) for r in base]  # 18 questions
    annotations = tmp_path / "many.json"
    annotations.write_text(json.dumps(records))
    out = tmp_path / "p.jsonl"
    args = _batch(run, annotations, out, synth_data, "--batch-size", "1", "--max-new-tokens", "4")
    proc = subprocess.Popen([sys.executable, "-m", "medmvl_cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out.is_file() and b"\n" in out.read_bytes()):  # the first batch is on disk
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out.read_text().splitlines()
    assert 1 <= len(before) < len(records)
    with out.open("a") as fh:  # as if killed in the middle of a write
        fh.write('{"id": "torn", "prom')
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert f"{len(records) - len(before)} asked" in resumed.stderr and f"{len(before)} already in" in resumed.stderr
    lines = out.read_text().splitlines()
    assert lines[:len(before)] == before
    ids = [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == sorted(r["id"] for r in records)  # each id exactly once, the torn line gone


def test_resuming_another_models_file_or_reusing_the_annotations_is_refused(run, questions, synth_data, tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text(json.dumps({"id": "synth2d-test-00000", "prediction": "x", "model": "another"}) + "\n")
    result = runner.invoke(app, _batch(run, questions, out, synth_data))
    assert result.exit_code == 1 and "another" in result.stderr and "--overwrite" in result.stderr
    assert runner.invoke(app, _batch(run, questions, questions, synth_data)).exit_code == 1
    usage = runner.invoke(app, _batch(run, questions, out, synth_data, "--prompt", "Why?"))
    assert usage.exit_code == 2


# ------------------------------------------------------------------------------------ batching
def test_the_feature_cache_computes_each_volume_once_and_changes_no_answer(fresh, questions, synth_data, tmp_path):
    records = _records(questions)
    volume_questions = sum(len(r.get("image3d", [])) for r in records.values())
    distinct = len({p for r in records.values() for p in r.get("image3d", [])})
    assert volume_questions > distinct  # several questions share a volume

    cached, plain = tmp_path / "cached.jsonl", tmp_path / "plain.jsonl"
    kwargs = dict(image_root=synth_data, volume_root=synth_data, batch_size=4)
    with step_logits(fresh) as cached_steps:
        predict_file(fresh, questions, cached, GREEDY, **kwargs)
    assert fresh.volumes_encoded == distinct and fresh.cache_hits == volume_questions - distinct
    fresh.volumes_encoded = 0
    with step_logits(fresh) as plain_steps:
        predict_file(fresh, questions, plain, GREEDY, use_feature_cache=False, **kwargs)
    assert fresh.volumes_encoded == volume_questions
    assert {r["id"]: r["prediction"] for r in _rows(cached)} == {r["id"]: r["prediction"] for r in _rows(plain)}
    assert len(cached_steps) == len(plain_steps)
    for a, b in zip(cached_steps, plain_steps):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_next_batch_volumes_are_read_ahead_once_each(fresh, questions, synth_data, tmp_path, monkeypatch,
                                                        batch_size):
    import threading

    pipeline = fresh.processor.volume_pipeline
    reads, load = [], pipeline.load

    def recording_load(path, *args, **kwargs):
        reads.append((Path(path).name, threading.current_thread().name))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load", recording_load)
    monkeypatch.setattr(fresh, "read_ahead_enabled", True)  # whatever cores this machine has free
    ahead, plain = tmp_path / "ahead.jsonl", tmp_path / "plain.jsonl"
    kwargs = dict(image_root=synth_data, volume_root=synth_data, batch_size=batch_size)
    predict_file(fresh, questions, ahead, GREEDY, **kwargs)
    distinct = {Path(p).name for r in _records(questions).values() for p in r.get("image3d", [])}
    assert sorted(name for name, _ in reads) == sorted(distinct)  # each volume read once
    assert {thread for _, thread in reads} == {"medmvl-read-ahead_0"}  # none on the generating thread
    assert not fresh._reading  # every volume read ahead was used
    fresh.clear_feature_cache()
    predict_file(fresh, questions, plain, GREEDY, use_feature_cache=False, **kwargs)
    assert {r["id"]: r["prediction"] for r in _rows(ahead)} == {r["id"]: r["prediction"] for r in _rows(plain)}


def test_volumes_are_read_ahead_only_where_a_core_is_free_for_it(fresh, monkeypatch):
    import medmvl_cli.threads

    monkeypatch.setattr(medmvl_cli.threads, "available_cpus", lambda: 2.0)
    for torch_threads, expected in ((2, False), (1, True)):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=torch_threads: n)
        assert fresh.reads_ahead is expected
    monkeypatch.setattr(fresh, "read_ahead_enabled", False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert fresh.reads_ahead is False


def test_one_question_at_a_time_takes_the_plain_path_with_the_same_predictions(fresh, questions, synth_data, tmp_path):
    # batch 1: nothing to share within the batch and decoding dominates, so reuse cannot pay
    reused, plain = tmp_path / "reused.jsonl", tmp_path / "plain.jsonl"
    kwargs = dict(image_root=synth_data, volume_root=synth_data, batch_size=1)
    fresh.prefix_tokens_reused = 0
    predict_file(fresh, questions, reused, GREEDY, **kwargs)
    assert fresh.prefix_tokens_reused == 0
    predict_file(fresh, questions, plain, GREEDY, reuse_prefix=False, **kwargs)
    assert reused.read_bytes() == plain.read_bytes()


@pytest.mark.parametrize("batch_size", [3, 8])
def test_prefix_reuse_writes_the_same_predictions_byte_for_byte(fresh, questions, synth_data, tmp_path, batch_size):
    reused, plain = tmp_path / "reused.jsonl", tmp_path / "plain.jsonl"
    kwargs = dict(image_root=synth_data, volume_root=synth_data, batch_size=batch_size)
    fresh.prefix_tokens_reused = 0
    with step_logits(fresh) as reused_steps:
        predict_file(fresh, questions, reused, GREEDY, **kwargs)
    saved = fresh.prefix_tokens_reused
    assert saved >= fresh.placeholder_lengths["<image3d>"] * 2  # the volumes' questions shared their prefix
    with step_logits(fresh) as plain_steps:
        predict_file(fresh, questions, plain, GREEDY, reuse_prefix=False, **kwargs)
    assert fresh.prefix_tokens_reused == saved
    assert reused.read_bytes() == plain.read_bytes()
    assert len(reused_steps) == len(plain_steps)
    for a, b in zip(reused_steps, plain_steps):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_left_padded_batch_gives_the_answers_of_batch_size_one(fresh, questions, synth_data):
    records = _records(questions)
    requests = [_request(records[rid], synth_data) for rid in
                ("synth2d-test-00001", "synth3d-test-00002-report", "multi-turn", "both", "synth3d-test-00000")]
    lengths = [len(fresh.prompt_ids(r.messages)) for r in requests]
    assert len(set(lengths)) == len(lengths)  # every row but the longest is padded
    with step_logits(fresh) as batch_steps:
        batched = fresh.generate(requests, GREEDY)
    for row, request in enumerate(requests):
        with step_logits(fresh) as steps:
            alone = fresh.generate([request], GREEDY)[0]
        assert batched[row] == alone, row
        for step, logits in enumerate(steps):
            torch.testing.assert_close(batch_steps[step][row], logits[0], atol=1e-4, rtol=1e-4)
    first = batch_steps[0]
    assert min((first[i] - first[j]).abs().max() for i in range(len(requests)) for j in range(i)) > 1e-3


def test_greedy_is_deterministic_and_a_temperature_samples(run, predictor, synth_data):
    request = Request([{"role": "user", "content": PRESENCE}], [], [synth_data / "volumes" / "test-00000.nii.gz"])
    greedy = predictor.generate([request], GREEDY)
    assert predictor.generate([request], GREEDY) == greedy
    hot = GenerationSettings(max_new_tokens=MAX_NEW, temperature=2.0)
    draws = [predictor.generate([request], hot)[0] for _ in range(3)]
    assert len(set(draws)) > 1 and any(d != greedy[0] for d in draws)

    args = ["infer", "--model", str(run), "--volume", str(synth_data / "volumes" / "test-00000.nii.gz"),
            "--max-new-tokens", str(MAX_NEW), "--temperature", "2.0"]
    one, same, other = (runner.invoke(app, args + ["--seed", seed]) for seed in ("1", "1", "2"))
    assert one.exit_code == 0, one.output
    assert one.stdout == same.stdout != other.stdout  # a seed draws the same answer again
    beams = runner.invoke(app, ["infer", "--model", str(run), "--volume", str(synth_data / "volumes" / "test-00000.nii.gz"),
                                "--max-new-tokens", "4", "--num-beams", "2"])
    assert beams.exit_code == 0 and beams.stdout.strip(), beams.output
