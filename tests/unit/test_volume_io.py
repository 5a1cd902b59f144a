"""3D readers: real headers (pydicom / nibabel test data), geometry checked against SimpleITK and
nibabel, and the errors a user meets (several series, 2-D arrays, NaN, broken files)."""

from __future__ import annotations

import gzip
import logging
import os
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medmvl_cli.data.volume_io import VolumeReader, read_volume, source_files, volume_format
from medmvl_cli.errors import DataError

DICOMDIR_TESTS = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
CT_SERIES = DICOMDIR_TESTS / "98892001" / "CT5N"  # 5 axial CT slices; InstanceNumber runs against z
NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_ct_series(folder: Path, hu: np.ndarray, spacing=(2.5, 0.8, 0.7), origin=(-5.0, -6.0, 30.0),
                    slope=2.0, intercept=-1024.0, series_uid: str | None = None) -> Path:
    """Write a D×H×W HU array as axial CT slices (LPS: rows go posterior, columns to the left,
    slice d at z = origin_z + d * spacing_d), in shuffled file order, InstanceNumber descending."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study, frame = generate_uid(), generate_uid()
    depth = hu.shape[0]
    order = list(range(depth))
    random.Random(0).shuffle(order)
    for n, d in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.SeriesDescription = "CT", "synthetic", "marker phantom"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame
        ds.InstanceNumber = depth - d
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + d * spacing[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.rint((hu[d] - intercept) / slope).astype("<u2")
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"slice_{n:03d}.dcm", enforce_file_format=True)
    return folder


def sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def world_of(volume: MetaTensor, index) -> np.ndarray:
    return (volume.affine.numpy() @ np.array([*index, 1.0]))[:3]


# ----------------------------------------------------------------------------- DICOM series


def test_real_ct_series_matches_simpleitk_in_values_order_and_geometry():
    volume = read_volume(CT_SERIES)
    reference = sitk_series(CT_SERIES)  # GDCM sorts by position and applies the rescale
    assert isinstance(volume, MetaTensor) and volume.dtype == torch.float32
    # ours is (slice, row, column), sorted inferior -> superior; SimpleITK's array is (z, y, x)
    np.testing.assert_array_equal(volume.numpy(), sitk.GetArrayFromImage(reference).astype(np.float32))
    for index in [(0, 0, 0), (4, 15, 0), (2, 3, 11)]:
        expected = LPS_TO_RAS[:3, :3] @ np.array(reference.TransformIndexToPhysicalPoint(index[::-1]))
        np.testing.assert_allclose(world_of(volume, index), expected, atol=1e-4)
    # the header says RescaleIntercept -1024: raw 868 in the most inferior slice is -156 HU
    lowest = min(CT_SERIES.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    raw = pydicom.dcmread(lowest).pixel_array.astype(np.float32)
    np.testing.assert_array_equal(volume[0].numpy(), raw - 1024)
    assert volume.meta["space"] == "RAS"


def test_written_series_is_ordered_by_position_not_file_or_instance_number(tmp_path):
    hu = np.full((6, 8, 10), -1000.0, dtype=np.float32)
    for d in range(6):
        hu[d, d, :] = 100.0 * d  # each slice marked by its own row and value
    folder = write_ct_series(tmp_path / "series", hu)
    volume = read_volume(folder)
    np.testing.assert_array_equal(volume.numpy(), hu)  # slope 2 / intercept -1024 undone exactly
    np.testing.assert_array_equal(volume.numpy(), sitk.GetArrayFromImage(sitk_series(folder)))
    # slice axis points superior 2.5 mm, rows posterior 0.8 mm, columns patient-left 0.7 mm (RAS)
    np.testing.assert_allclose(volume.affine.numpy()[:3, :3],
                               [[0, 0, -0.7], [0, -0.8, 0], [2.5, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(world_of(volume, (0, 0, 0)), [5.0, 6.0, 30.0], atol=1e-6)


def test_folder_with_several_series_lists_them():
    folder = DICOMDIR_TESTS / "98892003" / "MR1"  # three one-slice MR series
    with pytest.raises(DataError) as err:
        read_volume(folder)
    message = str(err.value)
    assert "3 DICOM series" in message and str(folder) in message
    uids = {str(pydicom.dcmread(f).SeriesInstanceUID) for f in folder.iterdir()}
    assert all(uid in message for uid in uids)
    assert "own folder" in err.value.hint


def test_two_written_series_in_one_folder_are_refused(tmp_path):
    hu = np.zeros((3, 4, 4), dtype=np.float32)
    write_ct_series(tmp_path / "mixed", hu)
    # a second series written into the same folder under other file names
    other = write_ct_series(tmp_path / "other", hu)
    for f in other.iterdir():
        f.rename(tmp_path / "mixed" / f"b_{f.name}")
    with pytest.raises(DataError, match="2 DICOM series"):
        read_volume(tmp_path / "mixed")


def test_series_with_mixed_orientations_is_refused():
    with pytest.raises(DataError, match="do not share one orientation"):
        read_volume(DICOMDIR_TESTS / "98892003" / "MR700")


def test_irregular_slice_gaps_are_reported(caplog):
    caplog.set_level(logging.WARNING)
    volume = read_volume(DICOMDIR_TESTS / "77654033" / "CT2")  # z = -99.5, 103.0, 104.3, 105.5
    assert volume.shape == (4, 16, 16)
    assert "irregular slice spacing" in caplog.text


def test_non_dicom_files_beside_the_series_are_ignored(tmp_path):
    hu = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5) * 2 - 60
    folder = write_ct_series(tmp_path / "s", hu)
    (folder / "README.txt").write_text("not a DICOM file")
    np.testing.assert_array_equal(read_volume(folder).numpy(), hu)


def test_folder_without_dicom_names_its_subfolders(tmp_path):
    (tmp_path / "patient" / "series_a").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        read_volume(tmp_path / "patient")
    assert "series_a" in str(err.value)


def test_single_slice_folder_is_a_2d_image(tmp_path):
    folder = write_ct_series(tmp_path / "one", np.zeros((1, 4, 4), dtype=np.float32))
    with pytest.raises(DataError, match="single DICOM slice"):
        read_volume(folder)


# ------------------------------------------------------------------------------ NIfTI / ITK


def test_real_nifti_keeps_nibabel_affine_and_values():
    path = NIB_DATA / "anatomical.nii"  # big-endian int16, LAS
    volume = read_volume(path)
    image = nib.load(path)
    np.testing.assert_array_equal(volume.affine.numpy(), image.affine)
    np.testing.assert_array_equal(volume.numpy(), np.asarray(image.dataobj, dtype=np.float32))
    assert volume.meta["medmvl_format"] == "nifti"


def test_nifti_scaling_is_applied(tmp_path):
    raw = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = nib.Nifti1Image(raw, np.diag([0.7, 0.7, 2.5, 1.0]))
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, tmp_path / "ct.nii.gz")
    np.testing.assert_array_equal(read_volume(tmp_path / "ct.nii.gz").numpy(), raw * 2.0 - 1024.0)


def test_four_d_nifti_is_refused():
    with pytest.raises(DataError, match="4-D"):
        read_volume(NIB_DATA / "example4d.nii.gz")


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_follow_direction_and_origin(tmp_path, suffix):
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)  # (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    angle = np.deg2rad(20)  # an oblique in-plane rotation and a flipped z axis
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, -1))
    sitk.WriteImage(image, str(tmp_path / f"v{suffix}"))
    volume = read_volume(tmp_path / f"v{suffix}")
    np.testing.assert_array_equal(volume.numpy(), array)
    for index in [(0, 0, 0), (4, 5, 6), (1, 3, 2)]:
        lps = image.TransformIndexToPhysicalPoint(tuple(int(i) for i in index[::-1]))
        np.testing.assert_allclose(world_of(volume, index), LPS_TO_RAS[:3, :3] @ np.array(lps), atol=1e-4)


def test_mhd_identity_includes_its_raw_file(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(tmp_path / "v.mhd"))
    names = [f.name for f in source_files(tmp_path / "v.mhd")]
    assert names[0] == "v.mhd" and len(names) == 2 and names[1].startswith("v.")
    assert read_volume(tmp_path / "v.mhd").shape == (3, 4, 5)


# -------------------------------------------------------------------------------------- npy


def test_npy_is_d_h_w_with_the_documented_geometry(tmp_path):
    hu = np.random.default_rng(1).integers(-1000, 1000, size=(4, 5, 6)).astype(np.int16)
    np.save(tmp_path / "v.npy", hu)
    volume = read_volume(tmp_path / "v.npy")
    np.testing.assert_array_equal(volume.numpy(), hu.astype(np.float32))
    # D -> superior, H -> posterior, W -> patient's left, 1 mm (in RAS: +S, -A, -R)
    np.testing.assert_array_equal(volume.affine.numpy()[:3, :3], [[0, 0, -1], [0, -1, 0], [1, 0, 0]])
    np.save(tmp_path / "c.npy", hu[None])  # (1, D, H, W) as some MedM-VL exports store it
    assert read_volume(tmp_path / "c.npy").shape == (4, 5, 6)


def test_two_d_array_is_not_a_volume(tmp_path):
    np.save(tmp_path / "slice.npy", np.zeros((64, 64), np.float32))
    with pytest.raises(DataError) as err:
        read_volume(tmp_path / "slice.npy")
    assert "slice.npy" in str(err.value) and "2D image" in str(err.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(tmp_path, bad):
    hu = np.zeros((3, 4, 5), np.float32)
    hu[1, 2, 3] = bad
    np.save(tmp_path / "v.npy", hu)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "v.nii.gz")
    for name in ("v.npy", "v.nii.gz"):
        with pytest.raises(DataError, match="1 voxels are NaN or infinite") as err:
            read_volume(tmp_path / name)
        assert name in str(err.value)


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy"):
        read_volume(tmp_path / "obj.npy")


# ------------------------------------------------------------------------------ broken inputs


def test_truncated_and_garbage_files_name_the_file(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.int16), np.eye(4)), tmp_path / "ok.nii.gz")
    data = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.mha").write_bytes(b"this is not an image")
    (tmp_path / "junk.npy").write_bytes(gzip.compress(b"nope"))
    for name in ("cut.nii.gz", "junk.mha", "junk.npy"):
        with pytest.raises(DataError) as err:
            read_volume(tmp_path / name)
        assert name in str(err.value), name


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="no such volume"):
        read_volume(tmp_path / "absent.nii.gz")
    (tmp_path / "scan.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a 3D volume format") as err:
        read_volume(tmp_path / "scan.png")
    assert ".nii.gz" in err.value.hint
    assert volume_format(tmp_path) == "dicom"


@pytest.mark.filterwarnings("ignore::UserWarning")  # MONAI announces its optional GPU readers
def test_reader_plugs_into_monai_loadimage():
    path = NIB_DATA / "anatomical.nii"
    loaded = LoadImage(reader=VolumeReader(), image_only=True, ensure_channel_first=True)(str(path))
    assert isinstance(loaded, MetaTensor) and loaded.shape == (1, 33, 41, 25)
    np.testing.assert_array_equal(loaded.affine.numpy(), nib.load(path).affine)
    assert os.fspath(path) == loaded.meta["filename_or_obj"]
