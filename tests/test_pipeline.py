"""Grain pipelines: batch contract, determinism, sharding, resumption, tokenisation, bad records."""

import functools
import json
import pickle

import numpy as np
import pytest

from unimedi_jax.data import phantom, pipeline, preprocess, sources, text



@functools.cache
def tokenizer_folder():
    # Called in tests only: worker processes import this module to unpickle ListSource.
    from unimedi_jax.models import bert

    return bert.default_checkpoint()

MAX_LENGTH = 24
LONG_REPORT = " ".join(["Bilateral lower lobe consolidation with air bronchograms."] * 8)


def report(index: int) -> str:
    if index % 5 == 3:
        return LONG_REPORT
    return f"Record {index}: nodule in the left lung, 4 mm. Größe ±0."


class ListSource:
    """In-memory records; labels[0] holds the record index so batches can be traced back."""

    def __init__(self, modality, n, stored, num_labels=3, broken=None):
        self.modality, self.n, self.stored, self.num_labels = modality, n, stored, num_labels
        self.broken = broken or {}  # index -> (field, value); value None deletes the field

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        rng = np.random.default_rng(index)
        labels = np.zeros(self.num_labels, np.float32)
        labels[0] = index
        record = {"id": f"r{index}", "report": report(index).encode(), "labels": labels}
        if self.modality == "xray":
            record["image"] = rng.integers(0, 256, self.stored).astype(np.uint8)
            record["mask"] = (record["image"] > 128).astype(np.uint8)
        else:
            record["volume"] = rng.integers(-1100, 1100, self.stored).astype(np.int16)
            record["mask"] = (record["volume"] > 900).astype(np.uint8)
            depth = np.arange(self.stored[0])
            record["slice_has_finding"] = ((depth + index) % 3 == 0).astype(np.uint8)
        if index in self.broken:
            field, value = self.broken[index]
            if value is None:
                del record[field]
            else:
                record[field] = value
        return record


XRAY = dict(modality="xray", crop_size=8)
CT = dict(modality="ct", crop_size=(4, 8, 8))
STORED = {"xray": (10, 10), "ct": (6, 10, 10)}


def make(source, **kwargs):
    options = dict(batch_size=4, train=True, seed=0, tokenizer_folder=tokenizer_folder(),
                   max_length=MAX_LENGTH, process_index=0, process_count=1)
    options.update(kwargs)
    return pipeline.make_dataset(source, **options)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def indices(batches):
    return [int(i) for b in batches for i in b["labels"][:, 0]]


# ---------------------------------------------------------------- batch contract


@pytest.mark.parametrize("spec", [XRAY, CT], ids=["xray", "ct"])
@pytest.mark.parametrize("train", [True, False])
def test_batch_shapes_and_dtypes(spec, train):
    source = ListSource(spec["modality"], 12, STORED[spec["modality"]])
    batch = next(iter(make(source, train=train, **spec)))
    crop = preprocess.as_shape(spec["crop_size"], len(STORED[spec["modality"]]))
    expected = {"labels": (np.float32, (4, 3)), "input_ids": (np.int32, (4, MAX_LENGTH)),
                "attention_mask": (np.int32, (4, MAX_LENGTH))}
    if spec["modality"] == "xray":
        expected["image"] = (np.float32, (4, *crop))
    else:
        expected["volume"] = (np.float32, (4, *crop))
        expected["slice_has_finding"] = (np.uint8, (4, crop[0]))
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == \
        {k: (np.dtype(d), s) for k, (d, s) in expected.items()}


