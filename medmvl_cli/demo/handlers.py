"""What the demo page does, as plain functions of plain values: no Gradio here, so tests call them
directly and the page (``app.py``) only wires them to components.

A conversation is kept twice: as the model is sent it (``DemoSession.messages``: role / content,
with ``<image>`` or ``<image3d>`` opening the first user turn, as ``medmvl infer`` builds it) and as
the chat shows it (the same without the placeholder). Answers come from ``Predictor.stream`` — the
one generation path of ``medmvl infer`` — run in a thread whose ``on_text`` pieces a generator hands
to the page as they arrive.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from medmvl_cli.data.limits import DEFAULT_MAX_PIXELS, DEFAULT_MAX_VOXELS
from medmvl_cli.demo.model_info import ModelInfo, describe_model
from medmvl_cli.demo.study import ACCEPTED, Study, UploadError, open_study
from medmvl_cli.demo.viewer import PLANE_DIRECTION, PLANES, render_slice
from medmvl_cli.errors import MedmvlError

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 1024
# Display windows a radiologist expects besides the model's own (width / level in HU).
WINDOW_PRESETS = {
    "Lung (-1350, 150)": (-1350.0, 150.0),
    "Soft tissue (-160, 240)": (-160.0, 240.0),
    "Bone (-450, 1050)": (-450.0, 1050.0),
    "Brain (0, 80)": (0.0, 80.0),
}
FULL_RANGE = "Full range of the file"
# 2D images are shown with their longer side between these sizes (the model reads the file itself).
IMAGE_VIEW_MIN, IMAGE_VIEW_MAX = 512, 1024
NO_STUDY = "Upload an image or a volume first (left panel), then ask about it."
EMPTY_ANSWER = "*(The model gave no answer. Try asking another way.)*"


@dataclass
class DemoSession:
    """One browser tab: the file it uploaded and the conversation about it."""

    study: Study | None = None
    messages: list[dict] = field(default_factory=list)

    def chat(self) -> list[dict]:
        """The conversation as the chat shows it: the placeholder line dropped."""
        shown = []
        for i, message in enumerate(self.messages):
            content = message["content"]
            if i == 0 and self.study is not None:
                content = content.removeprefix(self.study.placeholder + "\n")
            if message["role"] == "assistant" and not content.strip():
                content = EMPTY_ANSWER
            shown.append({"role": message["role"], "content": content})
        return shown

    def close(self) -> None:
        if self.study is not None:
            self.study.close()
        self.study = None
        self.messages = []


@dataclass
class SliderView:
    maximum: int
    value: int
    label: str


@dataclass
class UploadView:
    """What the page shows after an upload."""

    session: DemoSession
    status: str  # Markdown: the file's summary, or what is wrong with it
    ok: bool
    picture: Image.Image | None = None
    is_volume: bool = False
    slider: SliderView | None = None
    windows: list[str] = field(default_factory=list)


@dataclass
class AskView:
    """One step of an answer: the chat so far, and a status line (empty when all is well)."""

    chat: list[dict]
    status: str = ""
    ok: bool = True
    done: bool = False


def for_viewer(picture: Image.Image) -> Image.Image:
    """A 2D image scaled for the viewer: small ones enlarged, very large ones reduced."""
    longer = max(picture.size)
    target = min(max(longer, IMAGE_VIEW_MIN), IMAGE_VIEW_MAX)
    if target == longer:
        return picture
    scale = target / longer
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.Resampling.BILINEAR if scale > 1 else Image.Resampling.LANCZOS)


def error_text(message: str, hint: str | None = None) -> str:
    return f"**⚠ {message}**" + (f"  \n{hint}" if hint else "")


class DemoHandlers:
    """The page's event handlers around one loaded ``Predictor`` (shared by every tab)."""

    def __init__(self, predictor: Any, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
                 tmp_root: Path | None = None, max_voxels: int = DEFAULT_MAX_VOXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.predictor = predictor
        self.info: ModelInfo = describe_model(predictor)
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.limits = {"max_voxels": max_voxels, "max_pixels": max_pixels}
        self.tmp_root = tmp_root
        # The page's queue runs one event at a time; the lock also covers an answer still being
        # generated for a tab that was closed, and callers outside Gradio.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the file and the viewer

    def window_choices(self) -> list[str]:
        window = self.info.volume_window
        model = [f"Model's ({window[0]:g}, {window[1]:g})"] if window else []
        return model + list(WINDOW_PRESETS) + [FULL_RANGE]

    def window_range(self, choice: str | None, study: Study | None) -> tuple[float, float]:
        if choice in WINDOW_PRESETS:
            return WINDOW_PRESETS[choice]
        if (choice == FULL_RANGE or self.info.volume_window is None) and study is not None and study.volume is not None:
            lo, hi = study.volume.value_range()
            return (lo, hi) if hi > lo else (lo, lo + 1.0)
        return self.info.volume_window or (-1000.0, 1000.0)

    def upload(self, file: str | Path | None, session: DemoSession | None) -> UploadView:
        """Open an uploaded file for a (new) conversation; errors become the status text."""
        session = session or DemoSession()
        session.close()  # a new file starts a new conversation
        if file is None:
            return UploadView(session, status="", ok=True)
        path = Path(file)
        try:
            study = open_study(path, self.info.branches, self.max_upload_bytes,
                               image_window=self.info.image_window, tmp_root=self.tmp_root, **self.limits)
        except UploadError as err:
            logger.info("upload refused: %s", err.message)
            return UploadView(session, status=error_text(err.message, err.hint), ok=False)
        except Exception as err:  # a reader's own exception on a damaged file
            logger.exception("cannot open %s", path.name)
            return UploadView(session, status=error_text(f"{path.name}: cannot read this file ({err}).", ACCEPTED),
                              ok=False)
        session.study = study
        if study.volume is None:
            return UploadView(session, status=study.summary(), ok=True, picture=for_viewer(study.picture))
        plane = PLANES[0]
        slider = self.slider(study, plane)
        choices = self.window_choices()
        picture = render_slice(study.volume, plane, slider.value, self.window_range(choices[0], study))
        return UploadView(session, status=study.summary(), ok=True, picture=picture, is_volume=True,
                          slider=slider, windows=choices)

    @staticmethod
    def slider(study: Study, plane: str) -> SliderView:
        assert study.volume is not None
        count = study.volume.num_slices(plane)
        return SliderView(maximum=count - 1, value=count // 2,
                          label=f"{plane} slice ({PLANE_DIRECTION[plane]}, {count} in all)")

    def show_slice(self, session: DemoSession | None, plane: str, index: float,
                   window: str | None) -> Image.Image | None:
        """The picture for the slider / plane / window now chosen (None with no volume open)."""
        study = session.study if session else None
        if study is None or study.volume is None:
            return for_viewer(study.picture) if study is not None and study.picture is not None else None
        return render_slice(study.volume, plane, int(index), self.window_range(window, study))

    def change_plane(self, session: DemoSession | None, plane: str,
                     window: str | None) -> tuple[SliderView | None, Image.Image | None]:
        """A new plane starts at its middle slice."""
        study = session.study if session else None
        if study is None or study.volume is None:
            return None, self.show_slice(session, plane, 0, window)
        slider = self.slider(study, plane)
        return slider, self.show_slice(session, plane, slider.value, window)

    # ------------------------------------------------------------------------- the conversation

    def ask(self, session: DemoSession | None, question: str, max_new_tokens: int = 128,
            temperature: float = 0.0) -> Iterator[AskView]:
        """Send one question with the conversation so far; yield the chat as the answer streams in.

        The last view has ``done`` set; on an error it holds the chat as it was before the question.
        """
        from medmvl_cli.inference.generate import GenerationSettings, Request

        session = session or DemoSession()
        question = (question or "").strip()
        if session.study is None:
            yield AskView(session.chat(), status=error_text(NO_STUDY), ok=False, done=True)
            return
        if not question:
            yield AskView(session.chat(), status=error_text("Type a question first."), ok=False, done=True)
            return
        study = session.study
        content = question if session.messages else f"{study.placeholder}\n{question}"
        messages = session.messages + [{"role": "user", "content": content}]
        request = Request(messages=messages,
                          images=[study.path] if study.kind == "image" else [],
                          volumes=[study.path] if study.kind == "image3d" else [])
        settings = GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature))
        before = session.chat()
        pending = before + [{"role": "user", "content": question}]
        yield AskView(pending + [{"role": "assistant", "content": ""}])
        try:
            answer = ""
            for answer in self._stream(request, settings):
                yield AskView(pending + [{"role": "assistant", "content": answer}])
        except MedmvlError as err:
            logger.info("generation refused: %s", err.message)
            yield AskView(before, status=error_text(err.message, err.hint), ok=False, done=True)
            return
        except Exception as err:
            logger.exception("generation failed")
            yield AskView(before, status=error_text(f"The model failed to answer ({type(err).__name__}: {err})."),
                          ok=False, done=True)
            return
        session.messages = messages + [{"role": "assistant", "content": answer}]
        yield AskView(session.chat(), done=True)

    def _stream(self, request: Any, settings: Any) -> Iterator[str]:
        """The answer so far after each piece ``Predictor.stream`` produces; the final decoded text last."""
        pieces: queue.Queue = queue.Queue()
        finished = object()
        outcome: dict = {}

        def work() -> None:
            try:
                with self._lock:
                    outcome["text"] = self.predictor.stream(request, settings, on_text=pieces.put)
            except BaseException as err:  # handed to the page's thread below
                outcome["error"] = err
            finally:
                pieces.put(finished)

        threading.Thread(target=work, name="medmvl-demo-generate", daemon=True).start()
        text = ""
        while (piece := pieces.get()) is not finished:
            text += piece
            yield text.strip()
        if "error" in outcome:
            raise outcome["error"]
        yield str(outcome.get("text", text)).strip()

    def clear(self, session: DemoSession | None) -> tuple[DemoSession, list[dict]]:
        """Forget the conversation, keep the file."""
        session = session or DemoSession()
        session.messages = []
        return session, []
