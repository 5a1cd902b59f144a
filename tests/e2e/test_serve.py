"""`medmvl serve` through the official `openai` client, against a server this module starts on a
free loopback port: answers equal `medmvl infer`'s greedy ones (2D, 3D, a zipped DICOM series;
streaming and not), usage counts, OpenAI-shaped errors, the API key, and 64 concurrent mixed
requests each answered as if alone."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import zipfile
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from medmvl_cli.cli.app import app  # noqa: E402
from medmvl_cli.inference.generate import GenerationSettings, Predictor, Request  # noqa: E402
from medmvl_cli.serve.app import ServeSettings  # noqa: E402
from medmvl_cli.serve.server import serve_in_thread  # noqa: E402
from tests.e2e.conftest import RECIPE_2D3D  # noqa: E402

runner = CliRunner()
MAX_NEW = 8
CT_SERIES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
KEY = "test-key-123"


@pytest.fixture(scope="module")
def predictor(run_2d3d) -> Predictor:
    return Predictor(run_2d3d / "model")


@pytest.fixture(scope="module")
def chaotic(tmp_path_factory, synth_data) -> Predictor:
    """An untrained 2D + 3D model with large random weights: its greedy answers change with every
    input (a briefly trained tiny model says the same thing to everything), so an answer given to
    the wrong request shows."""
    import torch

    from medmvl_cli.config.loader import load_recipe
    from medmvl_cli.inference.load import build
    from medmvl_cli.model.builder import save_model

    root = tmp_path_factory.mktemp("chaotic")
    (root / "recipe.yaml").write_text(RECIPE_2D3D.format(data=synth_data))
    torch.manual_seed(0)
    model, processor = build(load_recipe(root / "recipe.yaml", []))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    return Predictor(save_model(model, root / "model", processor))


@pytest.fixture(scope="module")
def base_url(predictor, synth_data):
    settings = ServeSettings(max_batch_size=8, batch_window_s=0.02, allowed_local_root=synth_data)
    with serve_in_thread(predictor, settings) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def images(synth_data: Path) -> list[Path]:
    return sorted((synth_data / "images").glob("test-*.png"))[:4]


def volumes(synth_data: Path) -> list[Path]:
    return sorted((synth_data / "volumes").glob("test-*.nii.gz"))[:4]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(path.read_bytes())}"}}


def volume_part(path: Path, filename: str | None = None) -> dict:
    return {"type": "file", "file": {"file_data": b64(path.read_bytes()), "filename": filename or path.name}}


def series_zip(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, f"series/{file.name}")
    return buffer.getvalue()


def ask(part: dict, question: str) -> list[dict]:
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


def infer_answer(run: Path, flag: str, path: Path, question: str) -> str:
    result = runner.invoke(app, ["infer", "--model", str(run), flag, str(path), "--prompt", question,
                                 "--max-new-tokens", str(MAX_NEW)])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()[-1] if result.stdout.strip() else ""


def alone(predictor: Predictor, request: Request) -> tuple[str, int, int]:
    """(greedy answer, prompt tokens, generated tokens up to and with the stop token) for one request."""
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    ids, (prompt,) = predictor.generate_ids([request], settings)
    row = ids[0].tolist()
    stops = [i for i, t in enumerate(row) if t in predictor.processor.stop_token_ids]
    generated = stops[0] + 1 if stops else len(row)
    return predictor.tokenizer.decode(row, skip_special_tokens=True).strip(), prompt, generated


# ------------------------------------------------------------------------------------ answers
@pytest.mark.parametrize("kind", ["2d", "3d", "dicom-zip"])
def test_answers_equal_medmvl_infer_streaming_and_not(run_2d3d, predictor, client, synth_data, kind, tmp_path):
    question = "Which quadrant of the chest holds the lesion?" if kind == "2d" else "Which lung has the lesion?"
    if kind == "2d":
        path, flag, part, placeholder = images(synth_data)[0], "--image", image_part(images(synth_data)[0]), "<image>"
    elif kind == "3d":
        path, flag, part, placeholder = volumes(synth_data)[0], "--volume", volume_part(volumes(synth_data)[0]), "<image3d>"
    else:
        path, flag, placeholder = CT_SERIES, "--volume", "<image3d>"
        part = {"type": "file", "file": {"file_data": f"data:application/zip;base64,{b64(series_zip(CT_SERIES))}",
                                         "filename": "ct-series.zip"}}
    expected = infer_answer(run_2d3d, flag, path, question)
    request = Request(messages=[{"role": "user", "content": f"{placeholder}\n{question}"}],
                      **({"images": [path]} if flag == "--image" else {"volumes": [path]}))
    answer, prompt_tokens, generated = alone(predictor, request)
    assert answer == expected and generated >= 1

    reply = client.chat.completions.create(model=predictor.name, messages=ask(part, question), max_tokens=MAX_NEW,
                                           temperature=0)
    assert reply.object == "chat.completion" and reply.model == predictor.name
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == ("length" if generated == MAX_NEW and not _stopped(predictor, request) else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, generated)
    assert reply.usage.total_tokens == prompt_tokens + generated

    chunks = list(client.chat.completions.create(model=predictor.name, messages=ask(part, question),
                                                 max_tokens=MAX_NEW, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == generated


def _stopped(predictor: Predictor, request: Request) -> bool:
    ids, _ = predictor.generate_ids([request], GenerationSettings(max_new_tokens=MAX_NEW))
    return any(t in predictor.processor.stop_token_ids for t in ids[0].tolist())


def test_the_stream_is_server_sent_events_ending_with_done(base_url, predictor, synth_data):
    import httpx

    body = {"model": predictor.name, "messages": ask(image_part(images(synth_data)[1]), "Describe it."),
            "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and "usage" not in last


def test_stop_strings_and_seeded_sampling(client, predictor, synth_data):
    messages = ask(volume_part(volumes(synth_data)[1]), "Write a short report for this chest CT.")
    full = client.chat.completions.create(model=predictor.name, messages=messages, max_tokens=MAX_NEW, temperature=0)
    text = full.choices[0].message.content
    assert len(text) >= 3
    stop = text[2:4]
    cut = client.chat.completions.create(model=predictor.name, messages=messages, max_tokens=MAX_NEW, temperature=0,
                                         stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)].rstrip()
    assert cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=predictor.name, messages=messages, max_tokens=MAX_NEW,
                                              temperature=1.5, seed=3).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_local_files_only_under_the_allowed_root(client, predictor, synth_data, tmp_path):
    question = "Which lung has the lesion?"
    volume = volumes(synth_data)[2]
    by_path = client.chat.completions.create(
        model=predictor.name, max_tokens=MAX_NEW, temperature=0,
        messages=ask({"type": "image_url", "image_url": {"url": volume.resolve().as_uri()}}, question))
    uploaded = client.chat.completions.create(model=predictor.name, messages=ask(volume_part(volume), question),
                                              max_tokens=MAX_NEW, temperature=0)
    assert by_path.choices[0].message.content == uploaded.choices[0].message.content
    outside = tmp_path / "outside.png"
    outside.write_bytes(images(synth_data)[0].read_bytes())
    with pytest.raises(openai.BadRequestError, match="outside --allowed-local-root"):
        client.chat.completions.create(model=predictor.name, max_tokens=2,
                                       messages=ask({"type": "image_url", "image_url": {"url": outside.as_uri()}}, "q"))


# ------------------------------------------------------------------------------------ errors
def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    body = caught.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return caught.value.status_code, body["error"]


@pytest.mark.parametrize("change, status, param, fragment", [
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
     400, "messages[0].content[0]", "input_audio"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]},
     400, "messages[0].content[0].image_url.url", "base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}]}]},
     400, "messages[0].content[0].image_url.url", "network"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "AAAA", "filename": "scan.exe"}}]}]},
     400, "messages[0].content[0].file.filename", "suffix"),
    ({"messages": [{"role": "user", "content": "<image>\nWhat is this?"}]}, 400, "messages", "<image>"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "not supported"),
    ({"n": 2}, 400, "n", "not supported"),
    ({"logprobs": True}, 400, "logprobs", "not supported"),
    ({"model": "gpt-4o"}, 404, "model", "does not exist"),
    ({"max_tokens": 100000}, 400, "messages", "more than the model's"),
])
def test_bad_requests_get_openai_shaped_errors(client, predictor, change, status, param, fragment):
    body = {"model": predictor.name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, **change}
    got, error = error_of(lambda: client.chat.completions.create(**body))
    assert (got, error["param"]) == (status, param)
    assert fragment in error["message"]


def test_a_broken_image_fails_alone_and_its_batch_neighbours_answer(client, predictor, synth_data, tmp_path):
    """A file the reader refuses, in the same batch as good requests: 400 for it, answers for the rest."""
    broken = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(b'not a png at all')}"}}
    good = ask(image_part(images(synth_data)[2]), "Which quadrant of the chest holds the lesion?")
    aclient = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="unused", max_retries=0)

    async def both():
        return await asyncio.gather(
            aclient.chat.completions.create(model=predictor.name, messages=ask(broken, "q"), max_tokens=MAX_NEW),
            *[aclient.chat.completions.create(model=predictor.name, messages=good, max_tokens=MAX_NEW) for _ in range(3)],
            return_exceptions=True)

    results = asyncio.run(both())
    assert isinstance(results[0], openai.BadRequestError)
    message = results[0].response.json()["error"]["message"]
    assert "messages[0].content[0]" in message and "medmvl-serve-" not in message  # no temporary paths
    answers = {r.choices[0].message.content for r in results[1:]}
    assert len(answers) == 1


@pytest.mark.parametrize("kind", ["volume", "image"])
def test_an_over_limit_file_is_refused_from_its_header(client, predictor, tmp_path, kind):
    """The readers' header limits hold for requests too: a bomb is a 400 naming the limit, not a decode."""
    from tests import bombs

    if kind == "volume":
        part = volume_part(bombs.nifti(tmp_path / "bomb.nii.gz"))
    else:
        part = image_part(bombs.png(tmp_path / "bomb.png"))
    status, error = error_of(lambda: client.chat.completions.create(
        model=predictor.name, messages=ask(part, "What is shown?"), max_tokens=MAX_NEW))
    assert status == 400 and error["type"] == "invalid_request_error"
    assert "over the limit" in error["message"] and "medmvl-serve-" not in error["message"]


