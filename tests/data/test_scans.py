"""Scan reading in the pipeline: HU and CT windows (single file = series), multi-window
channels, non-finite policy, spacing resampling, hu_clip, PALETTE COLOR, preamble-less DICOM.

References are computed here with NumPy from the files' own attributes, never by the code
under test.
"""
from __future__ import annotations

import io

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image as PILImage
from pydicom.data import get_testdata_file

from medvl_jax import generate
from medvl_jax.data import pairs, pipeline, preprocess, readers
from medvl_jax.data.errors import DataError


def _cfg(**kw):
    c = pipeline.default_config()
    for k, v in kw.items():
        c[k] = v
    return c


def _ct_small():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return ds, hu


def _window(hu, c, w):
    """(hu - (c - w/2)) / w clipped to [0, 1], written out by hand."""
    y = (np.asarray(hu, np.float64) - (c - w / 2.0)) / w
    return np.minimum(np.maximum(y, 0.0), 1.0)


# --------------------------------------------------------------------------------------------
# CT: Hounsfield units and the configured window, single file and series alike.
# --------------------------------------------------------------------------------------------

def test_single_ct_file_uses_ct_window_not_its_own(tmp_path):
    ds, hu = _ct_small()
    # Give the file a display window of its own: the pipeline must ignore it for CT.
    ds.WindowCenter, ds.WindowWidth = 300, 200
    path = tmp_path / "ct.dcm"
    ds.save_as(path)
    out = pipeline.load_image(str(path), _cfg(ct_window=(40.0, 400.0)))
    assert out.dtype == np.float32 and out.shape == (128, 128)
    np.testing.assert_allclose(out, _window(hu, 40.0, 400.0), atol=1e-6)
    # A direct reader call still shows the file's own window when asked to.
    own = readers.read_dicom(path).pixels
    assert np.abs(own - out).max() > 0.1


def test_same_slice_single_file_and_series_are_identical(tmp_path):
    ds, hu = _ct_small()
    raw = ds.pixel_array
    series = tmp_path / "series"
    series.mkdir()
    for k, z in enumerate([-10.0, 0.0, 10.0]):
        s = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        s.PixelData = (raw + 50 * k).astype(raw.dtype).tobytes()
        s.ImagePositionPatient = [-158.135803, -179.035797, z]
        s.save_as(series / f"s{k}.dcm")
    cfg = _cfg(ct_window=(-600.0, 1500.0))
    vol = pipeline.load_image(str(series), cfg)
    single = pipeline.load_image(str(series / "s1.dcm"), cfg)
    assert vol.shape == (3, 128, 128)
    np.testing.assert_array_equal(vol[1], single)
    np.testing.assert_allclose(single, _window(hu + 50, -600.0, 1500.0), atol=1e-6)


def test_multi_window_channels(tmp_path):
    _, hu = _ct_small()
    windows = ((-600.0, 1500.0), (40.0, 400.0), (400.0, 1800.0))
    cfg = _cfg(ct_windows=windows, channels=3)
    out = pipeline.load_image(get_testdata_file("CT_small.dcm"), cfg)
    assert out.shape == (128, 128, 3)
    for k, (c, w) in enumerate(windows):
        np.testing.assert_allclose(out[..., k], _window(hu, c, w), atol=1e-6)
    # Through the pair/classify featurizer: the channels survive to the model input.
    cfg.image_size = 128
    feat = pairs.PairFeaturizer(cfg, tokenizer=None, train=False, label_names=("x",))
    img = feat.image({"id": "p", "image": get_testdata_file("CT_small.dcm")}, None)
    expected = np.stack([_window(hu, c, w) for c, w in windows], axis=-1)
    np.testing.assert_allclose(img, (expected - 0.5) / 0.5, atol=1e-5)
    # An MedSynth-style int16 HU array gets the same windows.
    arr = np.array([[-1000, 0], [40, 2000]], np.int16)
    out = pipeline.load_image(arr, cfg, modality="ct")
    np.testing.assert_allclose(out[..., 1], _window(arr, 40.0, 400.0), atol=1e-6)
    with pytest.raises(ValueError, match="ct_windows"):
        pipeline.image_ops(_cfg(ct_windows=windows, channels=1), train=False)


