"""Preprocessing: one axis convention whatever the file format, HU windowing, spacing, crop,
resize, and augmentation only at train time."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medmvl_cli.data.volume_transforms import (
    VolumeParams,
    augment_volume,
    build_augment_transform,
    build_volume_transform,
    load_volume,
)
from medmvl_cli.errors import DataError, RecipeError

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
CT_SERIES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def make_cfg(size=(5, 6, 7), window=(-1000, 1000), spacing=None, orientation="LPS", crop_foreground=False, **aug):
    augment = SimpleNamespace(flip_prob=0.0, rotate90_prob=0.0, intensity_scale_prob=0.0, intensity_shift_prob=0.0)
    for name, value in aug.items():
        setattr(augment, name, value)
    return SimpleNamespace(size=size, window=window, spacing=spacing, orientation=orientation,
                           crop_foreground=crop_foreground, augment=augment)


# ------------------------------------------------------------------ one phantom, every writer
# The phantom is D×H×W = 10×12×14 HU in the documented convention: D inferior -> superior,
# H anterior -> posterior, W patient's right -> left. A bright block fills the corner
# d < 4, h < 5, w < 6 (inferior, anterior, right): no flip or transpose maps it onto itself.
SHAPE, SPACING, ORIGIN = (10, 12, 14), (2.5, 0.8, 0.7), (-5.0, -6.0, 30.0)  # spacing (D, H, W); origin LPS


def phantom() -> np.ndarray:
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    hu[:4, :5, :6] = 1000.0
    return hu


def lps_to_ras_affine(columns, voxel0_lps) -> np.ndarray:
    """Affine whose columns are the given LPS step vectors, origin at the given LPS point."""
    affine = np.eye(4)
    affine[:3, :3] = np.array(columns, dtype=float).T
    affine[:3, 3] = voxel0_lps
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def write_npy(hu, path):
    np.save(path / "v.npy", hu)
    return path / "v.npy"


def write_nifti_ras(hu, path):
    """Stored canonically (i: left -> right, j: posterior -> anterior, k: inferior -> superior)."""
    data = hu.transpose(2, 1, 0)[::-1, ::-1, :]
    sd, sh, sw = SPACING
    W, H = SHAPE[2], SHAPE[1]
    first = (ORIGIN[0] + (W - 1) * sw, ORIGIN[1] + (H - 1) * sh, ORIGIN[2])  # voxel (0,0,0) in LPS
    affine = lps_to_ras_affine([(-sw, 0, 0), (0, -sh, 0), (0, 0, sd)], first)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data).astype(np.int16), affine), path / "ras.nii.gz")
    return path / "ras.nii.gz"


def write_nifti_permuted(hu, path):
    """Stored (slice, column, row): an unusual axis order that only the affine explains."""
    data = hu.transpose(0, 2, 1)
    sd, sh, sw = SPACING
    affine = lps_to_ras_affine([(0, 0, sd), (sw, 0, 0), (0, sh, 0)], ORIGIN)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path / "perm.nii")
    return path / "perm.nii"


def write_mha(hu, path):
    image = sitk.GetImageFromArray(hu.astype(np.int16))  # x = W, y = H, z = D, identity direction
    image.SetSpacing(SPACING[::-1])
    image.SetOrigin(ORIGIN)
    sitk.WriteImage(image, str(path / "v.mha"))
    return path / "v.mha"


def write_nrrd_flipped(hu, path):
    """x and z stored reversed, with a direction matrix that says so."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu[::-1, :, ::-1]))
    sd, sh, sw = SPACING
    image.SetSpacing((sw, sh, sd))
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, -1))
    image.SetOrigin((ORIGIN[0] + (SHAPE[2] - 1) * sw, ORIGIN[1], ORIGIN[2] + (SHAPE[0] - 1) * sd))
    sitk.WriteImage(image, str(path / "v.nrrd"))
    return path / "v.nrrd"


