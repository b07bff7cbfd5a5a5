"""Image readers: PNG/JPEG, DICOM (single file, multi-frame, series) and NIfTI.

Every reader returns an :class:`Image` holding float32 pixels, the pixel spacing when the file
states it, and the modality. Nothing else leaves a reader: no patient, study or device tags, so
identifying metadata can never reach examples, logs or checkpoints.

Failures raise :class:`~medvl_jax.data.errors.DataError` naming the file, with ``reason`` one of
``missing``, ``corrupt``, ``no_pixel_data``, ``unsupported_compression``, ``bad_dimensionality``,
``inconsistent_series`` or ``unsupported_format``. Nothing here unpickles.

Readers return what the file holds (modality units, or a file's own display window when asked);
choosing a CT window, the non-finite policy and resampling belong to the data pipeline
(:func:`medvl_jax.data.pipeline.load_image`).
"""
from __future__ import annotations

import dataclasses
import io
import os
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from medvl_jax.data.errors import DataError
from medvl_jax.data.preprocess import linear_resize

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class Image:
    """A decoded image.

    pixels: float32; [H, W] grayscale, [H, W, 3] RGB, [D, H, W] volume or multi-frame, or
        [F, H, W, 3] for multi-frame colour DICOM.
    spacing: millimetres per pixel along the spatial axes of ``pixels`` ((row, col) or
        (z, y, x)); None when the file does not state it.
    modality: DICOM modality ("CT", "MR", ...), "xray" style free text, or None.
    """

    pixels: np.ndarray
    spacing: tuple[float, ...] | None
    modality: str | None


def _require_file(path: PathLike) -> str:
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise DataError("file not found", where=p, reason="missing")
    return p


# --------------------------------------------------------------------------------------------
# Dispatch.
# --------------------------------------------------------------------------------------------

