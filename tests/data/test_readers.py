"""Readers against real files shipped in pydicom and nibabel, checked by hand formulas."""
from __future__ import annotations

import dataclasses
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from nibabel.testing import data_path as NIB_DATA
from PIL import Image as PILImage
from pydicom.data import get_testdata_file

from medvl_jax.data import readers
from medvl_jax.data.errors import DataError


def _ds(name: str):
    return pydicom.dcmread(get_testdata_file(name))


def _dicom_window(x, c, w):
    """PS3.3 C.11.2.1.2.1 linear window to [0, 1], written out case by case."""
    x = np.asarray(x, dtype=np.float64)
    y = ((x - (c - 0.5)) / (w - 1) + 0.5)
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, y)
    y = np.where(x > c - 0.5 + (w - 1) / 2, 1.0, y)
    return y


# --------------------------------------------------------------------------------------------
# DICOM.
# --------------------------------------------------------------------------------------------

def test_ct_small_hounsfield_units_from_raw_tags():
    ds = _ds("CT_small.dcm")
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img = readers.read_dicom(get_testdata_file("CT_small.dcm"), apply_voi=False)
    assert img.pixels.dtype == np.float32 and img.pixels.shape == (128, 128)
    np.testing.assert_array_equal(img.pixels, hu.astype(np.float32))
    assert img.modality == "CT"
    assert img.spacing == pytest.approx((0.661468, 0.661468))
    # No window in the file: apply_voi stretches min–max to [0, 1].
    voi = readers.read_dicom(get_testdata_file("CT_small.dcm"))
    np.testing.assert_allclose(voi.pixels, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)


def test_mr_small_window_by_hand():
    ds = _ds("MR_small.dcm")
    assert float(ds.WindowCenter) == 600 and float(ds.WindowWidth) == 1600
    img = readers.read_dicom(get_testdata_file("MR_small.dcm"))
    expected = _dicom_window(ds.pixel_array, 600.0, 1600.0)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
    assert img.modality == "MR" and img.spacing == pytest.approx((0.3125, 0.3125))
    # Spot values: a pixel at c - 0.5 maps to exactly 0.5 by the formula.
    assert readers.window(np.array([599.5]), 600, 1600)[0] == pytest.approx(0.5)
    assert readers.window(np.array([-200.0, 1400.5]), 600, 1600).tolist() == [0.0, 1.0]


def test_voi_lut_sequence_by_hand(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = _ds("MR_small.dcm")
    item = Dataset()
    item.add_new(0x00283002, "US", [1024, 600, 12])                    # LUTDescriptor
    item.add_new(0x00283006, "US", [min(4 * i, 4095) for i in range(1024)])  # LUTData
    ds.VOILUTSequence = Sequence([item])
    path = tmp_path / "voilut.dcm"
    ds.save_as(path)
    raw = ds.pixel_array.astype(np.int64)
    expected = np.minimum(4 * np.clip(raw - 600, 0, 1023), 4095) / 4095.0
    img = readers.read_dicom(path)  # the LUT sequence wins over WindowCenter/Width
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)


