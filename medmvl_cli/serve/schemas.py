"""Request models in OpenAI's chat-completions shapes, and OpenAI's error body.

Only what medmvl does is accepted: a field it would have to ignore (tools, logprobs, n > 1,
penalties, response formats, ...) is a 400 naming that field, never dropped silently. Shapes follow
the official `openai` client's types (`openai.types.chat`): text parts
``{"type": "text", "text"}``, image parts ``{"type": "image_url", "image_url": {"url", "detail"}}``
and file parts ``{"type": "file", "file": {"file_data", "file_id", "filename"}}``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(description="a data: URL (PNG, JPEG, BMP, TIFF, DICOM) or file:// under --allowed-local-root")
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="accepted for compatibility: every image goes through the model's own processor")


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class FileData(_Strict):
    file_data: str | None = Field(None, description="base64 file contents (plain or a data: URL)")
    file_id: str | None = Field(None, description="not supported: there is no files API")
    filename: str | None = Field(None, description="its suffix says the format: .nii, .nii.gz, .nrrd, .mha, .npy, .zip")


class FilePart(_Strict):
    type: Literal["file"]
    file: FileData


ContentPart = Annotated[TextPart | ImagePart | FilePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = Field(None, description="accepted for compatibility; not shown to the model")


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 or omitted: greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="one choice per request")
    logprobs: Literal[False] | None = None
    frequency_penalty: Literal[0, 0.0] | None = None
    presence_penalty: Literal[0, 0.0] | None = None
    user: str | None = Field(None, description="an end-user id, as OpenAI takes it; not used")

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])


# Fields accepted only at the value that changes nothing.
_ONLY_DEFAULT = ("n", "logprobs", "frequency_penalty", "presence_penalty")


def _field_path(loc: tuple) -> str | None:
    """A pydantic error location as the request's field path: union branch labels ("str",
    "list[tagged-union[...]]") and the part tag that follows a tagged list's index are dropped;
    indices are written as the media errors write them: ``messages[0].content[1].image_url``."""
    kept = []
    for i, item in enumerate(loc):
        if isinstance(item, int) and kept:
            kept[-1] += f"[{item}]"
        elif item == "str" or "[" in item:
            continue
        elif i >= 2 and isinstance(loc[i - 1], int) and "tagged-union" in str(loc[i - 2]):
            continue
        else:
            kept.append(item)
    return ".".join(kept) or None


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The validated request; APIError(400) naming the first offending field otherwise."""
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as err:
        # Of a union's failed branches, the deepest one says what is wrong (a bad part, not
        # "content is not a string"); branch labels ("str", "list[...]", tags) are not fields.
        first = max(err.errors(include_url=False), key=lambda e: len(e["loc"]))
        param = _field_path(first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"{param}: not supported by medmvl serve"
        elif param in _ONLY_DEFAULT:
            message = f"{param}: {first['msg']} (other values are not supported by medmvl serve)"
        elif first["type"] in ("json_invalid", "model_type"):
            message = f"the body is not a chat-completions JSON object ({first['msg']})"
        else:
            message = f"{param}: {first['msg']}" if param else first["msg"]
        raise APIError(400, message, param=param) from None