def test_hu_clip_before_the_window():
    _, hu = _ct_small()
    cfg = _cfg(ct_window=(0.0, 2000.0), hu_clip=(-100.0, 100.0))
    out = pipeline.load_image(get_testdata_file("CT_small.dcm"), cfg)
    np.testing.assert_allclose(out, _window(np.clip(hu, -100, 100), 0.0, 2000.0), atol=1e-6)
    with pytest.raises(ValueError, match="hu_clip"):
        pipeline.image_ops(_cfg(hu_clip=(5.0, -5.0)), train=False)


def test_monochrome1_ct_stays_in_hu(tmp_path):
    ds, hu = _ct_small()
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "m1.dcm"
    ds.save_as(path)
    img = readers.read_dicom(path, ct_in_hu=True)
    np.testing.assert_array_equal(img.pixels, hu.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Non-finite values and constant images.
# --------------------------------------------------------------------------------------------

def _nifti(tmp_path, vol_zyx, spacing_zyx=(1.0, 1.0, 1.0), name="v.nii.gz"):
    path = tmp_path / name
    affine = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
    nib.save(nib.Nifti1Image(np.asarray(vol_zyx, np.float32).T, affine), path)
    return str(path)


def test_nan_voxel_is_an_error_naming_the_file_and_count(tmp_path):
    vol = np.linspace(-1000, 1000, 4 * 5 * 6).reshape(4, 5, 6)
    vol[1, 2, 3] = np.nan
    vol[2, 0, 0] = np.inf
    path = _nifti(tmp_path, vol)
    for modality in (None, "ct"):
        with pytest.raises(DataError) as e:
            pipeline.load_image(path, _cfg(volume_shape=(4, 5, 6)), modality=modality)
        assert e.value.reason == "nonfinite" and path in str(e.value)
        assert "2 of 120" in str(e.value)


def test_nan_replaced_by_the_configured_value(tmp_path):
    vol = np.linspace(-1000, 1000, 4 * 5 * 6).reshape(4, 5, 6)
    vol[1, 2, 3] = np.nan
    path = _nifti(tmp_path, vol)
    cfg = _cfg(volume_shape=(4, 5, 6), nonfinite="replace", nonfinite_value=-1024.0,
               ct_window=(0.0, 1000.0))
    filled = np.where(np.isnan(vol), -1024.0, vol)
    ct = pipeline.load_image(path, cfg, modality="ct")
    np.testing.assert_allclose(ct, _window(filled, 0.0, 1000.0), atol=1e-6)
    other = pipeline.load_image(path, cfg)  # not CT: min-max of the filled volume
    np.testing.assert_allclose(other, (filled - filled.min()) / (filled.max() - filled.min()),
                               atol=1e-6)
    assert np.isfinite(other).all() and other.std() > 0.1
    with pytest.raises(ValueError, match="data.nonfinite"):
        pipeline.image_ops(_cfg(nonfinite="zero"), train=False)


def test_to_unit_range_never_blanks_a_nan_image():
    x = np.arange(12, dtype=np.float32).reshape(3, 4) * 10
    x[0, 0] = np.nan
    for modality in (None, "ct"):
        with pytest.raises(DataError, match="1 of 12"):
            pipeline.to_unit_range(x, modality, (40.0, 400.0), where="img")


def test_constant_images():
    flat = np.full((3, 4), 7.5, np.float32)
    np.testing.assert_array_equal(pipeline.to_unit_range(flat, None, (40.0, 400.0)),
                                  np.zeros((3, 4)))
    half = np.full((3, 4), 0.25, np.float32)
    np.testing.assert_array_equal(pipeline.to_unit_range(half, None, (40.0, 400.0)), half)
    water = np.full((3, 4), 100, np.int16)  # constant CT is still windowed: 260 / 400
    np.testing.assert_allclose(pipeline.to_unit_range(water, "ct", (40.0, 400.0)),
                               np.full((3, 4), 0.65), atol=1e-6)
    np.testing.assert_allclose(pipeline.to_unit_range(water, "ct", (40.0, 400.0)),
                               _window(water, 40.0, 400.0), atol=1e-6)


def test_reader_min_max_stretch_keeps_nan_visible():
    x = np.array([[2.0, np.nan], [4.0, 6.0]])
    out = readers.min_max(x)
    np.testing.assert_allclose(out[~np.isnan(x)], [0.0, 0.5, 1.0])
    assert np.isnan(out[0, 1])  # left for the pipeline's non-finite policy to see
    np.testing.assert_array_equal(readers.min_max(np.full((2, 2), 3.0)), np.zeros((2, 2)))


# --------------------------------------------------------------------------------------------
# Spacing.
# --------------------------------------------------------------------------------------------

def test_anisotropic_ramp_resampled_to_isotropic_stays_linear(tmp_path):
    spacing = (5.0, 0.7, 0.7)
    shape = (6, 40, 30)
    zz, yy, xx = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)],
                             indexing="ij")
    ramp = lambda z, y, x: 0.8 * z - 0.5 * y + 1.5 * x + 3.0  # noqa: E731  (mm → value)
    path = _nifti(tmp_path, ramp(zz, yy, xx), spacing)
    img = readers.read_nifti(path)
    assert img.spacing == pytest.approx(spacing)
    target = (1.4, 1.4, 1.4)
    out, new = preprocess.resample_to_spacing(img.pixels, img.spacing, target)
    # round(6 * 5 / 1.4) = 21, round(40 * 0.7 / 1.4) = 20, round(30 * 0.7 / 1.4) = 15
    assert out.shape == (21, 20, 15) and new == target
    # Output voxel i lies at the centre of the field of view + (i - (m - 1) / 2) * 1.4 mm.
    phys = [((n - 1) * s) / 2 + (np.arange(m) - (m - 1) / 2) * 1.4
            for n, s, m in zip(shape, spacing, out.shape)]
    pz, py, px = np.meshgrid(*phys, indexing="ij")
    expected = ramp(np.clip(pz, 0, 25.0), py, px)
    # Away from the in-plane borders (where the antialiasing kernel is cut) it is exact.
    inner = (slice(None), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(out[inner], expected[inner], atol=1e-3)
    # Same through the pipeline: resampled, then centre-cropped/padded to volume_shape.
    cfg = _cfg(volume_shape=(24, 16, 16), target_spacing=target, channels=1,
               normalise=(0.0, 1.0))
    loaded = pipeline.load_image(path, cfg)  # not CT: min-max scaled after resampling
    np.testing.assert_allclose(loaded, (out - out.min()) / (out.max() - out.min()), atol=1e-5)
    final = pipeline.image_ops(cfg, train=False)(loaded, None)[..., 0]
    # z 21 → 24: one slice padded before, two after; y 20 → 16: rows 2..17 kept;
    # x 15 → 16: one column padded after.
    assert final.shape == (24, 16, 16)
    np.testing.assert_allclose(final[1:22, :, :15], loaded[:, 2:18, :], atol=1e-6)
    assert not final[0].any() and not final[22:].any() and not final[:, :, 15].any()


def test_crop_or_pad_by_hand():
    x = np.arange(5 * 6 * 3, dtype=np.float32).reshape(5, 6, 3)
    out = preprocess.crop_or_pad((3, 9, 3), value=-1.0)(x, None)
    assert out.shape == (3, 9, 3)
    np.testing.assert_array_equal(out[:, 1:7, :], x[1:4])
    np.testing.assert_array_equal(out[:, [0, 7, 8], :], -1.0)


def test_series_spacing_resampling_and_missing_spacing(tmp_path):
    _, hu = _ct_small()
    raw = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array
    for k, z in enumerate([0.0, 7.5, 15.0]):
        s = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        s.PixelData = raw.tobytes()
        s.ImagePositionPatient = [-158.135803, -179.035797, z]
        s.save_as(tmp_path / f"s{k}.dcm")
    px = 0.661468
    cfg = _cfg(volume_shape=(3, 64, 64), target_spacing=(7.5, 2 * px, 2 * px),
               ct_window=(40.0, 400.0))
    vol = pipeline.load_image(str(tmp_path), cfg)
    assert vol.shape == (3, 64, 64)
    # Halving in-plane: output pixel i is centred on input 2i + 0.5, and the triangle kernel
    # widened to 2 pixels weighs inputs 2i-1, 2i, 2i+1, 2i+2 by 1, 3, 3, 1 (/ 8). Interior
    # rows and columns by hand, in HU, then the window:
    k = np.array([1.0, 3.0, 3.0, 1.0]) / 8.0
    rows = sum(k[a] * hu[1 + a:1 + a + 124:2] for a in range(4))          # i = 1 .. 62
    both = sum(k[b] * rows[:, 1 + b:1 + b + 124:2] for b in range(4))
    for d in range(3):  # the z spacing is already 7.5: slices unchanged
        np.testing.assert_allclose(vol[d, 1:63, 1:63], _window(both, 40.0, 400.0), atol=1e-5)
    with pytest.raises(DataError) as e:
        pipeline.load_image(np.zeros((4, 5, 6), np.int16), cfg, modality="ct", where="study-1")
    assert e.value.reason == "no_spacing" and "study-1" in str(e.value)
    with pytest.raises(ValueError, match="volume_shape"):
        pipeline.image_ops(_cfg(target_spacing=(1.0, 1.0, 1.0)), train=False)


# --------------------------------------------------------------------------------------------
# PALETTE COLOR and DICOM without the preamble.
# --------------------------------------------------------------------------------------------

def test_palette_color_is_rgb_by_the_lut():
    path = get_testdata_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    idx = ds.pixel_array.astype(np.int64)
    channels = []
    for colour in ("Red", "Green", "Blue"):
        n, first, bits = (int(v) for v in ds[f"{colour}PaletteColorLookupTableDescriptor"].value)
        data = ds[f"{colour}PaletteColorLookupTableData"].value
        lut = np.frombuffer(data, dtype="<u2" if bits == 16 else "u1").astype(np.float64)
        channels.append(lut[np.clip(idx - first, 0, (n or 65536) - 1)] / (2.0 ** bits - 1))
    expected = np.stack(channels, axis=-1)
    img = readers.read_dicom(path)
    assert img.pixels.shape == (350, 800, 3)
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
    assert expected.std(axis=-1).max() > 0.1  # really colour, not grey indices
    np.testing.assert_allclose(pipeline.load_image(path, _cfg()), expected, atol=1e-6)


def _without_preamble(tmp_path):
    """Three preamble-less variants of shipped files: (name, path, reference pixels)."""
    out = []
    data = open(get_testdata_file("CT_small.dcm"), "rb").read()
    assert data[128:132] == b"DICM"
    p = tmp_path / "ct_from_dicm.dcm"
    p.write_bytes(data[128:])                   # starts at "DICM"
    out.append((p, pydicom.dcmread(get_testdata_file("CT_small.dcm"))))
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.preamble = None
    p = tmp_path / "mr_meta_no_dicm"
    ds.save_as(p, enforce_file_format=False)    # file meta group, no preamble, no "DICM"
    out.append((p, pydicom.dcmread(get_testdata_file("MR_small.dcm"))))
    ds = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    ds.preamble = None
    del ds.file_meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=False)
    p = tmp_path / "mr_bare_bigendian.dcm"
    p.write_bytes(buf.getvalue())               # a bare big-endian data set
    out.append((p, pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))))
    return out