def test_multi_valued_window_uses_first_value():
    ds = _ds("examples_overlay.dcm")
    c, w = float(ds.WindowCenter[0]), float(ds.WindowWidth[0])
    img = readers.read_dicom(get_testdata_file("examples_overlay.dcm"))
    np.testing.assert_allclose(img.pixels, _dicom_window(ds.pixel_array, c, w), atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    ds = _ds("MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    raw = ds.pixel_array.astype(np.float64)
    img = readers.read_dicom(path)
    np.testing.assert_allclose(img.pixels, 1.0 - _dicom_window(raw, 600.0, 1600.0), atol=1e-6)
    # Without VOI: reflected inside the signed 16-bit stored range (-32768 + 32767 = -1).
    units = readers.read_dicom(path, apply_voi=False)
    np.testing.assert_array_equal(units.pixels, (-1.0 - raw).astype(np.float32))


def test_multi_frame_rtdose():
    ds = _ds("rtdose.dcm")
    img = readers.read_dicom(get_testdata_file("rtdose.dcm"), apply_voi=False)
    assert img.pixels.shape == (15, 10, 10)
    np.testing.assert_array_equal(img.pixels, ds.pixel_array.astype(np.float32))
    # Frame spacing from GridFrameOffsetVector (0, 5, 10, ...), then PixelSpacing.
    assert img.spacing == pytest.approx((5.0, 10.0, 10.0))
    assert img.modality == "RTDOSE"


def test_rgb_dicom_kept_as_rgb():
    ds = _ds("SC_rgb_small_odd.dcm")
    img = readers.read_dicom(get_testdata_file("SC_rgb_small_odd.dcm"))
    assert img.pixels.shape == (3, 3, 3)
    np.testing.assert_allclose(img.pixels, ds.pixel_array / 255.0, atol=1e-6)


def test_no_patient_tags_leave_the_reader():
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ds = _ds(name)
        img = readers.read_dicom(get_testdata_file(name))
        assert [f.name for f in dataclasses.fields(img)] == ["pixels", "spacing", "modality"]
        assert set(vars(img)) == {"pixels", "spacing", "modality"}
        text = repr(img) + str(img.spacing) + str(img.modality)
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID"):
            value = str(ds.get(tag, "") or "")
            if value:
                assert value not in text
        assert "CompressedSamples" not in text


def test_no_pixel_data(tmp_path):
    ds = _ds("CT_small.dcm")
    del ds.PixelData
    path = tmp_path / "nopix.dcm"
    ds.save_as(path)
    with pytest.raises(DataError) as e:
        readers.read_dicom(path)
    assert e.value.reason == "no_pixel_data" and str(path) in str(e.value)
    dicomdir = get_testdata_file("DICOMDIR")
    with pytest.raises(DataError) as e:
        readers.read_dicom(dicomdir)
    assert e.value.reason == "no_pixel_data" and dicomdir in str(e.value)


def test_garbage_missing_and_truncated_dicom(tmp_path):
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(b"\x00" * 128 + b"nope" + os.urandom(300))
    with pytest.raises(DataError) as e:
        readers.read_dicom(bad)
    assert e.value.reason == "corrupt" and str(bad) in str(e.value)
    with pytest.raises(DataError) as e:
        readers.read_image(tmp_path / "absent.dcm")
    assert e.value.reason == "missing" and "absent.dcm" in str(e.value)
    truncated = get_testdata_file("MR_truncated.dcm")
    with pytest.raises(DataError) as e:
        readers.read_dicom(truncated)
    assert e.value.reason == "corrupt" and truncated in str(e.value)


def test_compressed_without_decoder_names_the_syntax():
    path = get_testdata_file("JPEG-lossy.dcm")  # 12-bit JPEG Extended: Pillow cannot decode it
    try:
        _ds("JPEG-lossy.dcm").pixel_array
    except Exception:
        pass
    else:
        pytest.skip("a decoder for 12-bit JPEG is installed")
    with pytest.raises(DataError) as e:
        readers.read_dicom(path)
    assert e.value.reason == "unsupported_compression"
    assert "JPEG Extended" in str(e.value) and path in str(e.value)


def _write_series(tmp_path, positions, instance_numbers, with_geometry=True):
    base = _ds("CT_small.dcm")
    raw = base.pixel_array
    paths = []
    for k, (z, inst) in enumerate(zip(positions, instance_numbers)):
        ds = _ds("CT_small.dcm")
        ds.PixelData = (raw + 100 * k).astype(raw.dtype).tobytes()
        ds.ImagePositionPatient = [-158.135803, -179.035797, float(z)]
        ds.InstanceNumber = inst
        if not with_geometry:
            del ds.ImagePositionPatient
        path = tmp_path / f"slice_{chr(ord('a') + k)}.dcm"
        ds.save_as(path)
        paths.append(path)
    return raw, paths


def test_series_sorted_by_position(tmp_path):
    positions = [10.0, -5.0, 2.5, -12.5]        # written out of order
    instances = [1, 2, 3, 4]                    # deliberately unrelated to position
    raw, paths = _write_series(tmp_path, positions, instances)
    img = readers.read_dicom_series(tmp_path)
    order = np.argsort(positions)               # normal is +z for this orientation
    assert img.pixels.shape == (4, 128, 128)
    for d, k in enumerate(order):
        np.testing.assert_array_equal(img.pixels[d], (raw + 100 * k) * 1.0 - 1024.0)
    # Distinct gaps 7.5, 7.5, 7.5 after sorting.
    assert img.spacing == pytest.approx((7.5, 0.661468, 0.661468))
    assert img.modality == "CT"
    via_list = readers.read_dicom_series(list(reversed(paths)))
    np.testing.assert_array_equal(via_list.pixels, img.pixels)


def test_series_fallback_to_instance_number(tmp_path):
    raw, _ = _write_series(tmp_path, [0, 0, 0], [3, 1, 2], with_geometry=False)
    img = readers.read_dicom_series(tmp_path)
    for d, k in enumerate([1, 2, 0]):
        np.testing.assert_array_equal(img.pixels[d], (raw + 100 * k) - 1024.0)
    assert img.spacing == pytest.approx((5.0, 0.661468, 0.661468))  # SliceThickness


def test_read_image_dispatch_by_magic(tmp_path):
    target = tmp_path / "no_suffix"
    shutil.copy(get_testdata_file("CT_small.dcm"), target)
    img = readers.read_image(target, apply_voi=False)
    assert img.modality == "CT" and img.pixels.shape == (128, 128)


# --------------------------------------------------------------------------------------------
# NIfTI.
# --------------------------------------------------------------------------------------------

def test_nifti_canonical_orientation_and_spacing():
    path = os.path.join(NIB_DATA, "anatomical.nii")
    orig = nib.load(path)
    assert nib.aff2axcodes(orig.affine) == ("L", "A", "S")
    assert nib.aff2axcodes(nib.as_closest_canonical(orig).affine) == ("R", "A", "S")
    img = readers.read_nifti(path)
    data = np.asarray(orig.dataobj, dtype=np.float32)
    # LAS → RAS flips the first voxel axis; output is (S, A, R) = (k, j, i).
    np.testing.assert_array_equal(img.pixels, data[::-1].transpose(2, 1, 0))
    assert img.spacing == tuple(float(z) for z in orig.header.get_zooms()[::-1])
    # World R coordinate grows along the output x axis.
    nx = data.shape[0]
    r = [(orig.affine @ np.array([nx - 1 - x, 0, 0, 1]))[0] for x in range(nx)]
    assert np.all(np.diff(r) > 0)


def test_nifti_standard_ras_and_anisotropic_zooms():
    path = os.path.join(NIB_DATA, "standard.nii.gz")
    orig = nib.load(path)
    assert nib.aff2axcodes(orig.affine) == ("R", "A", "S")
    img = readers.read_nifti(path)
    np.testing.assert_array_equal(img.pixels, np.asarray(orig.dataobj, np.float32).T)
    assert img.pixels.shape == (7, 5, 4) and img.spacing == (2.0, 3.0, 1.0)


@pytest.mark.parametrize("name", ["example4d.nii.gz", "example_nifti2.nii.gz"])
def test_true_4d_is_refused(name):
    path = os.path.join(NIB_DATA, name)
    with pytest.raises(DataError) as e:
        readers.read_nifti(path)
    assert e.value.reason == "bad_dimensionality" and path in str(e.value)
    assert str(tuple(nib.load(path).shape)) in str(e.value)


def test_nifti_2d_refused_and_singleton_4d_squeezed(tmp_path):
    flat = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), flat)
    with pytest.raises(DataError) as e:
        readers.read_nifti(flat)
    assert e.value.reason == "bad_dimensionality" and str(flat) in str(e.value)
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6, 1)
    single = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 2.0, 3.0, 1.0])), single)
    img = readers.read_nifti(single)
    np.testing.assert_array_equal(img.pixels, vol[..., 0].T)
    assert img.spacing == (3.0, 2.0, 1.0)


