"""Tests for data_prep/readers.py, plus the tiny file writers other data_prep tests reuse."""

import gzip
import itertools
import zlib
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from data_prep import readers

# ----------------------------------------------------------------------------- file writers

# Voxel (x, y, z) -> RAS world (mm) of the reference anatomy: spacing 0.7, 0.8, 2.5 mm.
SPACING_XYZ = np.array([0.7, 0.8, 2.5])
ORIGIN_RAS = np.array([-10.0, 20.0, -30.0])


def anatomy(shape_xyz=(6, 5, 4), seed=0):
    """Random HU array indexed [x, y, z] with x->Right, y->Anterior, z->Superior."""
    return np.random.default_rng(seed).integers(-1000, 1500, shape_xyz).astype(np.int16)


def expected_dhw(data_ras):
    """Contract order (S->I, A->P, R->L) written with plain indexing: dhw[d, h, w]."""
    nx, ny, nz = data_ras.shape
    out = np.empty((nz, ny, nx), data_ras.dtype)
    for d, h, w in itertools.product(range(nz), range(ny), range(nx)):
        out[d, h, w] = data_ras[nx - 1 - w, ny - 1 - h, nz - 1 - d]
    return out


def ras_affine():
    affine = np.diag([*SPACING_XYZ, 1.0])
    affine[:3, 3] = ORIGIN_RAS
    return affine


def write_nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, ras_affine() if affine is None else affine), str(path))
    return Path(path)


def lps_geometry(data_ras):
    """The same anatomy stored LPS-ordered: array [i, j, k] with i->Left, j->Posterior."""
    data_lps = data_ras[::-1, ::-1, :]
    nx, ny, _ = data_ras.shape
    corner_ras = ORIGIN_RAS + SPACING_XYZ * [nx - 1, ny - 1, 0]  # voxel (0, 0, 0) of data_lps
    origin_lps = corner_ras * [-1, -1, 1]
    return data_lps, origin_lps


def write_nrrd(path, data_ras):
    data_lps, origin_lps = lps_geometry(data_ras)
    header = {"space": "left-posterior-superior", "space directions": np.diag(SPACING_XYZ),
              "space origin": origin_lps}
    nrrd.write(str(path), data_lps, header)
    return Path(path)


def write_metaimage(path, data_ras, *, big_endian=False, compressed=False):
    """A .mhd + raw pair, or a single .mha file with LOCAL data when `path` ends with .mha."""
    path = Path(path)
    data_lps, origin_lps = lps_geometry(data_ras)
    dtype = np.dtype(np.int16).newbyteorder(">" if big_endian else "<")
    raw = data_lps.transpose(2, 1, 0).astype(dtype).tobytes()  # x fastest
    if compressed:
        raw = zlib.compress(raw)
    local = path.suffix == ".mha"
    header = "\n".join([
        "ObjectType = Image", "NDims = 3", f"BinaryDataByteOrderMSB = {big_endian}",
        f"CompressedData = {compressed}", "TransformMatrix = 1 0 0 0 1 0 0 0 1",
        "Offset = " + " ".join(map(str, origin_lps)), "AnatomicalOrientation = RAI",
        "ElementSpacing = " + " ".join(map(str, SPACING_XYZ)),
        "DimSize = " + " ".join(map(str, data_lps.shape)), "ElementType = MET_SHORT",
        "ElementDataFile = " + ("LOCAL" if local else path.stem + ".raw")]) + "\n"
    if local:
        path.write_bytes(header.encode() + raw)
    else:
        path.write_text(header)
        path.with_suffix(".raw").write_bytes(raw)
    return path


def write_dicom(path, pixels, *, photometric="MONOCHROME2", slope=None, intercept=None,
                window=None, position=None, orientation=None, pixel_spacing=None,
                series_uid="1.2.3", **extra):
    """One uncompressed single-frame DICOM file holding integer `pixels` (rows, columns)."""
    pixels = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.astype(np.int16 if pixels.dtype.kind == "i" else np.uint16).tobytes()
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.save_as(str(path), enforce_file_format=True)
    return Path(path)


