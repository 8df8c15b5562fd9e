"""Evaluation during pretraining: at step 0 (the reference), every `eval_every_steps`, at the end.

`evaluate(params, config, val_ct, val_xray, train_ct)` encodes the first
`config.eval.max_examples` records of each validation source with the student `params`
(jitted, fixed batches of `config.eval.batch_size`, the last padded) and returns scalars:

- retrieval_r1_ct, retrieval_r1_xray: image-to-report R@1 of the exact pair among that
  modality's validation reports; retrieval_r1: their mean (over the modalities given).
- retrieval_r1_findings_{ct,xray} and retrieval_r1_findings: a hit when the retrieved report's
  label set equals the query's; retrieval_r1_findings_baseline{,_ct,_xray}: always retrieving a
  report of the most common label set; retrieval_r1_chance{_ct,_xray}: 1 / N.
- slice_precision: precision@k (k = objective.selection.k) of the slabs the student's own CLS
  attention on the volume alone selects (the student stands in for the EMA teacher, which
  starts as its copy and tracks it), against `slice_has_finding`, over the validation volumes
  with a finding; slice_precision_random: the exact expectation for k random slabs;
  slice_precision_prior: a fixed ranking of slab positions by their finding frequency in the
  first max_examples volumes of `train_ct` (see `selection_eval`).
- zero_shot_auroc_<finding>: zero-shot AUROC of `config.eval.prompts` (`zero_shot`) over the
  split's CTs and X-rays together; zero_shot_mean_auroc: their mean over the defined ones;
  zero_shot_mean_auroc_{ct,xray}: the mean per modality.
- clip_loss_{ct,xray}: the CLIP loss of the validation pairs, in consecutive batches of the
  modality's training batch size (`data.batch_size_<m>`; a last partial batch is left out) at
  the run's logit scale: beside the training metric `loss_vl_<m>` it tells memorising pairs
  (training far below) from not learning them (both near the uniform log(batch size)).
- image_embedding_mean_cosine_{ct,xray}: mean pairwise cosine of a modality's image embeddings
  (1 = collapsed), image_embedding_effective_rank_{ct,xray}: their RankMe effective rank; the
  keys without a modality are the mean over the modalities.
A CT's embedding is computed as in pretraining: the volume with its k selected slices
(`features.clip_embeddings`). Sources may be None (that modality is skipped); slice metrics
need `train_ct` and CT records with `slice_has_finding`.

A method without language (`objective.methods.has_text` false: Joint, DrasCLR) has no CLIP
space: `evaluate` then returns the collapse of the backbone [CLS] alone (X-rays and volumes
through the ViT, as the probes read them): cls_mean_cosine_{ct,xray}, cls_effective_rank_{ct,
xray} and their means over the modalities, cls_mean_cosine and cls_effective_rank.
"""

from __future__ import annotations

import jax
import numpy as np

from unimedi_jax.eval import features, metrics, retrieval, selection_eval, zero_shot
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.objective import losses, methods
from unimedi_jax.objective.step import logit_scale

CROP = {"ct": lambda c: c.data.ct.crop_size, "xray": lambda c: c.data.xray.crop_size}


def evaluate(params: dict, config, val_ct, val_xray, train_ct=None, mesh=None
             ) -> dict[str, float]:
    """The metrics above for the student params {"vision", "text", "img_proj", "txt_proj", ...}
    (params {"vision", ...} of a method without language: the backbone's collapse only); with
    the training `mesh`, the encoders run on it (params as training placed them)."""
    model = UniMedI.from_config(config)
    ev = config.eval
    if not methods.has_text(config):
        return backbone_collapse(model, params, config, {"ct": val_ct, "xray": val_xray}, mesh)
    results: dict[str, float] = {}
    slabs, embedded = None, {}
    for modality, source in (("ct", val_ct), ("xray", val_xray)):
        if source is None:
            continue
        got = retrieval.embed(model, params, features.head(source, ev.max_examples),
                              modality=modality, selection_cfg=config.objective.selection,
                              crop_size=CROP[modality](config), batch_size=ev.batch_size,
                              max_length=config.model.text.max_length,
                              name=f"{modality} evaluation split", mesh=mesh)
        embedded[modality] = got
        r = retrieval.retrieval_metrics(got["image"], got["text"], got["labels"], ks=(1,))
        results.update({f"retrieval_r1_{modality}": r["i2t_r1"],
                        f"retrieval_r1_findings_{modality}": r["i2t_findings_r1"],
                        f"retrieval_r1_findings_baseline_{modality}": r["findings_baseline_r1"],
                        f"retrieval_r1_chance_{modality}": r["chance_r1"]})
        if modality == "ct" and "slice_has_finding" in got:
            slabs = (got["slab_scores"], got["slice_has_finding"])
    for key in ("retrieval_r1", "retrieval_r1_findings", "retrieval_r1_findings_baseline",
                "retrieval_r1_chance"):
        values = [results[f"{key}_{m}"] for m in ("ct", "xray") if f"{key}_{m}" in results]
        if values:
            results[key] = float(np.mean(values))
    if embedded:
        results.update(embedding_metrics({m: g["image"] for m, g in embedded.items()}))
        scale = float(logit_scale(params, config.objective.clip))
        results.update({f"clip_loss_{m}": clip_loss_batched(
            g["image"], g["text"], scale, config.data[f"batch_size_{m}"])
            for m, g in embedded.items()})
        if ev.get("prompts"):
            results.update(zero_shot_metrics(model, params, config, embedded))
    if slabs is not None and train_ct is not None:
        patch_depth = model.vit.patch_size_3d[0]
        prior = selection_eval.prior_ranking(selection_eval.truth_only(
            features.head(train_ct, ev.max_examples), crop_size=CROP["ct"](config),
            batch_size=ev.batch_size, patch_depth=patch_depth, name="ct training split"))
        precision = selection_eval.selection_precision(
            slabs[0], selection_eval.slab_truth(slabs[1], patch_depth),
            config.objective.selection.k, prior)
        results.update({k: v for k, v in precision.items() if k != "slice_precision_volumes"})
    return results


