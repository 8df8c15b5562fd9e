"""The paper's dataset converters on tiny fixtures written in each dataset's published layout,
and the report cleaning of data_prep/reports.py."""

import csv
import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import (bcv, bimcv, cc_ccii, chexpert, covidx, luna16, mimic_cxr, readers, records,
                       reports, rsna)

sys.path.insert(0, str(Path(__file__).parent))
from test_readers import anatomy, write_dicom, write_metaimage, write_nifti  # noqa: E402

CT_SIZE = (8, 32, 32)
XRAY_SIZE = 32
RNG = np.random.default_rng(0)


def write_table(path, header, rows, delimiter=","):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_image(path, shape):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, shape).astype(np.uint8)).save(path, quality=95)
    return path


def build(module, root, data_dir, ct_size=CT_SIZE, **options):
    builder = module.make_builder(data_dir, str(root), ct_size=ct_size, xray_size=XRAY_SIZE,
                                  **options)
    builder.download_and_prepare()
    return tfds.builder_from_directory(builder.data_dir)


def all_records(builder):
    out = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split)
        for i in range(len(source)):
            record = source[i]
            out[record["id"].decode()] = {**record, "split": split}
    return out


def split_counts(builder):
    return {s: builder.info.splits[s].num_examples for s in builder.info.splits}


# ----------------------------------------------------------------------------- reports

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough.  Eval for pneumonia.

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  The
 cardiomediastinal silhouette is normal.  A 2.5 cm nodule projects over the
 left lung.

 IMPRESSION:

 1. No acute cardiopulmonary process.
 2. Left lung nodule, CT recommended.
