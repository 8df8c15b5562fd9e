"""The locked text tower, run once per distinct training report (docs/DESIGN.md §3).

With `model.text.trainable_layers = 0` (a locked tower with a trained projection, as LiT) the
pooled report feature `UniMedI.encode_text` is a fixed function of the report's tokens. When
training reads stored records (`data.procedural = False`), `ReportCache.build` encodes every
distinct tokenised report of the training splits once, and `attach` adds each training batch's
features as `step.TEXT_FEATURES` (B, text width) float32 on the host, before the batch goes to
the devices; `pretrain_step` then projects those instead of running the tower (the text
encoder's share of the step's FLOPs, 57% at the default config, is gone from every step).
`model.text.cache_locked = False` keeps the tower in the step.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import jax
import numpy as np

from unimedi_jax.data import text
from unimedi_jax.eval import features
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.objective.step import MODALITIES, TEXT_FEATURES

ENCODE_BATCH = 64  # reports per jitted forward of the tower
LENGTH_BUCKET = 16  # encoded lengths are multiples of this: few shapes to compile


def enabled(config) -> bool:
    """Whether the config asks for the cache and allows it: a locked text tower
    (model.text.trainable_layers = 0) and stored training records (data.procedural = False:
    a procedural stream's reports are new at every step)."""
    t = config.model.text
    return (bool(t.get("cache_locked", False)) and t.trainable_layers == 0
            and not config.data.get("procedural", False))


class ReportCache:
    """Locked-tower features of tokenised reports: `rows` maps a report's input_ids (bytes of
    the int32 (T,) row) to its row of `features` (U, text width) float32."""

    def __init__(self, rows: Mapping[bytes, int], features: np.ndarray, max_length: int):
        self.rows, self.features, self.max_length = dict(rows), features, int(max_length)

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def build(cls, model: UniMedI, text_params: dict, tokenizer, reports: Iterable[str],
              max_length: int, batch_size: int = ENCODE_BATCH) -> ReportCache:
        """Tokenises `reports` (to max_length, as the pipeline does) and encodes each distinct
        token sequence once with `model.encode_text` (jitted, fixed batches, the last padded:
        `eval.features.apply_batched`). Sequences go shortest first, each batch cut to its
        longest report rounded up to LENGTH_BUCKET tokens: the padding they drop is masked out
        of attention and pooling, so the features are those of the full length."""
        reports = list(reports)
        if not reports:
            raise ValueError("report cache: no reports to encode")
        chunks = [text.tokenize(tokenizer, reports[i:i + 1024], max_length)
                  for i in range(0, len(reports), 1024)]
        ids, masks = (np.concatenate([c[key] for c in chunks])
                      for key in ("input_ids", "attention_mask"))
        unique, first = np.unique(ids, axis=0, return_index=True)
        mask = masks[first]
        order = np.argsort(mask.sum(axis=1), kind="stable")
        encode = jax.jit(lambda p, b: {"features": model.encode_text(
            {"text": p}, b["input_ids"], b["attention_mask"])})

        def batches():
            for i in range(0, len(order), batch_size):
                rows = order[i:i + batch_size]
                length = int(mask[rows].sum(axis=1).max())
                length = min(max_length, -(-length // LENGTH_BUCKET) * LENGTH_BUCKET)
                batch = {"input_ids": unique[rows, :length],
                         "attention_mask": mask[rows, :length]}
                yield features.pad_batch(batch, batch_size), len(rows)

        encoded = features.apply_batched(encode, jax.device_put(text_params), batches())
        table = np.empty(encoded["features"].shape, np.float32)
        table[order] = encoded["features"]  # back to the rows of `unique`
        return cls({row.tobytes(): n for n, row in enumerate(unique)}, table, max_length)

    def lookup(self, input_ids: np.ndarray, name: str = "batch") -> np.ndarray:
        """Features (B, text width) of input_ids (B, T); ValueError for a report not cached."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int32)
        if ids.ndim != 2 or ids.shape[1] != self.max_length:
            raise ValueError(f"report cache: the {name}'s input_ids have shape {ids.shape}; the "
                             f"cache holds reports of {self.max_length} tokens "
                             "(config.model.text.max_length and data.max_length must agree)")
        try:
            rows = [self.rows[row.tobytes()] for row in ids]
        except KeyError:
            raise ValueError(
                f"report cache: a report of the {name} was not among the {len(self)} cached "
                "training reports (the cache covers the stored training splits; set "
                "config.model.text.cache_locked=False to run the text tower in the step)") from None
        return self.features[rows]

    def attach(self, batch: dict) -> dict:
        """The batch with `TEXT_FEATURES` added to each modality's sub-batch."""
        return {k: (dict(v, **{TEXT_FEATURES: self.lookup(v["input_ids"], f"{k} batch")})
                    if k in MODALITIES else v) for k, v in batch.items()}


def training_reports(sources: Sequence, progress: bool = True) -> list[str]:
    """The report text of every record of the given random-access sources."""
    from tqdm.auto import tqdm

    total = sum(len(s) for s in sources)
    out = []
    with tqdm(total=total, desc="training reports", unit="record", disable=not progress,
              dynamic_ncols=True) as bar:
        for source in sources:
            for i in range(len(source)):
                out.append(text.as_text(source[i]["report"]))
                bar.update(1)
    return out


def for_training(config, model: UniMedI, text_params: dict, data) -> ReportCache | None:
    """The cache of the training splits `data` (a `pipeline.PretrainData`) reads, when `enabled`;
    else None."""
    if not enabled(config):
        return None
    sources = [data.source(m, config.data[m].split) for m in MODALITIES
               if config.data[f"batch_size_{m}"]]
    return ReportCache.build(model, text_params, text.load_tokenizer(data.tokenizer_folder),
                             training_reports(sources, progress=jax.process_index() == 0),
                             config.model.text.max_length)