def test_the_api_key_is_required_when_set(predictor):
    with serve_in_thread(predictor, ServeSettings(api_key=KEY)) as url:
        status, error = error_of(lambda: openai.OpenAI(base_url=url, api_key="not-the-key", max_retries=0).models.list())
        assert status == 401 and error["code"] == "invalid_api_key"
        import httpx

        missing = httpx.post(f"{url}/chat/completions", json={"model": predictor.name, "messages": []})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        listed = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0).models.list()
        assert [m.id for m in listed.data] == [predictor.name]


def test_serve_refuses_other_addresses_without_a_key(run_2d3d, monkeypatch):
    monkeypatch.delenv("MEDMVL_API_KEY", raising=False)
    result = runner.invoke(app, ["serve", "--model", str(run_2d3d), "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "--api-key" in result.output


# ------------------------------------------------------------------------------------ load
def test_64_concurrent_mixed_requests_each_get_their_own_answer(chaotic, synth_data):
    questions = {"2d": ["Which quadrant of the chest holds the lesion?", "Describe the findings."],
                 "3d": ["Which lung has the lesion?", "Write a short report for this chest CT."]}
    cases = []  # (messages, the answer to it alone)
    for kind, paths in (("2d", images(synth_data)), ("3d", volumes(synth_data))):
        for path in paths:
            for question in questions[kind]:
                placeholder = "<image>" if kind == "2d" else "<image3d>"
                request = Request(messages=[{"role": "user", "content": f"{placeholder}\n{question}"}],
                                  **({"images": [path]} if kind == "2d" else {"volumes": [path]}))
                part = image_part(path) if kind == "2d" else volume_part(path)
                cases.append((ask(part, question), alone(chaotic, request)[0]))
    assert len({answer for _, answer in cases}) >= len(cases) - 2  # (nearly) every input has its own answer

    async def one(aclient, i: int) -> str:
        messages, _ = cases[i % len(cases)]
        if i % 3 == 0:
            stream = await aclient.chat.completions.create(model=chaotic.name, messages=messages,
                                                           max_tokens=MAX_NEW, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        reply = await aclient.chat.completions.create(model=chaotic.name, messages=messages, max_tokens=MAX_NEW)
        return reply.choices[0].message.content

    async def all64(url):
        aclient = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        return await asyncio.gather(*[one(aclient, i) for i in range(64)])

    import httpx

    with serve_in_thread(chaotic, ServeSettings(max_batch_size=16, batch_window_s=0.02)) as url:
        answers = asyncio.run(all64(url))
        for _ in range(100):  # each job releases its uploads right after its last event
            health = httpx.get(url.removesuffix("/v1") + "/health").json()
            if health["uploads_held"] == 0:
                break
            time.sleep(0.02)
    assert answers == [cases[i % len(cases)][1] for i in range(64)]
    assert health["largest_batch"] > 1  # requests really were batched
    assert health["feature_cache_hits"] > 0  # and volumes asked about again were not encoded again
    assert health["prefix_tokens_reused"] > 0  # questions about one study in a batch shared its prefill
    assert health["uploads_held"] == 0  # no upload outlives its requests


# ------------------------------------------------------------------------------------ chat
def test_chat_answers_turn_after_turn_with_the_conversation_as_context(run_2d3d, predictor, synth_data):
    volume = volumes(synth_data)[0]
    first, second = "Which lung has the lesion?", "Is it large?"
    result = runner.invoke(app, ["chat", "--model", str(run_2d3d), "--volume", str(volume), "--max-new-tokens", str(MAX_NEW)],
                           input=f"{first}\n\n{second}\n/exit\n")
    assert result.exit_code == 0, result.output
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    turn1 = [{"role": "user", "content": f"<image3d>\n{first}"}]
    answer1 = predictor.generate([Request(messages=turn1, volumes=[volume])], settings)[0]
    turn2 = turn1 + [{"role": "assistant", "content": answer1}, {"role": "user", "content": second}]
    answer2 = predictor.generate([Request(messages=turn2, volumes=[volume])], settings)[0]
    replies = [line.split("model> ", 1)[1] for line in result.stdout.splitlines() if "model> " in line]
    assert replies == [answer1, answer2]


def test_chat_takes_one_image_or_one_volume(run_2d3d, synth_data):
    result = runner.invoke(app, ["chat", "--model", str(run_2d3d), "--image", str(images(synth_data)[0]),
                                 "--volume", str(volumes(synth_data)[0])])
    assert result.exit_code == 2 and "not both" in result.output


# ------------------------------------------------------------------------------------ operations
def test_body_limit_timeout_and_no_request_contents_in_the_logs(predictor, synth_data, caplog):
    import logging

    secret = "PATIENT-ZEBRA-4711"
    volume = volumes(synth_data)[0]
    messages = ask(volume_part(volume, filename=f"{secret}.nii.gz"), f"Is {secret} well?")
    with caplog.at_level(logging.DEBUG):
        with serve_in_thread(predictor, ServeSettings(max_body_bytes=1024)) as url:
            status, error = error_of(lambda: openai.OpenAI(base_url=url, api_key="x", max_retries=0)
                                     .chat.completions.create(model=predictor.name, messages=messages, max_tokens=2))
            assert status == 413 and error["code"] == "request_too_large"
        with serve_in_thread(predictor, ServeSettings(request_timeout_s=1e-4)) as url:
            status, error = error_of(lambda: openai.OpenAI(base_url=url, api_key="x", max_retries=0)
                                     .chat.completions.create(model=predictor.name, messages=messages, max_tokens=2))
            assert status == 504 and error["code"] == "timeout"
        with serve_in_thread(predictor, ServeSettings()) as url:
            reply = openai.OpenAI(base_url=url, api_key="x", max_retries=0).chat.completions.create(
                model=predictor.name, messages=messages, max_tokens=MAX_NEW)
    answer = reply.choices[0].message.content
    assert answer and "POST /v1/chat/completions" in caplog.text or "chat/completions" in caplog.text
    assert secret not in caplog.text and answer not in caplog.text


@pytest.mark.slow  # starts `medmvl serve` in its own Python and loads the model there
def test_sigterm_finishes_the_request_in_flight_then_exits(run_2d3d, predictor, synth_data, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "medmvl_cli", "serve", "--model", str(run_2d3d), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TMPDIR=str(scratch)))
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"model": predictor.name, "messages": ask(volume_part(volumes(synth_data)[0]), "Describe it."),
                "max_tokens": 150, "stream": True}
        events = []
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line and not events:
                    server.send_signal(signal.SIGTERM)  # the answer has started
                events += [line] if line else []
        assert events[-1] == "data: [DONE]"
        finish = json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"]
        assert finish in ("stop", "length") and len(events) > 3
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says why.
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
        log = server.stdout.read()
        assert "Finished server process" in log and "Traceback" not in log
        assert list(scratch.iterdir()) == []  # the uploads' folder is gone
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health")
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
