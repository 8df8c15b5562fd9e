"""Input pipeline throughput: raw ArrayRecord reads, procedural generation, full Grain pipeline.

    python -m benchmarks.input_pipeline [--sizes=tiny,default] [--workers=0,2] [--steps=20]

For each size preset a phantom dataset (train split only) is built in a temporary folder with
`data_prep.build.build_dataset`; then, per modality, records/s of
  raw          iterating `builder.as_data_source("train")` (ArrayRecord read + decode only),
  procedural   `ProceduralPhantomSource` (generating records on demand),
  pipeline_wN  `make_dataset(train=True)` over the stored records with N worker processes:
               decode, check, augment, tokenise, batch; timed after the first batch, whose wait
               (worker start-up included) is reported as startup_wN_s.
The last line is a JSON object with every number.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import tensorflow_datasets as tfds
from absl import app, flags

from data_prep import build
from unimedi_jax.data import phantom, pipeline, sources
from unimedi_jax.models import bert

# Stored and crop sizes: "default" is configs/pretrain.py's, "paper" is DESIGN.md's
# (X-ray 256 stored, 224 crop; CT 32x128x128), "tiny" is for quick checks.
SIZES = {
    "tiny": dict(image_size=36, volume_size=(8, 32, 32), xray_crop=32, ct_crop=(8, 32, 32)),
    "default": dict(image_size=72, volume_size=(32, 64, 64), xray_crop=64, ct_crop=(32, 64, 64)),
    "paper": dict(image_size=256, volume_size=(32, 128, 128), xray_crop=224,
                  ct_crop=(32, 128, 128)),
}



def _define_flags() -> None:
    """The command line's flags, defined when run as a script only (other benchmarks import
    this module)."""
    flags.DEFINE_list("sizes", ["tiny", "default"], f"Size presets of {sorted(SIZES)}.")
    flags.DEFINE_list("workers", ["0", "2"], "Grain worker counts to time.")
    flags.DEFINE_integer("num_examples", 256, "Stored train examples per modality.")
    flags.DEFINE_integer("batch_size", 16, "Examples per batch.")
    flags.DEFINE_integer("steps", 20, "Batches timed per pipeline run (after the first).")
    flags.DEFINE_integer("max_length", 112, "Report tokens (DESIGN.md: 112).")
    flags.DEFINE_string("bench_data_dir", None, "Build here instead of a temp folder.")


def _rate(count: int, seconds: float) -> float:
    return round(count / max(seconds, 1e-9), 1)


def time_reads(source, count: int) -> float:
    """Records/s of reading `count` records in order."""
    start = time.perf_counter()
    for i in range(count):
        source[i]
    return _rate(count, time.perf_counter() - start)


def time_pipeline(source, modality: str, crop, workers: int, tokenizer: str, *,
                  batch_size: int = 16, steps: int = 20, max_length: int = 112) -> dict:
    """Examples/s of the training pipeline, after the first batch, and that batch's wait."""
    it = iter(pipeline.make_dataset(
        source, modality=modality, batch_size=batch_size, train=True, crop_size=crop,
        tokenizer_folder=tokenizer, max_length=max_length, seed=0, name=f"bench/{modality}",
        process_index=0, process_count=1, worker_count=workers))
    try:
        start = time.perf_counter()
        next(it)
        startup = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            next(it)
        rate = _rate(steps * batch_size, time.perf_counter() - start)
    finally:
        if hasattr(it, "close"):
            it.close()
    return {f"pipeline_w{workers}": rate, f"startup_w{workers}_s": round(startup, 2)}


def bench_size(name: str, data_dir: str, tokenizer: str, *, num_examples: int = 256,
               workers=(0, 2), **timing) -> dict:
    """Per modality of size preset `name`: build seconds and records/s (module docstring);
    `timing`: time_pipeline's batch_size, steps, max_length."""
    preset = SIZES[name]
    opts = phantom.PhantomOptions(image_size=preset["image_size"],
                                  volume_size=preset["volume_size"])
    results = {}
    for modality, crop in (("ct", preset["ct_crop"]), ("xray", preset["xray_crop"])):
        start = time.perf_counter()
        builder = build.build_dataset(
            "phantom", os.path.join(data_dir, name), modality=modality,
            num_train=num_examples, num_validation=0, num_test=0,
            image_size=opts.image_size, volume_size=opts.volume_size)
        out = {"build_s": round(time.perf_counter() - start, 2)}
        source = builder.as_data_source("train")
        out["raw"] = time_reads(source, len(source))
        procedural = sources.ProceduralPhantomSource(
            modality, phantom.split_seed(opts.seed, "train"), opts)
        out["procedural"] = time_reads(procedural, min(len(source), 128))
        for count in workers:
            out.update(time_pipeline(source, modality, crop, int(count), tokenizer, **timing))
        unit = "volumes/s" if modality == "ct" else "images/s"
        print(f"{name:8s} {modality:4s} ({unit}): " + ", ".join(f"{k} {v}" for k, v in out.items()),
              flush=True)
        results[modality] = out
    return results


def main(argv):
    del argv
    tfds.disable_progress_bar()
    f = flags.FLAGS
    unknown = sorted(set(f.sizes) - set(SIZES))
    if unknown:
        raise app.UsageError(f"--sizes: unknown preset(s) {unknown}; known: {sorted(SIZES)}")
    tokenizer = bert.default_checkpoint()
    timing = dict(batch_size=f.batch_size, steps=f.steps, max_length=f.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = f.bench_data_dir or tmp
        results = {name: bench_size(name, data_dir, tokenizer, num_examples=f.num_examples,
                                    workers=f.workers, **timing) for name in f.sizes}
    print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} CPUs",
                      "batch_size": f.batch_size, "max_length": f.max_length,
                      "num_examples": f.num_examples, "sizes": {k: SIZES[k] for k in results},
                      "rates": results}))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