def image_kind(path: PathLike) -> str:
    """Which reader :func:`read_image` uses: "series" (a directory), "png", "dicom", "nifti",
    or "unknown" (a file with another suffix and no PNG/JPEG signature and no "DICM" marker at
    byte 128: it may still be a DICOM data set without the preamble)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return "series"
    name = p.lower()
    if name.endswith((".png", ".jpg", ".jpeg")):
        return "png"
    if name.endswith((".dcm", ".dicom")):
        return "dicom"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    p = _require_file(p)
    with open(p, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff"):
        return "png"
    return "unknown"


def read_image(path: PathLike, **kwargs) -> Image:
    """Reads any supported image, choosing the reader by suffix, else by the file's content.

    ``.png .jpg .jpeg`` → :func:`read_png`; ``.dcm .dicom`` → :func:`read_dicom`;
    ``.nii .nii.gz`` → :func:`read_nifti`; a directory → :func:`read_dicom_series`. A file with
    another suffix is read as DICOM when it has "DICM" at byte 128 (the DICOM preamble), as
    PNG/JPEG by their signatures, and otherwise as DICOM without the preamble if it parses as
    one (see :func:`read_dicom`). ``kwargs`` go to the chosen reader.
    """
    kind = image_kind(path)
    p = os.fspath(path)
    if kind == "series":
        return read_dicom_series(p, **kwargs)
    if kind == "png":
        return read_png(p, **kwargs)
    if kind == "nifti":
        return read_nifti(p, **kwargs)
    if kind == "dicom":
        return read_dicom(p, **kwargs)
    try:
        return read_dicom(p, **kwargs)
    except DataError as e:
        if e.reason != "corrupt":
            raise
        raise DataError("unknown image format: not .png/.jpg/.jpeg/.dcm/.nii/.nii.gz, no PNG or "
                        "JPEG signature, and not a DICOM file", where=p,
                        reason="unsupported_format") from e


# --------------------------------------------------------------------------------------------
# PNG / JPEG.
# --------------------------------------------------------------------------------------------

def read_png(path: PathLike, *, unit_range: bool = False) -> Image:
    """Reads a PNG or JPEG (or anything Pillow decodes) with its pixel values unchanged.

    8-bit images give values 0..255 and 16-bit PNGs 0..65535, as float32; with ``unit_range``
    they are divided by their bit depth's maximum (255 or 65535) to lie in [0, 1]. Grayscale
    stays [H, W]; colour, palette and CMYK become RGB [H, W, 3]; alpha is dropped. The JPEG
    EXIF orientation is applied. Spacing and modality are unknown.
    """
    from PIL import Image as PILImage
    from PIL import ImageOps

    p = _require_file(path)
    try:
        with PILImage.open(p) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in ("1", "LA", "La"):
                im = im.convert("L")
            elif mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode == "PA":
                im = im.convert("RGBA")
            elif mode not in ("L", "I", "F", "RGB", "RGBA") and not mode.startswith("I;16"):
                im = im.convert("RGB")
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode image: {e}", where=p, reason="corrupt") from e
    if arr.ndim == 3:
        arr = arr[..., :3]  # RGBA → RGB
    pixels = arr.astype(np.float32)
    if unit_range and arr.dtype in (np.uint8, np.uint16):
        pixels = pixels / np.float32(np.iinfo(arr.dtype).max)
    return Image(pixels=pixels, spacing=None, modality=None)


# --------------------------------------------------------------------------------------------
# DICOM.
# --------------------------------------------------------------------------------------------

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _dcmread(path: PathLike):
    """Parses a DICOM file: the standard file format (128-byte preamble, "DICM", file meta), or
    a data set without the preamble (with or without "DICM" and the file meta group)."""
    import pydicom

    p = _require_file(path)
    with open(p, "rb") as f:
        head = f.read(132)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if head[128:132] == b"DICM":
                ds = pydicom.dcmread(p)
            elif head[:4] == b"DICM":  # Preamble stripped, file meta kept.
                with open(p, "rb") as f:
                    ds = pydicom.dcmread(io.BytesIO(bytes(128) + f.read()))
            else:
                ds = _dcmread_bare(p)
    except DataError:
        raise
    except Exception as e:  # pydicom raises many types on damaged files
        raise DataError(f"cannot parse DICOM file: {e}", where=p, reason="corrupt") from e
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise DataError("DICOM file has no pixel data", where=p, reason="no_pixel_data")
    return ds


def _dcmread_bare(p: str):
    """A DICOM data set without the preamble (and possibly without file meta), accepted only
    when it parses completely and holds an image (Rows, Columns, pixel data). The transfer
    syntax, when the file does not state it, is the encoding pydicom detected (uncompressed:
    implicit or explicit VR, little or big endian)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    not_dicom = ("not a DICOM file: no 'DICM' marker at byte 128, and the content does not "
                 "parse as a DICOM data set holding an image")
    try:
        ds = pydicom.dcmread(p, force=True)
        for _ in ds.iterall():  # Converts every element: garbage fails here.
            pass
    except Exception as e:
        raise DataError(f"{not_dicom} ({e})", where=p, reason="corrupt") from e
    if "Rows" not in ds or "Columns" not in ds or not any(k in ds for k in _PIXEL_KEYWORDS):
        raise DataError(not_dicom, where=p, reason="corrupt")
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") is None:
        implicit, little = ds.original_encoding
        if meta is None:
            ds.file_meta = meta = FileMetaDataset()
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _transfer_syntax(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return f"{uid.name} ({uid})" if uid is not None else "unknown transfer syntax"


def _raw_pixels(ds, p: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(ds.pixel_array)
    except (RuntimeError, NotImplementedError) as e:
        meta = getattr(ds, "file_meta", None)
        uid = meta.get("TransferSyntaxUID") if meta is not None else None
        if uid is not None and uid.is_compressed:
            raise DataError(
                f"cannot decode pixel data compressed as {_transfer_syntax(ds)}: no installed "
                f"decoder handles it (install pylibjpeg with its plugins, or gdcm); decoder "
                f"said: {e}", where=p, reason="unsupported_compression") from e
        raise DataError(f"cannot decode pixel data: {e}", where=p, reason="corrupt") from e
    except Exception as e:
        raise DataError(f"cannot decode pixel data ({_transfer_syntax(ds)}): {e}", where=p,
                        reason="corrupt") from e


def _first(value) -> float:
    """First value of a possibly multi-valued DICOM element, as float."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _modality_lut(arr: np.ndarray, ds) -> np.ndarray:
    """Stored values → modality units (HU for CT): Modality LUT sequence or rescale."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    slope = _first(ds.RescaleSlope) if ds.get("RescaleSlope") is not None else 1.0
    intercept = _first(ds.RescaleIntercept) if ds.get("RescaleIntercept") is not None else 0.0
    return arr.astype(np.float64) * slope + intercept


def window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The DICOM VOI window (PS3.3 C.11.2.1.2) mapped to the output range [0, 1].

    LINEAR: x <= c - 0.5 - (w-1)/2 → 0; x > c - 0.5 + (w-1)/2 → 1; otherwise
    ((x - (c - 0.5)) / (w - 1) + 0.5). LINEAR_EXACT: (x - c) / w + 0.5, clipped.
    SIGMOID: 1 / (1 + exp(-4 (x - c) / w)).
    """
    x = np.asarray(x, dtype=np.float64)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width <= 1.0:  # Degenerate window: a threshold at c - 0.5.
        return (x > center - 0.5).astype(np.float64)
    y = (x - (center - 0.5)) / (width - 1.0) + 0.5
    lo = x <= center - 0.5 - (width - 1.0) / 2.0
    hi = x > center - 0.5 + (width - 1.0) / 2.0
    return np.where(lo, 0.0, np.where(hi, 1.0, np.clip(y, 0.0, 1.0)))


def _voi(values: np.ndarray, ds) -> np.ndarray:
    """Modality values → [0, 1] by the VOI LUT sequence, else the window, else min–max."""
    if "VOILUTSequence" in ds:
        # PS3.3 C.11.2.1.1: LUTDescriptor = (entries, first mapped value, bits per entry);
        # values below/above the mapped range take the first/last entry.
        item = ds.VOILUTSequence[0]
        n, first, bits = (int(v) for v in item.LUTDescriptor)
        n = n or 65536
        data = item.LUTData
        if isinstance(data, bytes):  # OW: 16-bit words in the file's byte order
            order = "<" if getattr(ds, "is_little_endian", True) is not False else ">"
            data = np.frombuffer(data, dtype=f"{order}u2")
        lut = np.asarray(data, dtype=np.float64).reshape(-1)[:n]
        idx = np.clip(np.round(values) - first, 0, len(lut) - 1).astype(np.int64)
        return np.clip(lut[idx] / float(2**bits - 1), 0.0, 1.0)
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return window(values, _first(ds.WindowCenter), _first(ds.WindowWidth),
                      str(ds.get("VOILUTFunction", "LINEAR")))
    return min_max(values)


def min_max(x: np.ndarray) -> np.ndarray:
    """(x - min) / (max - min) over the finite values; non-finite values stay as they are (so a
    later check still sees them) and a constant image (max == min) gives zeros."""
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return x.copy()
    lo, hi = float(x[finite].min()), float(x[finite].max())
    if hi <= lo:
        return np.where(finite, 0.0, x)
    return (x - lo) / (hi - lo)


def _stored_range(ds) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _spacing(ds, n_frames: int | None) -> tuple[float, ...] | None:
    """(row, col) spacing, with the frame spacing prepended for multi-frame data."""
    pixel, thick = None, None
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        if ds.get(key) is not None:
            pixel = (float(ds[key].value[0]), float(ds[key].value[1]))
            break
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        measures = shared[0].get("PixelMeasuresSequence")
        if measures:
            m = measures[0]
            if pixel is None and m.get("PixelSpacing") is not None:
                pixel = (float(m.PixelSpacing[0]), float(m.PixelSpacing[1]))
            if m.get("SpacingBetweenSlices") is not None:
                thick = float(m.SpacingBetweenSlices)
            elif m.get("SliceThickness") is not None:
                thick = float(m.SliceThickness)
    if pixel is None:
        return None
    if n_frames is None:
        return pixel
    offsets = ds.get("GridFrameOffsetVector")
    if offsets is not None and len(offsets) > 1:
        thick = float(abs(np.median(np.diff(np.asarray(offsets, dtype=np.float64)))))
    elif ds.get("SpacingBetweenSlices") is not None:
        thick = float(ds.SpacingBetweenSlices)
    elif thick is None and ds.get("SliceThickness") is not None:
        thick = float(ds.SliceThickness)
    return (thick, *pixel) if thick is not None else None


def _palette_rgb(raw: np.ndarray, ds, p: str) -> np.ndarray:
    """PALETTE COLOR indices → RGB in [0, 1] through the file's red/green/blue palette LUTs
    (PS3.3 C.7.6.3.1.5, plain or segmented), scaled by the entries' bit depth."""
    try:
        try:
            from pydicom.pixels import apply_color_lut
        except ImportError:  # pydicom < 3
            from pydicom.pixel_data_handlers.util import apply_color_lut
        rgb = np.asarray(apply_color_lut(raw, ds))
    except Exception as e:
        raise DataError(f"cannot apply the PALETTE COLOR lookup tables: {e}", where=p,
                        reason="corrupt") from e
    # Entries are 8 or 16 bits (the size the LUT data has in the file); alpha is dropped.
    return rgb[..., :3].astype(np.float64) / float(np.iinfo(rgb.dtype).max)


def _is_ct(ds) -> bool:
    return str(ds.get("Modality", "") or "").upper() == "CT"


def _decode(ds, p: str, apply_voi: bool, ct_in_hu: bool = False
            ) -> tuple[np.ndarray, int | None]:
    """Decoded float32 pixels of one dataset and its frame count (None for one frame)."""
    raw = _raw_pixels(ds, p)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples == 1 and photometric == "PALETTE COLOR":
        out = _palette_rgb(raw, ds, p)
    elif samples > 1:
        # Colour (pydicom converts YBR to RGB): scaled to [0, 1] by the stored bit depth.
        _, hi = _stored_range(ds)
        out = raw.astype(np.float64) / float(hi) if apply_voi else raw.astype(np.float64)
    else:
        values = _modality_lut(raw, ds)
        if ct_in_hu and _is_ct(ds):
            out = values  # Hounsfield units, as stored (MONOCHROME1 only changes the display).
        elif apply_voi:
            out = _voi(values, ds)
            if photometric == "MONOCHROME1":
                out = 1.0 - out
        else:
            out = values
            if photometric == "MONOCHROME1":
                # Reflect within the modality image of the stored range so that high = bright.
                lo, hi = _stored_range(ds)
                ends = _modality_lut(np.array([lo, hi]), ds)
                out = float(ends.min() + ends.max()) - values
    return out.astype(np.float32), (n_frames if n_frames > 1 else None)


def read_dicom(path: PathLike, *, apply_voi: bool = True, ct_in_hu: bool = False) -> Image:
    """Reads one DICOM file (single- or multi-frame), with or without the 128-byte preamble.

    Stored values go through the modality LUT (Modality LUT sequence, else RescaleSlope /
    RescaleIntercept), giving modality units (HU for CT). With ``apply_voi`` they then go through
    the VOI LUT sequence, else the WindowCenter/WindowWidth window (first value when several; the
    VOILUTFunction is honoured), else a min–max stretch (a constant image gives zeros), to
    [0, 1]. MONOCHROME1 is inverted so that high values are bright. ``ct_in_hu``: a grayscale
    CT (Modality CT) stays in Hounsfield units whatever ``apply_voi`` says (never windowed nor
    inverted), so the data pipeline can apply its own CT window. Grayscale gives [H, W] or
    [F, H, W]; colour gives [H, W, 3] or [F, H, W, 3], scaled to [0, 1] by bit depth when
    ``apply_voi``; PALETTE COLOR is looked up in the file's palette to RGB in [0, 1] (either
    way). Spacing is (row, col) from PixelSpacing / ImagerPixelSpacing, with the frame spacing
    first for multi-frame files (or None when unknown). Only pixels, spacing and modality are
    returned.

    A file without the preamble (a bare data set, with or without the file meta group) is
    accepted when it parses completely and holds an image; anything else is refused with
    reason ``corrupt``.
    """
    p = os.fspath(path)
    ds = _dcmread(p)
    pixels, n_frames = _decode(ds, p, apply_voi, ct_in_hu)
    modality = str(ds.Modality) if ds.get("Modality") else None
    return Image(pixels=pixels, spacing=_spacing(ds, n_frames), modality=modality)


def read_dicom_series(paths_or_dir: PathLike | Iterable[PathLike], *,
                      apply_voi: bool = False, ct_in_hu: bool = False) -> Image:
    """Reads a series of single-frame DICOM slices into a [D, H, W] volume.

    ``paths_or_dir`` is a directory (every regular file in it is read) or a list of files.
    Slices are ordered by ImagePositionPatient projected on the slice normal (the cross
    product of the ImageOrientationPatient row and column directions), ascending; when any slice
    lacks position/orientation they are ordered by InstanceNumber instead. The z spacing is
    the median distance between consecutive positions (SpacingBetweenSlices or SliceThickness
    in the fallback). By default values stay in modality units (HU for CT) so a window can be
    chosen in preprocessing; ``apply_voi`` applies each slice's own window and ``ct_in_hu``
    keeps CT in Hounsfield units (not inverted for MONOCHROME1), as in :func:`read_dicom`.
    """
    if isinstance(paths_or_dir, (str, os.PathLike)):
        d = os.fspath(paths_or_dir)
        if not os.path.isdir(d):
            raise DataError("not a directory of DICOM slices", where=d, reason="missing")
        paths = sorted(os.path.join(d, n) for n in os.listdir(d)
                       if os.path.isfile(os.path.join(d, n)))
        where = d
    else:
        paths = [os.fspath(q) for q in paths_or_dir]
        where = paths[0] if paths else "<empty series>"
    if not paths:
        raise DataError("empty DICOM series", where=where, reason="missing")
    slices = []
    for q in paths:
        ds = _dcmread(q)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError("multi-frame file inside a slice series", where=q,
                            reason="inconsistent_series")
        slices.append((q, ds))
    ordered, z_spacing = _order_slices(slices, where)
    arrays = []
    for q, ds in ordered:
        arr, _ = _decode(ds, q, apply_voi, ct_in_hu)
        if arr.ndim != 2:
            raise DataError(f"series slice has shape {arr.shape}, expected 2D grayscale", where=q,
                            reason="inconsistent_series")
        if arrays and arr.shape != arrays[0].shape:
            raise DataError(f"slice shape {arr.shape} differs from {arrays[0].shape}", where=q,
                            reason="inconsistent_series")
        arrays.append(arr)
    first = ordered[0][1]
    pixel = _spacing(first, None)
    spacing = (z_spacing, *pixel) if pixel is not None and z_spacing is not None else None
    modality = str(first.Modality) if first.get("Modality") else None
    return Image(pixels=np.stack(arrays), spacing=spacing, modality=modality)


def _order_slices(slices: Sequence, where: str) -> tuple[list, float | None]:
    have_geometry = all(ds.get("ImagePositionPatient") is not None
                        and ds.get("ImageOrientationPatient") is not None for _, ds in slices)
    if have_geometry:
        iop = np.asarray(slices[0][1].ImageOrientationPatient, dtype=np.float64)
        for q, ds in slices[1:]:
            if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), iop,
                               atol=1e-4):
                raise DataError("slices of the series have different orientations", where=q,
                                reason="inconsistent_series")
        normal = np.cross(iop[:3], iop[3:])
        pos = np.array([np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)
                        for _, ds in slices])
        order = np.argsort(pos, kind="stable")
        steps = np.diff(pos[order])
        if len(steps) and np.min(steps) < 1e-6:
            raise DataError("two slices of the series share a position", where=where,
                            reason="inconsistent_series")
        z = float(np.median(steps)) if len(steps) else None
    else:
        order = np.argsort([int(ds.get("InstanceNumber", 0) or 0) for _, ds in slices],
                           kind="stable")
        z = None
    ordered = [slices[i] for i in order]
    if z is None:
        ds = ordered[0][1]
        for key in ("SpacingBetweenSlices", "SliceThickness"):
            if ds.get(key) is not None:
                z = float(ds[key].value)
                break
    return ordered, z