def test_dicom_without_preamble_reads_like_the_original(tmp_path):
    for path, ref in _without_preamble(tmp_path):
        assert open(path, "rb").read(132)[128:132] != b"DICM"
        img = readers.read_image(path, apply_voi=False)
        units = ref.pixel_array.astype(np.float64) * float(ref.get("RescaleSlope", 1)) \
            + float(ref.get("RescaleIntercept", 0))
        np.testing.assert_array_equal(img.pixels, units.astype(np.float32))
        assert img.modality == ref.Modality


def test_non_dicom_files_are_refused(tmp_path):
    png = tmp_path / "x.png"
    PILImage.fromarray(np.zeros((4, 4), np.uint8)).save(png)
    renamed = tmp_path / "really_png.dcm"
    renamed.write_bytes(png.read_bytes())
    text = tmp_path / "notes.dcm"
    text.write_text("patient notes, not an image\n" * 10)
    for path in (renamed, text):
        with pytest.raises(DataError) as e:
            readers.read_dicom(path)
        assert e.value.reason == "corrupt" and str(path) in str(e.value)
        assert "not a DICOM file" in str(e.value)
    blob = tmp_path / "blob"
    blob.write_bytes(b"\x01\x02" * 300)
    with pytest.raises(DataError) as e:
        readers.read_image(blob)
    assert e.value.reason == "unsupported_format" and str(blob) in str(e.value)


# --------------------------------------------------------------------------------------------
# generate shares the pipeline's reading.
# --------------------------------------------------------------------------------------------

def test_generate_preprocess_image_uses_the_same_reading(tmp_path):
    _, hu = _ct_small()
    c, w = pipeline.default_config().ct_window
    x = generate.preprocess_image(get_testdata_file("CT_small.dcm"), 128)
    np.testing.assert_allclose(x, np.repeat(((_window(hu, c, w) - 0.5) / 0.5)[..., None], 3, -1),
                               atol=1e-5)
    vol = np.ones((3, 4, 5))
    vol[1, 1, 1] = np.nan
    path = _nifti(tmp_path, vol)
    with pytest.raises(DataError) as e:
        generate.preprocess_image(path, 8)
    assert e.value.reason == "nonfinite" and path in str(e.value)