def embedding_metrics(images: dict[str, np.ndarray], prefix: str = "image_embedding"
                      ) -> dict[str, float]:
    """Collapse figures of image embeddings {modality: (N, P)}: per modality, and their mean over
    the modalities (not over the pooled embeddings: two modalities in different directions would
    hide a collapse within each). Keys `<prefix>_{mean_cosine,effective_rank}[_<modality>]`."""
    out = {}
    for name, fn in (("mean_cosine", metrics.mean_pairwise_cosine),
                     ("effective_rank", metrics.effective_rank)):
        values = {m: fn(x) for m, x in images.items()}
        out.update({f"{prefix}_{name}_{m}": v for m, v in values.items()})
        out[f"{prefix}_{name}"] = float(np.mean(list(values.values())))
    return out


def backbone_collapse(model, params: dict, config, sources: dict, mesh=None
                      ) -> dict[str, float]:
    """`embedding_metrics` (prefix "cls") of the backbone [CLS] of the first
    config.eval.max_examples records of each source {modality: source or None}."""
    ev, cls = config.eval, {}
    for modality, source in sources.items():
        if source is None:
            continue
        batches = features.eval_batches(
            features.head(source, ev.max_examples), modality=modality,
            crop_size=CROP[modality](config), batch_size=ev.batch_size, fields=(),
            name=f"{modality} evaluation split")
        cls[modality] = features.apply_batched(features.backbone_encoder(model.vit, modality),
                                               params["vision"], batches, mesh=mesh)["features"]
    return embedding_metrics(cls, prefix="cls") if cls else {}


def clip_loss_batched(image: np.ndarray, text: np.ndarray, scale: float, batch_size: int
                      ) -> float:
    """Mean CLIP loss (`losses.clip_loss`) over consecutive batches of `batch_size` pairs of
    image, text (N, P); a last partial batch is left out (nan when N < batch_size)."""
    batches = len(image) // batch_size if batch_size > 0 else 0
    if batches == 0:
        return float("nan")
    cut = batches * batch_size
    shape = (batches, batch_size, -1)
    per_batch = jax.vmap(losses.clip_loss, in_axes=(0, 0, None))(
        np.reshape(image[:cut], shape), np.reshape(text[:cut], shape), scale)
    return float(np.mean(per_batch))


def zero_shot_metrics(model, params: dict, config, embedded: dict[str, dict]) -> dict[str, float]:
    """Zero-shot AUROC of `config.eval.prompts` per finding over all modalities' images, its
    mean, and the mean per modality. embedded: {modality: {"image" (N, P), "labels" (N, L)}}."""
    ev = config.eval
    names, positive, negative = zero_shot.prompt_embeddings(
        model, params, ev.prompts, config.model.text.max_length, key="eval.prompts")
    label_names = list(ev.label_names)
    unknown = [n for n in names if n not in label_names]
    if unknown:
        raise ValueError(f"eval.prompts names {unknown}, which are not in eval.label_names "
                         f"{label_names}")
    columns = [label_names.index(n) for n in names]
    out, scored = {}, {}
    for modality, got in embedded.items():
        if got["labels"].shape[1] != len(label_names):
            raise ValueError(f"eval.label_names has {len(label_names)} names but the {modality} "
                             f"records have {got['labels'].shape[1]} label columns")
        scored[modality] = (got["labels"][:, columns],
                            zero_shot.prompt_scores(got["image"], positive, negative))
        out[f"zero_shot_mean_auroc_{modality}"] = _nanmean(
            metrics.per_label_auroc(*scored[modality]))
    labels = np.concatenate([s[0] for s in scored.values()])
    scores = np.concatenate([s[1] for s in scored.values()])
    per_label = metrics.per_label_auroc(labels, scores)
    out.update({f"zero_shot_auroc_{n}": float(v) for n, v in zip(names, per_label)})
    out["zero_shot_mean_auroc"] = _nanmean(per_label)
    return out


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")
