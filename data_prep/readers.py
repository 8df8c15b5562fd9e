"""Readers for medical image files and the resizing used before storage.

Volumes come back as int16 HU arrays in the axis order of docs/CONTRACTS.md,
(D, H, W) = (superior->inferior, anterior->posterior, patient's right->left), whatever the
orientation stored in the file: an axial slice looks as on a radiology viewer and a coronal
projection as on a radiograph (the patient's right on the viewer's left), like the phantom's
volumes. X-rays come back as uint8 (H, W) in display orientation.

Supported inputs:
- volumes: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mhd + raw/zraw, .mha),
  a folder holding one DICOM series, or a folder of 2D slice images (PNG/JPG, ordered by the
  number in their file names, 8-bit values mapped linearly onto a HU window).
- X-rays: PNG, JPG, BMP, TIFF (Pillow) and single-frame DICOM.

Every problem raises FileNotFoundError or ValueError with the file name and what is wrong.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pydicom.errors
from pydicom.multival import MultiValue
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

# Clip range for stored CT intensities: air (-1024 HU) to dense bone/contrast (2048 HU).
DEFAULT_HU_WINDOW = (-1024.0, 2048.0)
# HU range that the 0..255 grey values of exported slice images stand for: the standard lung
# window (level -600, width 1500), the usual way chest CT slices are exported to 8-bit images.
DEFAULT_SLICE_IMAGE_HU_WINDOW = (-1350.0, 150.0)
# Uniformity tolerance for DICOM slice gaps, relative to the median gap (larger: missing slices).
SLICE_GAP_TOLERANCE = 0.1

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mhd", ".mha")
_INT16 = np.iinfo(np.int16)


def suffix_of(path: str | Path) -> str:
    """Lower-case file suffix, treating `.nii.gz` as one suffix."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


# ----------------------------------------------------------------------------- volumes


def read_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reads a CT volume.

    Returns `(hu, spacing)`: `hu` int16 (D, H, W) in the contract axis order, `spacing` the voxel
    size in mm along (D, H, W) ((1, 1, 1) for slice-image folders, which carry no geometry).
    """
    hu, spacing, _ = read_volume_layout(path)
    return hu, spacing


@dataclasses.dataclass(frozen=True)
class DepthLayout:
    """Where the contract depth axis D (superior -> inferior) lies in the file as stored.

    `axis`: the axis of the file's own voxel array that becomes D (NIfTI/NRRD/MetaImage: the
    array index order of the file; a DICOM series: axis 2, its slices in order along their
    normal, as listed in `files`; a folder of slice images: axis 0, the images in the order of
    the numbers in their names). `reversed`: the native index grows towards the head, so that
    D = depth - 1 - native index. `shape`: the (D, H, W) read. `files`: the file of each native
    slice of a folder (empty for a single file).
    """

    axis: int
    reversed: bool
    shape: tuple[int, int, int]
    files: tuple[str, ...] = ()

    @property
    def depth(self) -> int:
        return self.shape[0]

    def native_range(self, start: int, stop: int, stored_depth: int) -> tuple[int, int]:
        """Native slices [a, b) along `axis` behind slices [start, stop) of this volume resized
        along D to `stored_depth` by `resize` (pixel centres aligned: resized slice j covers D
        coordinates [j, j + 1) * depth / stored_depth)."""
        if not 0 <= start < stop <= stored_depth:
            raise ValueError(f"slices [{start}, {stop}) lie outside 0..{stored_depth}")
        n = self.depth
        lo, hi = start * n // stored_depth, -(-stop * n // stored_depth)  # floor, ceil
        return (n - hi, n - lo) if self.reversed else (lo, hi)


def read_volume_layout(path: str | Path
                       ) -> tuple[np.ndarray, tuple[float, float, float], DepthLayout]:
    """`read_volume` plus the `DepthLayout` that maps D back to the file's own slices."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    files: list[Path] = []
    if path.is_dir():
        files = _folder_files(path)
        if files and all(suffix_of(f) in IMAGE_SUFFIXES for f in files):
            files = _slice_image_order(files)
            hu = _read_slice_images(path, files)
            return hu, (1.0, 1.0, 1.0), DepthLayout(0, False, hu.shape, tuple(map(str, files)))
        data, affine, files = _load_dicom_series(path, files)
    else:
        loaders = {".nii": _load_nifti, ".nii.gz": _load_nifti, ".nrrd": _load_nrrd,
                   ".nhdr": _load_nrrd, ".mhd": _load_metaimage, ".mha": _load_metaimage}
        loader = loaders.get(suffix_of(path))
        if loader is None:
            raise ValueError(f"{path}: unsupported volume format {suffix_of(path)!r}; expected one "
                             f"of {', '.join(VOLUME_SUFFIXES)} or a DICOM series folder")
        data, affine = loader(path)
    hu, spacing, (axis, towards_head) = _to_contract_axes(data, affine, path)
    return hu, spacing, DepthLayout(axis, towards_head, hu.shape, tuple(map(str, files)))


