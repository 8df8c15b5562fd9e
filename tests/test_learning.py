"""Tests of the learning-ladder benchmark (benchmarks/learning.py).

Two runs of `python -m benchmarks.learning` in subprocesses, one after the other, with XLA
backend optimisation level 0, as tests/test_benchmarks.py:
- the arms of PHANTOM_ARMS on configs/pretrain.py:test (the seconds-long phantom), the other
  methods (Joint, DrasCLR) among them: every metric of every arm is in ladder.json, finite where
  defined, n/a (null) where it does not apply; ladder.md and the plots are written; a second call
  reuses the arms' results; the other methods' encoders load in `inference` and the export;
- random, supervised and clip on a planted dataset (a manifest of tiny X-rays and volumes where
  the positives hold a bright block and their report says so): both trained arms' frozen
  features probe better than the random init's.
The ladder's bookkeeping (arm names, targets, spreads) is checked in-process.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of scripts, not an installed package
from benchmarks import learning  # noqa: E402

FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
FINDINGS = ("nodule", "consolidation", "ground_glass", "effusion", "cardiomegaly")
# pretrain_eval.evaluate's keys the ladder reports (null for the supervised arm).
EVAL_KEYS = ("zero_shot_mean_auroc", "retrieval_r1_findings", "retrieval_r1_findings_baseline",
             "slice_precision", "slice_precision_random", "slice_precision_prior",
             "image_embedding_mean_cosine", "image_embedding_effective_rank")
# The phantom run's arms: the floor, UniMedI, and the other methods on the same backbone (the
# UniMedI ablations differ from UniMedI by config switches only, `test_arm_names_and_aliases`;
# the planted run trains the supervised ceiling and the CLIP arm).
PHANTOM_ARMS = ("random", "unimedi", "joint", "drasclr")
NO_TEXT_ARMS = ("supervised", "joint", "drasclr")  # CLIP-space metrics n/a
PLANTED_STEPS = 40
PLANTED_COUNTS = {"train": 48, "validation": 24, "test": 48}

# The planted run's config: configs/pretrain.py:test on a manifest dataset (the CSV is the
# config argument), no zero-shot prompts (its label is not a phantom finding), and the default's
# locked 3-layer text tower and 16 examples a modality per step (with the test config's one
# trained MiniLM layer and 8 per step the CLIP loss stays at chance, ln 8, for 120 steps).
PLANTED_CONFIG = f'''
from configs import pretrain


def get_config(manifest):
    c = pretrain.get_config("test")
    c.data.procedural = False
    for modality in ("xray", "ct"):
        c.data[modality].dataset = "manifest"
        c.data[modality].options = {{"manifest": manifest}}
    c.data.batch_size_xray = c.data.batch_size_ct = 16
    c.model.text.update(num_layers=3, trainable_layers=0)
    c.eval.prompts = {{}}
    c.total_steps = c.checkpoint_every_steps = {PLANTED_STEPS}
    c.log_every_steps = 10
    return c
'''


def write_planted(folder: Path, counts: dict, seed: int = 0) -> Path:
    """A manifest of X-rays (36 x 36 PNG) and CT volumes (NIfTI, 32 x 32 x 8) on low noise,
    every second one holding a bright block (X-ray: 8 x 8 px, +100 grey levels; CT: 8 x 8 x 4
    voxels, +800 HU) anywhere: label `block`, and a report saying whether and where it is."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    where = lambda y, x, size: (f"A bright block in the {'upper' if y < size / 2 else 'lower'} "
                                f"{'left' if x < size / 2 else 'right'}.")
    rows = []
    for split, n in counts.items():
        for i in range(n):
            positive = i % 2 == 0
            image = 128 + rng.normal(0, 15, (36, 36))
            volume = rng.normal(0, 60, (32, 32, 8))  # NIfTI (x, y, z) order
            reports = ["No block is seen."] * 2
            if positive:
                y, x = rng.integers(2, 26, 2)
                image[y:y + 8, x:x + 8] += 100
                reports[0] = where(y + 4, x + 4, 36)
                y, x, z = *rng.integers(2, 22, 2), rng.integers(0, 5)
                volume[y:y + 8, x:x + 8, z:z + 4] += 800
                reports[1] = where(y + 4, x + 4, 32)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                folder / f"{split}_{i}.png")
            nib.save(nib.Nifti1Image(volume.astype(np.int16), np.eye(4)),
                     str(folder / f"{split}_{i}.nii.gz"))
            rows += [[f"{split}_{i}.png", reports[0], split, "xray", int(positive)],
                     [f"{split}_{i}.nii.gz", reports[1], split, "ct", int(positive)]]
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "report", "split", "modality", "block"])
        writer.writerows(rows)
    return path


