"""Builds a dataset as ArrayRecord for the Grain pipelines.

    python -m data_prep.build --dataset=NAME --data_dir=OUT [--manual_dir=RAW] [NAME options]

NAME is a module `data_prep/NAME.py` of `DATASETS` with a module-level
`make_builder(data_dir, manual_dir, **options)` returning a TFDS builder (or a list of
builders, for a dataset stored as several configs such as the phantom's CT and X-ray parts).
Each module defines its own absl flags (`--phantom_num_train`, `--manifest`, ...) at import, so
the command line imports every module before parsing flags (`--helpfull` lists them all);
a module that cannot be imported is an error only when its dataset is asked for.

From Python, `build_dataset(name, data_dir, manual_dir=None, **options)` does the same and
returns the prepared builder(s); a dataset that is already prepared is returned without work.
TFDS writes into a temporary folder renamed only when every split is written, so a failed or
interrupted build never leaves a dataset that looks complete.
"""

from __future__ import annotations

import importlib
import time

from absl import app, flags, logging

DATASETS = ("phantom", "manifest", "mimic_cxr", "chexpert", "rsna", "covidx", "bimcv",
            "cc_ccii", "luna16", "bcv")

_IMPORT_ERRORS: dict[str, ImportError] = {}


def _import_all():
    """Imports every dataset module that can be imported (their flags must exist before
    parsing); remembers why the others could not, to say so if one of them is asked for."""
    for name in DATASETS:
        try:
            importlib.import_module(f"data_prep.{name}")
        except ImportError as error:
            _IMPORT_ERRORS[name] = error


def dataset_module(name: str):
    """The module `data_prep.<name>`; a clear error for unknown or unimportable names."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    try:
        return importlib.import_module(f"data_prep.{name}")
    except ImportError as error:
        raise ImportError(f"dataset {name!r}: data_prep/{name}.py could not be imported: "
                          f"{error}") from _IMPORT_ERRORS.get(name, error)


def build_dataset(name: str, data_dir, manual_dir=None, **options):
    """Prepares dataset `name` under `data_dir` (reading raw files from `manual_dir`) unless it
    already is; returns what the module's `make_builder` returns (a builder or a list)."""
    made = dataset_module(name).make_builder(data_dir, manual_dir, **options)
    for builder in made if isinstance(made, (list, tuple)) else [made]:
        if builder.is_prepared():
            logging.info("%s is already prepared in %s", builder.info.full_name, builder.data_dir)
            continue
        builder.download_and_prepare(file_format="array_record")
    return made


def summary(builder) -> str:
    """Examples per split, and the rows left out and why (metadata `skipped`, `filtered`)."""
    info = builder.info
    counts = ", ".join(f"{s}: {info.splits[s].num_examples}" for s in info.splits)
    lines = [f"{info.full_name} in {builder.data_dir}: {counts}"]
    metadata = info.metadata or {}
    skipped = metadata.get("skipped") or []
    lines.append(f"  skipped rows: {len(skipped)}")
    lines += [f"    {row['where']}: {row['path']}: {row['reason']}" for row in skipped]
    for reason, n in sorted((metadata.get("filtered") or {}).items()):
        lines.append(f"  left out by design: {n} ({reason})")
    return "\n".join(lines)


def _define_flags():
    _import_all()
    flags.DEFINE_enum("dataset", None, list(DATASETS), "Dataset to build.")
    flags.DEFINE_string("data_dir", None, "Output folder (the TFDS data_dir).")
    flags.DEFINE_string("manual_dir", None, "Folder of the raw files (not used by the phantom).")
    flags.mark_flags_as_required(["dataset", "data_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    made = build_dataset(flags.FLAGS.dataset, flags.FLAGS.data_dir, flags.FLAGS.manual_dir)
    seconds = time.perf_counter() - start
    for builder in made if isinstance(made, (list, tuple)) else [made]:
        print(summary(builder))
    print(f"done in {seconds:.1f} s")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
