"""Embeds CT and X-ray files into the shared image-report space.

    python -m unimedi_jax.embed --workdir=W --output=OUT.npz FILES_OR_GLOBS_OR_MANIFESTS...

W: a pretraining workdir or a bundled checkpoint's name (phantom-default). Each file is read as
the run's training data (`unimedi_jax.scans`, the README's "From a file to an embedding").
OUT.npz holds `embeddings` float32 (N, proj_dim) (unit vectors), `paths` (N,) and
`modalities` (N,) ("ct" or "xray") of the inputs read, in input order. Unreadable inputs,
`--strict` and exit status: `unimedi_jax/cli.py`.
"""

from __future__ import annotations

import numpy as np
from absl import flags

from unimedi_jax import cli

FLAGS = cli.flag_values()
flags.DEFINE_string("output", None, "The .npz file to write.", flag_values=FLAGS)


def main(fv: flags.FlagValues, args: list[str]) -> None:
    cli.check_output(fv.output)
    inputs, skipped = cli.expand(args, fv.strict)
    enc = cli.load_encoder(fv.workdir, fv.batch_size)
    paths, modalities, embeddings = cli.embed_all(enc, inputs, skipped, fv.strict)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, embeddings=embeddings, paths=np.array(paths, dtype=str),
                     modalities=np.array(modalities, dtype=str))

    cli.write(fv.output, save)
    cli.finish(skipped, fv.output, len(paths))


if __name__ == "__main__":
    cli.run(main, FLAGS, ["workdir", "output"], __doc__)
