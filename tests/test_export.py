"""Export to PyTorch: timm, Hugging Face and the torch 3D/mixed module reproduce the JAX model."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm_vit = pytest.importorskip("timm.models.vision_transformer")
transformers = pytest.importorskip("transformers")

from test_inference import random_params, save_workdir, tiny_run  # noqa: E402
from unimedi_jax import inference  # noqa: E402
from unimedi_jax.export import export as export_lib  # noqa: E402
from unimedi_jax.export import torch_model  # noqa: E402
from unimedi_jax.data import text as text_lib  # noqa: E402
from unimedi_jax.models import bert  # noqa: E402
from unimedi_jax.models import vit as vit_lib  # noqa: E402
from unimedi_jax.models.unimedi import UniMedI  # noqa: E402

ATOL = 1e-4  # float32 parity across frameworks
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def enc(run):
    return inference.Encoder.from_params(*run)


@pytest.fixture(scope="module")
def out(run, tmp_path_factory):
    """The export of a tiny workdir, written by the command line."""
    workdir = tmp_path_factory.mktemp("workdir")
    save_workdir(*run, workdir, step=3)
    folder = tmp_path_factory.mktemp("export") / "out"
    subprocess.run([sys.executable, "-m", "unimedi_jax.export", f"--workdir={workdir}",
                    f"--output={folder}"], check=True, cwd=REPO, capture_output=True)
    return folder


@pytest.fixture(scope="module")
def torch_vit(out):
    return torch_model.UniMedIVisionTorch.from_export(out)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return (rng.normal(size=(3, 32, 32)).astype(np.float32),
            rng.normal(size=(2, 8, 32, 32)).astype(np.float32))


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def test_layout_and_config(out, run):
    config, _ = run
    assert sorted(os.listdir(out)) == ["config.json", "heads.safetensors", "text",
                                       "vision.safetensors"]
    assert not [p for p in os.listdir(out.parent) if p != "out"]  # no temporary folders left
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision"] == {**cfg["vision"], "img_size": 32, "patch_size": 8, "in_chans": 1,
                             "embed_dim": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0,
                             "patch_size_3d": [2, 8, 8], "volume_size": [8, 32, 32]}
    assert cfg["text"]["max_length"] == config.model.text.max_length
    assert cfg["heads"]["proj_dim"] == config.model.proj_dim
    assert cfg["source"]["step"] == 3


def test_timm_reproduces_encode_xray(out, enc, data):
    images, _ = data
    cfg = json.loads((out / "config.json").read_text())["vision"]
    model = timm_vit.VisionTransformer(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
        num_classes=0, global_pool="token", embed_dim=cfg["embed_dim"], depth=cfg["depth"],
        num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"])
    from safetensors.torch import load_file
    state = {k: v for k, v in load_file(out / "vision.safetensors").items()
             if k not in cfg["extra_keys"]}
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        got = model.eval()(_t(images)[:, None]).numpy()
    np.testing.assert_allclose(got, enc.encode_xray(images), atol=ATOL, rtol=0)


def _hf_text(folder, config, texts):
    """Hugging Face BertModel and tokenizer from `folder`: (model, loading info, tokens)."""
    hf, info = transformers.BertModel.from_pretrained(
        folder, add_pooling_layer=False, output_loading_info=True)
    tok = transformers.AutoTokenizer.from_pretrained(folder)(
        texts, max_length=config.model.text.max_length, padding="max_length", truncation=True,
        return_tensors="np")
    with torch.no_grad():
        hidden = hf.eval()(input_ids=_t(tok["input_ids"]).long(),
                           attention_mask=_t(tok["attention_mask"]).long()).last_hidden_state
    return hidden.numpy(), info, tok


def _check_text(folder, config, params, texts):
    """Hugging Face BertModel from `folder` vs the JAX text encoder: last_hidden_state."""
    got, info, tok = _hf_text(folder, config, texts)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref_tok = text_lib.load_tokenizer(UniMedI.from_config(config).text_checkpoint)(
        texts, max_length=config.model.text.max_length, padding="max_length", truncation=True,
        return_tensors="np")
    np.testing.assert_array_equal(tok["input_ids"], ref_tok["input_ids"])
    model = UniMedI.from_config(config)
    want = jax.jit(model.text.apply)({"params": params["text"]}, tok["input_ids"],
                                     tok["attention_mask"])["last_hidden_state"]
    valid = tok["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], np.asarray(want)[valid], atol=ATOL, rtol=0)


TEXTS = ["No acute cardiopulmonary process.",
         "Moderate right pleural effusion with adjacent atelectasis, unchanged."]


def test_transformers_reproduces_text_encoder(out, run):
    _check_text(out / "text", *run, TEXTS)


def test_torch_module_native_grids(torch_vit, enc, run, data):
    config, params = run
    images, volumes = data
    with torch.no_grad():
        np.testing.assert_allclose(torch_vit(images=_t(images)).numpy(), enc.encode_xray(images),
                                   atol=ATOL, rtol=0)
        np.testing.assert_allclose(torch_vit(volume=_t(volumes)).numpy(),
                                   enc.encode_ct(volumes, slices=0), atol=ATOL, rtol=0)
        # Mixed: the slices the JAX encoder selects, joined to the volume.
        indices, _ = enc.select_slices(volumes, 2)
        slices = volumes[np.arange(2)[:, None], indices * 2 + 1]
        got = torch_vit(volume=_t(volumes), images=_t(slices)).numpy()
    np.testing.assert_allclose(got, enc.encode_ct(volumes, slices=2), atol=ATOL, rtol=0)


def test_torch_module_other_grids(torch_vit, run):
    """Up- and downsampled (antialiased) position tables, in the mixed path."""
    config, params = run
    vit_apply = jax.jit(UniMedI.from_config(config).vit.apply)
    # 3D grid 2x2x6 (native 4x4x4), slices' 2D grid 2x6 (native 4x4): both tables shrink
    # along some axes and grow along others.
    volume = np.random.default_rng(2).normal(size=(2, 4, 16, 48)).astype(np.float32)
    slices = volume[:, [1, 3]]
    want, _ = vit_apply({"params": params["vision"]}, volume=volume, images=slices)
    with torch.no_grad():
        got = torch_vit(volume=_t(volume), images=_t(slices)).numpy()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("src,dst", [((4, 4), (6, 5)), ((4, 4), (2, 3)), ((5, 3), (2, 7)),
                                     ((4, 4, 4), (2, 2, 6)), ((4, 4, 4), (4, 4, 4))])
def test_resize_pos_embed_matches_jax(src, dst):
    pos = np.random.default_rng(3).normal(size=(1, int(np.prod(src)), 6)).astype(np.float32)
    want = vit_lib.resize_pos_embed(jnp.asarray(pos), src, dst)
    got = torch_model.resize_pos_embed(_t(pos), src, dst).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_torch_heads_match_encoder(torch_vit, out, run, enc, data):
    images, _ = data
    hidden, _, tokens = _hf_text(out / "text", run[0], TEXTS)
    assert torch_vit.text_pooling == run[0].model.text.pooling
    with torch.no_grad():
        img = torch_vit.embed(images=_t(images))
        txt = torch_vit.embed_text(torch_vit.pool_text(_t(hidden), _t(tokens["attention_mask"])))
        sim = torch_vit.similarity(img, txt).numpy()
        assert float(torch_vit.logit_scale.exp()) == pytest.approx(20.0, rel=1e-6)
    np.testing.assert_allclose(img.numpy(), enc.embed_xray(images), atol=ATOL, rtol=0)
    np.testing.assert_allclose(txt.numpy(), enc.encode_report(TEXTS), atol=ATOL, rtol=0)
    # Logits are cosines times 20: an error of ATOL in the unit vectors moves them by ~20 * ATOL.
    np.testing.assert_allclose(sim, enc.similarity(enc.embed_xray(images),
                                                   enc.encode_report(TEXTS)), atol=20 * ATOL,
                               rtol=0)


def test_refuses_non_empty_output_and_writes_atomically(run, tmp_path, monkeypatch):
    config, params = run
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=r"not empty; pass --overwrite"):
        export_lib.write_export(config, params, target)
    assert os.listdir(target) == ["keep.txt"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bert, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        export_lib.write_export(config, params, target, overwrite=True)
    assert os.listdir(target) == ["keep.txt"] and os.listdir(tmp_path) == ["out"]
    monkeypatch.undo()

    export_lib.write_export(config, params, target, overwrite=True)
    assert "keep.txt" not in os.listdir(target) and os.listdir(tmp_path) == ["out"]
    assert (target / "vision.safetensors").is_file()


def test_bad_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        export_lib.export(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_real_minilm_through_the_export(run, tmp_path):
    """The bundled all-MiniLM-L6-v2 text encoder survives the export."""
    config, _ = run
    config = config.copy_and_resolve_references()
    config.model.text.checkpoint = ""  # the bundled checkpoint
    model = UniMedI.from_config(config)
    params = random_params(jax.eval_shape(model.init_random, jax.random.key(0)), seed=5)
    _, params["text"] = bert.from_pretrained(model.text_checkpoint)
    export_lib.write_export(config, params, tmp_path / "out")
    _check_text(tmp_path / "out" / "text", config, params, TEXTS)