# --------------------------------------------------------------------------------------------
# NIfTI.
# --------------------------------------------------------------------------------------------

def read_nifti(path: PathLike, *, target_shape: tuple[int, int, int] | None = None,
               hu_clip: tuple[float, float] | None = None) -> Image:
    """Reads a NIfTI-1/2 volume, reoriented to the closest canonical RAS orientation.

    Axis convention: the canonical voxel axes (i, j, k) point to (R, A, S); the output is
    transposed to [D, H, W] = (S, A, R): ``pixels[z, y, x]`` with z running inferior→superior,
    y posterior→anterior and x from the patient's left toward the patient's right (RAS+).
    ``spacing`` is the header zooms in the same (z, y, x) order.
    The scale factors in the header are applied. A 4D image with a singleton fourth dimension
    is squeezed; anything else that is not 3D is refused (reason ``bad_dimensionality``).
    ``hu_clip=(lo, hi)`` clips values; ``target_shape=(D, H, W)`` resamples trilinearly
    (half-pixel-centre convention, the field of view is kept) and scales the spacing to match.
    """
    import nibabel as nib

    p = _require_file(path)
    try:
        img = nib.load(p)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DataError(f"not a NIfTI image ({type(img).__name__})", where=p,
                            reason="unsupported_format")
        shape = tuple(int(s) for s in img.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise DataError(f"expected a 3D volume, got shape {tuple(img.shape)}", where=p,
                            reason="bad_dimensionality")
        if len(img.shape) > 3:
            img = img.slicer[(slice(None),) * 3 + (0,) * (len(img.shape) - 3)]
        canon = nib.as_closest_canonical(img)
        data = np.asarray(canon.get_fdata(dtype=np.float32))
        zooms = tuple(float(z) for z in canon.header.get_zooms()[:3])
    except DataError:
        raise
    except Exception as e:  # nibabel raises many types on damaged files
        raise DataError(f"cannot read NIfTI file: {e}", where=p, reason="corrupt") from e
    pixels = np.ascontiguousarray(data.transpose(2, 1, 0))
    spacing = zooms[::-1]
    if hu_clip is not None:
        pixels = np.clip(pixels, float(hu_clip[0]), float(hu_clip[1]))
    if target_shape is not None:
        target = tuple(int(s) for s in target_shape)
        if len(target) != 3 or min(target) < 1:
            raise DataError(f"target_shape must be 3 positive ints, got {target_shape}", where=p,
                            reason="bad_dimensionality")
        spacing = tuple(s * n / t for s, n, t in zip(spacing, pixels.shape, target))
        pixels = linear_resize(pixels, target, axes=(0, 1, 2), antialias=False)
    return Image(pixels=pixels.astype(np.float32), spacing=tuple(spacing), modality=None)
