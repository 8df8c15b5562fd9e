"""Exports a pretraining run for PyTorch (layout: `unimedi_jax/export/export.py`).

    python -m unimedi_jax.export --workdir=DIR --output=OUT [--step=N] [--overwrite]
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from unimedi_jax.export import export as export_lib
from unimedi_jax.train import checkpoint

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Pretraining workdir, or one of its checkpoints/<step> folders.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write; must be absent or empty.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output folder.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        out = export_lib.export(_WORKDIR.value, _OUTPUT.value, _STEP.value, _OVERWRITE.value)
    except (FileNotFoundError, FileExistsError,  # a wrong path: the message says it all
            checkpoint.CheckpointRestoreError) as e:  # or a damaged checkpoint
        sys.exit(f"error: {e}")
    logging.info("Exported %s to %s", _WORKDIR.value, out)


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "output"])
    app.run(main)
