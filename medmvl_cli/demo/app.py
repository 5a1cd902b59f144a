"""The Gradio page of `medmvl demo`: the viewer on the left, the conversation on the right.

Only layout and wiring live here; what each event does is in ``handlers.py``. Events that use the
model share one concurrency group of size 1 (Gradio's queue), so several tabs take turns on the one
loaded model; the viewer's events do not touch the model and run beside them.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from medmvl_cli.demo.handlers import DEFAULT_MAX_UPLOAD_MB, DemoHandlers, DemoSession, SliderView
from medmvl_cli.demo.viewer import PLANES
from medmvl_cli.errors import RunError

logger = logging.getLogger(__name__)

TITLE = "medmvl · ask a model about {what}"
WHAT = {("image",): "a medical image", ("image3d",): "a CT volume"}
FILES = {
    "image": "a 2D image (PNG, JPEG, DICOM slice)",
    "image3d": "a 3D volume (NIfTI, NRRD, MHA, .npy, or a .zip of one DICOM series)",
}
DISCLAIMER = ("Research software: answers come from an experimental model and may be wrong. "
              "Not for diagnosis or patient care.")


def _title(branches: tuple[str, ...]) -> str:
    return TITLE.format(what=WHAT.get(branches, "an image or a CT volume"))


def _instructions(branches: tuple[str, ...]) -> str:
    """The three steps, for the inputs this model reads."""
    files = " or ".join(FILES[b] for b in branches) or "a file"
    review = ("in the viewer: for a volume, choose the plane and window and move the slice slider"
              if "image3d" in branches else "in the viewer")
    return f"""
