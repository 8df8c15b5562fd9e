"""Evaluation data and encoders: fixed-shape batches of a record source, jitted encoders.

`eval_batches` reads a random-access record source (`builder.as_data_source(split)`, a
`ProceduralPhantomSource`, a list of record dicts) in order through the evaluation view
(`transforms.CenterCrop`: centre crop and normalisation, the mask and `slice_has_finding` cropped
alike; reports tokenised on request) and yields `(batch, n)`: every batch has exactly
`batch_size` rows, the last one padded by repeating its last record, and n is the number of real
rows. `apply_batched` runs a jitted `fn(params, batch)` over them and concatenates the outputs
without the padding, so one compiled function serves every batch.

Encoders (all `(params, batch) -> dict of (B, ...)` arrays, jit-ready):
- `backbone_features`: the ViT's final-norm [CLS] of an X-ray or a volume alone (probing).
- `clip_embeddings`: L2-normalised image and report embeddings in the CLIP space. A CT sample
  is encoded as in pretraining (`objective.step`): the volume with the k slices of its best
  slabs, chosen by the evaluated encoder's own CLS attention on the volume alone (the student;
  with `selection.mode = "none"` the volume alone). Also returns those slab scores.

Their jitted forms (`backbone_encoder`, `clip_encoder`, `slab_scorer`, and the text encoder of
`text_embeddings`) are built once per (model, settings) and cached, so the evaluations during
pretraining compile once and every later one reuses the executable; they take the params where
they lie (on the training mesh, sharded as in training, or on the host).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from unimedi_jax.data import pipeline, text, transforms
from unimedi_jax.models.layers import l2_normalize
from unimedi_jax.objective import selection
from unimedi_jax.train import sharding

Batch = dict[str, np.ndarray]


class Subset:
    """Random-access view of `source` at `indices` (e.g. a label fraction)."""

    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(source)):
            raise IndexError(f"Subset indices outside [0, {len(source)})")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]


def head(source, n: int | None) -> Subset:
    """The first min(n, len) records (all when n is None or <= 0)."""
    count = len(source) if not n or n <= 0 else min(int(n), len(source))
    return Subset(source, np.arange(count))


class _Keep(grain.transforms.Map):
    def __init__(self, fields: Sequence[str]):
        self.fields = tuple(fields)

    def map(self, element: dict) -> dict:
        return {f: element[f] for f in self.fields if f in element}


def pad_batch(batch: Batch, size: int) -> Batch:
    """Pads every (n, ...) array to (size, ...) by repeating row n - 1."""
    n = len(next(iter(batch.values())))
    if n == size:
        return batch
    rows = np.minimum(np.arange(size), n - 1)
    return {k: v[rows] for k, v in batch.items()}


def eval_batches(
    source,
    *,
    modality: str,
    crop_size: int | Sequence[int],
    batch_size: int,
    fields: Sequence[str] = ("labels",),
    tokenizer_folder: str | None = None,
    max_length: int = text.MAX_LENGTH,
    name: str = "dataset",
    read_threads: int = 2,
) -> Iterator[tuple[Batch, int]]:
    """(batch, n) over all of `source` in order, batches of exactly `batch_size` rows.

    A batch holds the model input (`image` (B, H, W) or `volume` (B, D, H, W) float32), the
    requested `fields` the records have (`labels`, `mask`, `slice_has_finding`), and with a
    tokenizer folder `input_ids` / `attention_mask` (B, max_length) of the reports.
    Records are checked as in training (`pipeline.record_checker`): a bad one raises naming
    `name` and its index.
    """
    if batch_size <= 0:
        raise ValueError(f"{name}: batch_size must be positive, got {batch_size}")
    if len(source) == 0:
        raise ValueError(f"{name}: no records to evaluate")
    m = transforms.modality(modality)
    with_text = tokenizer_folder is not None
    checker = pipeline.record_checker(source[0], modality, name=name, with_text=with_text,
                                      with_mask="mask" in fields)
    ds = (grain.MapDataset.source(source).map_with_index(checker)
          .map(transforms.CenterCrop(modality, crop_size)))
    keep = [m.key, *fields]
    if with_text:
        ds = ds.map(text.Tokenize(tokenizer_folder, max_length))
        keep += ["input_ids", "attention_mask"]
    ds = ds.map(_Keep(keep)).batch(batch_size, drop_remainder=False)
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2)
    for batch in ds.to_iter_dataset(options):
        yield pad_batch(batch, batch_size), len(batch[m.key])


def apply_batched(fn: Callable[[Any, Batch], dict] | None, params: Any,
                  batches: Iterable[tuple[Batch, int]], keep: Sequence[str] = (),
                  mesh: Mesh | None = None) -> dict:
    """Runs `fn(params, batch)` on every batch; returns its outputs and the `keep` fields of the
    batches, concatenated over the real rows as host numpy arrays. fn=None only collects.

    With a `mesh` (the training mesh, params as training placed them), every process passes
    the same batches, each is split over the mesh's batch axes (its size must divide by their
    size), and fn runs under the mesh; without one, fn runs where params lie.
    """
    outputs, kept = [], []
    for batch, n in batches:
        if fn is None:
            out = {}
        elif mesh is None:
            out = fn(params, batch)
        else:
            with jax.set_mesh(mesh):
                out = fn(params, sharding.put_global(batch, mesh))
        outputs.append((out, n))
        kept.append({k: batch[k][:n] for k in keep if k in batch})
    if not outputs:
        raise ValueError("apply_batched: no batches")
    host = [({k: v[:n] for k, v in sharding.to_host(out).items()}) for out, n in outputs]
    joined = {k: np.concatenate([h[k] for h in host]) for k in host[0]}
    joined.update({k: np.concatenate([c[k] for c in kept]) for k in kept[0]})
    return joined


def input_key(modality: str) -> str:
    """The batch field of a modality's model input ("image" or "volume")."""
    return transforms.modality(modality).key


