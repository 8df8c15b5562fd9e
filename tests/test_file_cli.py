"""The file-level command lines: `python -m unimedi_jax.embed` and `python -m unimedi_jax.zero_shot`
(outputs against the Encoder's file methods, skipped inputs, --strict, user errors)."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from unimedi_jax import cli, embed, inference, zero_shot

from test_inference import save_workdir, tiny_run  # noqa: E402  (tests/ is on the path)
from test_readers import anatomy, write_nifti  # noqa: E402
from test_scans import file_config  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    config, params = tiny_run(tmp_path_factory.mktemp("text"))
    folder = tmp_path_factory.mktemp("run")
    save_workdir(file_config(config), params, str(folder), step=3)
    return folder


@pytest.fixture(scope="module")
def enc(workdir):
    return inference.load(workdir)


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two readable files (a NIfTI CT, a PNG X-ray) and a corrupted PNG."""
    folder = tmp_path_factory.mktemp("scans")
    write_nifti(folder / "ct.nii.gz", anatomy((30, 30, 16), seed=3))
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 52), np.uint8)).save(
        folder / "cxr.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def call(module, *args):
    """Runs a command line's main in this process: (exit code or message, None when it ran
    through)."""
    try:
        cli.run(module.main, module.FLAGS, ["workdir", "output"], module.__doc__,
                argv=[module.__name__, *map(str, args)])
    except SystemExit as e:
        return e.code
    return None


def test_embed_two_files_equals_embed_files(workdir, enc, scans, tmp_path):
    out = tmp_path / "emb.npz"
    files = [scans / "ct.nii.gz", scans / "cxr.png"]
    assert call(embed, f"--workdir={workdir}", f"--output={out}", *files) is None
    saved = np.load(out)
    np.testing.assert_array_equal(saved["embeddings"], enc.embed_files(files))
    assert list(saved["paths"]) == list(map(str, files))
    assert list(saved["modalities"]) == ["ct", "xray"]


def test_glob_and_manifest_inputs(workdir, enc, scans, tmp_path):
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["path", "report"], [str(scans / "cxr.png"), "Clear."],
                                 ["missing.png", "Gone."]])
    out = tmp_path / "emb.npz"
    code = call(embed, f"--workdir={workdir}", f"--output={out}", str(scans / "c*.nii.gz"),
                manifest)
    assert "1 input(s) skipped" in code  # the manifest's row 2
    saved = np.load(out)
    assert list(saved["paths"]) == [str(scans / "ct.nii.gz"), str(scans / "cxr.png")]
    np.testing.assert_array_equal(saved["embeddings"],
                                  enc.embed_files([scans / "ct.nii.gz", scans / "cxr.png"]))


def test_corrupted_file_is_skipped_by_name_and_strict_writes_nothing(workdir, scans, tmp_path,
                                                                      capsys):
    out = tmp_path / "emb.npz"
    inputs = [scans / "ct.nii.gz", scans / "broken.png", scans / "cxr.png"]
    code = call(embed, f"--workdir={workdir}", f"--output={out}", *inputs)
    assert code.startswith("error: 1 input(s) skipped") and str(out) in code
    assert f"skipped {scans / 'broken.png'}: unreadable image" in capsys.readouterr().err
    assert list(np.load(out)["paths"]) == [str(scans / "ct.nii.gz"), str(scans / "cxr.png")]

    strict = tmp_path / "strict.npz"
    code = call(embed, f"--workdir={workdir}", f"--output={strict}", "--strict", *inputs)
    assert code.startswith(f"error: {scans / 'broken.png'}: unreadable image")
    assert "nothing written" in code and not strict.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["emb.npz"]  # no temporary file left


