"""Content parts -> files for `medmvl serve`: content-hash names and keys, shared uploads released
by the last user, zips unpacked flat (no zip-slip) within a size limit, file:// only under the
allowed root (symlinks resolved), request validation in OpenAI's terms."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import pytest

pytest.importorskip("fastapi")

from medmvl_cli.serve.media import MediaStore  # noqa: E402
from medmvl_cli.serve.schemas import APIError, ChatCompletionRequest, parse_request  # noqa: E402


def chat(*parts, role="user") -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": role, "content": list(parts)}])


def file_part(data: bytes, filename: str) -> dict:
    return {"type": "file", "file": {"file_data": base64.b64encode(data).decode(), "filename": filename}}


@pytest.fixture
def store(tmp_path):
    store = MediaStore(allowed_local_root=tmp_path / "allowed")
    yield store
    store.close()


def test_uploads_are_named_and_keyed_by_content_and_removed_by_their_last_user(store):
    a = store.prepare(chat(file_part(b"volume-bytes", "ct.nii.gz"), {"type": "text", "text": "q"}))
    b = store.prepare(chat(file_part(b"volume-bytes", "other-name.nii.gz")))
    c = store.prepare(chat(file_part(b"other-bytes", "ct.nii.gz")))
    assert a.request.volumes == b.request.volumes and a.request.volume_keys == b.request.volume_keys != c.request.volume_keys
    assert a.request.volumes[0].name.endswith(".nii.gz") and "ct" not in a.request.volumes[0].name  # no client file names on disk
    assert a.request.messages == [{"role": "user", "content": [{"type": "volume"}, {"type": "text", "text": "q"}]}]
    store.release(a)
    assert a.request.volumes[0].is_file()  # b still uses it
    store.release(b)
    store.release(c)
    assert not a.request.volumes[0].exists() and not c.request.volumes[0].exists()


def test_a_zipped_series_is_unpacked_flat_and_never_outside_its_folder(store, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../../escape.dcm", b"x" * 10)
        archive.writestr("/abs/path.dcm", b"y" * 10)
        archive.writestr("series/", b"")
    prepared = store.prepare(chat(file_part(buffer.getvalue(), "series.ZIP")))
    (folder,) = prepared.request.volumes
    assert folder.is_dir() and folder.parent == store.root
    assert sorted(p.name for p in folder.iterdir()) == ["000000.dcm", "000001.dcm"]
    assert not (tmp_path / "escape.dcm").exists() and not list(store.root.parent.glob("escape.dcm"))
    store.release(prepared)
    assert not folder.exists()


def test_a_zip_that_unpacks_too_large_is_refused_before_writing(tmp_path):
    store = MediaStore(max_series_bytes=1000)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.dcm", b"\0" * 5000)
    with pytest.raises(APIError) as err:
        store.prepare(chat(file_part(buffer.getvalue(), "s.zip")))
    assert err.value.status == 413 and list(store.root.iterdir()) == []
    store.close()


def test_local_files_only_under_the_allowed_root(store, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "film.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"png")
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    ok = store.prepare(chat({"type": "image_url", "image_url": {"url": (allowed / "film.png").as_uri()}}))
    assert ok.request.images == [(allowed / "film.png").resolve()] and ok.held == []  # not copied, not deleted
    for path in (tmp_path / "secret.png", allowed / "link.png", allowed / ".." / "secret.png"):
        with pytest.raises(APIError, match="outside --allowed-local-root"):
            store.prepare(chat({"type": "image_url", "image_url": {"url": "file://" + str(path)}}))
    closed = MediaStore()
    with pytest.raises(APIError, match="file:// URLs are off"):
        closed.prepare(chat({"type": "image_url", "image_url": {"url": (allowed / "film.png").as_uri()}}))
    closed.close()


def test_a_failed_part_releases_the_uploads_before_it(store):
    with pytest.raises(APIError, match=r"messages\[0\]\.content\[1\]"):
        store.prepare(chat(file_part(b"v", "ct.nrrd"), {"type": "image_url", "image_url": {"url": "data:image/gif;base64,AAAA"}}))
    assert list(store.root.iterdir()) == []


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"temperature": 3}, "temperature"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
])
def test_requests_are_validated_field_by_field(body, param):
    full = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(APIError) as err:
        parse_request(json.dumps(full).encode())
    assert err.value.status == 400 and err.value.param == param
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}


def test_the_defaults_a_client_sends_are_accepted():
    request = parse_request(json.dumps({"model": "m", "messages": [{"role": "developer", "content": "s"},
                                                                   {"role": "user", "content": "hi"}],
                                        "n": 1, "logprobs": False, "presence_penalty": 0, "stop": "END"}).encode())
    assert request.stop_strings == ["END"]