def test_eval_batches_are_preprocessed_records_in_order():
    source = ListSource("ct", 8, STORED["ct"])
    batches = take(iter(make(source, train=False, with_mask=True, **CT)), 2)
    assert indices(batches) == list(range(8))
    for i, volume in enumerate(np.concatenate([b["volume"] for b in batches])):
        record = source[i]
        np.testing.assert_array_equal(volume, preprocess.preprocess_ct(record["volume"], (4, 8, 8)))
        np.testing.assert_array_equal(batches[i // 4]["mask"][i % 4],
                                      preprocess.center_crop(record["mask"], (4, 8, 8)))
        np.testing.assert_array_equal(batches[i // 4]["slice_has_finding"][i % 4],
                                      record["slice_has_finding"][1:5])


def test_train_batches_are_augmented_views_of_their_records():
    """Each training image is a crop of its own record's normalised image (tracked by label)."""
    source = ListSource("xray", 12, STORED["xray"])
    batch = next(iter(make(source, augment=pipeline.transforms.AugmentOptions(), **XRAY)))
    for image, index in zip(batch["image"], batch["labels"][:, 0]):
        full = preprocess.normalize_xray(source[int(index)]["image"])
        assert any(np.array_equal(image, full[r:r + 8, c:c + 8])
                   for r in range(3) for c in range(3))


def test_tokens_equal_the_hugging_face_tokenizer():
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_folder(), local_files_only=True)
    source = ListSource("xray", 10, STORED["xray"])
    batches = take(iter(make(source, train=False, **XRAY)), 2)
    reports = [report(i) for i in indices(batches)]
    expected = hf(reports, max_length=MAX_LENGTH, padding="max_length", truncation=True)
    tokens = {k: np.concatenate([b[k] for b in batches]) for k in ("input_ids", "attention_mask")}
    np.testing.assert_array_equal(tokens["input_ids"], np.array(expected["input_ids"]))
    np.testing.assert_array_equal(tokens["attention_mask"], np.array(expected["attention_mask"]))
    assert tokens["attention_mask"][3].all()  # the long report is truncated, not dropped
    assert not tokens["attention_mask"][0].all()  # a short one is padded


def test_tokenize_function_single_and_batch():
    tokenizer = text.cached_tokenizer(tokenizer_folder())
    single = text.tokenize(tokenizer, "No effusion.", 8)
    both = text.tokenize(tokenizer, ["No effusion.", LONG_REPORT], 8)
    assert single["input_ids"].shape == (8,) and both["input_ids"].shape == (2, 8)
    assert single["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(single["input_ids"], both["input_ids"][0])
    assert text.as_text(np.array(b"caf\xc3\xa9")) == "café"


def test_pipeline_tokenizer_gives_the_transformers_ids_without_importing_transformers(
        tmp_path):
    """The pipeline's tokenizer (the Rust `tokenizers.Tokenizer` of tokenizer.json) gives the
    same ids and masks as `transformers`' fast tokenizer, on phantom reports of both modalities
    and edge cases, padded and truncated; a Grain worker loading it never imports transformers
    (seconds: it imports torch); a folder with vocab.txt only falls back to transformers."""
    import shutil
    import subprocess
    import sys

    folder = tokenizer_folder()
    light, reference = text.cached_tokenizer(folder), text.load_tokenizer(folder)
    assert not hasattr(light, "save_pretrained")  # not the transformers object
    opts = phantom.PhantomOptions(volume_size=(8, 16, 16), image_size=16, xray_render_size=12)
    reports = [phantom.generate(m, 0, i, opts)["report"] for m in ("ct", "xray")
               for i in range(6)]
    reports += [LONG_REPORT, "", "Ünïcode, TABS\tand CAPS; [CLS] literal.", "a " * 300]
    for max_length in (5, 16, 112):
        got = text.tokenize(light, reports, max_length)
        want = reference(reports, max_length=max_length, padding="max_length", truncation=True)
        np.testing.assert_array_equal(got["input_ids"], np.array(want["input_ids"]))
        np.testing.assert_array_equal(got["attention_mask"], np.array(want["attention_mask"]))

    code = ("import sys; from unimedi_jax.data import text; "
            f"t = text.Tokenize({folder!r}, 8).map({{'report': b'No effusion.'}}); "
            "assert t['input_ids'].shape == (8,); "
            "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out

    vocab_only = tmp_path / "vocab_only"
    vocab_only.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{folder}/{name}", vocab_only / name)
    fallback = text.cached_tokenizer(str(vocab_only))
    assert hasattr(fallback, "save_pretrained")
    np.testing.assert_array_equal(text.tokenize(fallback, reports, 16)["input_ids"],
                                  text.tokenize(light, reports, 16)["input_ids"])


# ---------------------------------------------------------------- determinism


def test_same_seed_same_batches_different_seed_different():
    source = ListSource("ct", 16, STORED["ct"])
    a = take(iter(make(source, seed=3, **CT)), 3)
    b = take(iter(make(source, seed=3, **CT)), 3)
    c = take(iter(make(source, seed=4, **CT)), 3)
    assert_batches_equal(a, b)
    assert indices(a) != indices(c)
    assert not np.array_equal(a[0]["volume"], c[0]["volume"])


def test_epochs_are_reshuffled_and_cover_the_split():
    source = ListSource("xray", 8, STORED["xray"])
    order = indices(take(iter(make(source, num_epochs=2, **XRAY)), 4))
    assert sorted(order[:8]) == sorted(order[8:]) == list(range(8))
    assert order[:8] != order[8:]
    with pytest.raises(StopIteration):
        it = iter(make(source, num_epochs=1, **XRAY))
        take(it, 3)


@pytest.mark.parametrize("train", [True, False])
def test_process_shards_are_disjoint_and_cover_the_split(train):
    source = ListSource("xray", 24, STORED["xray"])
    seen = [indices(take(iter(make(source, train=train, num_epochs=1, process_index=p,
                                   process_count=2, **XRAY)), 3)) for p in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 12
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))


def test_augmentation_does_not_depend_on_the_process_count():
    """Process p of 2 gets global positions p, p + 2, ... with the same crops as one process."""
    source = ListSource("xray", 8, STORED["xray"])
    single = take(iter(make(source, batch_size=1, **XRAY)), 8)
    for p in (0, 1):
        shard = take(iter(make(source, batch_size=1, process_index=p, process_count=2, **XRAY)), 4)
        assert_batches_equal(shard, single[p::2])


def test_uneven_split_gives_equal_shards():
    source = ListSource("xray", 25, STORED["xray"])
    sizes = []
    for p in range(3):
        ds = make(source, train=False, num_epochs=1, batch_size=1, process_index=p,
                  process_count=3, **XRAY)
        sizes.append(len(indices(list(ds))))
    assert sizes == [8, 8, 8]


# ---------------------------------------------------------------- resumption


def test_restored_iterator_continues_with_the_next_batch():
    source = ListSource("ct", 20, STORED["ct"])
    it = iter(make(source, **CT))
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 2)
    fresh = iter(make(source, **CT))
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 2), expected)


