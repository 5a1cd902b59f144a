"""2D readers: PIL formats, DICOM with real headers (rescale, window, MONOCHROME1), volumes
refused, and HF image processors without torchvision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from medmvl_cli.data.image_io import read_image, to_pixel_values
from medmvl_cli.errors import DataError


def dicom_file(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:  # files of the pydicom-data package (a test extra)
        pytest.skip(f"{name} needs the pydicom-data package")
    return path


def expected_gray(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.rint(np.clip((values.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def as_gray(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    return array[..., 0]


def pattern() -> np.ndarray:
    """An RGB test card that no flip or transpose leaves unchanged."""
    rgb = np.zeros((24, 40, 3), np.uint8)
    rgb[:8, :10] = (255, 0, 0)
    rgb[16:, 30:] = (0, 0, 255)
    rgb[:, 20] = (0, 200, 0)
    return rgb


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".jpg"])
def test_pil_formats_read_as_rgb_in_place(tmp_path, suffix):
    path = tmp_path / f"card{suffix}"
    Image.fromarray(pattern()).save(path, quality=95) if suffix == ".jpg" else Image.fromarray(pattern()).save(path)
    image = read_image(path)
    assert image.mode == "RGB" and image.size == (40, 24)
    error = np.abs(np.asarray(image).astype(int) - pattern())
    if suffix == ".jpg":  # lossy: compare block colours, not edges
        assert error.mean() < 8 and tuple(np.asarray(image)[2, 2] // 128) == (1, 0, 0)
    else:
        assert error.max() == 0


def test_sixteen_bit_png_uses_its_range_or_the_window(tmp_path):
    values = np.linspace(0, 4000, 32 * 16).reshape(16, 32).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(as_gray(read_image(tmp_path / "deep.png")), expected_gray(values, 0, 4000))
    np.testing.assert_array_equal(as_gray(read_image(tmp_path / "deep.png", window=(1000, 2000))),
                                  expected_gray(values, 1000, 2000))


def test_ct_small_applies_rescale_before_the_window():
    path = dicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    hu = ds.pixel_array * 1.0 - 1024.0
    got = as_gray(read_image(path, window=(-160, 240)))  # a soft-tissue window in HU
    np.testing.assert_array_equal(got, expected_gray(hu, -160, 240))
    assert np.abs(got.astype(int) - expected_gray(ds.pixel_array, -160, 240)).mean() > 20  # not raw values


def test_mr_small_uses_the_header_window():
    path = dicom_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    got = as_gray(read_image(path))
    np.testing.assert_array_equal(got, expected_gray(ds.pixel_array, center - width / 2, center + width / 2))
    assert not np.array_equal(got, expected_gray(ds.pixel_array, ds.pixel_array.min(), ds.pixel_array.max()))


def test_multi_valued_window_uses_the_first_pair():
    path = dicom_file("MR-SIEMENS-DICOM-WithOverlays.dcm")
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter[0]), float(ds.WindowWidth[0])
    assert len(ds.WindowCenter) > 1
    np.testing.assert_array_equal(as_gray(read_image(path)),
                                  expected_gray(ds.pixel_array, center - width / 2, center + width / 2))


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    normal = as_gray(read_image(dicom_file("MR_small.dcm")))
    np.testing.assert_array_equal(as_gray(read_image(tmp_path / "mono1.dcm")), 255 - normal)


def test_real_monochrome1_radiograph_is_inverted():
    path = dicom_file("RG3_UNCR.dcm")  # a CR of a leg, MONOCHROME1: low stored values are white
    ds = pydicom.dcmread(path)
    got = as_gray(read_image(path))
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    np.testing.assert_array_equal(got, 255 - expected_gray(ds.pixel_array, center - width / 2, center + width / 2))


def test_rgb_and_palette_dicom():
    rgb = np.asarray(read_image(dicom_file("SC_rgb.dcm")))
    assert rgb.shape == (100, 100, 3)
    assert tuple(rgb[0, 0]) == (255, 0, 0)  # the top band of SC_rgb is red
    palette = read_image(dicom_file("OBXXXX1A.dcm"))
    assert palette.mode == "RGB" and palette.size == (800, 600)


def test_dicom_without_suffix_is_detected(tmp_path):
    (tmp_path / "IM0001").write_bytes(Path(dicom_file("MR_small.dcm")).read_bytes())
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "IM0001")),
                                  np.asarray(read_image(dicom_file("MR_small.dcm"))))


def test_volumes_given_as_images_are_refused(tmp_path):
    with pytest.raises(DataError, match="multi-frame DICOM .*volume") as err:
        read_image(dicom_file("emri_small.dcm"))
    assert "image3d" in err.value.hint
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (0, 128, 255)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match="3 frames"):
        read_image(tmp_path / "stack.tif")
    with pytest.raises(DataError, match="volume"):
        read_image(np.zeros((4, 32, 32), np.float32))
    (tmp_path / "ct.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match="3D volume"):
        read_image(tmp_path / "ct.nii.gz")
    with pytest.raises(DataError, match="folder"):
        read_image(tmp_path)


def test_image_reader_knows_every_volume_suffix_without_importing_monai():
    import subprocess
    import sys

    from medmvl_cli.data import file_kinds, image_io, volume_io

    assert image_io.VOLUME_SUFFIXES is volume_io.VOLUME_SUFFIXES is file_kinds.VOLUME_SUFFIXES
    code = "import sys, medmvl_cli.data.image_io; print('monai' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_arrays_and_broken_files(tmp_path):
    gray = read_image(np.array([[0.0, 50.0], [100.0, 200.0]], np.float32))
    np.testing.assert_array_equal(as_gray(gray), expected_gray(np.array([[0, 50], [100, 200]]), 0, 200))
    assert np.array_equal(np.asarray(read_image(pattern())), pattern())
    with pytest.raises(DataError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="broken.png"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(ValueError):
        read_image(pattern(), window=(10, 10))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_image_processors_work_without_torchvision(tmp_path, kind):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    cls = CLIPImageProcessor if kind == "clip" else SiglipImageProcessor
    size = {"shortest_edge": 32} if kind == "clip" else {"height": 32, "width": 32}
    extra = {"crop_size": {"height": 32, "width": 32}} if kind == "clip" else {}
    processor = cls(size=size, **extra)
    Image.fromarray(pattern()).save(tmp_path / "card.png")
    white = Image.new("RGB", (40, 24), (255, 255, 255))
    pixels = to_pixel_values([white, tmp_path / "card.png"], processor)
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    torch.testing.assert_close(pixels[0, :, 16, 16], (1 - mean) / std)  # white after normalisation
    assert not torch.allclose(pixels[1], pixels[0])