def test_zero_shot_writes_ensemble_scores(workdir, enc, scans, tmp_path):
    prompts = {"effusion": {"positive": ["Pleural effusion.", "There is an effusion."],
                            "negative": "No effusion."},
               "nodule": {"positive": "A nodule.", "negative": ["No nodule.", "Clear lungs."]}}
    (tmp_path / "findings.json").write_text(json.dumps(prompts))
    out = tmp_path / "scores.csv"
    files = [scans / "cxr.png", scans / "ct.nii.gz"]
    assert call(zero_shot, f"--workdir={workdir}", f"--output={out}",
                f"--prompts={tmp_path / 'findings.json'}", *files) is None
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "modality", "effusion", "nodule"]
    assert [r[:2] for r in rows[1:]] == [[str(files[0]), "xray"], [str(files[1]), "ct"]]
    want = enc.zero_shot_files(files, {"effusion": (("Pleural effusion.",
                                                     "There is an effusion."), "No effusion."),
                                       "nodule": ("A nodule.", ("No nodule.", "Clear lungs."))})
    np.testing.assert_allclose(np.array([r[2:] for r in rows[1:]], float), want, atol=2e-6)
    # Without --prompts: the run's evaluation prompts (configs/prompts.py for the phantom).
    assert call(zero_shot, f"--workdir={workdir}", f"--output={out}", files[0]) is None
    with open(out) as f:
        assert next(csv.reader(f))[2:] == list(enc.config.eval.prompts)


@pytest.mark.parametrize("args, words", [
    (["--output={out}", "{scans}/ct.nii.gz"], "--workdir must be given"),
    (["--workdir={workdir}", "--output={out}", "--no_such_flag", "{scans}/ct.nii.gz"],
     "Unknown command line flag 'no_such_flag'"),
    (["--workdir={workdir}", "--output={out}"], "no input given"),
    (["--workdir={tmp}/nowhere", "--output={out}", "{scans}/ct.nii.gz"],
     "--workdir={tmp}/nowhere: {tmp}/nowhere does not exist"),
    (["--workdir={workdir}", "--output={tmp}/no/dir/x.npz", "{scans}/ct.nii.gz"],
     "--output={tmp}/no/dir/x.npz: not a file in an existing folder"),
    (["--workdir={workdir}", "--output={out}", "{tmp}/missing.nii.gz"],
     "no readable input; nothing written:\n  {tmp}/missing.nii.gz: no such file"),
    (["--workdir={workdir}", "--output={out}", "{tmp}/*.nrrd"],
     "{tmp}/*.nrrd: no file matches this pattern"),
    (["--workdir={workdir}", "--output={out}", "--strict", "{tmp}/bad.csv", "{scans}/cxr.png"],
     "{tmp}/bad.csv: row 1 (line 2): {tmp}/x.png: empty report; file not found"),
])
def test_user_errors(workdir, scans, tmp_path, args, words):
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "report"], ["x.png", ""]])
    fill = dict(workdir=workdir, scans=scans, tmp=tmp_path, out=tmp_path / "o.npz")
    code = call(embed, *(a.format(**fill) for a in args))
    assert code.startswith("error: ") and words.format(**fill) in code, code
    assert not (tmp_path / "o.npz").exists()


def test_prompt_file_errors(workdir, scans, tmp_path):
    for content, words in [("{", "cannot read JSON"), ("[]", "non-empty object"),
                           ('{"a": {"positive": "x"}}', "'a' must be an object with exactly"),
                           ('{"a": {"positive": [], "negative": "y"}}', "a.positive must be")]:
        (tmp_path / "p.json").write_text(content)
        code = call(zero_shot, f"--workdir={workdir}", f"--output={tmp_path / 'o.csv'}",
                    f"--prompts={tmp_path / 'p.json'}", scans / "cxr.png")
        assert code.startswith(f"error: --prompts={tmp_path / 'p.json'}: ") and words in code


def test_command_line_prints_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "unimedi_jax.embed", f"--workdir={tmp_path}",
                           f"--output={tmp_path / 'o.npz'}", "a.png"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(f"error: --workdir={tmp_path}: ")
    assert "Traceback" not in proc.stderr