def write_dicom(hu, path):
    """Axial CT slices, shuffled files, InstanceNumber against position, slope 2 / intercept -1024."""
    folder = path / "dicom"
    folder.mkdir()
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    order = list(range(SHAPE[0]))
    random.Random(1).shuffle(order)
    for n, d in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CT", "phantom"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = SHAPE[0] - d
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + d * SPACING[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [SPACING[1], SPACING[2]]
        ds.Rows, ds.Columns = SHAPE[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        ds.PixelData = np.rint((hu[d] + 1024) / 2).astype("<u2").tobytes()
        ds.save_as(folder / f"{n:02d}.dcm", enforce_file_format=True)
    return folder


WRITERS = [write_npy, write_nifti_ras, write_nifti_permuted, write_mha, write_nrrd_flipped, write_dicom]


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    return {writer.__name__: writer(phantom(), root) for writer in WRITERS}


def corner_means(volume: torch.Tensor) -> dict:
    """Mean of each of the 8 corner octants of a (1, D, H, W) tensor, keyed by (d, h, w) in {0, 1}."""
    _, D, H, W = volume.shape
    halves = [(slice(0, n // 2), slice((n + 1) // 2, n)) for n in (D, H, W)]
    return {(a, b, c): float(volume[0, halves[0][a], halves[1][b], halves[2][c]].mean())
            for a in (0, 1) for b in (0, 1) for c in (0, 1)}


@pytest.mark.parametrize("orientation, corner", [("LPS", (0, 0, 0)), ("RAS", (0, 1, 1))])
def test_marker_lands_in_the_same_corner_from_every_format(phantom_files, orientation, corner):
    cfg = make_cfg(size=(6, 8, 10), orientation=orientation)
    outputs = {name: load_volume(path, cfg) for name, path in phantom_files.items()}
    for name, volume in outputs.items():
        assert volume.shape == (1, 6, 8, 10) and volume.dtype == torch.float32, name
        means = corner_means(volume)
        assert means[corner] > 0.4, (name, means)
        assert all(v < 0.05 for k, v in means.items() if k != corner), (name, means)
    reference = outputs["write_npy"]
    for name, volume in outputs.items():
        torch.testing.assert_close(volume, reference, atol=1e-5, rtol=0, msg=name)


def test_marker_survives_resampling_to_real_spacing(phantom_files):
    # 2.5 x 0.8 x 0.7 mm -> 2 mm isotropic, then crop and resize: the marker keeps its corner.
    cfg = make_cfg(size=(8, 8, 8), spacing=(2.0, 2.0, 2.0), window=(-500, 1000))
    for name in ("write_nifti_ras", "write_nifti_permuted", "write_mha", "write_nrrd_flipped", "write_dicom"):
        means = corner_means(load_volume(phantom_files[name], cfg))
        assert means[(0, 0, 0)] > 0.4 and max(v for k, v in means.items() if k != (0, 0, 0)) < 0.05, (name, means)


def test_real_nifti_orientation_matches_nibabel_canonical():
    path = NIB_DATA / "anatomical.nii"  # stored LAS: its rows must be flipped to run anterior -> posterior
    image = nib.as_closest_canonical(nib.load(path))  # RAS: i -> right, j -> anterior, k -> superior
    ras = np.asarray(image.dataobj, dtype=np.float32)
    expected_lps = ras[::-1, ::-1, :].transpose(2, 1, 0)  # (D, H, W): superior, posterior, left
    cfg = make_cfg(size=expected_lps.shape, window=(0, 4000))
    lps = load_volume(path, cfg)[0].numpy()
    np.testing.assert_allclose(lps, np.clip(expected_lps / 4000, 0, 1), atol=1e-6)
    naive = np.clip(np.asarray(nib.load(path).dataobj, np.float32).transpose(2, 1, 0) / 4000, 0, 1)
    assert np.abs(lps - naive).max() > 0.1  # the header's orientation was honoured, not ignored
    ras_out = load_volume(path, make_cfg(size=expected_lps.shape, window=(0, 4000), orientation="RAS"))[0].numpy()
    np.testing.assert_allclose(ras_out, lps[:, ::-1, ::-1], atol=1e-6)


def test_real_dicom_series_reads_in_hu_and_radiological_layout():
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(CT_SERIES)))
    reference = sitk.GetArrayFromImage(sitk.DICOMOrient(reader.Execute(), "LPS")).astype(np.float32)
    volume = load_volume(CT_SERIES, make_cfg(size=reference.shape, window=(-1024, 1024)))
    np.testing.assert_allclose(volume[0].numpy(), np.clip((reference + 1024) / 2048, 0, 1), atol=1e-6)


def test_spacing_resamples_in_d_h_w_order():
    # standard.nii.gz: 4 x 5 x 7 voxels of 1 x 3 x 2 mm (RAS); D = z (2 mm), H = y (3 mm), W = x (1 mm)
    transform = build_volume_transform(make_cfg(size=(4, 4, 4), spacing=(1.0, 1.0, 1.0), window=(0, 100)))
    data = {"image": str(NIB_DATA / "standard.nii.gz")}
    for step in transform.transforms[:-2]:  # stop before resize
        data = step(data)
    assert isinstance(data["image"], MetaTensor)
    assert tuple(data["image"].shape) == (1, 13, 13, 4)


def test_window_maps_hu_to_unit_range(tmp_path):
    hu = np.zeros((4, 4, 5), np.float32)
    hu[..., 0], hu[..., 1], hu[..., 2], hu[..., 3], hu[..., 4] = -3000, -1000, 0, 1000, 3000
    np.save(tmp_path / "v.npy", hu)
    out = load_volume(tmp_path / "v.npy", make_cfg(size=(4, 4, 5)))[0]
    np.testing.assert_allclose(out[0, 0].numpy(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_crop_foreground_keeps_the_body_only(tmp_path):
    hu = np.full((20, 20, 20), -1000.0, np.float32)
    hu[5:15, 8:12, 2:18] = 40.0  # a soft-tissue box in air
    np.save(tmp_path / "v.npy", hu)
    cropped = load_volume(tmp_path / "v.npy", make_cfg(size=(4, 4, 4), crop_foreground=True))
    full = load_volume(tmp_path / "v.npy", make_cfg(size=(4, 4, 4), crop_foreground=False))
    assert float(cropped.min()) > 0.5  # only the box is left, stretched to the output
    assert float(full.min()) == 0.0
    np.save(tmp_path / "air.npy", np.full((6, 6, 6), -1000.0, np.float32))
    air = load_volume(tmp_path / "air.npy", make_cfg(size=(4, 4, 4), crop_foreground=True))
    assert air.shape == (1, 4, 4, 4) and float(air.abs().max()) == 0.0  # nothing to crop to: kept whole


# ----------------------------------------------------------------------------- augmentation


@pytest.fixture()
def ramp_npy(tmp_path):
    hu = np.random.default_rng(0).uniform(-900, 900, size=(6, 8, 8)).astype(np.float32)
    np.save(tmp_path / "r.npy", hu)
    return tmp_path / "r.npy"


def test_eval_never_augments(ramp_npy):
    plain = load_volume(ramp_npy, make_cfg(size=(6, 8, 8)))
    noisy_cfg = make_cfg(size=(6, 8, 8), flip_prob=1.0, rotate90_prob=1.0, intensity_scale_prob=1.0,
                         intensity_shift_prob=1.0)
    assert torch.equal(load_volume(ramp_npy, noisy_cfg, train=False), plain)
    assert torch.equal(load_volume(ramp_npy, make_cfg(size=(6, 8, 8)), train=True), plain)  # all probs 0
    assert len(build_volume_transform(noisy_cfg, train=False).transforms) < len(
        build_volume_transform(noisy_cfg, train=True).transforms)


def test_train_augmentations_do_what_they_say(ramp_npy):
    plain = load_volume(ramp_npy, make_cfg(size=(6, 8, 8)))
    flipped = load_volume(ramp_npy, make_cfg(size=(6, 8, 8), flip_prob=1.0), train=True)
    assert torch.equal(flipped, plain.flip(1, 2, 3))
    turned = load_volume(ramp_npy, make_cfg(size=(6, 8, 8), rotate90_prob=1.0), train=True)
    assert any(torch.equal(turned, torch.rot90(plain, k, dims=(2, 3))) for k in (1, 2, 3))
    scaled = load_volume(ramp_npy, make_cfg(size=(6, 8, 8), intensity_scale_prob=1.0), train=True)
    ratio = scaled[plain > 0.05] / plain[plain > 0.05]
    assert float(ratio.std()) < 1e-4 and 0.9 <= float(ratio.mean()) <= 1.1 and not torch.equal(scaled, plain)
    shifted = load_volume(ramp_npy, make_cfg(size=(6, 8, 8), intensity_shift_prob=1.0), train=True)
    delta = shifted - plain
    assert float(delta.std()) < 1e-5 and 0 < abs(float(delta.mean())) <= 0.1


def test_augmentation_follows_torch_seed(ramp_npy):
    cfg = make_cfg(size=(6, 8, 8), flip_prob=0.5, rotate90_prob=0.5, intensity_scale_prob=0.5)
    runs = []
    for seed in (3, 3, 4, 5, 6):
        torch.manual_seed(seed)
        runs.append(load_volume(ramp_npy, cfg, train=True))
    assert torch.equal(runs[0], runs[1])
    assert any(not torch.equal(runs[0], other) for other in runs[2:])


def test_augment_volume_applies_to_cached_tensors():
    volume = torch.rand(1, 4, 6, 6)
    assert torch.equal(augment_volume(volume, make_cfg(size=(4, 6, 6), flip_prob=1.0)), volume.flip(1, 2, 3))
    assert build_augment_transform(make_cfg(size=(4, 6, 6))) is None


# ------------------------------------------------------------------------------- the config


def test_config_accepts_namespaces_mappings_and_missing_augment():
    params = VolumeParams.from_config({"size": [32, 256, 256], "window": [-1000, 1000], "spacing": None,
                                       "orientation": "ras", "crop_foreground": True})
    assert params.size == (32, 256, 256) and params.orientation == "RAS" and not params.augments
    assert params.axcodes == "SAR"
    assert VolumeParams.from_config(make_cfg(flip_prob=0.2)).augment.flip_prob == 0.2
    assert VolumeParams.from_config(make_cfg()) == VolumeParams.from_config(make_cfg())  # hashable key
    assert VolumeParams.from_config(make_cfg()).eval_dict() == VolumeParams.from_config(
        make_cfg(flip_prob=0.5)).eval_dict()  # augmentation does not change the eval output


@pytest.mark.parametrize("bad, key", [
    (dict(orientation="RAR"), "orientation"),
    (dict(orientation="XYZ"), "orientation"),
    (dict(window=(100, -100)), "window"),
    (dict(size=(4, 4)), "size"),
    (dict(spacing=(1.0, 0.0, 1.0)), "spacing"),
    (dict(size=(4, 6, 8), rotate90_prob=0.5), "rotate90_prob"),
    (dict(flip_prob=1.5), "flip_prob"),
])
def test_config_errors_name_the_key(bad, key):
    with pytest.raises(RecipeError, match=key):
        VolumeParams.from_config(make_cfg(**bad))


def test_load_errors_stay_data_errors(tmp_path):
    bad = np.zeros((3, 3, 3), np.float32)
    bad[0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match="nan.npy"):
        load_volume(tmp_path / "nan.npy", make_cfg())
    with pytest.raises(DataError, match="missing.nii.gz"):
        load_volume(tmp_path / "missing.nii.gz", make_cfg())
