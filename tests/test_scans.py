"""Files in, model inputs out: the inference path against the builder path, and slabs mapped
back to the original file's slices (unimedi_jax/scans.py, inference.Encoder's file methods)."""

import csv

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from configs import pretrain
from data_prep import readers
from unimedi_jax import inference, scans
from unimedi_jax.data import sources, transforms

from test_inference import tiny_run  # noqa: E402  (tests/ is on the path)
from test_readers import anatomy, write_dicom, write_dicom_series, write_nifti  # noqa: E402

# Stored forms larger than the tiny model's inputs (8, 32, 32) and 32, so that the centre crop
# moves the depth by 2 stored slices; an HU window other than data_prep's default.
CT_STORED, XRAY_STORED = (12, 36, 36), 36
HU_WINDOW = (-900.0, 1200.0)
PATCH_DEPTH = 2  # test_inference.VIT's patch_size_3d[0]


def file_config(config):
    config.data.ct.update(stored_size=CT_STORED, crop_size=(8, 32, 32),
                          options={"hu_window": HU_WINDOW})
    config.data.xray.update(stored_size=XRAY_STORED, crop_size=32)
    return config


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    config, params = tiny_run(tmp_path_factory.mktemp("text"))
    return inference.Encoder.from_params(file_config(config), params)


def test_recipe_from_config(enc):
    assert enc.recipe == scans.Recipe(CT_STORED, (8, 32, 32), XRAY_STORED, 32, HU_WINDOW)
    config = file_config(pretrain.get_config())
    del config.data.ct.options["hu_window"]  # builders' default window
    assert scans.Recipe.from_config(config).hu_window == readers.DEFAULT_HU_WINDOW
    with pytest.raises(ValueError, match="does not fit"):
        scans.Recipe(CT_STORED, (16, 32, 32), XRAY_STORED, 32)


def test_builder_and_inference_paths_give_identical_arrays(tmp_path, enc):
    """A NIfTI and a DICOM series at different spacings, a PNG and a DICOM radiograph go
    through the manifest builder (as a run's config builds it) and the evaluation crop, and
    through Encoder.read: the same arrays, bit for bit."""
    raw = tmp_path / "raw"
    raw.mkdir()
    affine = np.diag([1.2, 1.1, 1.5, 1.0])
    write_nifti(raw / "a.nii.gz", anatomy((20, 22, 14), seed=1), affine)  # 1.2 x 1.1 x 1.5 mm
    write_dicom_series(raw / "b", anatomy((16, 12, 10), seed=2))  # 0.7 x 0.8 x 2.5 mm
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 37)).astype(np.uint8)).save(raw / "c.png")
    write_dicom(raw / "d.dcm", rng.integers(0, 4096, (30, 44)).astype(np.uint16))
    rows = [["a.nii.gz", "One."], ["b", "Two."], ["c.png", "Three."], ["d.dcm", "Four."]]
    with open(raw / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "report"], *rows])

    config = enc.config
    checked = 0
    for modality in ("ct", "xray"):
        spec = config.data[modality]
        source = sources.open_split("manifest", modality, "train", data_dir=str(tmp_path / "d"),
                                    stored_size=spec.stored_size,
                                    options={**spec.options, "manifest": str(raw / "m.csv")})
        crop = transforms.CenterCrop(modality, spec.crop_size)
        key = "volume" if modality == "ct" else "image"
        for i in range(len(source)):
            record = source[i]
            built = crop.map(record)[key]
            got_modality, read = enc.read(raw / record["id"].decode())
            assert got_modality == modality
            assert read.dtype == np.float32 and read.shape == built.shape
            np.testing.assert_array_equal(read, built)
            checked += 1
    assert checked == 4
    # The run's HU window is the one applied: the builders' default gives other values.
    default = scans.Recipe(CT_STORED, (8, 32, 32), XRAY_STORED, 32)
    assert not np.array_equal(scans.read_ct(raw / "a.nii.gz", default),
                              enc.read(raw / "a.nii.gz")[1])


# A volume of 24 native slices stored at depth 12, cropped to 8: model-input slab i (2 slices)
# is stored slices [2 + 2i, 4 + 2i), i.e. contract slices [4 + 4i, 8 + 4i) (contract D runs
# head to feet). Native slices [8, 12) are contract slices [12, 16) (slab 2) in a file stored
# feet first (index grows towards the head) and contract slices [8, 12) (slab 1) in a file
# stored head first.
DEPTH, BRIGHT = 24, (8, 12)


@pytest.mark.parametrize("head_first, slab", [(False, 2), (True, 1)])
def test_native_slabs_by_hand(head_first, slab):
    recipe = scans.Recipe(CT_STORED, (8, 32, 32), XRAY_STORED, 32)
    layout = readers.DepthLayout(axis=2, reversed=not head_first, shape=(DEPTH, 40, 40))
    (got,) = scans.native_slabs(layout, recipe, [slab], [0.5], PATCH_DEPTH)
    assert (got.slab, got.start, got.stop, got.axis, got.score) == (slab, *BRIGHT, 2, 0.5)
    # Every slab, both ways: slab i covers contract [4 + 4i, 8 + 4i).
    for i in range(4):
        (s,) = scans.native_slabs(layout, recipe, [i], [0.0], PATCH_DEPTH)
        lo, hi = 4 + 4 * i, 8 + 4 * i
        assert (s.start, s.stop) == ((lo, hi) if head_first else (DEPTH - hi, DEPTH - lo))