def test_nifti_garbage_and_missing(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"definitely not gzip")
    with pytest.raises(DataError) as e:
        readers.read_image(bad)
    assert e.value.reason == "corrupt" and str(bad) in str(e.value)
    with pytest.raises(DataError) as e:
        readers.read_nifti(tmp_path / "none.nii")
    assert e.value.reason == "missing"


def test_nifti_hu_clip():
    path = os.path.join(NIB_DATA, "anatomical.nii")
    raw = readers.read_nifti(path).pixels
    img = readers.read_nifti(path, hu_clip=(10.0, 50.0))
    np.testing.assert_array_equal(img.pixels, np.clip(raw, 10.0, 50.0))


def _ramp(z, y, x):
    return 2.0 * z - 3.0 * y + 0.5 * x + 7.0


def _save_ras(tmp_path, vol_zyx, spacing_zyx, name="ramp.nii.gz"):
    path = tmp_path / name
    affine = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
    nib.save(nib.Nifti1Image(vol_zyx.T.astype(np.float32), affine), path)
    return path


def test_nifti_trilinear_reproduces_linear_ramp(tmp_path):
    shape = (6, 8, 10)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    path = _save_ras(tmp_path, _ramp(zz, yy, xx), (3.0, 2.0, 1.5))
    target = (3, 12, 7)
    img = readers.read_nifti(path, target_shape=target)
    # Half-pixel centres: output i samples (i + 0.5) * n / m - 0.5, clamped to the volume.
    coords = [np.clip((np.arange(m) + 0.5) * n / m - 0.5, 0, n - 1) for n, m in zip(shape, target)]
    cz, cy, cx = np.meshgrid(*coords, indexing="ij")
    np.testing.assert_allclose(img.pixels, _ramp(cz, cy, cx), atol=1e-4)
    assert img.spacing == pytest.approx((3.0 * 6 / 3, 2.0 * 8 / 12, 1.5 * 10 / 7))


