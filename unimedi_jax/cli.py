"""What the file-level command lines share (`python -m unimedi_jax.embed`, `.zero_shot`).

Inputs are files, DICOM series folders, glob patterns (expanded here, so they may be quoted)
and manifest CSVs (data_prep/manifest.py's format: a `path` and a `report` column, paths
relative to the CSV; an optional `modality` column). Inputs are read with a progress bar and
embedded in batches. An input that cannot be read (missing file, pattern matching nothing, bad
manifest row, unreadable or unsupported file) is listed on stderr with its reason and the
others are processed; the exit status is then 1. `--strict` stops at the first such input,
before anything is written. A user error prints `error: <message>` and exits with status 1,
without a traceback; a traceback means a bug.

Each command line has its own `flag_values()` (not absl's global FLAGS, so that they and the
other entry points coexist in one process) and calls `run(main, flag_values, ...)`.
"""

from __future__ import annotations

import dataclasses
import glob
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from absl import flags, logging
from tqdm.auto import tqdm

from data_prep import manifest
from unimedi_jax import files, inference
from unimedi_jax.train import checkpoint


def flag_values() -> flags.FlagValues:
    """Fresh flags holding the shared --workdir, --strict, --batch_size and --help."""
    fv = flags.FlagValues()
    flags.DEFINE_string(
        "workdir", None, "Pretraining workdir, one of its checkpoints/<step> folders, or the "
        "name of a bundled checkpoint (e.g. phantom-default).", flag_values=fv)
    flags.DEFINE_bool("strict", False, "Stop at the first unreadable input; write nothing.",
                      flag_values=fv)
    flags.DEFINE_integer("batch_size", inference.DEFAULT_BATCH_SIZE,
                         "Files read and embedded per batch.", lower_bound=1, flag_values=fv)
    flags.DEFINE_bool("help", False, "Show this help.", flag_values=fv)
    return fv


class UserError(Exception):
    """A mistake of the command line's user: printed as `error: <message>`, exit status 1."""


@dataclasses.dataclass(frozen=True)
class Input:
    path: str
    modality: str | None = None  # None: told by the file type


def expand(args: Sequence[str], strict: bool) -> tuple[list[Input], list[str]]:
    """Command-line inputs -> (files to read, in order; 'INPUT: reason' for those left out).

    A UserError when there are none, or with --strict when one is left out.
    """
    if not args:
        raise UserError("no input given: name files, folders, glob patterns or manifest CSVs")
    inputs, skipped = [], []
    for arg in args:
        if arg.lower().endswith(".csv"):
            try:
                table = manifest.read_manifest(arg)
            except (FileNotFoundError, ValueError) as e:
                skipped.append(str(e))
                continue
            inputs += [Input(e.path, m) for m, e in table.rows]
            skipped += [f"{arg}: {b}" for _, b in table.bad]
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                skipped.append(f"{arg}: no file matches this pattern")
            inputs += [Input(m) for m in matches]
        else:
            inputs.append(Input(arg))
    if strict and skipped:
        raise UserError(f"{skipped[0]} (--strict: nothing written)")
    return inputs, skipped


def load_encoder(workdir: str, batch_size: int) -> inference.Encoder:
    """The Encoder of --workdir; a UserError when it names no loadable checkpoint."""
    try:
        return inference.load(workdir, batch_size=batch_size)
    except (FileNotFoundError, ValueError, checkpoint.CheckpointRestoreError) as e:
        raise UserError(f"--workdir={workdir}: {e}") from e


def _skip(message: str, path: str) -> str:
    """A skip message naming the input first."""
    return message if message.startswith(str(Path(path))) else f"{path}: {message}"


def embed_all(enc: inference.Encoder, inputs: Sequence[Input], skipped: list[str],
              strict: bool) -> tuple[list[str], list[str], np.ndarray]:
    """Reads and embeds `inputs` in batches with a progress bar.

    Returns (paths, modalities, embeddings (N, proj_dim)) of the inputs read; appends a message
    per unreadable input to `skipped`. With --strict the first one raises a UserError.
    """
    paths, modalities, parts, batch = [], [], [], []
    with tqdm(total=len(inputs), desc="embed", unit="file", dynamic_ncols=True) as bar:
        for i, item in enumerate(inputs):
            try:
                batch.append(enc.read(item.path, item.modality))
                paths.append(item.path)
            except (OSError, ValueError) as e:  # readers' errors; permissions
                message = _skip(str(e), item.path)
                if strict:
                    raise UserError(f"{message} (--strict: nothing written)") from e
                skipped.append(message)
            if batch and (len(batch) == enc.batch_size or i == len(inputs) - 1):
                parts.append(enc.embed_inputs(batch))
                modalities += [m for m, _ in batch]
                batch = []
            bar.update()
    if not paths:
        raise UserError("no readable input; nothing written:\n  " + "\n  ".join(skipped))
    return paths, modalities, np.concatenate(parts)


def check_output(path: str) -> None:
    """A UserError, before any work, when `path` cannot be the output file."""
    if Path(path).is_dir() or not Path(path).absolute().parent.is_dir():
        raise UserError(f"--output={path}: not a file in an existing folder")


def write(path: str, write_fn: Callable[[str], None]) -> None:
    """`files.atomic_write`, with an unwritable destination as a UserError."""
    try:
        files.atomic_write(path, write_fn)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        raise UserError(f"cannot write {path}: {e}") from e


def finish(skipped: Sequence[str], output: str, written: int) -> None:
    """Lists the skipped inputs on stderr and exits with status 1 when there are any."""
    if skipped:
        for message in skipped:
            print(f"skipped {message}", file=sys.stderr)
        sys.exit(f"error: {len(skipped)} input(s) skipped (listed above); {output} holds the "
                 f"other {written}")


def run(main: Callable[[flags.FlagValues, list[str]], None], fv: flags.FlagValues,
        required: Sequence[str], doc: str, argv: Sequence[str] | None = None) -> None:
    """Parses `argv` (default sys.argv) into `fv` and calls main(fv, inputs).

    Bad flags, a missing required flag and UserErrors print `error: <message>` and exit with
    status 1 (SystemExit); --help prints `doc` and the flags.
    """
    argv = list(sys.argv if argv is None else argv)
    fv.unparse_flags()
    try:
        inputs = fv(argv)[1:]
    except flags.Error as e:
        sys.exit(f"error: {e}")
    if fv["help"].value:
        print(f"{doc.strip()}\n\nflags:\n{fv.get_help()}")
        return
    missing = [f"--{name}" for name in required if fv[name].value is None]
    if missing:
        sys.exit(f"error: {', '.join(missing)} must be given")
    logging.set_verbosity(logging.WARNING)  # the progress bar and the skipped inputs
    try:
        main(fv, inputs)
    except UserError as e:
        sys.exit(f"error: {e}")
