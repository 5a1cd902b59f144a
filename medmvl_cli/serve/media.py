"""OpenAI content parts -> the messages and media files `Predictor` takes.

Images come as `image_url` parts (data: URLs; PNG, JPEG, BMP, TIFF, DICOM), volumes as `file`
parts (base64 `file_data` + a `filename` whose suffix names the format: .nii / .nii.gz, .nrrd,
.mha, .npy, or .zip holding one DICOM series), and either as `file://` URLs under
`--allowed-local-root` (off by default). Uploaded bytes are written to a private temporary folder
under their SHA-256 (the readers `medmvl infer` uses need paths) and deleted when the last request
using them ends; the hash is also the volume's feature-cache key, so a CT asked about again is
not encoded again. Nothing here decodes pixels: the model's own readers do, in the batch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from medmvl_cli.constants import IMAGE_PLACEHOLDER, VOLUME_PLACEHOLDER
from medmvl_cli.data.file_kinds import IMAGE_SUFFIXES
from medmvl_cli.data.templates import count_placeholders
from medmvl_cli.inference.generate import Request, file_identity
from medmvl_cli.serve.schemas import APIError, ChatCompletionRequest, FilePart, ImagePart

logger = logging.getLogger(__name__)

IMAGE_MIME_SUFFIXES = {
    "image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/bmp": ".bmp", "image/tiff": ".tiff",
    "application/dicom": ".dcm",
}
# Single-file volume formats (.mhd needs its data file beside it: send .mha) and a zipped series.
VOLUME_UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".npy")
SERIES_SUFFIX = ".zip"
ROLE_OF = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Prepared:
    """One request as the predictor takes it (messages with typed parts, media files, content-hash
    feature keys), with what the server needs to report on it and clean up after it."""

    request: Request = field(default_factory=lambda: Request(messages=[]))
    # Where each file came from ("messages[0].content[1]"), to name it in errors instead of its path.
    origins: dict[str, str] = field(default_factory=dict)
    held: list[Path] = field(default_factory=list)  # uploads to release when the request ends

    def describe(self, text: str) -> str:
        """`text` (an error message) with every temporary or local path replaced by its origin."""
        for path, origin in self.origins.items():
            text = text.replace(path, origin)
        return text


class MediaStore:
    """Uploads on disk under their content hash, shared by concurrent requests (reference-counted)."""

    def __init__(self, allowed_local_root: Path | None = None, max_series_bytes: int = 2 << 30):
        self.allowed_local_root = Path(allowed_local_root).resolve() if allowed_local_root else None
        self.max_series_bytes = max_series_bytes
        self.root = Path(tempfile.mkdtemp(prefix="medmvl-serve-"))  # mode 0700
        self._users: dict[Path, int] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------- requests
    def prepare(self, chat: ChatCompletionRequest) -> Prepared:
        """Messages with typed parts ({"type": "text" | "image" | "volume"}) and the media they
        name, in placeholder order; APIError(400) naming the part on anything unusable."""
        prepared = Prepared()
        request = prepared.request
        try:
            for i, message in enumerate(chat.messages):
                content = message.content
                if not isinstance(content, str):
                    content = [self._part(part, f"messages[{i}].content[{j}]", prepared)
                               for j, part in enumerate(content)]
                request.messages.append({"role": ROLE_OF[message.role], "content": content})
            self._check_placeholders(request)
        except BaseException:
            self.release(prepared)
            raise
        return prepared

    def release(self, prepared: Prepared) -> None:
        with self._lock:
            for path in prepared.held:
                self._users[path] -= 1
                if self._users[path] == 0:
                    del self._users[path]
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            prepared.held.clear()

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def uploads_held(self) -> int:
        """Uploaded files / series on disk now (requests still using them)."""
        with self._lock:
            return len(self._users)

    # ----------------------------------------------------------------------------- parts
    def _part(self, part, where: str, prepared: Prepared) -> dict:
        if part.type == "text":
            return {"type": "text", "text": part.text}
        if isinstance(part, ImagePart):
            path, key, kind = self._from_url(part.image_url.url, f"{where}.image_url.url", prepared)
        else:
            path, key, kind = self._from_file(part, where, prepared)
        prepared.origins[str(path)] = where
        if kind == "volume":
            prepared.request.volumes.append(path)
            prepared.request.volume_keys.append(key)
        else:
            prepared.request.images.append(path)
        return {"type": kind}

    def _from_url(self, url: str, where: str, prepared: Prepared) -> tuple[Path, str, str]:
        if url.startswith("data:"):
            mime, data = _data_url(url, where)
            suffix = IMAGE_MIME_SUFFIXES.get(mime)
            if suffix is None:
                raise APIError(400, f"{where}: images are {', '.join(IMAGE_MIME_SUFFIXES)} data URLs, not {mime or 'untyped'}; "
                                    "send volumes as file parts", param=where)
            return (*self._hold(data, suffix, prepared), "image")
        if url.startswith("file:"):
            path = self._local_path(url, where)
            kind = "volume" if path.is_dir() or path.name.lower().endswith(VOLUME_UPLOAD_SUFFIXES + (".mhd",)) else "image"
            return path, file_identity(path), kind
        raise APIError(400, f"{where}: only data: URLs (and file:// under --allowed-local-root) are read; "
                            "this server fetches nothing from the network", param=where)

    def _from_file(self, part: FilePart, where: str, prepared: Prepared) -> tuple[Path, str, str]:
        if part.file.file_id is not None:
            raise APIError(400, f"{where}.file.file_id: there is no files API here; send file_data", param=f"{where}.file.file_id")
        if not part.file.file_data or not part.file.filename:
            raise APIError(400, f"{where}.file: needs file_data (base64) and filename (its suffix names the format)",
                           param=f"{where}.file")
        name = part.file.filename.lower()
        data = (_data_url(part.file.file_data, f"{where}.file.file_data")[1] if part.file.file_data.startswith("data:")
                else _base64(part.file.file_data, f"{where}.file.file_data"))
        if name.endswith(SERIES_SUFFIX):
            return (*self._hold_series(data, f"{where}.file", prepared), "volume")
        suffix = next((s for s in VOLUME_UPLOAD_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            return (*self._hold(data, suffix, prepared), "volume")
        suffix = next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            return (*self._hold(data, suffix, prepared), "image")
        raise APIError(400, f"{where}.file.filename: the suffix names no format medmvl reads; volumes are "
                            f"{', '.join(VOLUME_UPLOAD_SUFFIXES)} or a .zip of one DICOM series, images "
                            f"{', '.join(IMAGE_SUFFIXES)}", param=f"{where}.file.filename")

    def _local_path(self, url: str, where: str) -> Path:
        if self.allowed_local_root is None:
            raise APIError(400, f"{where}: file:// URLs are off; start the server with --allowed-local-root DIR", param=where)
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise APIError(400, f"{where}: a file:// URL names a local path (file:///...)", param=where)
        try:
            path = Path(unquote(parsed.path)).resolve(strict=True)
        except (OSError, RuntimeError):
            raise APIError(400, f"{where}: no such file under --allowed-local-root", param=where) from None
        if not path.is_relative_to(self.allowed_local_root):
            raise APIError(400, f"{where}: outside --allowed-local-root", param=where)
        return path

    # ----------------------------------------------------------------------------- files
    def _hold(self, data: bytes, suffix: str, prepared: Prepared) -> tuple[Path, str]:
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / f"{digest}{suffix}"
        with self._lock:
            if path not in self._users:
                staging = path.with_name(f".{digest}.part")
                staging.write_bytes(data)
                os.replace(staging, path)
            self._users[path] = self._users.get(path, 0) + 1
        prepared.held.append(path)
        return path, f"sha256:{digest}{suffix}"

    def _hold_series(self, data: bytes, where: str, prepared: Prepared) -> tuple[Path, str]:
        digest = hashlib.sha256(data).hexdigest()
        folder = self.root / f"{digest}.series"
        with self._lock:
            if folder not in self._users:
                staging = self.root / f".{digest}.series.part"
                shutil.rmtree(staging, ignore_errors=True)
                try:
                    _unzip_flat(data, staging, self.max_series_bytes, where)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
                os.replace(staging, folder)
            self._users[folder] = self._users.get(folder, 0) + 1
        prepared.held.append(folder)
        return folder, f"sha256:{digest}.series"

    @staticmethod
    def _check_placeholders(request: Request) -> None:
        counts = count_placeholders(request.messages)
        for token, media, part in ((IMAGE_PLACEHOLDER, request.images, "image_url"), (VOLUME_PLACEHOLDER, request.volumes, "file")):
            if counts[token] != len(media):
                raise APIError(400, f"the messages hold {counts[token]} {token} for {len(media)} {part} part(s); send "
                                    f"media as parts and leave {token} out of the text", param="messages")


def _data_url(url: str, where: str) -> tuple[str, bytes]:
    """(mime type, bytes) of a base64 data: URL."""
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, f"{where}: expected data:<mime>;base64,<data>", param=where)
    return header[: -len(";base64")].split(";")[0].strip().lower(), _base64(payload, where)


def _base64(payload: str, where: str) -> bytes:
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: not valid base64", param=where) from None
    if not data:
        raise APIError(400, f"{where}: empty", param=where)
    return data


def _unzip_flat(data: bytes, folder: Path, max_bytes: int, where: str) -> None:
    """The files of a zip, flat in `folder` under numbered names: member paths are never used
    (no zip-slip), and the total uncompressed size is checked before anything is written."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise APIError(400, f"{where}: not a zip file", param=where) from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if not members:
            raise APIError(400, f"{where}: the zip holds no files", param=where)
        if sum(m.file_size for m in members) > max_bytes:
            raise APIError(413, f"{where}: the zip unpacks to more than {max_bytes >> 20} MiB", param=where)
        folder.mkdir()
        for n, member in enumerate(members):
            with archive.open(member) as source, open(folder / f"{n:06d}.dcm", "wb") as target:
                shutil.copyfileobj(source, target)
