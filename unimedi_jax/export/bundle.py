"""Exports a pretraining run as a bundled checkpoint (layout: `unimedi_jax/models/bundle.py`).

    python -m unimedi_jax.export.bundle --workdir=W --name=phantom-default [--step=N]
        [--data_dir=DATA] [--assets_dir=unimedi_jax/assets]

writes ASSETS/NAME.safetensors and ASSETS/NAME.json, loadable as `inference.load(NAME)`. The
JSON holds the run's config, the step, the text checkpoint's name and the evaluation numbers of
the bundled encoder (`eval.pretrain_eval`, as eval_summary.json) on the phantom TEST split:
`eval` over the whole split, `eval_prefix` over its first PREFIX_EXAMPLES records per modality
(what tests/test_bundle.py reproduces; a phantom built with fewer test examples holds the same
first records). The data is the run's `config.data` (built into --data_dir when missing).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from unimedi_jax import inference
from unimedi_jax.data import pipeline
from unimedi_jax.eval import pretrain_eval
from unimedi_jax.models import bundle
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.objective import methods, optim
from unimedi_jax.train import checkpoint

EVAL_SPLIT = "test"
PREFIX_EXAMPLES = 32  # records per modality of `eval_prefix` (seconds to evaluate in a test)
MAX_BYTES = 16 << 20  # the weights file of a bundle shipped with the package


class ExportError(ValueError):
    """A run or name that cannot be bundled (the message says why)."""


def trained_text_keys(params: dict, config) -> list[str]:
    """The "text/..." keys of the leaves the optimiser trained (`model.text.trainable_layers`)."""
    mask = optim.trainable_mask(params, config)[bundle.TEXT_KEY]
    return sorted(bundle.SEP.join([bundle.TEXT_KEY, *(str(getattr(k, "key", k)) for k in path)])
                  for path, trains in jax.tree_util.tree_leaves_with_path(mask) if trains)


def check_frozen_text(params: dict, config, text_stored: list[str]) -> None:
    """The frozen text leaves equal the text checkpoint's (what a bundle loads in their place)."""
    reference = bundle.flatten(UniMedI.from_config(config).load_text_params(),
                               bundle.TEXT_KEY + bundle.SEP)
    ours = bundle.flatten(params[bundle.TEXT_KEY], bundle.TEXT_KEY + bundle.SEP)
    differ = [k for k in sorted(ours) if k not in text_stored and (
        k not in reference or not np.array_equal(ours[k], reference[k]))]
    if differ:
        raise ExportError(f"the frozen text weights {differ[:3]}{'...' if len(differ) > 3 else ''}"
                         f" differ from {bundle.text_checkpoint_name(config)}, which a bundle "
                         "loads in their place")


def evaluate_test(params: dict, config, *, data_dir: str | None = None,
                  max_examples: int | None = None, build_options: dict | None = None) -> dict:
    """`pretrain_eval.evaluate` of the student `params` on the phantom test split.

    max_examples: the first records of each modality (None: every record); the slab-position
    prior reads as many training CTs. data_dir: instead of `config.data.data_dir`;
    build_options: extra builder options per modality (e.g. smaller split sizes for a test).
    Returns {"split", "examples": {"ct", "xray", "ct_train_for_prior"}, "metrics"}.
    """
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.eval.split = EVAL_SPLIT
    if data_dir:
        cfg.data.data_dir = data_dir
    for modality in ("ct", "xray"):
        cfg.data[modality].options = {**dict(cfg.data[modality].get("options") or {}),
                                      **(build_options or {})}
    data = pipeline.make_pretrain_data(cfg, UniMedI.from_config(cfg).text_checkpoint)
    sources = {"ct": data.val_ct, "xray": data.val_xray, "ct_train_for_prior": data.train_ct}
    sizes = [len(s) for k, s in sources.items() if s is not None and k != "ct_train_for_prior"]
    if not sizes:
        raise ExportError("the config trains on neither modality (data.batch_size_ct and "
                         "data.batch_size_xray are 0): nothing to evaluate")
    cfg.eval.max_examples = int(max_examples or max(sizes))
    metrics = pretrain_eval.evaluate(params, cfg, data.val_ct, data.val_xray, data.train_ct)
    return {"split": EVAL_SPLIT,
            "examples": {k: min(cfg.eval.max_examples, len(s)) for k, s in sources.items()
                         if s is not None},
            "metrics": {k: float(v) for k, v in metrics.items()}}