def vit_inputs(batch: Batch, modality: str) -> dict:
    """ViT keyword inputs of a batch: images=(B, 1, H, W) for X-rays, volume=(B, D, H, W)."""
    if modality == "xray":
        return {"images": jnp.asarray(batch["image"])[:, None]}
    return {"volume": jnp.asarray(batch["volume"])}


def backbone_features(vit, modality: str) -> Callable[[Any, Batch], dict]:
    """(vision params, batch) -> {"features": [CLS] (B, width) float32}."""

    def fn(params, batch):
        cls, _ = vit.apply({"params": params}, **vit_inputs(batch, modality))
        return {"features": cls.astype(jnp.float32)}

    return fn


class Selection(NamedTuple):
    """The slice-selection settings an evaluator is compiled for (`objective.selection`),
    hashable so that compiled evaluators can be cached on them."""

    mode: str
    k: int
    slice_mode: str
    layers: int = 0  # Eq. 1 over every layer (0) or the last `layers`

    @classmethod
    def from_config(cls, cfg) -> Selection:
        return cls(cfg.mode, int(cfg.k), cfg.slice_mode,
                   int(cfg.get("layers", 0)))  # configs saved before the key: every layer


def slab_scores(model, params: dict, volume: jax.Array, layers: int = 0) -> jax.Array:
    """Eq. 1-2 slab scores (B, d) of the encoder's own CLS attention on the volume alone (all
    layers, or the last `layers`: `selection.volume_slab_scores`)."""
    _, out = model.encode_image(params, volume=volume)
    return selection.volume_slab_scores(out, layers)


def ct_inputs(model, params: dict, volume: jax.Array, sel: Selection) -> tuple[dict, jax.Array]:
    """Pretraining-style CT input (volume + selected slices) and the `slab_scores` (B, d)."""
    scores = slab_scores(model, params, volume, sel.layers)
    if sel.mode == "none":
        return {"volume": volume}, scores
    slices, _ = selection.select_slices(volume, scores, sel.k, sel.slice_mode,
                                        model.vit.patch_size_3d[0])
    return {"volume": volume, "images": slices}, scores


def clip_embeddings(model, modality: str, sel: Selection, with_text: bool = True
                    ) -> Callable[[dict, Batch], dict]:
    """(UniMedI params, batch) -> {"image" (B, P), "text" (B, P) with_text, and for CT
    "slab_scores" (B, d)}; embeddings L2-normalised, float32."""

    def fn(params, batch):
        out = {}
        if modality == "ct":
            inputs, out["slab_scores"] = ct_inputs(model, params, jnp.asarray(batch["volume"]),
                                                   sel)
        else:
            inputs = vit_inputs(batch, modality)
        cls, _ = model.encode_image(params, **inputs)
        out["image"] = l2_normalize(model.project_image(params, cls))
        if with_text:
            txt = model.encode_text(params, batch["input_ids"], batch["attention_mask"])
            out["text"] = l2_normalize(model.project_text(params, txt))
        return out

    return fn


@functools.cache
def backbone_encoder(vit, modality: str) -> Callable[[Any, Batch], dict]:
    """`backbone_features`, jitted once per (ViT, modality)."""
    return jax.jit(backbone_features(vit, modality))


@functools.cache
def clip_encoder(model, modality: str, sel: Selection, with_text: bool = True
                 ) -> Callable[[dict, Batch], dict]:
    """`clip_embeddings`, jitted once per (model, modality, selection, with_text)."""
    return jax.jit(clip_embeddings(model, modality, sel, with_text))


@functools.cache
def slab_scorer(model, layers: int = 0) -> Callable[[dict, Batch], dict]:
    """(params, batch) -> {"scores": `slab_scores` (B, d)}, jitted once per (model, layers)."""
    return jax.jit(lambda p, batch: {"scores": slab_scores(model, p, batch["volume"], layers)})


@functools.cache
def _text_encoder(model) -> Callable[[dict, jax.Array, jax.Array], jax.Array]:
    return jax.jit(lambda p, ids, mask: l2_normalize(
        model.project_text(p, model.encode_text(p, ids, mask))))


def text_embeddings(model, tokenizer, texts: Sequence[str], params: dict, max_length: int
                    ) -> np.ndarray:
    """L2-normalised CLIP embeddings (len(texts), P) of a few texts (e.g. prompts)."""
    tokens = text.tokenize(tokenizer, list(texts), max_length)
    return np.asarray(_text_encoder(model)(params, tokens["input_ids"],
                                           tokens["attention_mask"]))