"""
MIMIC_CLEAN = ("There is no focal consolidation, pleural effusion or pneumothorax. The "
               "cardiomediastinal silhouette is normal. A 2.5 cm nodule projects over the left "
               "lung. No acute cardiopulmonary process. Left lung nodule, CT recommended.")


def test_clean_report_keeps_findings_and_impression():
    assert reports.extract_sections(MIMIC_REPORT) == MIMIC_CLEAN.replace(
        "No acute", "1. No acute").replace("Left lung nodule", "2. Left lung nodule")
    cleaned = reports.clean_report(MIMIC_REPORT)
    assert cleaned == reports.CleanedReport(MIMIC_CLEAN, "")


def test_clean_report_drops_short_and_headerless_reports():
    short = " FINDINGS: Lungs are clear. Heart size normal.\n IMPRESSION: None.\n"
    assert reports.clean_report(short) == (None, "2 sentence(s), fewer than 3")
    assert reports.clean_report(" INDICATION: cough.\n COMPARISON: none.\n") == (
        None, "no FINDINGS or IMPRESSION section")
    assert reports.clean_report("   ") == (None, "empty report")
    assert reports.clean_report(None) == (None, "empty report")
    plain = "Opacidad en lóbulo inferior derecho.  Sin derrame.\nCorazón normal."
    assert reports.clean_report(plain, sections=False).text == (
        "Opacidad en lóbulo inferior derecho. Sin derrame. Corazón normal.")
    assert reports.clean_report(plain, sections=False, min_sentences=4).text is None


def test_sections_take_the_last_of_each_name_and_aliases():
    text = (" FINDINGS: old text.\n FINDINGS: Lungs clear. Heart normal.\n"
            " CONCLUSION: No change since prior.\n NOTIFICATION: called Dr. ___.\n")
    assert reports.extract_sections(text) == "Lungs clear. Heart normal. No change since prior."
    assert reports.split_sentences("1. Mild edema.  2) Small effusion! Stable? ok") == [
        "Mild edema.", "Small effusion!"]


# ----------------------------------------------------------------------------- MIMIC-CXR

MIMIC_META = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
              "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
              "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
              "PatientOrientationCodeSequence_CodeMeaning"]
CHEXPERT_14 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
               "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity",
               "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax",
               "Support Devices"]


def mimic_fixture(root, *, drop_report=False):
    """Studies: s50000001 (train, PA + lateral), s50000002 (validate, AP), s50000003 (test,
    two-sentence report), s50000004 (train, PA, no chexpert row)."""
    studies = [("10000032", "50000001", "train", [("d1", "PA"), ("d2", "LATERAL")], MIMIC_REPORT),
               ("10000032", "50000002", "validate", [("d3", "AP")], MIMIC_REPORT.replace(
                   "normal", "enlarged")),
               ("11000040", "50000003", "test", [("d4", "PA")],
                " FINDINGS: Lungs clear. Heart normal.\n"),
               ("19999999", "50000004", "train", [("d5", "PA")], MIMIC_REPORT)]
    meta, split = [], []
    for subject, study, split_name, images, report in studies:
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        for k, (dicom, view) in enumerate(images):
            shape = (30, 24) if k == 0 else (24, 30)
            write_image(folder / f"s{study}" / f"{dicom}.jpg", shape)
            meta.append([dicom, subject, study, "CHEST (PA AND LAT)", view, shape[0], shape[1],
                         "21800506", "213014.531", "CHEST (PA AND LAT)", "postero-anterior",
                         "Erect"])
            split.append([dicom, study, subject, split_name])
        if not (drop_report and study == "50000002"):
            (folder / f"s{study}.txt").write_text(report)
    write_table(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_META, meta)
    write_table(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id",
                                                        "split"], split)
    values = {"Atelectasis": "-1.0", "Cardiomegaly": "-1.0", "Edema": "1.0", "No Finding": ""}
    write_table(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *CHEXPERT_14],
                [[s, st, *[values.get(c, "0.0") for c in CHEXPERT_14]]
                 for s, st in [("10000032", "50000001"), ("10000032", "50000002"),
                               ("11000040", "50000003")]])
    return root


def test_mimic_cxr(tmp_path):
    root = mimic_fixture(tmp_path / "mimic-cxr-jpg")
    builder = build(mimic_cxr, root, tmp_path / "out")
    assert split_counts(builder) == {"train": 2, "validation": 1}
    assert builder.info.metadata["label_names"] == list(chexpert.COMPETITION_LABELS)
    assert builder.info.metadata["filtered"] == {
        "not a frontal view (ViewPosition PA/AP)": 1,
        "report: 2 sentence(s), fewer than 3": 1}
    stored = all_records(builder)
    assert sorted(stored) == ["p10000032/s50000001/d1", "p10000032/s50000002/d3",
                              "p19999999/s50000004/d5"]
    first = stored["p10000032/s50000001/d1"]
    assert first["report"].decode() == MIMIC_CLEAN
    # Atelectasis -1 -> 1, Cardiomegaly -1 -> 0, Consolidation 0, Edema 1, Effusion 0.
    np.testing.assert_array_equal(first["labels"], [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(stored["p19999999/s50000004/d5"]["labels"], [-1] * 5)
    assert stored["p10000032/s50000002/d3"]["split"] == "validation"
    jpg = root / "files/p10/p10000032/s50000001/d1.jpg"
    assert first["image"].shape == (XRAY_SIZE, XRAY_SIZE) and first["image"].dtype == np.uint8
    np.testing.assert_array_equal(first["image"],
                                  readers.pad_resize_xray(readers.read_xray(jpg), XRAY_SIZE))


def test_mimic_cxr_missing_report_is_a_bad_row(tmp_path):
    root = mimic_fixture(tmp_path / "mimic", drop_report=True)
    with pytest.raises(records.BadRowsError, match=r"metadata row 3: .*d3.jpg: report .*"
                                                   r"s50000002.txt not found"):
        build(mimic_cxr, root, tmp_path / "out")


# ----------------------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
                   "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                   "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]


def chexpert_row(path, view, **labels):
    values = {"Path": f"CheXpert-v1.0-small/{path}", "Sex": "Female", "Age": "68",
              "Frontal/Lateral": view, "AP/PA": "AP" if view == "Frontal" else ""}
    return [values.get(c, labels.get(c.replace(" ", "_"), "")) for c in CHEXPERT_HEADER]


def test_chexpert(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    train = [chexpert_row("train/patient00001/study1/view1_frontal.jpg", "Frontal",
                          Atelectasis="-1.0", Cardiomegaly="-1.0", Consolidation="-1.0",
                          Edema="-1.0", Pleural_Effusion="-1.0"),
             chexpert_row("train/patient00001/study1/view2_lateral.jpg", "Lateral"),
             chexpert_row("train/patient00002/study1/view1_frontal.jpg", "Frontal",
                          Cardiomegaly="1.0", Edema="0.0"),
             chexpert_row("train/patient00003/study2/view1_frontal.jpg", "Frontal")]
    valid = [chexpert_row("valid/patient64541/study1/view1_frontal.jpg", "Frontal",
                          Atelectasis="1.0", Pleural_Effusion="1.0", Edema="0.0")]
    for row in train + valid:
        write_image(root / Path(*Path(row[0]).parts[1:]), (28, 24))
    write_table(root / "train.csv", CHEXPERT_HEADER, train)
    write_table(root / "valid.csv", CHEXPERT_HEADER, valid)
    builder = build(chexpert, root, tmp_path / "out", num_validation=1)
    assert split_counts(builder) == {"train": 2, "validation": 1, "test": 1}
    assert builder.info.metadata["filtered"] == {"lateral view": 1}
    stored = all_records(builder)
    labels = {k: list(v["labels"]) for k, v in stored.items()}
    assert labels == {
        "train/patient00001/study1/view1_frontal.jpg": [1, 0, 0, 1, 1],  # uncertain: MGCA map
        "train/patient00002/study1/view1_frontal.jpg": [0, 1, 0, 0, 0],  # blanks -> 0
        "train/patient00003/study2/view1_frontal.jpg": [0, 0, 0, 0, 0],
        "valid/patient64541/study1/view1_frontal.jpg": [1, 0, 0, 0, 1]}
    assert stored["valid/patient64541/study1/view1_frontal.jpg"]["split"] == "test"
    assert all(r["report"] == b"" for r in stored.values())
    # The hold-out depends only on the seed.
    again = build(chexpert, root, tmp_path / "again", num_validation=1)
    assert {k: v["split"] for k, v in all_records(again).items()} == {
        k: v["split"] for k, v in stored.items()}


# ----------------------------------------------------------------------------- RSNA


def test_rsna_labels_boxes_and_masks(tmp_path):
    root = tmp_path / "rsna"
    rows = [["p-two", "4", "8", "10", "6", "1"], ["p-none", "", "", "", "", "0"],
            ["p-two", "20", "30", "5", "5", "1"], ["p-one", "0", "0", "40", "2", "1"]]
    write_table(root / "stage_2_train_labels.csv",
                ["patientId", "x", "y", "width", "height", "Target"], rows)
    (root / "stage_2_train_images").mkdir()
    for patient in ("p-two", "p-none", "p-one"):
        write_dicom(root / "stage_2_train_images" / f"{patient}.dcm",
                    RNG.integers(0, 256, (40, 40)).astype(np.uint16))
    builder = build(rsna, root, tmp_path / "out", validation=1, test=1)
    assert split_counts(builder) == {"train": 1, "validation": 1, "test": 1}
    assert builder.info.metadata["mask_classes"] == ["background", "pneumonia"]
    stored = all_records(builder)
    assert {k: float(v["labels"][0]) for k, v in stored.items()} == {
        "p-two": 1.0, "p-none": 0.0, "p-one": 1.0}
    # 40 -> 32 pixels: output pixel o samples source floor((o + 0.5) * 1.25).
    source = np.floor((np.arange(XRAY_SIZE) + 0.5) * 40 / XRAY_SIZE).astype(int)

    def inside(start, length):
        return (source >= start) & (source < start + length)

    want = np.zeros((XRAY_SIZE, XRAY_SIZE), np.uint8)
    want[np.ix_(inside(8, 6), inside(4, 10))] = 1
    want[np.ix_(inside(30, 5), inside(20, 5))] = 1
    np.testing.assert_array_equal(stored["p-two"]["mask"], want)
    assert stored["p-none"]["mask"].sum() == 0
    # Boxes as boxes: (x, y, w, h) of the 40-px DICOM -> (x0, y0, x1, y1) of the 32-px record.
    np.testing.assert_allclose(stored["p-two"]["boxes"], np.array(
        [[4, 8, 14, 14], [20, 30, 25, 35]]) * XRAY_SIZE / 40, rtol=1e-6)
    assert stored["p-none"]["boxes"].shape == (0, 4)
    dcm = root / "stage_2_train_images/p-one.dcm"
    np.testing.assert_array_equal(stored["p-one"]["image"],
                                  readers.pad_resize_xray(readers.read_xray(dcm), XRAY_SIZE))


def test_rsna_bad_target_is_reported(tmp_path):
    root = tmp_path / "rsna"
    write_table(root / "stage_2_train_labels.csv",
                ["patientId", "x", "y", "width", "height", "Target"],
                [["a", "", "", "", "", "0"], ["b", "", "", "", "", "1"]])
    with pytest.raises(records.BadRowsError, match="row 2: Target '1' with box"):
        build(rsna, root, tmp_path / "out")


# ----------------------------------------------------------------------------- COVIDx


def test_covidx(tmp_path):
    root = tmp_path / "covidx"
    train = ["1 a.png normal rsna", "1 b.jpg normal rsna", "2 c c.png pneumonia cohen",
             "3 d.png COVID-19 sirm"]
    test = ["9 e.png COVID-19 ricord"]
    for line in train:
        write_image(root / "train" / " ".join(line.split()[1:-2]), (20, 26))
    write_image(root / "test" / "e.png", (26, 20))
    (root / "train_COVIDx6.txt").write_text("\n".join(train) + "\n")
    (root / "test_COVIDx6.txt").write_text("\n".join(test) + "\n")
    builder = build(covidx, root, tmp_path / "out", validation=1)
    counts = split_counts(builder)
    assert counts["test"] == 1 and counts["validation"] in (1, 2) and sum(counts.values()) == 5
    stored = all_records(builder)
    assert stored["train/a.png"]["split"] == stored["train/b.jpg"]["split"]  # same patient
    np.testing.assert_array_equal(stored["train/c c.png"]["labels"], [0, 1, 0])
    np.testing.assert_array_equal(stored["test/e.png"]["labels"], [0, 0, 1])
    np.testing.assert_array_equal(stored["train/a.png"]["labels"], [1, 0, 0])

    (root / "test_COVIDx6.txt").write_text("9 e.png positive ricord\n")
    with pytest.raises(records.BadRowsError, match="test_COVIDx6.txt line 1"):
        build(covidx, root, tmp_path / "out2")


# ----------------------------------------------------------------------------- CT datasets

LONG_REPORT = ("Opacidades en vidrio deslustrado bilaterales.  Predominio periférico.\n"
               "No hay derrame pleural.")
# As in labels_covid_posi.tsv: the repr of a list of strings, with escaped newlines.
STORED_REPORT = repr(["Opacidades en vidrio deslustrado bilaterales.  Predominio periférico.",
                      "No hay derrame pleural."])


def test_bimcv(tmp_path):
    root = tmp_path / "covid19_posi"
    sessions = {("sub-S0001", "ses-E0001"): STORED_REPORT,
                ("sub-S0002", "ses-E0002"): "Sin hallazgos agudos. Estudio normal."}
    paths = {}
    for (subject, session), _ in sessions.items():
        path = root / subject / session / "mod-rx" / f"{subject}_{session}_run-1_bp-chest_ct.nii.gz"
        path.parent.mkdir(parents=True)
        paths[session] = write_nifti(path, anatomy((16, 16, 10), seed=len(paths)))
        (path.parent / f"{subject}_{session}_run-1_bp-chest_cr.nii.gz").write_bytes(b"")  # not CT
    write_table(root / "derivatives/labels/labels_covid_posi.tsv",
                ["ReportID", "PatientID", "Report", "Labels", "Localizations",
                 "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS"],
                [[ses, sub, text, "[]", "[]", "[]", "[]", "[]"]
                 for (sub, ses), text in sessions.items()], delimiter="\t")
    builder = build(bimcv, tmp_path, tmp_path / "out")  # the parent of covid19_posi
    assert split_counts(builder) == {"train": 1}
    assert builder.info.metadata["filtered"] == {"report: 2 sentence(s), fewer than 3": 1}
    (record,) = all_records(builder).values()
    assert record["report"].decode() == " ".join(LONG_REPORT.split())
    assert bimcv.report_text("Texto plano. Sin lista.") == "Texto plano. Sin lista."
    assert record["volume"].shape == CT_SIZE and record["volume"].dtype == np.int16
    assert record["labels"].shape == (0,)
    np.testing.assert_array_equal(
        record["volume"], readers.resample_volume(readers.read_volume(paths["ses-E0001"])[0],
                                                  CT_SIZE))


def test_cc_ccii(tmp_path):
    root = tmp_path / "ccccii"
    scans = {}
    for label, patient, scan in [("NCP", "1", "1001"), ("NCP", "1", "1002"), ("CP", "7", "2001"),
                                 ("Normal", "9", "3001")]:
        folder = root / label / patient / scan
        for k in range(5):
            write_image(folder / f"{k:04d}.png", (20, 20))
        scans[f"{label}/{patient}/{scan}"] = folder
    builder = build(cc_ccii, root, tmp_path / "out", validation=1, test=1)
    stored = all_records(builder)
    assert sorted(stored) == sorted(scans)
    assert stored["NCP/1/1001"]["split"] == stored["NCP/1/1002"]["split"]  # split by patient
    assert sorted(split_counts(builder).values()) == [1, 1, 2]
    np.testing.assert_array_equal(stored["CP/7/2001"]["labels"], [0, 1, 0])
    np.testing.assert_array_equal(stored["Normal/9/3001"]["labels"], [0, 0, 1])
    np.testing.assert_array_equal(
        stored["NCP/1/1002"]["volume"],
        readers.resample_volume(readers.read_volume(scans["NCP/1/1002"])[0], CT_SIZE))


def test_luna16(tmp_path):
    root = tmp_path / "luna"
    uids = {"1.3.6.1.4.1.14519.5.2.1.6279.6001.100": 0, "1.3.6.1.4.1.14519.5.2.1.6279.6001.200": 8,
            "1.3.6.1.4.1.14519.5.2.1.6279.6001.300": 9}
    for k, (uid, subset) in enumerate(uids.items()):
        folder = root / f"subset{subset}" / (f"subset{subset}" if k == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        write_metaimage(folder / f"{uid}.mhd", anatomy((12, 12, 10), seed=k))
    first, _, third = uids
    annotated = [first, third, first, "1.3.6.1.4.1.14519.5.2.1.6279.6001.999"]  # 999: no scan
    write_table(root / "annotations.csv", ["seriesuid", "coordX", "coordY", "coordZ",
                                           "diameter_mm"],
                [[u, "-100.5", "67.2", "-231.9", "6.4"] for u in annotated])
    builder = build(luna16, root, tmp_path / "out")
    assert split_counts(builder) == {"train": 1, "validation": 1, "test": 1}
    assert builder.info.metadata["filtered"] == {
        "annotated series whose scan is not in manual_dir": 1}
    stored = all_records(builder)
    assert {k[-3:]: (v["split"], float(v["labels"][0])) for k, v in stored.items()} == {
        "100": ("train", 1.0), "200": ("validation", 0.0), "300": ("test", 1.0)}
    mhd = root / "subset8" / f"{list(uids)[1]}.mhd"
    np.testing.assert_array_equal(stored[list(uids)[1]]["volume"], readers.resample_volume(
        readers.read_volume(mhd)[0], CT_SIZE))


def test_bcv_masks_follow_the_image(tmp_path):
    root = tmp_path / "bcv"
    (root / "RawData/Training/img").mkdir(parents=True)
    (root / "RawData/Training/label").mkdir(parents=True)
    shape_xyz = (16, 12, 10)
    labels = np.zeros(shape_xyz, np.int16)
    labels[2:9, 3:8, 1:6] = 6  # liver
    labels[10:14, 2:5, 4:9] = 1  # spleen
    affine = np.diag([-0.8, 0.8, 2.5, 1.0])  # x stored right-to-left: both files get flipped
    for case in (1, 35):
        write_nifti(root / f"RawData/Training/img/img{case:04d}.nii.gz", labels * 100, affine)
        write_nifti(root / f"RawData/Training/label/label{case:04d}.nii.gz", labels, affine)
    # Stored at the source size (D, H, W) = (z, y, x) so that no voxel is interpolated.
    builder = build(bcv, root, tmp_path / "out", ct_size=shape_xyz[::-1])
    assert split_counts(builder) == {"train": 1, "test": 1}
    assert builder.info.metadata["mask_classes"][6] == "liver"
    record = all_records(builder)["img0035"]
    mask, volume = record["mask"], record["volume"]
    assert mask.dtype == np.uint8 and mask.shape == volume.shape == shape_xyz[::-1]
    np.testing.assert_array_equal(volume, mask.astype(np.int16) * 100)  # aligned voxel by voxel
    np.testing.assert_array_equal(np.sort(mask.ravel()), np.sort(labels.ravel()))
    present = np.zeros(13)
    present[[0, 5]] = 1  # spleen, liver
    np.testing.assert_array_equal(record["labels"], present)
    # Resized, the mask is the nearest-neighbour resampling of the label map.
    small = all_records(build(bcv, root, tmp_path / "small"))["img0035"]
    label_path = root / "RawData/Training/label/label0035.nii.gz"
    np.testing.assert_array_equal(small["mask"], readers.resample_volume(
        readers.read_volume(label_path)[0], CT_SIZE, window=None, order=0))


def test_missing_manual_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manual_dir .* is not a folder"):
        build(luna16, tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="annotations.csv"):
        build(luna16, tmp_path / "empty", tmp_path / "out")