def _mixed():
    return pipeline.MixedIterator(xray=iter(make(ListSource("xray", 12, STORED["xray"]), **XRAY)),
                                  ct=iter(make(ListSource("ct", 10, STORED["ct"]), batch_size=3,
                                               **CT)))


def test_mixed_iterator_state_round_trip():
    mixed = _mixed()
    first = next(mixed)
    assert set(first) == {"xray", "ct"} and first["ct"]["volume"].shape == (3, 4, 8, 8)
    take(mixed, 4)  # crosses epoch boundaries of both sources
    state = mixed.get_state()
    assert json.loads(json.dumps(state)) == state
    expected = take(mixed, 2)
    fresh = _mixed()
    fresh.set_state(state)
    for got, want in zip(take(fresh, 2), expected):
        assert_batches_equal([got["xray"], got["ct"]], [want["xray"], want["ct"]])
    with pytest.raises(ValueError, match="parts"):
        fresh.set_state({"xray": state["xray"]})


def test_worker_processes_match_in_process_reading_and_resume():
    # Without text: a worker's first tokenisation imports transformers (and torch), ~7 s each.
    source, options = ListSource("xray", 12, STORED["xray"]), dict(tokenizer_folder=None, **XRAY)
    expected = take(iter(make(source, **options)), 4)
    assert "input_ids" not in expected[0]
    it = iter(make(source, worker_count=2, **options))
    try:
        assert_batches_equal(take(it, 2), expected[:2])
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    resumed = iter(make(source, worker_count=2, **options))
    try:
        resumed.set_state(state)
        assert_batches_equal(take(resumed, 2), expected[2:])
    finally:
        resumed.close()


