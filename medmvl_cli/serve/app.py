"""The FastAPI app of `medmvl serve`: OpenAI's chat-completions protocol over a medmvl model.

Routes: POST /v1/chat/completions (JSON, or server-sent `chat.completion.chunk` events ending with
`data: [DONE]` when `stream` is true), GET /v1/models, GET /health. Every error is OpenAI's body
``{"error": {"message", "type", "param", "code"}}``. With an API key, /v1 routes need
``Authorization: Bearer KEY``. Request bodies, file names and answers are never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medmvl_cli.errors import MedmvlError
from medmvl_cli.inference.generate import GenerationSettings, Predictor
from medmvl_cli.serve.batcher import Batcher, Job
from medmvl_cli.serve.media import MediaStore, Prepared
from medmvl_cli.serve.schemas import APIError, ChatCompletionRequest, parse_request

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = GenerationSettings().max_new_tokens


@dataclass
class ServeSettings:
    """How the server treats requests (the CLI's options)."""

    api_key: str | None = None
    max_batch_size: int = 8
    batch_window_s: float = 0.005
    allowed_local_root: Path | None = None
    max_body_bytes: int = 256 << 20
    request_timeout_s: float = 300.0


def create_app(predictor: Predictor, settings: ServeSettings) -> FastAPI:
    created = int(time.time())
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["batcher"] = Batcher(predictor, settings.max_batch_size, settings.batch_window_s)
        state["media"] = MediaStore(settings.allowed_local_root, max_series_bytes=4 * settings.max_body_bytes)
        state["batcher"].start()
        yield
        await state["batcher"].stop()  # uvicorn has finished the in-flight requests by now
        state["media"].close()

    app = FastAPI(title="medmvl serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send Authorization: Bearer KEY",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        batcher = state["batcher"]
        return {"status": "ok", "model": predictor.name, "batches": batcher.batches,
                "largest_batch": batcher.largest_batch, "volumes_encoded": predictor.volumes_encoded,
                "feature_cache_hits": predictor.cache_hits, "prefix_tokens_reused": predictor.prefix_tokens_reused,
                "uploads_held": state["media"].uploads_held}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": predictor.name, "object": "model", "created": created, "owned_by": "medmvl"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await _read_body(request, settings.max_body_bytes)
        chat = parse_request(body)
        if chat.model != predictor.name:
            raise APIError(404, f"the model `{chat.model}` does not exist; this server has `{predictor.name}`",
                           param="model", code="model_not_found")
        prepared = state["media"].prepare(chat)
        # The batcher releases the uploads once the job has run (or was dropped), whatever the client does.
        job = _job(chat, prepared, on_done=lambda: state["media"].release(prepared))
        state["batcher"].submit(job)
        reply = _Reply(chat, predictor.name)
        deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
        try:
            first = await _next_event(job, deadline)
            if first[0] == "error":
                raise _as_api_error(first[1], prepared)
            if chat.stream:
                return StreamingResponse(_sse(reply, job, first, deadline, prepared),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            text, event = "", first
            while event[0] == "delta":
                text += event[1]
                event = await _next_event(job, deadline)
        except BaseException:
            job.cancelled.set()
            raise
        if event[0] == "error":
            raise _as_api_error(event[1], prepared)
        return reply.completion(text, *event[1:])

    return app


def _job(chat: ChatCompletionRequest, prepared: Prepared, on_done) -> Job:
    max_tokens = chat.max_completion_tokens or chat.max_tokens or DEFAULT_MAX_TOKENS
    settings = GenerationSettings(max_new_tokens=max_tokens, temperature=chat.temperature or 0.0,
                                  top_p=chat.top_p if chat.top_p is not None else 1.0)
    return Job(request=prepared.request, settings=settings, stop=chat.stop_strings, seed=chat.seed,
               loop=asyncio.get_running_loop(), on_done=on_done)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is over {limit >> 20} MiB (--max-body-mb)", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def _next_event(job: Job, deadline: float) -> tuple:
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(job.events.get(), max(remaining, 0.001))
    except asyncio.TimeoutError:
        job.cancelled.set()
        raise APIError(504, "the request took longer than --request-timeout", type="server_error", code="timeout") from None


def _as_api_error(err: BaseException, prepared: Prepared) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, MedmvlError):
        message = prepared.describe(err.message + (f" Fix: {err.hint}" if err.hint else ""))
        return APIError(400, message, param="messages")
    return APIError(500, "the model failed on this request; the server log says how (without its contents)",
                    type="server_error")


class _Reply:
    """OpenAI's response objects for one request."""

    def __init__(self, chat: ChatCompletionRequest, model: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.include_usage = bool(chat.stream_options and chat.stream_options.include_usage)

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def completion(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "finish_reason": finish, "logprobs": None}],
            "usage": self.usage(prompt_tokens, completion_tokens), "system_fingerprint": None,
        }

    def chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else [],
                "system_fingerprint": None}
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"


async def _sse(reply: _Reply, job: Job, first: tuple, deadline: float, prepared: Prepared):
    """The stream: a role chunk, content chunks, a finish chunk, (usage), then [DONE]. An error
    after the stream began is sent as an error event, then the stream ends."""
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        event = first
        while event[0] == "delta":
            yield reply.chunk({"content": event[1]})
            event = await _next_event(job, deadline)
        if event[0] == "error":
            yield f"data: {json.dumps(_as_api_error(event[1], prepared).body())}\n\n"
            return
        finish, prompt_tokens, completion_tokens = event[1:]
        yield reply.chunk({}, finish)
        if reply.include_usage:
            yield reply.chunk({}, usage=reply.usage(prompt_tokens, completion_tokens), choices=False)
        yield "data: [DONE]\n\n"
    except APIError as err:
        yield f"data: {json.dumps(err.body())}\n\n"
    finally:
        job.cancelled.set()  # a client that went away stops its row at the next step
