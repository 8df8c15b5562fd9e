"""Zero-shot findings of CT and X-ray files from prompt ensembles.

    python -m unimedi_jax.zero_shot --workdir=W [--prompts=findings.json] --output=OUT.csv FILES...

Writes OUT.csv: columns `path`, `modality`, then one score per finding, one row per input read
(unreadable inputs, `--strict` and exit status: `unimedi_jax/cli.py`). A finding's score is the
image's cosine with the mean embedding of its positive phrasings minus that with the mean of
its negative ones (`inference.Encoder.score_findings`): higher means more likely; compare
scores of one finding across images (as the run's AUROC does), not with 0. findings.json:

    {"effusion": {"positive": ["There is a pleural effusion.", "Pleural effusion."],
                  "negative": ["No pleural effusion.", "There is no pleural effusion."]},
     "nodule": {"positive": "There is a pulmonary nodule.", "negative": "No nodule."}}

each side one sentence or a list of sentences (several phrasings, averaged, are the default
advice). Without --prompts: the prompt ensembles the run was evaluated with
(`config.eval.prompts`, for the phantom configs/prompts.py).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from absl import flags

from unimedi_jax import cli

FLAGS = cli.flag_values()
flags.DEFINE_string("prompts", None, "findings.json (default: the run's prompts).",
                    flag_values=FLAGS)
flags.DEFINE_string("output", None, "The .csv file to write.", flag_values=FLAGS)
SIDES = ("positive", "negative")


def load_prompts(path: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """findings.json -> {finding: (positives, negatives)}; a UserError naming what is wrong."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise cli.UserError(f"--prompts={path}: cannot read JSON ({e})") from e
    if not isinstance(spec, dict) or not spec:
        raise cli.UserError(f"--prompts={path}: expected a non-empty object "
                            '{"finding": {"positive": [...], "negative": [...]}}')
    prompts = {}
    for name, entry in spec.items():
        if not isinstance(entry, dict) or sorted(entry) != sorted(SIDES):
            raise cli.UserError(f"--prompts={path}: {name!r} must be an object with exactly the "
                                f"keys 'positive' and 'negative', got {entry!r}")
        sides = []
        for side in SIDES:
            value = entry[side]
            phrasings = (value,) if isinstance(value, str) else value
            if (not isinstance(phrasings, (list, tuple)) or not phrasings
                    or not all(isinstance(p, str) and p.strip() for p in phrasings)):
                raise cli.UserError(f"--prompts={path}: {name}.{side} must be a sentence or a "
                                    f"non-empty list of sentences, got {value!r}")
            sides.append(tuple(phrasings))
        prompts[name] = tuple(sides)
    return prompts


def main(fv: flags.FlagValues, args: list[str]) -> None:
    cli.check_output(fv.output)
    inputs, skipped = cli.expand(args, fv.strict)
    prompts = load_prompts(fv.prompts) if fv.prompts else None
    enc = cli.load_encoder(fv.workdir, fv.batch_size)
    if prompts is None:
        prompts = dict(enc.config.get("eval", {}).get("prompts") or {})
        if not prompts:
            raise cli.UserError(f"--workdir={fv.workdir} holds no evaluation prompts; give "
                                "--prompts=findings.json")
    paths, modalities, embeddings = cli.embed_all(enc, inputs, skipped, fv.strict)
    scores = enc.score_findings(embeddings, prompts)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["path", "modality", *prompts])
    for path, modality, row in zip(paths, modalities, scores):
        writer.writerow([path, modality, *(f"{v:.6f}" for v in row)])
    cli.write(fv.output, lambda tmp: Path(tmp).write_text(table.getvalue(), encoding="utf-8"))
    cli.finish(skipped, fv.output, len(paths))


if __name__ == "__main__":
    cli.run(main, FLAGS, ["workdir", "output"], __doc__)