def _ladder(workdir: Path, data_dir: Path, config: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=FAST_XLA, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "benchmarks.learning", f"--config={config}",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """{"phantom", "planted"}: (workdir, ladder.json) of the two runs."""
    tmp = tmp_path_factory.mktemp("learning")
    manifest = write_planted(tmp / "planted_raw", PLANTED_COUNTS)
    (tmp / "planted_config.py").write_text(PLANTED_CONFIG)
    commands = {
        "phantom": (tmp / "phantom", tmp / "phantom_data", "configs/pretrain.py:test",
                    f"--arms={','.join(PHANTOM_ARMS)}"),
        "planted": (tmp / "planted", tmp / "planted_data",
                    f"{tmp / 'planted_config.py'}:{manifest}",
                    "--arms=random,supervised,clip", "--probe_lr=1e-2"),
    }
    out = {}
    for name, args in commands.items():  # one at a time: the other xdist worker has a core
        proc = _ladder(*args)
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}:\n{log[-6000:]}"
        with open(tmp / name / "ladder.json") as f:
            out[name] = (tmp / name, json.load(f))
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_every_arm_has_every_metric(runs):
    workdir, ladder = runs["phantom"]
    assert ladder["arms"] == list(PHANTOM_ARMS) and ladder["seeds"] == [0]
    assert ladder["fractions"] == [1.0, 0.1]
    summary = ladder["summary"]
    keys = set(summary["unimedi"])
    for arm in PHANTOM_ARMS:
        assert set(summary[arm]) == keys, arm  # the same columns for every arm
        m = {k: s["mean"] for k, s in summary[arm].items()}
        for modality in ("xray", "ct"):
            for p in ("100pct", "10pct"):
                assert 0.0 <= m[f"probe_{modality}_{p}_mean_auroc"] <= 1.0, (arm, modality, p)
                for finding in FINDINGS:  # undefined (null) where the test split has one class
                    assert f"probe_{modality}_{p}_auroc_{finding}" in m
            assert -1.0 <= m[f"cls_mean_cosine_{modality}"] <= 1.0
            assert m[f"cls_effective_rank_{modality}"] >= 1.0
        zero_shot = [f"zero_shot_auroc_{f}" for f in FINDINGS]
        if arm in NO_TEXT_ARMS:  # no text tower trained: n/a, not zero
            assert all(m[k] is None for k in (*EVAL_KEYS, *zero_shot)), m
        else:
            assert all(_finite(m[k]) for k in EVAL_KEYS), (arm, m)
            assert all(k in m for k in zero_shot)
            assert m["image_embedding_effective_rank"] >= 1.0
            assert 0.0 <= m["slice_precision"] <= 1.0
        run = ladder["runs"][arm]["0"]
        assert run["steps"] == (0 if arm == "random" else 6)
        assert all(v is None or _finite(v) for v in run["metrics"].values())
    assert ladder["labels"] == {"xray": list(FINDINGS), "ct": list(FINDINGS)}
    checks = ladder["targets"]["checks"]
    assert set(checks) == {"slice_precision", "probe_2D", "probe_3D", "zero_shot",
                           "retrieval_r1_findings", "collapse"}
    assert all(c["holds"] in (True, False, None) for c in checks.values())
    assert checks["slice_precision"]["holds"] is not None
    assert checks["collapse"]["holds"] is not None


def test_tables_plots_and_curves_are_written(runs):
    workdir, ladder = runs["phantom"]
    table = (workdir / "ladder.md").read_text()
    for arm in PHANTOM_ARMS:
        assert f"\n| {arm} |" in table
    assert "n/a" in table and "## Targets" in table
    for name in ("curves.png", "findings.png"):
        data = (workdir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    for arm in PHANTOM_ARMS[1:]:
        rows = [json.loads(line) for line in open(workdir / arm / "metrics.jsonl")]
        assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6], arm
    assert not (workdir / "random" / "metrics.jsonl").exists()