def _same(a: dict, b: dict) -> bool:
    fa, fb = bundle.flatten(a), bundle.flatten(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def export(workdir: str | os.PathLike, name: str, *, step: int | None = None,
           data_dir: str | None = None, assets_dir: str | os.PathLike = bundle.ASSETS,
           prefix: int = PREFIX_EXAMPLES, evaluate: bool = True) -> tuple[Path, Path]:
    """Writes bundle `name` of checkpoint `step` (default: the latest) of a pretraining
    `workdir` into `assets_dir`; returns (weights, JSON) paths.

    The bundle is written to a temporary folder, read back (`bundle.read`) and checked equal to
    the checkpoint's params, evaluated (unless `evaluate` is off), and only then moved into
    `assets_dir`: the weights first, the JSON (which holds their digest) last.
    """
    if not name or os.sep in name or "/" in name or name.startswith("."):
        raise ExportError(f"--name={name!r}: a bundle name is a plain file stem, e.g. "
                         "phantom-default")
    workdir, step = inference.resolve_checkpoint(workdir, step)
    config, params = checkpoint.load_pretrained(str(workdir), step)
    if "model" not in config:
        raise ExportError(f"{workdir / checkpoint.CONFIG_FILE} has no 'model' section: not the "
                         "config of a pretraining run")
    if not methods.has_text(config):
        raise ExportError(f"{workdir} was pretrained with config.method="
                          f"{methods.name(config)!r}: a bundle packages a UniMedI run (encoder, "
                          "text tower and heads); `python -m unimedi_jax.export` writes its "
                          "encoder")
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    text_stored = trained_text_keys(params, config)
    check_frozen_text(params, config, text_stored)
    meta = {"step": int(step), "text_checkpoint": bundle.text_checkpoint_name(config),
            "source": {"workdir": str(workdir), "step": int(step)}}
    assets_dir = Path(assets_dir).expanduser().absolute()
    assets_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=assets_dir))
    try:
        weights, _ = bundle.write(staging, name, params, {**meta, "config": config.to_dict()},
                                  text_stored)
        size = weights.stat().st_size
        if size > MAX_BYTES:
            raise ExportError(f"the bundle's weights take {size / 2**20:.1f} MiB, over the "
                             f"{MAX_BYTES >> 20} MiB a packaged checkpoint may take")
        loaded = bundle.read(name, staging)
        if not _same(loaded.params, params):
            raise AssertionError("the bundle does not read back as the checkpoint's params")
        if evaluate:
            logging.info("Evaluating step %d on the %s split", step, EVAL_SPLIT)
            meta["eval"] = {"about": f"every record of the {EVAL_SPLIT} split",
                            **evaluate_test(loaded.params, loaded.config, data_dir=data_dir)}
            meta["eval_prefix"] = {
                "about": f"the first {prefix} records of the {EVAL_SPLIT} split per modality (and "
                         f"of the training CTs, for the slab-position prior): what "
                         f"tests/test_bundle.py reproduces, within 1e-4, on a phantom built "
                         f"with only those records",
                **evaluate_test(loaded.params, loaded.config, data_dir=data_dir,
                                max_examples=prefix)}
        weights, path = bundle.write(staging, name, params,
                                     {**meta, "config": config.to_dict()}, text_stored)
        os.replace(weights, assets_dir / weights.name)
        os.replace(path, assets_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return assets_dir / weights.name, assets_dir / path.name


def _define_flags() -> None:
    """The command line's flags, defined when run as a script only: importing this module (the
    tests, `export`) leaves the process's flags alone."""
    flags.DEFINE_string("workdir", None,
                        "Pretraining workdir, or one of its checkpoints/<step> folders.")
    flags.DEFINE_string("name", None, "Bundle name, e.g. phantom-default.")
    flags.DEFINE_integer("step", None, "Checkpoint step to bundle (default: the latest).")
    flags.DEFINE_string("data_dir", None, "Phantom data folder for the evaluation "
                        "(default: the run's config.data.data_dir; built when missing).")
    flags.DEFINE_string("assets_dir", str(bundle.ASSETS), "Folder to write into.")
    flags.mark_flags_as_required(["workdir", "name"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        weights, meta = export(f.workdir, f.name, step=f.step, data_dir=f.data_dir,
                               assets_dir=f.assets_dir)
    except (FileNotFoundError, ExportError,  # a wrong path or name, a run that cannot bundle
            checkpoint.CheckpointRestoreError) as e:  # or a damaged checkpoint
        sys.exit(f"error: {e}")
    logging.info("Wrote %s (%.1f MiB) and %s", weights, weights.stat().st_size / 2**20, meta)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
