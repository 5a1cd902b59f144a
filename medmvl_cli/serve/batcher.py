"""Dynamic batching: concurrent chat requests answered together in one `generate`.

Requests wait in a queue; the collector takes the first, then whatever else arrives within a short
window (up to `max_batch_size`), groups them by decoding settings (greedy requests batch together;
sampled ones only with the same temperature / top-p; a seeded one runs alone so its seed means
something) and runs each group in the single model thread. One `generate` call serves the group:
left-padded prompts, per-row limits (`max_tokens`, `stop` strings, cancellation) through a
stopping criterion, and per-row text deltas pushed back to each request's asyncio queue as tokens
come. A bad input fails only its own request: a batch that raises a `MedmvlError` is re-run one
request at a time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from medmvl_cli.errors import MedmvlError
from medmvl_cli.inference.generate import GenerationSettings, Predictor, Request
from medmvl_cli.serve.schemas import APIError

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request in flight; `events` receives ("delta", text), then ("done", finish_reason,
    prompt_tokens, completion_tokens) or ("error", exception)."""

    request: Request
    settings: GenerationSettings
    stop: list[str]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_done: Callable[[], None] = lambda: None  # called once the job has run or was dropped

    def key(self) -> tuple:
        if not self.settings.sampling:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sample", self.settings.temperature, self.settings.top_p)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _Row:
    """Decoding state of one row: its tokens, the text shown so far, why it ended."""

    def __init__(self, job: Job):
        self.job, self.ids, self.shown, self.finish = job, [], "", None


class RowTracker:
    """An HF streamer and stopping criterion in one: it sees each step's tokens (`put`), turns
    them into per-row text deltas, and tells `generate` which rows are done (`__call__`)."""

    def __init__(self, jobs: list[Job], tokenizer, stop_token_ids: list[int]):
        self.rows = [_Row(job) for job in jobs]
        self.tokenizer, self.stop_token_ids = tokenizer, set(stop_token_ids)
        self._prompt_seen = False

    # streamer side (BaseStreamer's interface)
    def put(self, value) -> None:
        if not self._prompt_seen:  # generate first passes the prompt ids
            self._prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            if row.finish is None:
                self._step(row, token)

    def end(self) -> None:
        for row in self.rows:
            if row.finish is None:  # generate stopped at the batch's largest max_new_tokens
                row.finish = "length"
                self._show(row, final=True)

    def _step(self, row: _Row, token: int) -> None:
        row.ids.append(token)
        if row.job.cancelled.is_set():
            row.finish = "cancelled"
            return
        if token in self.stop_token_ids:
            row.finish = "stop"
        elif len(row.ids) >= row.job.settings.max_new_tokens:
            row.finish = "length"
        self._show(row, final=row.finish is not None)

    def _show(self, row: _Row, final: bool) -> None:
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True).lstrip()
        cut = min((i for i in (text.find(s) for s in row.job.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, final, row.finish = text[:cut], True, "stop"
        if final:
            text = text.rstrip()
        else:
            # Hold back what may still change: trailing spaces (answers are stripped), a partial
            # UTF-8 character, the start of a stop string.
            text = text.rstrip().rstrip("\ufffd").rstrip()
            text = text[: len(text) - _partial_stop(text, row.job.stop)]
        if len(text) > len(row.shown) and text.startswith(row.shown):
            row.job.emit("delta", text[len(row.shown):])
            row.shown = text

    # stopping-criterion side
    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.tensor([row.finish is not None for row in self.rows], device=input_ids.device)


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins one of `stops`."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


class Batcher:
    """Collects jobs and runs them in batches on one model thread."""

    def __init__(self, predictor: Predictor, max_batch_size: int = 8, window_s: float = 0.005):
        self.predictor, self.max_batch_size, self.window_s = predictor, max_batch_size, window_s
        self._queue: asyncio.Queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medmvl-model")
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.largest_batch = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        """Finish what is queued, then stop the collector and the model thread."""
        await self._queue.put(None)
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def submit(self, job: Job) -> None:
        self._queue.put_nowait(job)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            jobs, deadline = [first], loop.time() + self.window_s
            while len(jobs) < self.max_batch_size:
                try:
                    job = await asyncio.wait_for(self._queue.get(), max(deadline - loop.time(), 0))
                except asyncio.TimeoutError:
                    break
                if job is None:
                    stopping = True
                    break
                jobs.append(job)
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                if job.cancelled.is_set():
                    job.on_done()
                else:
                    groups.setdefault(job.key(), []).append(job)
            for group in groups.values():
                await loop.run_in_executor(self._executor, self._run, group)

    # ----------------------------------------------------------------------------- model thread
    def _run(self, jobs: list[Job]) -> None:
        try:
            self._answer(jobs)
        finally:
            for job in jobs:
                job.on_done()

    def _answer(self, jobs: list[Job]) -> None:
        try:
            self._generate(jobs)
        except MedmvlError as err:
            if len(jobs) > 1:  # find the bad input: each request on its own
                for job in jobs:
                    self._answer([job])
                return
            jobs[0].emit("error", err)
        except Exception as err:  # noqa: BLE001 - answered as a 500; the message may hold request data
            logger.error("generation failed (%s); see --debug for the traceback", type(err).__name__)
            logger.debug("generation failed", exc_info=True)
            for job in jobs:
                job.emit("error", err)

    def _fits(self, job: Job) -> bool:
        """Whether the job's conversation encodes and fits the model's length; if not, the job
        gets its error (tokenising happens here, in the model thread, never concurrently)."""
        try:
            prompt_tokens = len(self.predictor.prompt_ids(job.request.messages))
        except MedmvlError as err:
            job.emit("error", err)
            return False
        limit = self.predictor.processor.max_length
        if limit and prompt_tokens + job.settings.max_new_tokens > limit:
            job.emit("error", APIError(
                400, f"the prompt is {prompt_tokens} tokens (images included) and max_tokens "
                     f"{job.settings.max_new_tokens}: more than the model's {limit}",
                param="messages", code="context_length_exceeded"))
            return False
        return True

    def _generate(self, jobs: list[Job]) -> None:
        from transformers import StoppingCriteriaList

        predictor = self.predictor
        jobs = [job for job in jobs if self._fits(job)]
        if not jobs:
            return
        settings = jobs[0].settings
        longest = max(job.settings.max_new_tokens for job in jobs)
        batch_settings = GenerationSettings(longest, settings.temperature, settings.top_p, 1)
        tracker = RowTracker(jobs, predictor.tokenizer, predictor.processor.stop_token_ids)
        if jobs[0].seed is not None:
            import torch

            torch.manual_seed(jobs[0].seed)
        # reuse_prefix: questions about the same study in one batch prefill its image tokens once
        # (where that pays: `prefix_cache.reuse_pays`), with the same answers.
        _, prompt_lengths = predictor.generate_ids([job.request for job in jobs], batch_settings, streamer=tracker,
                                                   stopping_criteria=StoppingCriteriaList([tracker]),
                                                   reuse_prefix=True)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        for row, prompt_tokens in zip(tracker.rows, prompt_lengths):
            row.job.emit("done", row.finish, prompt_tokens, len(row.ids))
