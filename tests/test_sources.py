"""Opening data: procedural and built phantom splits agree, missing splits are named, and the
pretraining and downstream-task paths read the same records."""

import ml_collections
import numpy as np
import pytest

from unimedi_jax.data import phantom, pipeline, sources, text
from unimedi_jax.eval import tasks

STORED = {"ct": (8, 16, 16), "xray": 16}
# seed=7: a stream other than the default's, so a source that drops the options differs.
TINY_PHANTOM = dict(xray_render_size=12, xray_depth_samples=8, seed=7)
TINY_SPLITS = dict(num_train=3, num_validation=2, num_test=0)


def assert_records_equal(got, expected):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype, key
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            assert text.as_text(got[key]) == text.as_text(value), key


@pytest.mark.parametrize("modality", ["ct", "xray"])
def test_procedural_split_equals_the_built_split(tmp_path, modality):
    kwargs = dict(data_dir=tmp_path, stored_size=STORED[modality],
                  options={**TINY_PHANTOM, **TINY_SPLITS})
    built = sources.open_dataset("phantom", modality, **kwargs)
    generated = sources.open_dataset("phantom", modality, procedural=True, **kwargs)
    assert built.splits == ("train", "validation") and generated.splits == built.splits
    assert built.label_names == generated.label_names == phantom.LABEL_NAMES
    for split in ("train", "validation"):
        stored, stream = built.split(split), generated.split(split)
        assert isinstance(stream, sources.ProceduralPhantomSource)
        assert len(stream) == len(stored) == TINY_SPLITS[f"num_{split}"]
        for i in range(2):
            assert_records_equal(stored[i], stream[i])
    shape = {"ct": ("volume", (8, 16, 16)), "xray": ("image", (16, 16))}[modality]
    assert stream[0][shape[0]].shape == shape[1]


@pytest.mark.parametrize("procedural", [False, True])
def test_missing_split_names_it_and_the_available_ones(tmp_path, procedural):
    with pytest.raises(ValueError, match=r"phantom \(ct\).* has no split\(s\) \['test'\]; it has "
                                         r"\['train', 'validation'\]"):
        sources.open_split("phantom", "ct", "test", data_dir=tmp_path, stored_size=STORED["ct"],
                           options={**TINY_PHANTOM, **TINY_SPLITS}, procedural=procedural)


def test_open_errors():
    with pytest.raises(ValueError, match="procedural=True needs the phantom"):
        sources.open_dataset("bcv", "ct", data_dir="/x", procedural=True)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['volume'\]"):
        sources.open_dataset("phantom", "ct", data_dir="/x", procedural=True,
                             options={"volume": (8, 16, 16)})
    with pytest.raises(ValueError, match="Unknown modality 'mri'"):
        sources.open_dataset("phantom", "mri", data_dir="/x", procedural=True)


def test_options_from_converts_lists_and_keeps_defaults():
    opts = phantom.options_from({"volume_size": [8, 16, 16], "finding_probs": [0.1] * 5,
                                 "seed": None, "image_size": 16})
    assert opts == phantom.PhantomOptions(volume_size=(8, 16, 16), finding_probs=(0.1,) * 5,
                                          image_size=16)
    assert phantom.split_sizes("ct", {"train": 3, "test": None}) == {
        "train": 3, "validation": 200, "test": 200}


@pytest.mark.parametrize("procedural", [False, True])
def test_tasks_and_pretraining_read_the_same_records(tmp_path, procedural):
    """A downstream task (procedural or built) and a pretraining run's evaluation source open
    the same split of the same build."""
    pretrain = ml_collections.ConfigDict(dict(data=dict(
        data_dir=str(tmp_path), phantom=TINY_PHANTOM, procedural=False,
        ct=dict(dataset="phantom", split="train", stored_size=STORED["ct"],
                options=TINY_SPLITS))))
    task = ml_collections.ConfigDict(dict(
        name="phantom", modality="ct", data_dir=str(tmp_path), manual_dir="",
        procedural=procedural, max_examples={}, validation_from_train=0.2,
        build_options=dict(**TINY_PHANTOM, **TINY_SPLITS, volume_size=STORED["ct"])))
    got, names = tasks.open_splits(task, ("train", "validation"))
    assert names == phantom.LABEL_NAMES
    data = pipeline.PretrainData(pretrain, tokenizer_folder="")
    for split in ("train", "validation"):
        expected = data.source("ct", split)
        assert len(got[split]) == len(expected)
        assert_records_equal(got[split][1], expected[1])
    assert len(list((tmp_path / "phantom").glob("ct*"))) == 1  # one build serves both
