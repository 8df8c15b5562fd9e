"""TFDS builder of the synthetic phantom (the embedded default data), written as ArrayRecord.

One builder, `phantom`, with one config per modality, so each config is one record layout:

    phantom/ct    volume int16 (D, H, W), mask uint8 (D, H, W), slice_has_finding uint8 (D,)
    phantom/xray  image uint8 (S, S), mask uint8 (S, S)

both with id, report and labels (docs/CONTRACTS.md), splits train/validation/test, and
`info.metadata["label_names"]` (= unimedi_jax.data.phantom.LABEL_NAMES) and
`info.metadata["options"]`. Record i of a split is
`generate_<modality>(split_seed(options.seed, split), i, options)`: the stored train split is
the start of the procedural training stream, and validation/test come from disjoint seeds.

Reading, with no TensorFlow:

    builder = data_prep.phantom.make_builder(DATA_DIR, modality="ct")   # the options it was
    source = builder.as_data_source("validation")                       # built with
    source[0]["volume"]  # int16 (32, 64, 64)

or, without this code, `tfds.builder_from_directory(DATA_DIR/phantom/ct/1.2.0)`. Default
options use the config names `ct` and `xray`; other options get `ct-<hash>` / `xray-<hash>`,
so datasets of different options never share a folder.

Options: keyword arguments of `make_builder` (`modality`, `num_train`, `num_validation`,
`num_test` and any `PhantomOptions` field) or the absl flags `--phantom_*` below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json

import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from tensorflow_datasets.core import shuffle as tfds_shuffle

from data_prep import records
from unimedi_jax.data import phantom

MODALITIES = ("ct", "xray")
# Default split sizes: the default build of both modalities stays under a minute on 2 cores
# (training draws unlimited pairs procedurally; the stored splits serve evaluation).
DEFAULT_EXAMPLES = {"ct": {"train": 1000, "validation": 200, "test": 200},
                    "xray": {"train": 2000, "validation": 400, "test": 400}}

records.define_flag(flags.DEFINE_enum, "phantom_modality", None,
                    "Phantom modality to build (default: both).", enum_values=list(MODALITIES))
for _split in phantom.SPLIT_INDEX:
    records.define_flag(flags.DEFINE_integer, f"phantom_num_{_split}", None,
                        f"Phantom {_split} examples (default: ct {DEFAULT_EXAMPLES['ct'][_split]}, "
                        f"xray {DEFAULT_EXAMPLES['xray'][_split]}).")
records.define_flag(flags.DEFINE_list, "phantom_volume_size", None, "Phantom CT size D,H,W.")
records.define_flag(flags.DEFINE_integer, "phantom_image_size", None, "Phantom X-ray side S.")
records.define_flag(flags.DEFINE_integer, "phantom_seed", None, "Phantom base seed.")
records.define_flag(flags.DEFINE_bool, "phantom_pair_drr_with_ct", None,
                    "Phantom X-ray i is the DRR of CT i.")


@dataclasses.dataclass(eq=False)
class PhantomConfig(tfds.core.BuilderConfig):
    """One modality of the phantom with its generator options and split sizes."""
    modality: str = "ct"
    num_examples: dict = dataclasses.field(default_factory=dict)  # split -> count
    options: phantom.PhantomOptions = phantom.PhantomOptions()


def make_config(modality: str, num_examples: dict | None = None,
                options: phantom.PhantomOptions | None = None) -> PhantomConfig:
    """The config of `modality`; named after the modality for default options, else
    `<modality>-<hash of the options and split sizes>`."""
    if modality not in MODALITIES:
        raise ValueError(f"phantom: modality {modality!r} is not one of {MODALITIES}")
    counts = dict(DEFAULT_EXAMPLES[modality])
    for split, n in (num_examples or {}).items():
        if split not in counts or int(n) < 0:
            raise ValueError(f"phantom: num_{split}={n!r}: needs a split of {list(counts)} "
                             "and a count >= 0")
        counts[split] = int(n)
    options = options or phantom.PhantomOptions()
    config = PhantomConfig(name=modality, modality=modality, num_examples=counts, options=options,
                           description=f"Phantom {modality}, {counts}")
    # Without TensorFlow, TFDS holds a whole split in memory before writing it (its shuffler
    # spills to disk only through tf.io.gfile).
    per_example = 3 * int(np.prod(_pixel_shape(config)))  # int16 pixels + mask, upper bound
    limit = tfds_shuffle.MAX_MEM_BUFFER_SIZE
    for split, n in counts.items():
        if n * per_example > limit and importlib.util.find_spec("tensorflow") is None:
            raise ValueError(
                f"phantom {modality}: num_{split}={n} examples of up to {per_example} bytes "
                f"exceed the {limit >> 20} MiB that TFDS writes per split without TensorFlow; "
                "use fewer (training draws unlimited examples procedurally)")
    if counts == DEFAULT_EXAMPLES[modality] and options == phantom.PhantomOptions():
        return config
    key = json.dumps([counts, dataclasses.asdict(options)], sort_keys=True)
    config.name = f"{modality}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    return config


def _pixel_shape(config: PhantomConfig) -> tuple:
    opts = config.options
    return tuple(opts.volume_size) if config.modality == "ct" else (opts.image_size,) * 2


class Phantom(tfds.core.GeneratorBasedBuilder):
    """Synthetic chest CT volumes and DRR X-rays with planted findings and generated reports."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Lesions twice their clinical width by default (lesion_scale=2).",
                     "1.2.0": "CT findings local in depth (mean share of finding slabs "
                              "0.55 -> 0.26): lesions centred on a slab, compact in depth, "
                              "fewer per case, bilateral effusions at one level (X-ray "
                              "lesions as before); slice_has_finding leaves out cardiomegaly "
                              "(a whole-organ finding, still in mask and labels). Reports: "
                              "more paraphrases, varied order, fewer negations (0.7 -> 0.35), "
                              "shorter filler (> 64 tokens: 19% -> 1% of CT reports)."}
    BUILDER_CONFIGS = [make_config(m) for m in MODALITIES]

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        config, opts = self.builder_config, self.builder_config.options
        shape = _pixel_shape(config)
        # Pixels as raw bytes (the default would widen every value to an int64 varint);
        # masks are nearly all background, and zlib shrinks them ~100x at little cost.
        pixels = {"volume": np.int16, "image": np.uint8}
        name = "volume" if config.modality == "ct" else "image"
        features = {
            "id": tfds.features.Text(),
            "report": tfds.features.Text(),
            "labels": tfds.features.Tensor(shape=(len(phantom.LABEL_NAMES),), dtype=np.float32),
            name: tfds.features.Tensor(shape=shape, dtype=pixels[name],
                                       encoding=tfds.features.Encoding.BYTES),
            "mask": tfds.features.Tensor(shape=shape, dtype=np.uint8,
                                         encoding=tfds.features.Encoding.ZLIB),
        }
        if config.modality == "ct":
            features["slice_has_finding"] = tfds.features.Tensor(shape=shape[:1], dtype=np.uint8)
        features = tfds.features.FeaturesDict(features)
        metadata = tfds.core.MetadataDict(
            label_names=list(phantom.LABEL_NAMES), skipped=[],
            mask_classes=["background", *phantom.LABEL_NAMES],
            options={**dataclasses.asdict(opts), "num_examples": config.num_examples})
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features,
                                     metadata=metadata, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to download
        return {split: self._generate_examples(split, n)
                for split, n in self.builder_config.num_examples.items() if n > 0}

    def _generate_examples(self, split: str, count: int):
        config = self.builder_config
        generate = phantom.generate_ct if config.modality == "ct" else phantom.generate_xray
        seed = phantom.split_seed(config.options.seed, split)
        for index in range(count):
            yield index, generate(seed, index, config.options)