def test_nifti_resample_matches_torch_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(5, 6, 7)).astype(np.float32)
    path = _save_ras(tmp_path, vol, (1.0, 1.0, 1.0))
    img = readers.read_nifti(path, target_shape=(9, 4, 11))
    ref = torch.nn.functional.interpolate(torch.from_numpy(vol)[None, None], size=(9, 4, 11),
                                          mode="trilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(img.pixels, ref, atol=1e-5)
    # Round trip: a smooth volume doubled then halved comes back (exact away from borders).
    z, y, x = np.meshgrid(np.arange(8.0), np.arange(8.0), np.arange(8.0), indexing="ij")
    smooth = np.sin(0.3 * z) + np.cos(0.2 * y) * 0.5 + 0.1 * x
    path = _save_ras(tmp_path, smooth, (1.0, 1.0, 1.0))
    up = readers.read_nifti(path, target_shape=(16, 16, 16))
    path2 = _save_ras(tmp_path, up.pixels, up.spacing, name="up.nii.gz")
    back = readers.read_nifti(path2, target_shape=(8, 8, 8))
    assert back.spacing == pytest.approx((1.0, 1.0, 1.0))
    np.testing.assert_allclose(back.pixels[1:-1, 1:-1, 1:-1], smooth[1:-1, 1:-1, 1:-1],
                               atol=0.02)


# --------------------------------------------------------------------------------------------
# PNG / JPEG.
# --------------------------------------------------------------------------------------------

def test_png_16bit_rgb_and_alpha(tmp_path):
    v16 = (np.arange(20 * 30).reshape(20, 30) * 97 % 65536).astype(np.uint16)
    p16 = tmp_path / "deep.png"
    PILImage.fromarray(v16).save(p16)
    img = readers.read_image(p16)
    assert img.pixels.dtype == np.float32 and img.spacing is None and img.modality is None
    np.testing.assert_array_equal(img.pixels, v16.astype(np.float32))
    np.testing.assert_allclose(readers.read_png(p16, unit_range=True).pixels, v16 / 65535.0,
                               atol=1e-7)

    rgba = np.random.default_rng(0).integers(0, 256, size=(7, 9, 4), dtype=np.uint8)
    prgba = tmp_path / "rgba.png"
    PILImage.fromarray(rgba, mode="RGBA").save(prgba)
    np.testing.assert_array_equal(readers.read_png(prgba).pixels, rgba[..., :3])
    np.testing.assert_allclose(readers.read_png(prgba, unit_range=True).pixels,
                               rgba[..., :3] / 255.0, atol=1e-7)


def test_jpeg_grayscale(tmp_path):
    g = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (16, 1))
    path = tmp_path / "g.jpeg"
    PILImage.fromarray(g).save(path, quality=95)
    img = readers.read_image(path)
    assert img.pixels.shape == (16, 32)
    assert np.abs(img.pixels - g).max() < 8  # lossy, but close


def test_truncated_png_is_corrupt(tmp_path):
    good = tmp_path / "good.png"
    PILImage.fromarray(np.zeros((64, 64), np.uint8) + 3).save(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.png"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        readers.read_image(bad)
    assert e.value.reason == "corrupt" and str(bad) in str(e.value)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(DataError) as e:
        readers.read_png(junk)
    assert e.value.reason == "corrupt" and str(junk) in str(e.value)
