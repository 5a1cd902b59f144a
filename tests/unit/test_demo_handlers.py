"""`medmvl demo`'s handlers called directly: image and volume turns, history, streaming, the viewer's
orientation, and every refusal a user can meet. A fake predictor with the real Predictor's
interface stands in for the model; tests/e2e/test_demo_browser.py drives the real page on a real model.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from medmvl_cli.config.schema import VolumeConfig
from medmvl_cli.demo.handlers import EMPTY_ANSWER, FULL_RANGE, NO_STUDY, DemoHandlers, DemoSession
from medmvl_cli.demo.model_info import describe_model
from medmvl_cli.demo.study import UploadError, open_study
from medmvl_cli.demo.viewer import render_slice, to_display
from medmvl_cli.errors import DataError, RunError

CT_SERIES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
CT_SMALL = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
BOTH = ("image", "image3d")


class FakePredictor:
    """The parts of `Predictor` the demo uses; answers name the turn and stream word by word."""

    def __init__(self, branches=BOTH, fail: Exception | None = None):
        self.name = "tiny-fake"
        self.model_dir = Path("/runs/tiny-fake/model")
        self.device = "cpu"
        self.processor = SimpleNamespace(
            template_name="qwen2",
            image_processor=SimpleNamespace(crop_size={"height": 32, "width": 32}) if "image" in branches else None,
            image_window=None,
            volume=VolumeConfig(size=(16, 32, 32), window=(-1000, 1000), spacing=None, orientation="RAS",
                                crop_foreground=False) if "image3d" in branches else None,
            tokens={p: 16 for b, p in (("image", "<image>"), ("image3d", "<image3d>")) if b in branches},
        )
        self.requests = []
        self.settings = []
        self.fail = fail

    def stream(self, request, settings, on_text):
        self.requests.append(request)
        self.settings.append(settings)
        if self.fail is not None:
            raise self.fail
        turn = sum(m["role"] == "user" for m in request.messages)
        words = ["answer", "to", f"turn {turn}"]
        for i, word in enumerate(words):
            on_text(word if i == 0 else " " + word)
        return " ".join(words) + " "


def last(views):
    views = list(views)
    assert views[-1].done
    return views


@pytest.fixture
def png(tmp_path) -> Path:
    path = tmp_path / "chest.png"
    Image.fromarray(np.tile(np.arange(48, dtype=np.uint8)[None] * 5, (40, 1))).save(path)
    return path


def marker_volume(shape=(20, 24, 10)) -> np.ndarray:
    """A RAS-indexed volume of air with one bright voxel at the right, anterior, superior corner."""
    data = np.full(shape, -1000.0, dtype=np.float32)
    data[-2, -2, -2] = 1000.0
    return data


@pytest.fixture
def nifti(tmp_path) -> Path:
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(marker_volume(), np.diag([1.0, 1.0, 3.0, 1.0])), path)
    return path


# ---------------------------------------------------------------------------------- turns


def test_image_turn_sends_the_image_with_its_placeholder(png):
    predictor = FakePredictor(("image",))
    handlers = DemoHandlers(predictor)
    view = handlers.upload(png, None)
    assert view.ok and not view.is_volume and "2D image" in view.status
    assert max(view.picture.size) == 512  # a small image is enlarged for the viewer
    views = last(handlers.ask(view.session, "  Is the heart enlarged?  ", max_new_tokens=32, temperature=0.0))
    (request,) = predictor.requests
    assert request.messages == [{"role": "user", "content": "<image>\nIs the heart enlarged?"}]
    assert request.images == [png] and request.volumes == []
    assert predictor.settings[0].max_new_tokens == 32 and predictor.settings[0].temperature == 0.0
    assert views[-1].chat == [{"role": "user", "content": "Is the heart enlarged?"},
                              {"role": "assistant", "content": "answer to turn 1"}]


def test_volume_turn_streams_the_answer_piece_by_piece(nifti):
    predictor = FakePredictor(("image3d",))
    handlers = DemoHandlers(predictor)
    view = handlers.upload(nifti, DemoSession())
    assert view.ok and view.is_volume, view.status
    assert view.slider.maximum == 9 and view.slider.value == 5  # 10 axial slices, the middle one shown
    assert "10 axial slices of 24 × 20" in view.status
    views = last(handlers.ask(view.session, "Is there a nodule?", 64, 0.7))
    (request,) = predictor.requests
    assert request.volumes == [nifti] and request.images == []
    assert request.messages[0]["content"] == "<image3d>\nIs there a nodule?"
    assert predictor.settings[0].temperature == pytest.approx(0.7)
    answers = [v.chat[-1]["content"] for v in views if v.chat and v.chat[-1]["role"] == "assistant"]
    assert answers[:4] == ["", "answer", "answer to", "answer to turn 1"]  # grows as pieces arrive


def test_second_turn_keeps_the_history_and_placeholder_stays_in_the_first_turn(nifti):
    predictor = FakePredictor()
    handlers = DemoHandlers(predictor)
    session = handlers.upload(nifti, None).session
    last(handlers.ask(session, "Is there a nodule?"))
    views = last(handlers.ask(session, "Which lobe?"))
    second = predictor.requests[1]
    assert second.messages == [
        {"role": "user", "content": "<image3d>\nIs there a nodule?"},
        {"role": "assistant", "content": "answer to turn 1"},
        {"role": "user", "content": "Which lobe?"},
    ]
    assert [m["content"] for m in views[-1].chat] == ["Is there a nodule?", "answer to turn 1", "Which lobe?",
                                                     "answer to turn 2"]
    assert len(session.messages) == 4


def test_clear_keeps_the_file_and_a_new_file_starts_a_new_conversation(nifti, png):
    predictor = FakePredictor()
    handlers = DemoHandlers(predictor)
    session = handlers.upload(nifti, None).session
    last(handlers.ask(session, "Is there a nodule?"))
    session, chat = handlers.clear(session)
    assert chat == [] and session.messages == [] and session.study is not None
    last(handlers.ask(session, "Again?"))
    assert predictor.requests[-1].messages == [{"role": "user", "content": "<image3d>\nAgain?"}]
    session = handlers.upload(png, session).session
    assert session.messages == [] and session.study.kind == "image"


def test_zip_of_a_dicom_series_is_read_as_a_volume_and_cleaned_up(tmp_path):
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(CT_SERIES.iterdir()):
            zf.write(file, f"CT5N/{file.name}")
        zf.writestr("__MACOSX/CT5N/._junk", b"resource fork")
    handlers = DemoHandlers(FakePredictor(), tmp_root=tmp_path)
    view = handlers.upload(archive, None)
    assert view.ok and view.is_volume, view.status
    study = view.session.study
    assert study.path.is_dir() and study.volume.shape[0] == 5  # 5 axial slices
    last(handlers.ask(view.session, "Describe."))
    assert handlers.predictor.requests[0].volumes == [study.path]
    handlers.upload(None, view.session)  # the upload box cleared: the unpacked copy goes
    assert not study.path.exists()


def test_zip_of_an_mhd_with_its_raw_file_is_read(tmp_path):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.zeros((6, 8, 10), dtype=np.int16))
    image.SetSpacing((0.5, 0.5, 2.0))
    sitk.WriteImage(image, str(tmp_path / "ct.mhd"))
    archive = tmp_path / "ct.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in tmp_path.glob("ct.*"):
            if file.suffix != ".zip":
                zf.write(file, file.name)
    view = DemoHandlers(FakePredictor(), tmp_root=tmp_path).upload(archive, None)
    assert view.ok and view.session.study.volume.shape == (6, 8, 10), view.status
    assert view.session.study.path.name == "ct.mhd"
    lone = DemoHandlers(FakePredictor()).upload(tmp_path / "ct.mhd", None)
    assert not lone.ok and "Zip the .mhd" in lone.status


def test_zip_with_two_series_folders_is_refused_and_removed(tmp_path):
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for folder in ("series1", "series2"):
            for file in sorted(CT_SERIES.iterdir())[:2]:
                zf.write(file, f"{folder}/{file.name}")
    view = DemoHandlers(FakePredictor(), tmp_root=tmp_path).upload(archive, None)
    assert not view.ok and "2 folders" in view.status and "series1" in view.status, view.status
    assert not list(tmp_path.glob("medmvl-demo-*"))


def test_viewer_controls_draw_the_chosen_plane_slice_and_window(nifti):
    handlers = DemoHandlers(FakePredictor())
    session = handlers.upload(nifti, None).session
    slider, picture = handlers.change_plane(session, "Coronal", None)
    assert slider.maximum == 23 and "Coronal" in slider.label
    assert picture.height > picture.width  # 10 slices of 3 mm over 20 columns of 1 mm: taller than wide
    dark = np.asarray(handlers.show_slice(session, "Axial", 0, "Lung (-1350, 150)"), dtype=float).mean()
    full = np.asarray(handlers.show_slice(session, "Axial", 0, FULL_RANGE), dtype=float).mean()
    assert full < dark  # air is grey in a lung window, black in the full -1000..1000 range


# ------------------------------------------------------------------------------ the viewer


def test_display_is_radiological_whatever_the_file_orientation():
    ras = marker_volume()
    ras_affine = np.diag([1.0, 1.0, 2.0, 1.0])
    # The same volume stored LPS: x and y reversed, the affine saying so.
    lps = ras[::-1, ::-1, :].copy()
    lps_affine = ras_affine @ np.array([[-1, 0, 0, 19], [0, -1, 0, 23], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    a, b = to_display(ras, ras_affine), to_display(lps, lps_affine)
    np.testing.assert_array_equal(a.voxels, b.voxels)
    assert a.shape == (10, 24, 20) and a.spacing == (2.0, 1.0, 1.0)
    d = int(np.argmax(a.voxels.max(axis=(1, 2))))
    assert d == 8  # superior is up the slice index
    axial = np.asarray(render_slice(a, "Axial", d, (-1000, 1000), labels=False))[..., 0]
    row, col = np.unravel_index(np.argmax(axial), axial.shape)
    assert row < axial.shape[0] // 4 and col < axial.shape[1] // 4  # anterior at the top, patient's right on the left
    coronal = np.asarray(render_slice(a, "Coronal", 1, (-1000, 1000), labels=False))[..., 0]
    row, col = np.unravel_index(np.argmax(coronal), coronal.shape)
    assert row < coronal.shape[0] // 4 and col < coronal.shape[1] // 4  # superior at the top


# ------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("branches, upload, words", [
    (("image",), "nifti", ["3D volume", "2D images only"]),
    (("image3d",), "png", ["2D image", "3D volumes only"]),
])
def test_a_file_of_a_branch_the_model_lacks_is_refused(branches, upload, words, request):
    path = request.getfixturevalue(upload)
    predictor = FakePredictor(branches)
    view = DemoHandlers(predictor).upload(path, None)
    assert not view.ok and view.session.study is None and view.picture is None
    assert path.name in view.status and all(w in view.status for w in words), view.status
    assert "--model" in view.status  # says how to get a model that reads it


def test_zip_to_a_2d_only_model_is_refused_before_unpacking(tmp_path):
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.dcm", b"x")
    view = DemoHandlers(FakePredictor(("image",)), tmp_root=tmp_path).upload(archive, None)
    assert not view.ok and "2D images only" in view.status
    assert not list(tmp_path.glob("medmvl-demo-*"))


def test_a_file_over_the_size_limit_is_refused(nifti):
    limit_mb = nifti.stat().st_size / 2**20 / 2
    view = DemoHandlers(FakePredictor(), max_upload_mb=limit_mb).upload(nifti, None)
    assert not view.ok and "over this demo's upload limit" in view.status and "--max-upload-mb" in view.status


def test_a_zip_that_unpacks_over_the_limit_is_refused(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("s/1.dcm", b"\0" * 3_000_000)
    view = DemoHandlers(FakePredictor(), max_upload_mb=0.5, tmp_root=tmp_path).upload(archive, None)
    assert not view.ok and "unpacks to" in view.status
    assert not list(tmp_path.glob("medmvl-demo-*/**/*.dcm"))


@pytest.mark.parametrize("name, content, words", [
    ("scan.nii.gz", b"not a nifti at all", ["scan.nii.gz", "cannot read", "NIfTI"]),
    ("film.png", b"\x89PNG broken", ["film.png", "cannot read", "NIfTI"]),
    ("notes.txt", b"hello", ["notes.txt", "not a file type", "NIfTI"]),  # says what the demo does read
    ("series.zip", b"PK not really", ["series.zip", "not a readable zip", "Zip the series folder"]),
])
def test_unreadable_files_are_refused_with_their_name(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    view = DemoHandlers(FakePredictor()).upload(path, None)
    assert not view.ok and view.session.study is None
    assert all(w in view.status for w in words), view.status
    assert str(tmp_path) not in view.status  # the temporary upload folder is not shown


def test_a_single_dicom_slice_without_suffix_is_a_2d_image(tmp_path):
    path = tmp_path / "IM0001"
    path.write_bytes(CT_SMALL.read_bytes())
    study = open_study(path, BOTH, 2**30)
    assert study.kind == "image" and study.picture.size == (128, 128)
    with pytest.raises(UploadError, match="3D volumes only"):
        open_study(path, ("image3d",), 2**30)


def test_asking_without_a_file_or_a_question(png):
    predictor = FakePredictor()
    handlers = DemoHandlers(predictor)
    (view,) = handlers.ask(None, "Is there a nodule?")
    assert not view.ok and NO_STUDY in view.status
    session = handlers.upload(png, None).session
    (view,) = handlers.ask(session, "   ")
    assert not view.ok and "Type a question" in view.status
    assert predictor.requests == []


def test_an_empty_answer_is_said_to_be_empty(png):
    predictor = FakePredictor()
    predictor.stream = lambda request, settings, on_text: ""
    handlers = DemoHandlers(predictor)
    session = handlers.upload(png, None).session
    views = last(handlers.ask(session, "Anything?"))
    assert views[-1].chat[-1] == {"role": "assistant", "content": EMPTY_ANSWER}
    assert session.messages[-1] == {"role": "assistant", "content": ""}  # the model is sent what it said


@pytest.mark.parametrize("error, words", [
    (DataError("ct.nii.gz: preprocessing failed (boom).", hint="Check the volume."), ["preprocessing failed", "Check the volume"]),
    (RuntimeError("CUDA out of memory"), ["failed to answer", "CUDA out of memory"]),
])
def test_a_failed_answer_leaves_the_conversation_as_it_was(nifti, error, words):
    predictor = FakePredictor()
    handlers = DemoHandlers(predictor)
    session = handlers.upload(nifti, None).session
    last(handlers.ask(session, "First?"))
    before = list(session.messages)
    predictor.fail = error
    views = last(handlers.ask(session, "Second?"))
    assert not views[-1].ok and all(w in views[-1].status for w in words), views[-1].status
    assert session.messages == before
    assert [m["content"] for m in views[-1].chat] == ["First?", "answer to turn 1"]


# ----------------------------------------------------------------------- page and command


def test_model_card_names_branches_and_preprocessing():
    info = describe_model(FakePredictor())
    assert info.branches == BOTH and info.volume_window == (-1000.0, 1000.0) and info.image_size == (32, 32)
    card = info.markdown()
    for words in ("tiny-fake", "2D images and 3D volumes", "HU window -1000 to 1000", "16 × 32 × 32", "32 × 32 px"):
        assert words in card
    assert "3D" not in describe_model(FakePredictor(("image",))).markdown().split("Reads:")[1].split("\n")[0]


def test_missing_gradio_says_to_install_the_extra(monkeypatch):
    from medmvl_cli.demo.app import require_gradio

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(RunError) as caught:
        require_gradio()
    assert ".[demo]" in caught.value.hint


@pytest.mark.parametrize("branches", [("image",), ("image3d",), BOTH])
def test_the_page_builds_for_every_kind_of_model(branches):
    pytest.importorskip("gradio")
    from medmvl_cli.demo.app import build_demo

    demo = build_demo(DemoHandlers(FakePredictor(branches)))
    components = demo.get_config_file()["components"]
    ids = {c.get("props", {}).get("elem_id") for c in components}
    page_text = " ".join(str(c.get("props", {}).get("value", "")) for c in components)
    assert ("NIfTI" in page_text) == ("image3d" in branches) and ("PNG" in page_text) == ("image" in branches)
    assert {"upload", "viewer", "slice", "plane", "window", "chat", "question", "ask", "clear", "model-card"} <= ids
    # Both ways of asking (Enter, the Ask button) share one concurrency group of size 1: one model, one answer at a time.
    asking = [fn for fn in demo.fns.values() if fn.name == "on_ask"]
    assert len(asking) == 2 and {(fn.concurrency_id, fn.concurrency_limit) for fn in asking} == {("model", 1)}


def test_the_command_checks_for_gradio_before_loading_a_model(monkeypatch, tmp_path):
    from medmvl_cli.cli.demo_cmd import demo

    monkeypatch.setitem(sys.modules, "gradio", None)
    monkeypatch.chdir(tmp_path)  # no ./runs here: a model lookup would fail differently
    with pytest.raises(RunError, match="needs gradio"):
        demo(model=None)


def test_the_command_listens_on_this_machine_only_and_never_shares_by_default():
    import inspect

    from medmvl_cli.cli.demo_cmd import demo

    params = inspect.signature(demo).parameters
    assert params["host"].default == "127.0.0.1" and params["share"].default is False
    assert params["max_upload_mb"].default == 1024


# ------------------------------------------------------------------- on a real tiny model


@pytest.fixture(scope="module")
def real_predictor(tmp_path_factory):
    """A two-branch tiny model trained a few steps (tests/e2e/demo_support.py), loaded by the real Predictor."""
    from medmvl_cli.inference.generate import Predictor
    from medmvl_cli.runs.resolve import resolve_model_dir
    from tests.e2e.demo_support import tiny_model

    run = tiny_model(tmp_path_factory)
    predictor = Predictor(resolve_model_dir(str(run)))
    predictor.requests = []
    real_stream = predictor.stream

    def spy(request, settings, on_text):
        predictor.requests.append(request)
        return real_stream(request, settings, on_text)

    predictor.stream = spy
    return predictor, run.parents[1] / "data"


@pytest.mark.slow
def test_real_model_volume_turns_keep_the_history_and_match_the_shared_inference(real_predictor):
    from medmvl_cli.inference.generate import GenerationSettings
    from tests.e2e.demo_support import TINY_ANSWER

    predictor, data = real_predictor
    handlers = DemoHandlers(predictor)
    assert handlers.info.branches == BOTH and handlers.info.volume_window == (-1000.0, 1000.0)
    volume = sorted((data / "volumes").glob("test-*.nii.gz"))[0]
    view = handlers.upload(volume, None)
    assert view.ok and view.is_volume, view.status
    first = last(handlers.ask(view.session, "Is there a nodule?", max_new_tokens=16))
    second = last(handlers.ask(view.session, "Where?", max_new_tokens=16))
    assert [m["content"] for m in second[-1].chat] == ["Is there a nodule?", TINY_ANSWER, "Where?", TINY_ANSWER]
    assert [len(r.messages) for r in predictor.requests[-2:]] == [1, 3]
    assert predictor.requests[-1].volumes == [volume]
    partial = [v.chat[-1]["content"] for v in first[1:-1]]
    assert len(set(partial)) >= 2 and all(TINY_ANSWER.startswith(p) for p in partial), partial  # streamed in pieces
    # The page's answer is what the one inference path gives for the same conversation.
    direct = predictor.generate([predictor.requests[-1]], GenerationSettings(max_new_tokens=16))[0]
    assert second[-1].chat[-1]["content"] == direct


@pytest.mark.slow
def test_real_model_image_turn(real_predictor):
    from tests.e2e.demo_support import TINY_ANSWER

    predictor, data = real_predictor
    handlers = DemoHandlers(predictor)
    image = sorted((data / "images").glob("test-*.png"))[0]
    view = handlers.upload(image, None)
    assert view.ok and not view.is_volume, view.status
    views = last(handlers.ask(view.session, "What do you see?", max_new_tokens=16))
    assert views[-1].ok and views[-1].chat[-1]["content"] == TINY_ANSWER
    assert predictor.requests[-1].images == [image] and predictor.requests[-1].volumes == []