def make_builder(data_dir, manual_dir=None, *, modality=None, num_train=None,
                 num_validation=None, num_test=None, **options):
    """The phantom builder of `modality` ("ct" | "xray"), or a list [ct, xray] when neither
    the argument nor `--phantom_modality` names one. `options`: `PhantomOptions` fields
    (None: the flag `--phantom_<field>` if set, else the default)."""
    del manual_dir  # generated data
    options = {k: v for k, v in options.items() if v is not None}
    counts = {split: records.option(f"phantom_num_{split}", n)
              for split, n in (("train", num_train), ("validation", num_validation),
                               ("test", num_test))}
    for field in ("volume_size", "image_size", "seed", "pair_drr_with_ct"):
        value = records.option(f"phantom_{field}", options.get(field))
        if value is not None:
            options[field] = tuple(int(v) for v in value) if field == "volume_size" else value
    known = {f.name for f in dataclasses.fields(phantom.PhantomOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"phantom: unknown option(s) {unknown}; known: {sorted(known)}")
    opts = phantom.PhantomOptions(**options)
    counts = {s: n for s, n in counts.items() if n is not None}
    modality = records.option("phantom_modality", modality)
    configs = [make_config(m, counts, opts) for m in ([modality] if modality else MODALITIES)]
    # TFDS takes the registered default configs by name only.
    builders = [Phantom(data_dir=data_dir, config=c.name if c.name in MODALITIES else c)
                for c in configs]
    return builders[0] if modality else builders
