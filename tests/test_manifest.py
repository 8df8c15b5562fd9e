"""Tests for data_prep/manifest.py and the shared record builder of data_prep/records.py."""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from data_prep import manifest, readers, records

sys.path.insert(0, str(Path(__file__).parent))
from test_readers import (  # noqa: E402
    anatomy, write_dicom, write_dicom_series, write_nifti, write_nrrd)

CT_SIZE = (8, 32, 32)
XRAY_SIZE = 32
LABELS = ["effusion", "nodule"]


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def files(tmp_path):
    """A folder of tiny CTs (NIfTI, NRRD, DICOM series) and X-rays (PNG, DICOM)."""
    raw = tmp_path / "raw"
    (raw / "ct").mkdir(parents=True)
    write_nifti(raw / "ct" / "a.nii.gz", anatomy((16, 16, 8), seed=1))
    write_nrrd(raw / "ct" / "b.nrrd", anatomy((16, 12, 8), seed=2))
    write_dicom_series(raw / "ct" / "c", anatomy((12, 16, 6), seed=3))
    rng = np.random.default_rng(0)
    (raw / "xr").mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 30)).astype(np.uint8)).save(raw / "xr" / "a.png")
    write_dicom(raw / "xr" / "b.dcm", rng.integers(0, 4096, (24, 16)).astype(np.uint16))
    return raw


GOOD_ROWS = [
    ["ct/a.nii.gz", "Small left  effusion.\nNo nodule.", "train", "1", "0"],
    ["ct/b.nrrd", "Nodule in the right upper lobe.", "", "0", ""],
    ["ct/c", "Clear lungs.", "test", "", "1.5"],
    ["xr/a.png", "Normal chest.", "validation", "0", "0"],
    ["xr/b.dcm", "Effusion.", "train", "1", "-1"],
]
HEADER = ["path", "report", "split", *LABELS]


def build(data_dir, csv_path, modality, **options):
    builder = manifest.make_builder(data_dir, manifest=str(csv_path), modality=modality,
                                    ct_size=CT_SIZE, xray_size=XRAY_SIZE, **options)
    builder.download_and_prepare()
    return builder


def read_all(builder, split):
    source = builder.as_data_source(split)
    return {r["id"].decode(): r for r in (source[i] for i in range(len(source)))}


def test_ct_and_xray_configs_hold_the_right_records(tmp_path, files):
    csv_path = write_csv(files / "manifest.csv", HEADER, GOOD_ROWS)
    ct = build(tmp_path / "out", csv_path, "ct")
    xray = build(tmp_path / "out", csv_path, "xray")
    assert ct.info.full_name == "manifest/ct/1.0.0" and xray.info.full_name == "manifest/xray/1.0.0"
    assert {s: ct.info.splits[s].num_examples for s in ct.info.splits} == {"train": 2, "test": 1}
    assert {s: xray.info.splits[s].num_examples for s in xray.info.splits} == {
        "train": 1, "validation": 1}

    # Read back without the builder code, as the data pipelines do.
    stored = tfds.builder_from_directory(ct.data_dir)
    assert stored.info.metadata["label_names"] == LABELS
    records = {**read_all(stored, "train"), **read_all(stored, "test")}
    assert sorted(records) == ["ct/a.nii.gz", "ct/b.nrrd", "ct/c"]
    for name, record in records.items():
        assert record["volume"].dtype == np.int16 and record["volume"].shape == CT_SIZE
        want = readers.resample_volume(readers.read_volume(files / name)[0], CT_SIZE)
        np.testing.assert_array_equal(record["volume"], want)
    assert records["ct/a.nii.gz"]["report"].decode() == "Small left effusion. No nodule."
    np.testing.assert_array_equal(records["ct/a.nii.gz"]["labels"], [1, 0])
    np.testing.assert_array_equal(records["ct/b.nrrd"]["labels"], [0, -1])
    np.testing.assert_array_equal(records["ct/c"]["labels"], [-1, 1.5])

    images = {**read_all(xray, "train"), **read_all(xray, "validation")}
    for name, record in images.items():
        assert record["image"].dtype == np.uint8 and record["image"].shape == (XRAY_SIZE,) * 2
        want = readers.pad_resize_xray(readers.read_xray(files / name), XRAY_SIZE)
        np.testing.assert_array_equal(record["image"], want)
    np.testing.assert_array_equal(images["xr/b.dcm"]["labels"], [1, -1])