def test_tokenize_transform_pickles_without_its_tokenizer():
    transform = text.Tokenize(tokenizer_folder(), max_length=8)
    restored = pickle.loads(pickle.dumps(transform))
    assert vars(restored) == {"folder": tokenizer_folder(), "max_length": 8, "field": "report"}
    out = restored.map({"report": b"No effusion.", "labels": np.zeros(1, np.float32)})
    assert set(out) == {"labels", "input_ids", "attention_mask"}
    tokens = text.tokenize(text.cached_tokenizer(tokenizer_folder()), "No effusion.", 8)
    np.testing.assert_array_equal(out["input_ids"], tokens["input_ids"])


# ---------------------------------------------------------------- procedural phantom


def test_procedural_source_is_the_phantom_generator():
    opts = phantom.PhantomOptions(volume_size=(8, 16, 16), image_size=16, xray_render_size=12,
                                  xray_depth_samples=8)
    seed = phantom.split_seed(0, "train")
    source = sources.ProceduralPhantomSource("ct", seed, opts)
    assert len(source) == 2**31 - 1
    record, expected = source[5], phantom.generate_ct(seed, 5, opts)
    assert record.keys() == expected.keys()
    np.testing.assert_array_equal(record["volume"], expected["volume"])
    with pytest.raises(IndexError):
        source[-1]
    batch = next(iter(make(source, modality="ct", crop_size=(8, 16, 16))))
    assert batch["volume"].shape == (4, 8, 16, 16) and batch["slice_has_finding"].shape == (4, 8)
    xray = next(iter(make(sources.ProceduralPhantomSource("xray", seed, opts),
                          modality="xray", crop_size=12)))
    assert xray["image"].shape == (4, 12, 12) and xray["labels"].shape == (4, 5)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("broken, message", [
    ((3, ("volume", None)), r"toy/train: record 3 lacks field\(s\) \['volume'\]"),
    ((2, ("volume", np.zeros((6, 10, 10), np.float32))),
     r"record 2: field 'volume' is float32\[6, 10, 10\], expected int16\[6, 10, 10\]"),
    ((5, ("volume", np.zeros((6, 10, 9), np.int16))),
     r"record 5: field 'volume' is int16\[6, 10, 9\]"),
    ((1, ("labels", np.zeros(4, np.float32))),
     r"record 1: field 'labels' is float32\[4\], expected float32\[3\]"),
    ((4, ("report", 7)), r"record 4: field 'report' is a int, expected text"),
])
def test_bad_record_is_named(broken, message):
    source = ListSource("ct", 8, STORED["ct"], broken=dict([broken]))
    with pytest.raises(ValueError, match=message):
        take(iter(make(source, train=False, name="toy/train", **CT)), 2)


def test_bad_first_record_empty_split_and_bad_sizes_fail_at_construction():
    with pytest.raises(ValueError, match="toy/test: the split is empty"):
        make(ListSource("xray", 0, STORED["xray"]), name="toy/test", **XRAY)
    bad_first = ListSource("xray", 4, STORED["xray"],
                           broken={0: ("image", np.zeros((10, 10), np.int16))})
    with pytest.raises(ValueError, match=r"toy: record 0: field 'image' is int16\[10, 10\], "
                                         r"expected uint8 of rank 2"):
        make(bad_first, name="toy", **XRAY)
    with pytest.raises(ValueError, match=r"crop_size \(12, 12\) exceeds the stored image "
                                         r"shape \(10, 10\)"):
        make(ListSource("xray", 4, STORED["xray"]), modality="xray", crop_size=12)
    with pytest.raises(ValueError, match="cannot be split over 3 processes"):
        make(ListSource("xray", 2, STORED["xray"]), process_index=0, process_count=3, **XRAY)
    with pytest.raises(ValueError, match="do not fill one batch"):
        make(ListSource("xray", 3, STORED["xray"]), num_epochs=1, **XRAY)


# ---------------------------------------------------------------- prepared phantom, config


TINY_PHANTOM = dict(xray_render_size=12, xray_depth_samples=8, seed=7)
TINY_SPLITS = dict(num_train=8, num_validation=4, num_test=0)