@pytest.mark.parametrize("arm", ["joint", "drasclr"])
def test_other_methods_load_in_inference_and_export(runs, arm, tmp_path):
    """A Joint or DrasCLR run's encoder: `inference.load` gives its ViT's [CLS] (the image-report
    space is a clear error), the eval summary holds the backbone's collapse from step 0 on, the
    export holds the encoder alone and the PyTorch port reproduces its [CLS]."""
    import torch

    from unimedi_jax import inference
    from unimedi_jax.export import export as export_lib
    from unimedi_jax.export.torch_model import UniMedIVisionTorch
    from unimedi_jax.train import checkpoint

    workdir = runs["phantom"][0] / arm
    config, params = checkpoint.load_pretrained(str(workdir))
    assert config.method == arm and "text" not in params
    summary = json.loads((workdir / "eval_summary.json").read_text())
    for key in ("cls_mean_cosine", "cls_effective_rank"):
        assert _finite(summary[key]) and _finite(summary[f"{key}_init"]), (key, summary)
    assert not any(k.startswith(("zero_shot", "retrieval")) for k in summary)

    enc = inference.load(workdir)
    vit = enc.model.vit
    rng = np.random.default_rng(0)
    volumes = rng.normal(size=(2, *vit.volume_size)).astype(np.float32)
    images = rng.normal(size=(3, vit.image_size, vit.image_size)).astype(np.float32)
    cls_ct, _ = vit.apply({"params": params["vision"]}, volume=volumes)
    cls_xray, _ = vit.apply({"params": params["vision"]}, images=images[:, None])
    np.testing.assert_allclose(enc.encode_ct(volumes), cls_ct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(enc.encode_xray(images), cls_xray, rtol=1e-5, atol=1e-5)
    for call in (lambda: enc.embed_ct(volumes), lambda: enc.encode_report("no finding")):
        with pytest.raises(ValueError, match=f"'{arm}' run.*no language"):
            call()

    out = export_lib.export(workdir, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "vision.safetensors"]
    exported = json.loads((out / "config.json").read_text())
    assert exported["method"] == arm and exported["text"] is None and exported["heads"] is None
    torch_model = UniMedIVisionTorch.from_export(out)
    with torch.no_grad():
        got = torch_model(volume=torch.from_numpy(volumes)).numpy()
    np.testing.assert_allclose(got, cls_ct, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no projection heads"):
        torch_model.embed(volume=torch.from_numpy(volumes))


def test_a_second_call_reuses_the_results(runs, tmp_path):
    """Arms whose results exist are not run again (no data, no training)."""
    workdir, ladder = runs["phantom"]
    for arm in ("random", "unimedi"):
        (tmp_path / arm).mkdir()
        (tmp_path / arm / learning.ARM_RESULTS).write_bytes(
            (workdir / arm / learning.ARM_RESULTS).read_bytes())
    config = _base_config()
    config.data.data_dir = str(tmp_path / "nonexistent")  # reading data would fail
    again = learning.run_ladder(config, ["random", "unimedi"], [0],
                                learning.Probing((1.0, 0.1)), str(tmp_path))
    assert again["arms"] == ["random", "unimedi"]
    assert again["summary"]["unimedi"] == ladder["summary"]["unimedi"]
    assert "| unimedi |" in (tmp_path / "ladder.md").read_text()
    assert not (tmp_path / "nonexistent").exists()
    with pytest.raises(ValueError, match="probe_lr"):
        learning.run_ladder(config, ["random"], [0], learning.Probing((1.0,), lr=0.1),
                            str(tmp_path))


def test_training_beats_random_init_on_planted_data(runs):
    """A block every second image, named in the report: the supervised and the CLIP arm's
    frozen [CLS] must probe clearly better than the random init's (mean AUROC over 2D, 3D and
    the label fractions; measured 0.72 random, 1.0 clip, 1.0 supervised)."""
    _, ladder = runs["planted"]
    assert ladder["labels"] == {"xray": ["block"], "ct": ["block"]}
    m = {arm: np.mean([ladder["summary"][arm][f"probe_{mod}_{p}_mean_auroc"]["mean"]
                       for mod in ("xray", "ct") for p in ("100pct", "10pct")])
         for arm in ("random", "supervised", "clip")}
    assert m["supervised"] >= 0.95, m
    assert m["supervised"] >= m["random"] + 0.15, m
    assert m["clip"] >= m["random"] + 0.15, m
    supervised, clip = ladder["summary"]["supervised"], ladder["summary"]["clip"]
    assert set(supervised) == set(clip)  # the same columns, n/a where CLIP-space metrics are
    assert all(supervised[k]["mean"] is None for k in EVAL_KEYS if k in clip), supervised
    assert _finite(clip["image_embedding_mean_cosine"]["mean"])


# ---------------------------------------------------------------- bookkeeping, in-process


def test_arm_names_and_aliases():
    # Table 7: VL and VL+SD select slices at random, +Attn attentively.
    assert learning.resolve_arms(["vl", "vl_sd", "vl_sd_attn", "clip", "clip_random"]) == [
        "clip_random", "clip_sd_random", "unimedi", "clip"]
    with pytest.raises(ValueError, match="unknown arm 'simclr'.*random, supervised"):
        learning.resolve_arms(["simclr"])
    with pytest.raises(ValueError, match="--fractions"):
        learning.parse_fractions(["0"])
    with pytest.raises(ValueError, match="--seeds"):
        learning.parse_seeds(["a"])
    config = learning.arm_config(_base_config(), "clip_sd_random", 3)
    assert (config.seed, config.data.seed) == (3, 3)
    assert config.objective.sd.enabled and config.objective.selection.mode == "random"
    assert learning.arm_config(_base_config(), "clip", 0).objective.sd.enabled is False
    assert learning.arm_config(_base_config(), "clip_sd", 0).objective.selection.mode == "none"
    # The other methods: their own config file's method and sections, at the base config's
    # size, on its data and with its optimiser (a command-line override reaches every arm).
    from configs import pretrain_drasclr, pretrain_joint
    for arm, module in (("joint", pretrain_joint), ("drasclr", pretrain_drasclr)):
        base = _base_config()
        base.data.data_dir = "/somewhere"
        base.optim.lr = 1.234e-4
        config = learning.arm_config(base, arm, 1, "test")
        own = module.get_config("test")
        assert config.method == arm and config.seed == 1
        assert config.objective[arm] == own.objective[arm]
        assert config.objective.views == own.objective.views and config.optim.lr == 1.234e-4
        assert config.model == own.model and config.data.data_dir == "/somewhere"


def _base_config():
    from configs import pretrain
    return pretrain.get_config("test")


def _summary(values: dict) -> dict:
    """{arm: {metric: value}} -> a one-seed summary."""
    return learning.summarise({arm: {0: {"metrics": m}} for arm, m in values.items()})


def test_targets_hold_and_fail():
    names = {"xray": ["a", "b"], "ct": ["a", "b"]}
    probe = lambda m, a, b: {f"probe_{m}_100pct_auroc_a": a, f"probe_{m}_100pct_auroc_b": b}
    good = {
        "random": {**probe("xray", 0.5, 0.5), **probe("ct", 0.5, 0.5)},
        "supervised": {**probe("xray", 0.9, 0.6), **probe("ct", 0.9, 0.9)},
        "unimedi": {**probe("xray", 0.75, 0.5), **probe("ct", 0.6, 0.85),
                    "zero_shot_auroc_a": 0.8, "zero_shot_auroc_b": 0.62,
                    "slice_precision": 0.7, "slice_precision_random": 0.25,
                    "slice_precision_prior": 0.5, "retrieval_r1_findings": 0.4,
                    "retrieval_r1_findings_baseline": 0.3, "image_embedding_mean_cosine": 0.2},
    }
    checks = learning.targets(_summary(good), names, [1.0, 0.1])["checks"]
    assert {k: c["holds"] for k, c in checks.items()} == dict.fromkeys(checks, True)
    assert checks["probe_2D"]["labels"] == ["a"]  # supervised reaches 0.8 on a only
    assert checks["probe_3D"]["pretrained_minus_random"] == pytest.approx(0.225)
    assert checks["probe_3D"]["needed"] == pytest.approx(0.2)
    assert checks["zero_shot"]["zero_shot_mean_auroc"] == pytest.approx(0.71)
    bad = {arm: dict(m) for arm, m in good.items()}
    bad["unimedi"].update(slice_precision=0.55, image_embedding_mean_cosine=0.9,
                          retrieval_r1_findings=0.3, probe_ct_100pct_auroc_a=0.5)
    checks = learning.targets(_summary(bad), names, [1.0])["checks"]
    assert not any(checks[k]["holds"] for k in ("slice_precision", "collapse",
                                                "retrieval_r1_findings", "probe_3D"))
    assert checks["probe_2D"]["holds"]
    del bad["supervised"]  # without the ceiling the probe targets are undefined, not failed
    checks = learning.targets(_summary(bad), names, [1.0])["checks"]
    assert checks["probe_2D"]["holds"] is None and checks["zero_shot"]["holds"] is None


def test_spread_over_seeds():
    s = learning.spread([0.5, None, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(np.std([0.5, 0.7],
                                                                                 ddof=1))
    assert s["n"] == 2 and s["values"] == [0.5, None, 0.7]
    assert learning.spread([None])["mean"] is None
    assert learning.spread([0.3])["std"] is None