def test_box_column(tmp_path, files):
    rows = [[*r, "2 4 10 6; 0 0 3 3" if r[0] == "xr/a.png" else ""] for r in GOOD_ROWS]
    csv_path = write_csv(files / "manifest.csv", HEADER + ["boxes"], rows)
    xray = tfds.builder_from_directory(build(tmp_path / "out", csv_path, "xray").data_dir)
    assert xray.info.metadata["label_names"] == LABELS  # `boxes` is not a label
    a = read_all(xray, "validation")["xr/a.png"]
    # 20 x 30 -> 21 x 32 (scale 32 / 30), padded by 5 rows above.
    scale, top = XRAY_SIZE / 30, (XRAY_SIZE - int(20 * XRAY_SIZE / 30)) // 2
    sy = int(20 * XRAY_SIZE / 30) / 20
    np.testing.assert_allclose(a["boxes"], [[2 * scale, 4 * sy + top, 12 * scale, 10 * sy + top],
                                            [0, top, 3 * scale, 3 * sy + top]], rtol=1e-5)
    assert a["mask"].max() == 1 and read_all(xray, "train")["xr/b.dcm"]["boxes"].shape == (0, 4)
    assert "boxes" not in read_all(build(tmp_path / "ct", csv_path, "ct"), "train")["ct/b.nrrd"]
    bad = write_csv(files / "bad.csv", HEADER + ["boxes"], [[*GOOD_ROWS[3], "1 2 3"]])
    with pytest.raises(records.BadRowsError, match="'x y w h'"):
        build(tmp_path / "bad", bad, "xray")


def test_modality_column_and_inference(tmp_path, files):
    mixed = write_csv(files / "m.csv", HEADER, GOOD_ROWS)
    both = manifest.make_builder(tmp_path / "out", manifest=str(mixed))
    assert [b.info.full_name for b in both] == ["manifest/ct/1.0.0", "manifest/xray/1.0.0"]
    nothing_good = write_csv(files / "bad.csv", HEADER, [["missing.png", "r", "", "0", "0"]])
    with pytest.raises(records.BadRowsError, match="row 1 .*missing.png: file not found"):
        manifest.make_builder(tmp_path / "out", manifest=str(nothing_good))
    only_xray = write_csv(files / "x.csv", ["path", "report", "modality"],
                          [["xr/a.png", "Normal.", "XRAY"]])
    builder = manifest.make_builder(tmp_path / "out", manifest=str(only_xray), xray_size=16)
    assert builder.modality == "xray" and builder.info.metadata["label_names"] == []
    assert readers.infer_modality(files / "ct" / "c") == "ct"
    assert readers.infer_modality(files / "xr" / "b.dcm") == "xray"
    assert readers.infer_modality(files / "notes.txt") is None


def test_every_bad_row_is_listed_and_nothing_is_written(tmp_path, files):
    nan = np.zeros((8, 8, 8), np.float32)
    nan[1, 2, 3] = np.nan
    write_nifti(files / "ct" / "nan.nii", nan)
    write_nifti(files / "ct" / "flat.nii", np.zeros((8, 8), np.float32))
    (files / "ct" / "broken.nii.gz").write_bytes(b"not gzip at all")
    (files / "notes.txt").write_text("not an image")
    rows = GOOD_ROWS[:2] + [
        ["ct/missing.nii.gz", "Report.", "train", "0", "0"],       # row 3: missing file
        ["ct/broken.nii.gz", "Report.", "train", "0", "0"],        # row 4: unreadable
        ["ct/flat.nii", "Report.", "train", "0", "0"],             # row 5: 2D volume
        ["ct/a.nii.gz", "Duplicate.", "train", "0", "0"],          # row 6: same path as row 1
        ["ct/c", "   ", "train", "0", "0"],                        # row 7: empty report
        ["ct/nan.nii", "Report.", "train", "0", "0"],              # row 8: NaN voxels
        ["ct/b.nrrd", "Report.", "holdout", "0", "0"],             # row 9: unknown split
        ["ct/c", "Report.", "train", "yes", "0"],                  # row 10: non-numeric label
        ["notes.txt", "Report.", "train", "0", "0"],               # row 11: unknown type
        ["xr/missing.png", "", "train", "0", "0"],                 # X-ray row: not this build
    ]
    csv_path = write_csv(files / "bad.csv", HEADER, rows)
    data_dir = tmp_path / "out"
    with pytest.raises(records.BadRowsError) as info:
        build(data_dir, csv_path, "ct")
    message = str(info.value)
    expected = {3: "file not found", 4: "unreadable NIfTI", 5: "expected a 3D volume",
                6: "same path as row 1", 7: "empty report", 8: "NaN", 9: "unknown split",
                10: "not a finite number", 11: "cannot tell CT from X-ray"}
    assert f"{len(expected)} bad row(s)" in message
    for number, reason in expected.items():
        line = next(x for x in message.splitlines() if x.strip().startswith(f"row {number} "))
        assert reason in line and str(files / rows[number - 1][0]) in line, line
    assert "xr/missing.png" not in message
    assert not list(data_dir.rglob("dataset_info.json"))
    assert not manifest.make_builder(data_dir, manifest=str(csv_path), modality="ct",
                                     ct_size=CT_SIZE).is_prepared()

    # skip_bad_rows leaves them out and lists them in the metadata.
    builder = build(data_dir, csv_path, "ct", skip_bad_rows=True)
    stored = tfds.builder_from_directory(builder.data_dir)
    assert stored.info.splits["train"].num_examples == 2
    skipped = stored.info.metadata["skipped"]
    assert sorted(int(s["where"].split()[1]) for s in skipped) == sorted(expected)
    assert all(s["path"] and s["reason"] for s in skipped)