def tiny_data_config(data_dir, procedural):
    import ml_collections

    return ml_collections.ConfigDict(dict(
        data_dir=str(data_dir), procedural=procedural, phantom=TINY_PHANTOM, seed=1,
        max_length=MAX_LENGTH, worker_count=0, batch_size_xray=4, batch_size_ct=2,
        xray=dict(dataset="phantom", split="train", stored_size=16, crop_size=12,
                  options=TINY_SPLITS),
        ct=dict(dataset="phantom", split="train", stored_size=(8, 16, 16), crop_size=(8, 12, 12),
                augment=dict(intensity_scale=0.0), options=TINY_SPLITS)))


def test_prepared_phantom_split_is_the_start_of_the_procedural_stream(tmp_path):
    source = sources.open_split("phantom", "ct", "validation", data_dir=tmp_path,
                                stored_size=(8, 16, 16), options={**TINY_PHANTOM, **TINY_SPLITS})
    assert len(source) == 4
    opts = phantom.PhantomOptions(volume_size=(8, 16, 16), **TINY_PHANTOM)
    stream = sources.ProceduralPhantomSource("ct", phantom.split_seed(7, "validation"), opts)
    for i in range(4):
        np.testing.assert_array_equal(source[i]["volume"], stream[i]["volume"])
        assert text.as_text(source[i]["report"]) == stream[i]["report"]
    batch = next(iter(make(source, train=False, modality="ct", crop_size=(8, 12, 12))))
    volumes = np.stack([stream[i]["volume"] for i in range(4)])
    expected = preprocess.preprocess_ct(volumes, (8, 12, 12))
    np.testing.assert_array_equal(batch["volume"], expected)
    np.testing.assert_array_equal(batch["slice_has_finding"],
                                  np.stack([stream[i]["slice_has_finding"] for i in range(4)]))
    with pytest.raises(ValueError, match=r"has no split\(s\) \['test'\]"):
        sources.open_split("phantom", "ct", "test", data_dir=tmp_path, stored_size=(8, 16, 16),
                           options={**TINY_PHANTOM, **TINY_SPLITS})


@pytest.mark.parametrize("procedural", [True, False])
def test_make_mixed_from_config_resumes_exactly(tmp_path, procedural):
    data = tiny_data_config(tmp_path, procedural)
    mixed = pipeline.make_mixed(data, tokenizer_folder=tokenizer_folder(),
                                process_index=0, process_count=1)
    batch = next(mixed)
    assert batch["xray"]["image"].shape == (4, 12, 12)
    assert batch["xray"]["input_ids"].shape == (4, MAX_LENGTH)
    assert batch["ct"]["volume"].shape == (2, 8, 12, 12)
    assert batch["ct"]["slice_has_finding"].shape == (2, 8)
    take(mixed, 4)  # past the 8-record prepared splits
    state = mixed.get_state()
    expected = take(mixed, 2)
    fresh = pipeline.make_mixed(data, tokenizer_folder=tokenizer_folder(),
                                process_index=0, process_count=1)
    fresh.set_state(state)
    for got, want in zip(take(fresh, 2), expected):
        assert_batches_equal([got["xray"], got["ct"]], [want["xray"], want["ct"]])
    assert (tmp_path / "phantom").exists() != procedural  # procedural training builds nothing


def test_make_mixed_config_errors(tmp_path):
    data = tiny_data_config(tmp_path, procedural=True)
    data.batch_size_ct = 3
    with pytest.raises(ValueError, match="batch_size_ct=3 is not divisible by the process count 2"):
        pipeline.make_mixed(data, tokenizer_folder=None, process_index=0, process_count=2)
    data.batch_size_ct = 0  # leaves CT out
    assert set(next(pipeline.make_mixed(data, tokenizer_folder=None, process_index=0,
                                        process_count=1))) == {"xray"}
    data.xray.dataset = "mimic_cxr"
    with pytest.raises(ValueError, match="procedural needs config.data.xray.dataset='phantom'"):
        pipeline.make_mixed(data, tokenizer_folder=None, process_index=0, process_count=1)