<ol class="medmvl-steps">
<li><b>Upload</b> {files} on the left.</li>
<li><b>Review</b> it {review}.</li>
<li><b>Ask</b> on the right. Follow-up questions keep the conversation; a new file starts a new one.</li>
</ol>
<div class="medmvl-disclaimer">{DISCLAIMER}</div>
"""


CSS = """
.medmvl-title h1 { font-size: 1.45rem; margin: 0 0 .2rem 0; }
.medmvl-steps { font-size: .95rem; line-height: 1.5; margin: .2rem 0 0 1.2rem; padding: 0; }
.medmvl-steps li { margin: 0; }
.medmvl-disclaimer { font-size: .82rem; color: #b45309; margin-top: .35rem; }
#model-card { font-size: .88rem; border-left: 3px solid var(--color-accent); padding-left: .7rem; }
#study-status, #chat-status { min-height: 1.4rem; font-size: .92rem; }
.medmvl-error, .medmvl-error * { color: #b91c1c !important; }
#viewer img { background: #000; }
"""
CONCURRENCY_ID = "model"


def require_gradio():
    """Import gradio, or explain how to get it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports, no version check
    try:
        import gradio
    except ImportError as err:
        raise RunError(
            "`medmvl demo` needs gradio, which is not installed.",
            hint='install the demo extra: pip install -e ".[demo]" (in a checkout) or pip install "medmvl[demo]"',
        ) from err
    return gradio


def build_demo(handlers: DemoHandlers):
    """The ``gr.Blocks`` page around a set of handlers (not launched)."""
    gr = require_gradio()
    with gr.Blocks(title="medmvl demo", analytics_enabled=False) as demo:
        session = gr.State(None, delete_callback=lambda s: s.close() if s is not None else None)
        _header(gr, handlers.info)
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=360):
                view = _viewer_column(gr, handlers)
            with gr.Column(scale=6, min_width=380):
                chat = _chat_column(gr)
        _wire_events(gr, handlers, session, view, chat)
    return demo


def _header(gr, info) -> None:
    """Title and the three steps on the left, the model card on the right."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=7):
            gr.Markdown(f"# {_title(info.branches)}", elem_classes=["medmvl-title"])
            gr.HTML(_instructions(info.branches))
        with gr.Column(scale=5):
            gr.Markdown(info.markdown(), elem_id="model-card")


def _viewer_column(gr, handlers: DemoHandlers) -> SimpleNamespace:
    """The upload box, its status line, the volume controls, the viewer and the slice slider."""
    upload = gr.File(label=_upload_label(handlers.info.branches, handlers.max_upload_bytes), elem_id="upload")
    study_status = gr.Markdown("", elem_id="study-status")
    with gr.Group(visible=False, elem_id="volume-controls") as volume_controls:
        with gr.Row(equal_height=True):
            plane = gr.Radio(list(PLANES), value=PLANES[0], label="Plane", elem_id="plane", scale=3)
            window = gr.Dropdown(handlers.window_choices(), value=(handlers.window_choices() or [None])[0],
                                 label="Display window (HU)", elem_id="window", scale=2, min_width=170)
    viewer = gr.Image(label="Viewer", elem_id="viewer", interactive=False, height=440, format="png",
                      type="pil", buttons=["fullscreen"], placeholder="The image or volume appears here.")
    index = gr.Slider(0, 1, value=0, step=1, label="Slice", elem_id="slice", visible=False)
    return SimpleNamespace(upload=upload, study_status=study_status, volume_controls=volume_controls,
                           plane=plane, window=window, viewer=viewer, index=index)


def _chat_column(gr) -> SimpleNamespace:
    """The conversation, the question box with its buttons and the decoding settings."""
    chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=470, buttons=["copy"],
                         feedback_options=None,
                         placeholder="Upload a file, then ask, for example: "
                                     "<i>Is there a nodule in the right lung?</i>")
    with gr.Row(equal_height=True):
        question = gr.Textbox(show_label=False, elem_id="question", scale=6, lines=1, max_lines=6,
                              placeholder="Ask about the image or volume, then press Enter",
                              submit_btn=False)
        ask = gr.Button("Ask", variant="primary", elem_id="ask", scale=1, min_width=90)
    with gr.Row(equal_height=False):
        chat_status = gr.Markdown("", elem_id="chat-status")
        clear = gr.Button("Clear conversation", variant="secondary", size="sm", elem_id="clear",
                          scale=0, min_width=170)
    with gr.Row():
        max_new_tokens = gr.Slider(8, 1024, value=128, step=8, label="Longest answer (tokens)",
                                   elem_id="max-new-tokens")
        temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature",
                                info="0 = the single most likely answer", elem_id="temperature")
    return SimpleNamespace(chatbot=chatbot, question=question, ask=ask, chat_status=chat_status, clear=clear,
                           max_new_tokens=max_new_tokens, temperature=temperature)


def _callbacks(gr, handlers: DemoHandlers) -> SimpleNamespace:
    """What each event does, as Gradio updates of the page's components."""

    def slider_update(view: SliderView | None):
        if view is None:
            return gr.update()
        return gr.update(minimum=0, maximum=max(view.maximum, 1), value=view.value, label=view.label,
                         interactive=view.maximum > 0, visible=True)

    def status_update(text: str, ok: bool):
        return gr.update(value=text, elem_classes=[] if ok else ["medmvl-error"])

    def on_upload(file, session):
        view = handlers.upload(file, session)
        if view.is_volume:
            window_value = view.windows[0] if view.windows else None
            return (view.session, status_update(view.status, view.ok), view.picture,
                    gr.update(visible=True), gr.update(value=PLANES[0]), slider_update(view.slider),
                    gr.update(choices=view.windows, value=window_value), [], status_update("", True))
        return (view.session, status_update(view.status, view.ok), view.picture,
                gr.update(visible=False), gr.update(), gr.update(visible=False), gr.update(), [], status_update("", True))

    def on_plane(session, plane, window):
        slider, picture = handlers.change_plane(session, plane, window)
        return slider_update(slider), picture

    def on_slice(session, plane, index, window):
        return handlers.show_slice(session, plane, index, window)

    def on_ask(session, question, max_new_tokens, temperature):
        session = session or DemoSession()
        for view in handlers.ask(session, question, max_new_tokens, temperature):
            keep_question = question if not view.ok else ""
            yield session, view.chat, keep_question, status_update(view.status, view.ok)

    def on_clear(session):
        session, chat = handlers.clear(session)
        return session, chat, status_update("", True)

    return SimpleNamespace(upload=on_upload, plane=on_plane, slice=on_slice, ask=on_ask, clear=on_clear)


def _wire_events(gr, handlers: DemoHandlers, session, view: SimpleNamespace, chat: SimpleNamespace) -> None:
    """Connect the components to the callbacks; model events share one concurrency group."""
    on = _callbacks(gr, handlers)
    view.upload.change(on.upload, [view.upload, session],
                       [session, view.study_status, view.viewer, view.volume_controls, view.plane, view.index,
                        view.window, chat.chatbot, chat.chat_status],
                       concurrency_limit=2)
    view_events = {"show_progress": "hidden", "concurrency_limit": None, "trigger_mode": "always_last"}
    slice_inputs = [session, view.plane, view.index, view.window]
    view.plane.change(on.plane, [session, view.plane, view.window], [view.index, view.viewer], **view_events)
    view.index.change(on.slice, slice_inputs, [view.viewer], **view_events)
    view.window.change(on.slice, slice_inputs, [view.viewer], **view_events)
    ask_inputs = [session, chat.question, chat.max_new_tokens, chat.temperature]
    ask_outputs = [session, chat.chatbot, chat.question, chat.chat_status]
    for trigger in (chat.question.submit, chat.ask.click):
        trigger(on.ask, ask_inputs, ask_outputs, concurrency_limit=1, concurrency_id=CONCURRENCY_ID,
                show_progress="minimal")
    for trigger in (chat.clear.click, chat.chatbot.clear):  # the button, and the chat's own bin icon
        trigger(on.clear, [session], [session, chat.chatbot, chat.chat_status], concurrency_limit=None)


def _upload_label(branches: tuple[str, ...], max_bytes: int) -> str:
    what = {("image",): "a 2D image", ("image3d",): "a 3D volume"}.get(branches, "an image or a volume")
    return f"Upload {what} (up to {max_bytes / 2**20:,.0f} MB)"


def launch(predictor: Any, host: str = "127.0.0.1", port: int = 7860,
           max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, share: bool = False,
           on_ready: Callable[[str, str | None], None] | None = None, block: bool = True,
           **limits: int):
    """Serve the page for a loaded ``Predictor``; calls ``on_ready(local_url, share_url)`` once it listens.
    ``limits``: ``max_voxels`` / ``max_pixels`` for uploads (see data/limits.py).

    Returns the ``gr.Blocks`` (still serving) when ``block`` is false.
    """
    gr = require_gradio()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests
    tmp_root = Path(tempfile.mkdtemp(prefix="medmvl-demo-"))
    atexit.register(shutil.rmtree, tmp_root, ignore_errors=True)
    handlers = DemoHandlers(predictor, max_upload_mb=max_upload_mb, tmp_root=tmp_root, **limits)
    demo = build_demo(handlers)
    demo.queue(default_concurrency_limit=1)
    try:
        _, local_url, share_url = demo.launch(
            server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
            show_error=True, max_file_size=int(max_upload_mb * 2**20), footer_links=[], ssr_mode=False,
            mcp_server=False, theme=gr.themes.Default(primary_hue="blue", neutral_hue="slate"), css=CSS,
        )
    except OSError as err:
        logger.debug("launch failed: %s", err)
        raise RunError(f"cannot listen on {host}:{port}: the port is taken, or the address is not one of this machine's.",
                       hint="pick another port with --port (or another --host), or stop what is using this one") from err
    if on_ready is not None:
        on_ready(local_url, share_url)
    if not block:
        return demo
    _serve_until_stopped(demo)
    return demo


def _serve_until_stopped(demo) -> None:
    """Wait for Ctrl+C or SIGTERM, then close the server (and let atexit remove the temporary files)."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    try:
        while demo.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        logger.info("stopping the demo")
    finally:
        demo.close()