def test_failure_while_writing_leaves_no_complete_dataset(tmp_path, files, monkeypatch):
    csv_path = write_csv(files / "manifest.csv", HEADER, GOOD_ROWS)
    builder = manifest.make_builder(tmp_path / "out", manifest=str(csv_path), modality="ct",
                                    ct_size=CT_SIZE)
    calls = []

    def fail_on_third(example, spec):
        calls.append(example.id)
        if len(calls) == 3 + 3:  # after the up-front check of three rows, the third write
            raise ValueError(f"{example.path}: disk trouble")
        return real_encode(example, spec)

    real_encode = records.encode
    monkeypatch.setattr(records, "encode", fail_on_third)
    with pytest.raises(ValueError, match="disk trouble"):
        builder.download_and_prepare()
    assert not list((tmp_path / "out").rglob("dataset_info.json"))
    assert not list((tmp_path / "out").rglob("*.array_record*"))
    assert not builder.is_prepared()


def test_reuse_checks_options(tmp_path, files):
    csv_path = write_csv(files / "manifest.csv", HEADER, GOOD_ROWS)
    build(tmp_path / "out", csv_path, "xray")
    again = build(tmp_path / "out", csv_path, "xray")  # same options: reused
    assert again.is_prepared()
    with pytest.raises(ValueError, match="built with options"):
        manifest.make_builder(tmp_path / "out", manifest=str(csv_path), modality="xray",
                              xray_size=XRAY_SIZE + 1)
    write_csv(csv_path, HEADER, GOOD_ROWS[3:4])
    with pytest.raises(ValueError, match="built with options"):
        manifest.make_builder(tmp_path / "out", manifest=str(csv_path), modality="xray",
                              xray_size=XRAY_SIZE)


def test_flags_and_default_manifest_location(tmp_path, files):
    write_csv(files / "manifest.csv", HEADER, GOOD_ROWS)
    try:
        flags.FLAGS(["prog", "--ct_size=4,8,8", "--manifest_modality=ct", "--hu_window=-500,500"])
        builder = manifest.make_builder(tmp_path / "out", manual_dir=str(files))
    finally:
        flags.FLAGS.unparse_flags()
    assert builder.modality == "ct"
    assert builder.info.features["volume"].shape == (4, 8, 8)
    assert builder.info.metadata["options"]["hu_window"] == [-500.0, 500.0]
    with pytest.raises(ValueError, match="manifest.csv"):
        manifest.make_builder(tmp_path / "out")
    with pytest.raises(ValueError, match="ct_size"):
        manifest.make_builder(tmp_path / "o2", manual_dir=str(files), modality="ct", ct_size=(4, 8))


def test_worker_processes_give_identical_records(tmp_path, files):
    csv_path = write_csv(files / "manifest.csv", HEADER, GOOD_ROWS)
    serial = build(tmp_path / "one", csv_path, "xray")
    parallel = build(tmp_path / "two", csv_path, "xray", num_workers=2)
    for split in ("train", "validation"):
        a, b = read_all(serial, split), read_all(parallel, split)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key]["image"], b[key]["image"])


def test_boxes_to_mask():
    mask = records.boxes_to_mask([(1, 2, 3, 1), (4.4, 0, 10, 2)], (4, 6))
    want = np.zeros((4, 6), np.uint8)
    want[2:3, 1:4] = 1
    want[0:2, 4:6] = 1
    np.testing.assert_array_equal(mask, want)


def test_holdout_splits_sizes_and_determinism():
    groups = [f"patient{i}" for i in range(20)] * 2  # repeated groups count once
    split = records.holdout_splits(groups, seed=3, validation=0.25, test=2)
    assert sorted(split) == sorted(set(groups))
    counts = {s: list(split.values()).count(s) for s in ("train", "validation", "test")}
    assert counts == {"train": 13, "validation": 5, "test": 2}
    assert records.holdout_splits(reversed(groups), seed=3, validation=0.25, test=2) == split
    assert records.holdout_splits(groups, seed=4, validation=0.25, test=2) != split
    with pytest.raises(ValueError, match="exceed"):
        records.holdout_splits(groups, seed=0, validation=15, test=10)


def test_read_table_gz_tsv_and_missing_columns(tmp_path):
    import gzip
    with gzip.open(tmp_path / "t.tsv.gz", "wt") as f:
        f.write("a\tb\n1\tx y\n")
    assert records.read_table(tmp_path / "t.tsv.gz", required=("a",)) == [{"a": "1", "b": "x y"}]
    with pytest.raises(ValueError, match=r"columns \['c'\] missing"):
        records.read_table(tmp_path / "t.tsv.gz", required=("a", "c"))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        records.read_table(tmp_path / "nope.csv")