def test_native_range_rounds_outwards():
    layout = readers.DepthLayout(axis=0, reversed=False, shape=(10, 4, 4))
    # Stored depth 4 of 10 slices: stored slice j covers [2.5 j, 2.5 (j + 1)).
    assert layout.native_range(0, 1, 4) == (0, 3)
    assert layout.native_range(1, 2, 4) == (2, 5)
    assert layout.native_range(3, 4, 4) == (7, 10)
    assert readers.DepthLayout(0, True, (10, 4, 4)).native_range(1, 2, 4) == (5, 8)
    with pytest.raises(ValueError, match="outside"):
        layout.native_range(3, 5, 4)


def brightest_slabs(volume, k):
    """A stand-in for the encoder's selection: slabs ranked by mean intensity."""
    volume = np.asarray(volume)
    scores = volume.reshape(volume.shape[0] // PATCH_DEPTH, -1).mean(axis=1)
    return np.argsort(-scores)[:k].astype(np.int32), scores


def bright_anatomy(shape_xyz, bright_z):
    """Soft tissue (-100 HU) with a bright (800 HU) slab at voxel z indices `bright_z`."""
    data = np.full(shape_xyz, -100, np.int16)
    data[:, :, slice(*bright_z)] = 800
    return data


@pytest.mark.parametrize("head_first", [False, True])
def test_select_slices_file_finds_a_planted_slab_in_native_slices(tmp_path, enc, monkeypatch,
                                                                   head_first):
    """A NIfTI stored feet first (+z affine) or head first (-z affine), a bright slab at native
    slices [8, 12): the file's reported slab is exactly those slices."""
    affine = np.diag([1.5, 1.5, -2.0 if head_first else 2.0, 1.0])
    path = write_nifti(tmp_path / "v.nii.gz", bright_anatomy((40, 40, DEPTH), BRIGHT), affine)
    assert nib.aff2axcodes(nib.load(path).affine)[2] == ("I" if head_first else "S")
    monkeypatch.setattr(enc, "select_slices", brightest_slabs)
    best = enc.select_slices_file(path, k=2)[0]
    assert (best.start, best.stop, best.axis, best.files) == (*BRIGHT, 2, ())
    assert best.slab == (1 if head_first else 2)


def test_select_slices_file_dicom_series_names_the_slice_files(tmp_path, enc, monkeypatch):
    """A DICOM series (slices sorted by position, file names shuffled): the slab's files are
    those of the planted slices."""
    folder = write_dicom_series(tmp_path / "s", bright_anatomy((16, 16, DEPTH), BRIGHT))
    monkeypatch.setattr(enc, "select_slices", brightest_slabs)
    best = enc.select_slices_file(folder, k=1)[0]
    assert (best.start, best.stop, best.axis) == (*BRIGHT, 2)
    z = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in best.files]
    first_z = min(float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in folder.iterdir())
    np.testing.assert_allclose(sorted(z), first_z + 2.5 * np.arange(*BRIGHT))


def test_select_slices_file_with_the_encoder(tmp_path, enc):
    """The encoder's own selection: k slabs, best first, each the native range of its slab."""
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    path = write_nifti(tmp_path / "v.nii.gz", anatomy((40, 40, DEPTH), seed=4), affine)
    volume = scans.read_ct(path, enc.recipe)
    indices, scores = enc.select_slices(volume, 3)
    slabs = enc.select_slices_file(path, 3)
    assert [s.slab for s in slabs] == list(indices)
    np.testing.assert_allclose([s.score for s in slabs], scores[indices])
    for s in slabs:
        assert (s.start, s.stop) == (DEPTH - 8 - 4 * s.slab, DEPTH - 4 - 4 * s.slab)


def test_embed_files_and_zero_shot_files_match_array_calls(tmp_path, enc):
    write_nifti(tmp_path / "a.nii", anatomy((30, 30, 16), seed=5))
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40), np.uint8)).save(
        tmp_path / "b.png")
    paths = [tmp_path / "b.png", tmp_path / "a.nii"]
    got = enc.embed_files(paths)
    xray, volume = scans.read_xray(paths[0], enc.recipe), scans.read_ct(paths[1], enc.recipe)
    np.testing.assert_allclose(got[0], enc.embed_xray(xray[None])[0], atol=1e-6)
    np.testing.assert_allclose(got[1], enc.embed_ct(volume[None])[0], atol=1e-6)
    prompts = {"effusion": (("Pleural effusion.", "There is an effusion."), "No effusion."),
               "nodule": ("A nodule.", ("No nodule.", "Clear lungs."))}
    scores = enc.zero_shot_files(paths, prompts)
    pos = [enc.encode_report(list(p[0]) if isinstance(p[0], tuple) else [p[0]]).mean(0)
           for p in prompts.values()]
    neg = [enc.encode_report(list(p[1]) if isinstance(p[1], tuple) else [p[1]]).mean(0)
           for p in prompts.values()]
    np.testing.assert_allclose(scores, got @ np.array(pos).T - got @ np.array(neg).T, atol=1e-5)
    with pytest.raises(ValueError, match="cannot tell CT from X-ray"):
        enc.embed_files([tmp_path / "notes.txt"])