def _to_contract_axes(data: np.ndarray, affine: np.ndarray, path: Path):
    """Checks a volume in voxel order (i, j, k) with a voxel->RAS affine.

    Returns (hu, spacing, (axis, towards_head)): the voxel axis that becomes D, and whether its
    index grows towards the head (then D runs against it).
    """
    data = _checked_array(data, path, ndim=3, what="3D volume")
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    ras = np.asarray(canonical.dataobj)  # axes point to Right, Anterior, Superior
    dhw = ras.transpose(2, 1, 0)[::-1, ::-1, ::-1]  # (S->I, A->P, R->L)
    spacing = nib.affines.voxel_sizes(canonical.affine)[::-1]
    hu = np.clip(np.rint(dhw), _INT16.min, _INT16.max).astype(np.int16)
    # Row i: (RAS axis, +-1) of voxel axis i, the orientation as_closest_canonical applies.
    orientation = nib.orientations.io_orientation(affine)
    axis = int(np.flatnonzero(orientation[:, 0] == 2)[0])
    return hu, tuple(float(s) for s in spacing), (axis, bool(orientation[axis, 1] > 0))


def _checked_array(data: np.ndarray, path: Path, ndim: int, what: str) -> np.ndarray:
    """Drops trailing singleton axes and rejects empty, wrong-rank or non-finite arrays."""
    data = np.asarray(data, dtype=np.float32)
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    if data.size == 0:
        raise ValueError(f"{path}: empty image (shape {data.shape})")
    if data.ndim != ndim or min(data.shape) < 2:
        raise ValueError(f"{path}: expected a {what}, got an array of shape {data.shape}")
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise ValueError(f"{path}: {bad} NaN/infinite voxels")
    return data


def _load_nifti(path: Path):
    try:
        image = nib.load(path)
        return image.get_fdata(dtype=np.float32), image.affine
    except Exception as e:  # nibabel raises many types (ImageFileError, EOFError, zlib.error...)
        raise ValueError(f"{path}: unreadable NIfTI file ({type(e).__name__}: {e})") from e


# NRRD space names to the sign that turns that axis into R, A or S.
_SPACE_SIGN = {"right": 1, "left": -1, "anterior": 1, "posterior": -1, "superior": 1,
               "inferior": -1}
_SPACE_ABBREVIATIONS = {"ras": "right-anterior-superior", "las": "left-anterior-superior",
                        "lps": "left-posterior-superior"}


def _load_nrrd(path: Path):
    try:
        data, header = nrrd.read(str(path))  # axis order of the header ("F" index order)
    except Exception as e:
        raise ValueError(f"{path}: unreadable NRRD file ({type(e).__name__}: {e})") from e
    if "space directions" in header:
        directions = np.asarray(header["space directions"], dtype=np.float64)
        if directions.shape != (data.ndim, 3) or not np.isfinite(directions).all():
            raise ValueError(f"{path}: expected a 3D scalar volume with three spatial axes, got "
                             f"data of shape {data.shape} with space directions {directions}")
        space = str(header.get("space", "right-anterior-superior")).lower()
        space = _SPACE_ABBREVIATIONS.get(space, space)
        names = space.split("-")
        if len(names) != 3 or not all(n in _SPACE_SIGN for n in names):
            raise ValueError(f"{path}: unsupported NRRD space {header.get('space')!r}")
        signs = np.array([_SPACE_SIGN[n] for n in names], dtype=np.float64)
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    else:  # no geometry: axes taken as R, A, S with the given spacings
        if data.ndim != 3:
            raise ValueError(f"{path}: expected a 3D volume, got an array of shape {data.shape}")
        directions = np.diag(np.asarray(header.get("spacings", np.ones(3)), np.float64))
        signs, origin = np.ones(3), np.zeros(3)
    affine = np.eye(4)
    affine[:3, :3] = signs[:, None] * directions.T
    affine[:3, 3] = signs * origin
    return data, affine