def write_dicom_series(folder, data_ras, *, slope=1.0, intercept=0.0, shuffle_names=True):
    """The anatomy as axial LPS slices (rows->Posterior, columns->Left), stored HU = raw*slope+b.

    File names are shuffled so that only ImagePositionPatient gives the slice order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data_lps, origin_lps = lps_geometry(data_ras)
    nz = data_ras.shape[2]
    names = np.random.default_rng(1).permutation(nz) if shuffle_names else np.arange(nz)
    for k in range(nz):
        raw = np.rint((data_lps[:, :, k].T - intercept) / slope).astype(np.int16)  # (row=j, col=i)
        write_dicom(folder / f"IM{names[k]:04d}.dcm", raw, slope=slope, intercept=intercept,
                    position=origin_lps + [0, 0, SPACING_XYZ[2] * k],
                    orientation=[1, 0, 0, 0, 1, 0],
                    pixel_spacing=[SPACING_XYZ[1], SPACING_XYZ[0]])
    return folder


def write_bytes(path, content: bytes):
    Path(path).write_bytes(content)
    return Path(path)


# ----------------------------------------------------------------------------- volumes

DHW_SPACING = tuple(SPACING_XYZ[::-1])


def test_nifti_ras_is_reordered_to_contract_axes(tmp_path):
    data = anatomy()
    hu, spacing = readers.read_volume(write_nifti(tmp_path / "a.nii.gz", data))
    assert hu.dtype == np.int16 and hu.shape == (4, 5, 6)
    np.testing.assert_array_equal(hu, expected_dhw(data))
    np.testing.assert_allclose(spacing, DHW_SPACING, rtol=1e-6)


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, -1, 1), (1, -1, -1)])
def test_nifti_any_storage_orientation_gives_same_array(tmp_path, perm, flips):
    """The same anatomy stored with permuted and flipped voxel axes reads back identically."""
    data = anatomy()
    stored, affine = data, ras_affine()
    for axis, sign in enumerate(flips):
        if sign < 0:  # flip voxel axis; move origin to the other end
            stored = np.flip(stored, axis)
            affine = affine.copy()
            affine[:3, 3] += affine[:3, axis] * (data.shape[axis] - 1)
            affine[:3, axis] *= -1
    stored = stored.transpose(perm)
    affine = affine.copy()
    affine[:3, :3] = affine[:3, list(perm)]
    hu, spacing = readers.read_volume(write_nifti(tmp_path / "p.nii", stored, affine))
    np.testing.assert_array_equal(hu, expected_dhw(data))
    np.testing.assert_allclose(spacing, DHW_SPACING, rtol=1e-6)


def test_nrrd_metaimage_and_dicom_agree_with_nifti(tmp_path):
    data = anatomy(seed=3) // 2 * 2  # even, so the DICOM copy's slope of 2 stores it exactly
    want = expected_dhw(data)
    paths = [write_nrrd(tmp_path / "v.nrrd", data),
             write_metaimage(tmp_path / "v.mhd", data),
             write_metaimage(tmp_path / "big.mhd", data, big_endian=True),
             write_metaimage(tmp_path / "z.mhd", data, compressed=True),
             write_metaimage(tmp_path / "local.mha", data),
             write_dicom_series(tmp_path / "series", data, slope=2.0, intercept=-1024.0)]
    for path in paths:
        hu, spacing = readers.read_volume(path)
        np.testing.assert_array_equal(hu, want, err_msg=str(path))
        np.testing.assert_allclose(spacing, DHW_SPACING, rtol=1e-5, err_msg=str(path))


def test_nifti_scaling_and_rounding(tmp_path):
    raw = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    image = nib.Nifti1Image(raw, np.eye(4))
    image.header.set_slope_inter(0.5, -1000.0)
    nib.save(image, str(tmp_path / "s.nii"))
    hu, _ = readers.read_volume(tmp_path / "s.nii")
    np.testing.assert_array_equal(hu, expected_dhw(np.rint(raw * 0.5 - 1000.0)))


@pytest.mark.parametrize("make, error, words", [
    (lambda p: p / "missing.nii.gz", FileNotFoundError, "no such file"),
    (lambda p: write_nifti(p / "flat.nii", np.zeros((5, 6), np.float32)), ValueError,
     "expected a 3D volume"),
    (lambda p: write_nifti(p / "one.nii", np.zeros((5, 6, 1), np.float32)), ValueError,
     "expected a 3D volume"),
    (lambda p: write_nifti(p / "nan.nii", np.where(np.arange(60).reshape(3, 4, 5) == 7, np.nan,
                                                   0.0).astype(np.float32)), ValueError,
     "1 NaN"),
    (lambda p: write_bytes(p / "bad.nii.gz", gzip.compress(b"not a nifti")), ValueError,
     "unreadable NIfTI"),
    (lambda p: write_bytes(p / "bad.nrrd", b"garbage"), ValueError, "unreadable NRRD"),
    (lambda p: write_bytes(p / "v.vtk", b"x"), ValueError, "unsupported volume"),
    (lambda p: (p / "empty").mkdir() or p / "empty", ValueError, "empty folder"),
])
def test_volume_errors_name_file_and_problem(tmp_path, make, error, words):
    path = make(tmp_path)
    with pytest.raises(error, match=words) as info:
        readers.read_volume(path)
    assert str(path) in str(info.value)


def test_metaimage_errors(tmp_path):
    data = anatomy()
    path = write_metaimage(tmp_path / "v.mhd", data)
    raw = path.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:-10])
    with pytest.raises(ValueError, match="bytes"):
        readers.read_volume(path)
    raw.unlink()
    with pytest.raises(FileNotFoundError, match="v.raw"):
        readers.read_volume(path)


def test_dicom_series_errors(tmp_path):
    data = anatomy()
    two = write_dicom_series(tmp_path / "two", data)
    write_dicom(two / "other.dcm", np.zeros((5, 6), np.int16), series_uid="9.9",
                position=[0, 0, 0], orientation=[1, 0, 0, 0, 1, 0], pixel_spacing=[1, 1])
    with pytest.raises(ValueError, match="2 DICOM series"):
        readers.read_volume(two)

    gap = write_dicom_series(tmp_path / "gap", anatomy((6, 5, 5)), shuffle_names=False)
    (gap / "IM0002.dcm").unlink()
    with pytest.raises(ValueError, match="missing slices"):
        readers.read_volume(gap)

    junk = write_dicom_series(tmp_path / "junk", data)
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt: not a readable DICOM"):
        readers.read_volume(junk)


def test_slice_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    slices = rng.integers(0, 256, (3, 4, 5)).astype(np.uint8)
    folder = tmp_path / "scan"
    folder.mkdir()
    for number, image in zip([2, 10, 1], slices):  # written out of name order
        Image.fromarray(image).save(folder / f"{number}.png")
    hu, spacing = readers.read_volume(folder)
    lo, hi = readers.DEFAULT_SLICE_IMAGE_HU_WINDOW
    order = [2, 0, 1]  # numbers 1, 2, 10
    want = np.rint(lo + slices[order].astype(np.float64) * (hi - lo) / 255)
    np.testing.assert_array_equal(hu, want.astype(np.int16))
    assert spacing == (1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------- X-rays


def test_read_png_jpg_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (7, 9)).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(readers.read_xray(tmp_path / "g.png"), gray)

    rgb = rng.integers(0, 256, (7, 9, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    luma = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]  # ITU-R 601-2, Pillow's "L"
    out = readers.read_xray(tmp_path / "c.png")
    assert out.dtype == np.uint8 and out.shape == (7, 9)
    assert np.abs(out - luma).max() <= 1.0

    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(tmp_path / "j.jpg", quality=95)
    assert np.abs(readers.read_xray(tmp_path / "j.jpg").astype(int) - 100).max() <= 1


def test_read_16bit_png_uses_full_range(tmp_path):
    pixels = np.array([[0, 1000], [2000, 3000]], np.uint16)
    Image.fromarray(pixels).save(tmp_path / "w.png")
    np.testing.assert_array_equal(readers.read_xray(tmp_path / "w.png"),
                                  np.rint(pixels / 3000 * 255).astype(np.uint8))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_xray_window_and_inversion(tmp_path, photometric):
    pixels = np.array([[0, 100, 200], [300, 400, 4095]], np.uint16)
    path = write_dicom(tmp_path / "x.dcm", pixels, photometric=photometric, slope=1.0,
                       intercept=-100.0, window=(150.0, 200.0))
    out = readers.read_xray(path)
    hu = pixels - 100.0
    want = np.rint(np.clip((hu - 50.0) / 200.0, 0, 1) * 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        want = 255 - want
    np.testing.assert_array_equal(out, want)
    # Without a window the full value range is used.
    plain = write_dicom(tmp_path / "p.dcm", pixels)
    np.testing.assert_array_equal(readers.read_xray(plain),
                                  np.rint(pixels / 4095 * 255).astype(np.uint8))


def test_xray_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        readers.read_xray(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="bad.png: unreadable image"):
        readers.read_xray(tmp_path / "bad.png")
    (tmp_path / "bad.dcm").write_bytes(b"nothing")
    with pytest.raises(ValueError, match="bad.dcm: not a readable DICOM"):
        readers.read_xray(tmp_path / "bad.dcm")
    path = write_dicom(tmp_path / "m.dcm", np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 2
    ds.save_as(path)
    with pytest.raises(ValueError, match="multi-frame"):
        readers.read_xray(path)
    with pytest.raises(ValueError, match="unsupported X-ray format"):
        readers.read_xray(write_nifti(tmp_path / "x.nii", np.zeros((4, 4, 4), np.float32)))


# ----------------------------------------------------------------------------- resizing


def reference_resize(array, size, order):
    """Per-output-voxel float64 interpolation: half-pixel centres, clamped edges."""
    array = np.asarray(array, np.float64)
    out = np.empty(size)
    for index in itertools.product(*map(range, size)):
        coords = [min(max((o + 0.5) * n / s - 0.5, 0), n - 1)
                  for o, n, s in zip(index, array.shape, size)]
        if order == 0:
            out[index] = array[tuple(min(int(np.floor(c + 0.5)), n - 1)
                                     for c, n in zip(coords, array.shape))]
            continue
        value = 0.0
        for corner in itertools.product((0, 1), repeat=array.ndim):
            weight, source = 1.0, []
            for c, n, bit in zip(coords, array.shape, corner):
                low = int(np.floor(c))
                weight *= (c - low) if bit else (1 - (c - low))
                source.append(min(low + bit, n - 1))
            value += weight * array[tuple(source)]
        out[index] = value
    return out


@pytest.mark.parametrize("shape, size", [((5, 7), (9, 3)), ((4, 6, 5), (7, 3, 5)),
                                         ((3, 8, 8), (6, 4, 11))])
@pytest.mark.parametrize("order", [0, 1])
def test_resize_matches_reference(shape, size, order):
    array = np.random.default_rng(0).normal(size=shape) * 100
    got = readers.resize(array, size, order=order, anti_aliasing=False)
    assert got.shape == size and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_resize(array, size, order), rtol=1e-5, atol=1e-4)


def test_resize_anti_aliasing_matches_smooth_then_interpolate():
    """Reference: Gaussian smoothing of all axes at once (float64), then plain interpolation."""
    from scipy import ndimage
    array = np.random.default_rng(1).normal(size=(12, 9, 20)) * 100
    size = (5, 9, 4)  # shrink, keep, shrink
    sigma = [max(0.0, (n / s - 1) / 2) for n, s in zip(array.shape, size)]
    want = reference_resize(ndimage.gaussian_filter(array, sigma, mode="nearest"), size, 1)
    np.testing.assert_allclose(readers.resize(array, size), want, rtol=1e-4, atol=1e-3)


def test_resize_anti_aliasing_removes_checkerboard():
    board = (np.indices((15, 15, 15)).sum(0) % 2) * 1000.0  # Nyquist pattern, mean ~500
    smooth = readers.resize(board, (5, 5, 5))  # factor 3: output centres land on input pixels
    aliased = readers.resize(board, (5, 5, 5), anti_aliasing=False)
    assert np.abs(smooth - 500).max() < 25
    assert np.abs(aliased - 500).max() > 400
    np.testing.assert_allclose(readers.resize(np.full((9, 5), 3.0), (4, 8)), 3.0, rtol=1e-6)


def test_resample_volume_clips_to_window():
    hu = np.full((4, 6, 6), -3000, np.int16)
    hu[:, :, 3:] = 3000
    out = readers.resample_volume(hu, (4, 6, 6))
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out[:, :, :3], -1024)
    np.testing.assert_array_equal(out[:, :, 3:], 2048)
    custom = readers.resample_volume(hu, (2, 3, 3), window=(-100, 100))
    assert custom.shape == (2, 3, 3) and custom.min() >= -100 and custom.max() <= 100
    labels = np.random.default_rng(0).integers(0, 5, (4, 6, 8)).astype(np.int16)
    np.testing.assert_array_equal(readers.resample_volume(labels, (2, 3, 4), order=0, window=None),
                                  reference_resize(labels, (2, 3, 4), 0))


@pytest.mark.parametrize("shape", [(40, 20), (21, 50), (30, 30), (300, 7)])
def test_pad_resize_xray_keeps_aspect_and_centres(shape):
    image = np.random.default_rng(0).integers(1, 256, shape).astype(np.uint8)
    size = 16
    out = readers.pad_resize_xray(image, size)
    assert out.shape == (size, size) and out.dtype == np.uint8
    h, w = shape
    inner = (size, max(1, int(w * size / h))) if h >= w else (max(1, int(h * size / w)), size)
    top, left = (size - inner[0]) // 2, (size - inner[1]) // 2
    want = np.zeros((size, size), np.uint8)
    want[top:top + inner[0], left:left + inner[1]] = np.rint(
        np.clip(readers.resize(image, inner), 0, 255))
    np.testing.assert_array_equal(out, want)
    assert (out[top:top + inner[0], left:left + inner[1]] > 0).all()  # image spans the inner box