_MET_TYPES = {"MET_CHAR": np.int8, "MET_UCHAR": np.uint8, "MET_SHORT": np.int16,
              "MET_USHORT": np.uint16, "MET_INT": np.int32, "MET_UINT": np.uint32,
              "MET_LONG": np.int32, "MET_ULONG": np.uint32, "MET_LONG_LONG": np.int64,
              "MET_ULONG_LONG": np.uint64, "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64}
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _load_metaimage(path: Path):
    """MetaImage (.mhd header + separate raw data, or .mha with LOCAL data) without SimpleITK.

    Geometry as ITK reads it: axis i points along row i of TransformMatrix, world space LPS.
    """
    content = path.read_bytes()
    header, data_start = {}, None
    for match in re.finditer(rb"[^\n]*\n?", content):
        line = match.group().decode("latin-1").strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: malformed MetaImage header line {line!r}")
        header[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            data_start = match.end()
            break
    try:
        ndims = int(header["NDims"])
        shape = [int(v) for v in header["DimSize"].split()]
        dtype = np.dtype(_MET_TYPES[header["ElementType"]])
        data_file = header["ElementDataFile"]
    except KeyError as e:
        raise ValueError(f"{path}: MetaImage header lacks or has an unknown {e}") from e
    if ndims != 3 or len(shape) != 3 or int(header.get("ElementNumberOfChannels", 1)) != 1:
        raise ValueError(f"{path}: expected a 3D scalar volume, got NDims={ndims} "
                         f"DimSize={shape}")
    if data_file == "LOCAL":
        raw = content[data_start:]
    else:
        raw_path = path.parent / data_file
        if not raw_path.is_file():
            raise FileNotFoundError(f"{path}: its data file {raw_path} does not exist")
        raw = raw_path.read_bytes()
    if header.get("CompressedData", "False").lower() == "true":
        try:
            raw = zlib.decompress(raw)
        except zlib.error as e:
            raise ValueError(f"{path}: corrupt compressed data ({e})") from e
    msb = header.get("BinaryDataByteOrderMSB", header.get("ElementByteOrderMSB", "False"))
    dtype = dtype.newbyteorder(">" if msb.lower() == "true" else "<")
    expected = int(np.prod(shape)) * dtype.itemsize
    header_size = int(header.get("HeaderSize", 0))
    raw = raw[-expected:] if header_size == -1 else raw[header_size:]
    if len(raw) != expected:
        raise ValueError(f"{path}: data holds {len(raw)} bytes, DimSize {shape} of "
                         f"{header['ElementType']} needs {expected}")
    data = np.frombuffer(raw, dtype=dtype).reshape(shape[::-1]).transpose(2, 1, 0)
    spacing = [float(v) for v in header.get("ElementSpacing", "1 1 1").split()]
    matrix = [float(v) for v in header.get("TransformMatrix", "1 0 0 0 1 0 0 0 1").split()]
    offset = [float(v) for v in header.get("Offset", header.get("Position", "0 0 0")).split()]
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS[:, None] * (np.reshape(matrix, (3, 3)).T * spacing)
    affine[:3, 3] = _LPS_TO_RAS * offset
    return data, affine


def _folder_files(folder: Path) -> list[Path]:
    """Regular, non-hidden files of a folder other than DICOMDIR indexes, sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")


def _load_dicom_series(folder: Path, files: list[Path]):
    """Stacks one DICOM series, sorted along the slice normal.

    Returns (data, voxel->RAS affine, the files in stacking order: data[:, :, n] is files[n]).
    """
    if not files:
        raise ValueError(f"{folder}: empty folder, expected a DICOM series or slice images")
    slices = [_read_dicom(f) for f in files]
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in slices}
    if len(series) > 1:
        raise ValueError(f"{folder}: holds {len(series)} DICOM series; put each in its own folder")
    try:
        orientation = np.array([float(v) for v in slices[0].ImageOrientationPatient])
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
        row_step, col_step = (float(v) for v in slices[0].PixelSpacing)
    except AttributeError as e:
        raise ValueError(f"{folder}: DICOM slices lack geometry ({e})") from e
    for ds, f in zip(slices, files):
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], orientation, atol=1e-4):
            raise ValueError(f"{f}: ImageOrientationPatient differs from the rest of {folder}")
    along_row, along_col = orientation[:3], orientation[3:]
    order = np.argsort(positions @ np.cross(along_row, along_col))
    positions = positions[order]
    gaps = np.linalg.norm(np.diff(positions, axis=0), axis=1)
    if len(gaps) and gaps.min() <= 0:
        raise ValueError(f"{folder}: two slices share one position")
    if len(gaps) and np.abs(gaps - np.median(gaps)).max() > SLICE_GAP_TOLERANCE * np.median(gaps):
        raise ValueError(f"{folder}: slice gaps vary from {gaps.min():.3g} to {gaps.max():.3g} mm "
                         "(missing slices?)")
    pixels = [_dicom_pixels(slices[i], files[i]) for i in order]
    if len({p.shape for p in pixels}) > 1:
        raise ValueError(f"{folder}: slices differ in size: {sorted({p.shape for p in pixels})}")
    data = np.stack(pixels).transpose(2, 1, 0)  # (column, row, slice)
    step = (positions[-1] - positions[0]) / max(len(pixels) - 1, 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = (along_row * col_step, along_col * row_step,
                                                      step, positions[0])
    return data, np.diag([*_LPS_TO_RAS, 1.0]) @ lps, [files[i] for i in order]


def _read_dicom(path: Path) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable DICOM file ({e})") from e
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM file has no pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{path}: multi-frame DICOM is not supported")
    return ds


def _dicom_pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """Pixel values after the modality rescale (HU for CT), float32 (rows, columns)."""
    try:
        pixels = ds.pixel_array
    except Exception as e:  # missing decoders, truncated data
        raise ValueError(f"{path}: cannot decode DICOM pixels ({e}); compressed transfer "
                         "syntaxes need pylibjpeg or GDCM") from e
    if pixels.ndim != 2:
        raise ValueError(f"{path}: expected single-channel pixels, got shape {pixels.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return pixels.astype(np.float32) * slope + intercept


def _slice_image_order(files: list[Path]) -> list[Path]:
    """Slice images ordered by the last number in their names (then by name)."""
    def number(p: Path):
        digits = re.findall(r"\d+", p.stem)
        return (int(digits[-1]) if digits else -1, p.name)
    return sorted(files, key=number)


def _read_slice_images(folder: Path, files: list[Path],
                       hu_window=DEFAULT_SLICE_IMAGE_HU_WINDOW) -> np.ndarray:
    """Stacks 8-bit axial slice images into int16 HU (D, H, W).

    The images carry no geometry: slices are taken cranio-caudal in the order of the number in
    their file names, each in radiological display orientation (anterior up, the patient's right
    on the image's left), which is already the contract's (H, W) order.
    """
    slices = [_read_pillow(f) for f in _slice_image_order(files)]
    shapes = sorted({s.shape for s in slices})
    if len(shapes) > 1:
        raise ValueError(f"{folder}: slice images differ in size: {shapes}")
    stack = _checked_array(np.stack(slices), folder, ndim=3, what="3D stack of slice images")
    lo, hi = hu_window
    return np.rint(lo + stack * ((hi - lo) / 255.0)).astype(np.int16)


# ----------------------------------------------------------------------------- X-rays


def read_xray(path: str | Path) -> np.ndarray:
    """Reads a 2D X-ray as uint8 (H, W), bright = dense (MONOCHROME1 DICOMs are inverted)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = suffix_of(path)
    if suffix in IMAGE_SUFFIXES:
        return _read_pillow(path)
    if suffix in DICOM_SUFFIXES or not suffix:
        return _read_dicom_xray(path)
    raise ValueError(f"{path}: unsupported X-ray format {suffix!r}; expected one of "
                     f"{', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)}")


def _read_pillow(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit: full range
                pixels = _checked_array(np.asarray(image), path, ndim=2, what="2D image")
                return window_to_uint8(pixels, pixels.min(), pixels.max())
            pixels = np.asarray(image if image.mode == "L" else image.convert("L"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable image ({e})") from e
    _checked_array(pixels, path, ndim=2, what="2D image")
    return pixels


def _read_dicom_xray(path: Path) -> np.ndarray:
    ds = _read_dicom(path)
    pixels = _checked_array(_dicom_pixels(ds, path), path, ndim=2, what="2D image")
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:  # linear VOI window, first if several
        center = float(center[0] if isinstance(center, MultiValue) else center)
        width = float(width[0] if isinstance(width, MultiValue) else width)
        image = window_to_uint8(pixels, center - width / 2, center + width / 2)
    else:
        image = window_to_uint8(pixels, pixels.min(), pixels.max())
    return 255 - image if ds.get("PhotometricInterpretation") == "MONOCHROME1" else image


def window_to_uint8(pixels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Maps [lo, hi] linearly onto 0..255 (clipped); a flat image (hi <= lo) becomes zeros."""
    if hi <= lo:
        return np.zeros(pixels.shape, np.uint8)
    scaled = (np.asarray(pixels, np.float64) - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)


# ----------------------------------------------------------------------------- resizing


def resize(array: np.ndarray, size, *, order: int = 1, anti_aliasing: bool = True) -> np.ndarray:
    """Resizes an N-D array to `size` (float32), pixel centres aligned (align_corners=False).

    order 1: separable linear interpolation, edges clamped; with `anti_aliasing`, axes that
    shrink are first smoothed by a Gaussian of sigma (in/out - 1) / 2 input pixels
    (scikit-image's rule). order 0: nearest neighbour (for label maps). Axes are done one at a
    time, the most shrinking first, which gives the same result as smoothing all axes first.
    """
    array = np.asarray(array, np.float32)
    size = tuple(int(s) for s in size)
    if len(size) != array.ndim or min(size) < 1:
        raise ValueError(f"resize: size {size} does not fit an array of shape {array.shape}")
    if order not in (0, 1):
        raise ValueError(f"resize: order must be 0 or 1, got {order}")
    for axis in sorted(range(array.ndim), key=lambda a: size[a] / array.shape[a]):
        n, s = array.shape[axis], size[axis]
        coords = np.clip((np.arange(s) + 0.5) * (n / s) - 0.5, 0, n - 1)
        if order == 0:
            array = np.take(array, np.minimum(np.floor(coords + 0.5), n - 1).astype(int), axis)
            continue
        if anti_aliasing and n > s:
            array = ndimage.gaussian_filter1d(array, (n / s - 1) / 2, axis=axis, mode="nearest")
        low = np.floor(coords).astype(int)
        high = np.minimum(low + 1, n - 1)
        weight = (coords - low).astype(np.float32).reshape([-1] + [1] * (array.ndim - axis - 1))
        array = np.take(array, low, axis) * (1 - weight) + np.take(array, high, axis) * weight
    return array


def resample_volume(hu: np.ndarray, size=(32, 128, 128), *, window=DEFAULT_HU_WINDOW,
                    order: int = 1) -> np.ndarray:
    """Clips HU to `window` and resizes (D, H, W) to `size`; int16. order 0 for label volumes."""
    volume = np.asarray(hu, np.float32)
    if window is not None:
        volume = np.clip(volume, *window)
    return np.rint(resize(volume, size, order=order)).astype(np.int16)


def pad_resize_xray(image: np.ndarray, size: int = 256, *, order: int = 1) -> np.ndarray:
    """Resizes the longer side to `size` keeping the aspect ratio, then zero-pads to centred
    (size, size) uint8 (the MGCA X-ray preprocessing). order 0 for masks."""
    h, w = image.shape
    scale = size / max(h, w)
    shape = (size, max(1, int(w * scale))) if h >= w else (max(1, int(h * scale)), size)
    resized = np.rint(np.clip(resize(image, shape, order=order), 0, 255)).astype(np.uint8)
    pad = [(d // 2, d - d // 2) for d in (size - shape[0], size - shape[1])]
    return np.pad(resized, pad)


# ----------------------------------------------------------------------------- stored forms
# The one path from a file to its stored form: the data builders (data_prep/records.py) and
# file-level inference (unimedi_jax/scans.py) both call these, so the two cannot drift apart.


def infer_modality(path: str | Path) -> str | None:
    """"ct" for folders and volume files, "xray" for 2D image files and single DICOM files
    (also files without a suffix); None when the file type does not tell."""
    path = Path(path)
    suffix = suffix_of(path)
    if path.is_dir() or suffix in VOLUME_SUFFIXES:
        return "ct"
    if suffix in IMAGE_SUFFIXES + DICOM_SUFFIXES or (path.is_file() and not suffix):
        return "xray"
    return None


def stored_ct(path: str | Path, size, *, window=DEFAULT_HU_WINDOW
              ) -> tuple[np.ndarray, DepthLayout]:
    """A CT file in its stored form: int16 HU (D, H, W) = `size`, read in the contract axis
    order, clipped to `window` and resized (`resample_volume`); with the file's `DepthLayout`."""
    hu, _, layout = read_volume_layout(path)
    return resample_volume(hu, size, window=window), layout


def stored_xray(path: str | Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An X-ray file in its stored form: uint8 (size, size) (`pad_resize_xray`); with the
    (H, W) of the image read."""
    image = read_xray(path)
    return pad_resize_xray(image, size), image.shape
