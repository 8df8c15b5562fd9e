"""One UniMedI pretraining step (paper §3, DESIGN §4) and the jittable train step.

Per step, for the X-ray sub-batch (images, k = 1) and the CT sub-batch (volumes):

1. CT only, slice selection (`objective.selection.mode`): `attentive` runs the EMA teacher on
   the volume alone and scores its slabs by CLS attention (Eq. 1-2); `random` scores them with
   noise; the top-k slabs give k 2D slices that join the volume's tokens as
   `[3D tokens, slice 1..k tokens]`. `none` keeps the volume alone.
2. Self-distillation targets (`objective.sd.enabled`, for the sub-batches named in
   `objective.sd.modalities`): the teacher encodes the full (mixed) input; its CLS attention
   scores the tokens for the student's mask (per modality block, `objective.masking`), its
   DINO-head outputs are the CLS and patch targets.
3. The student encodes the masked input (a sub-batch that is not distilled enters whole: the
   masking belongs to the masking-and-recovering task of §3.4); the text encoder encodes the
   reports.
4. L = w_vl L_vl + w_icl L_icl + w_pcl L_pcl (+ w_pair L_pair, below).

DRR bridge (`objective.pair.enabled`, DESIGN §4.7): each CT of the batch (as augmented) gives a
radiograph rendered in the step (`pair.drr_inputs`) that the student encodes whole; L_pair ties
its [CLS] to the CT's ("unimiss": the student's DINO output on the DRR against the teacher's on
the CT; "infonce": the projected embeddings), and with `objective.pair.clip` the DRR also forms
its own CLIP matrix with its volume's reports, one more term of the mean L_vl.

CLIP pairing: each sample contributes one image embedding, the projection of its single [CLS].
For a CT sample the volume and its selected slices form one sequence, so that [CLS] attends to
both and stands for the pair; it is paired with the volume's report (which the slices share).
This is the paper's §3.3 ("all tokens are concatenated and processed together by E_v ... the
loss is applied to image [CLS] tokens"), and keeps the pairing one-to-one, so no report appears
twice as its own negative. With `objective.clip.joint` X-rays and CTs share one similarity matrix
(B2 + B3 pairs); otherwise each modality has its own (metric `loss_vl_<modality>`) and the loss
is their mean.

Every reduction is over the global arrays, so under `jax.jit` with a batch sharded on the mesh
the CLIP negatives, loss means and DINO centres span the global batch.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from unimedi_jax.models.unimedi import UniMedI, teacher_params
from unimedi_jax.objective import losses, masking, pair, schedules, selection, update
from unimedi_jax.objective.ema import ema_update
from unimedi_jax.objective.optim import make_optimizer, trainable_mask

Array = jax.Array
MODALITIES = ("xray", "ct")  # batch keys, in the order their samples enter the CLIP matrix
SELECTION_MODES = ("attentive", "random", "none")
# objective.clip.targets: "pairs" (each image's own report is its one positive, CLIP) or
# "findings" (every report in the batch with the image's label set is a positive: soft targets
# as MedCLIP, so reports that say the same are not pushed apart as negatives)
CLIP_TARGETS = ("pairs", "findings")
# Optional sub-batch key: report features (B, text width) float32 of the locked text tower,
# computed once per report outside the step (`train.report_cache`); the step then skips the
# tower and projects these.
TEXT_FEATURES = "text_features"


def logit_scale(params: dict, clip_cfg) -> Array:
    """The CLIP logit multiplier: exp(params["logit_scale"]) clamped at clip.max_logit_scale when
    learnable (CLIP), else the fixed 1 / clip.temperature."""
    if clip_cfg.learnable:
        return jnp.exp(jnp.minimum(params["logit_scale"], math.log(clip_cfg.max_logit_scale)))
    return jnp.asarray(1.0 / clip_cfg.temperature, jnp.float32)


def distilled_modalities(config, present: Sequence[str]) -> list[str]:
    """The modalities of `present` (sub-batch names, in their order) that the step masks and
    distils: those in `objective.sd.modalities` when `objective.sd.enabled`, else none
    (docs/DESIGN.md §4.5). Raises ValueError for a configured name not in MODALITIES."""
    sd = config.objective.sd
    modalities = tuple(sd.get("modalities", MODALITIES))  # configs saved before the key
    if not set(modalities) <= set(MODALITIES):
        raise ValueError(f"objective.sd.modalities={modalities!r}: each must be one of "
                         f"{MODALITIES}")
    return [k for k in present if k in modalities] if sd.enabled else []


def _normalized_entropy(p: Array) -> Array:
    """Mean over rows of the entropy of p (B, N) divided by log N (1 = uniform)."""
    ent = -jnp.sum(p * jnp.log(jnp.maximum(p, jnp.finfo(p.dtype).tiny)), axis=-1)
    return ent.mean() / math.log(p.shape[-1])


def _vision_inputs(model: UniMedI, teacher: dict, sub: dict, kind: str, sel_cfg,
                   rng: Array) -> tuple[dict, Array | None]:
    """The full (unmasked) ViT inputs of a sub-batch, and the chosen slab indices (CT)."""
    if kind == "xray":
        return {"images": sub["image"][:, None]}, None
    volume = sub["volume"]
    if sel_cfg.mode == "none":
        return {"volume": volume}, None
    patch_depth = model.vit.patch_size_3d[0]
    if sel_cfg.mode == "attentive":
        _, out = model.encode_image(teacher, volume=volume)
        scores = selection.volume_slab_scores(out, sel_cfg.get("layers", 0))
    elif sel_cfg.mode == "random":
        scores = selection.random_scores(rng, (volume.shape[0], volume.shape[1] // patch_depth))
    else:
        raise ValueError(f"objective.selection.mode={sel_cfg.mode!r}; expected one of "
                         f"{SELECTION_MODES}")
    slices, indices = selection.select_slices(volume, jax.lax.stop_gradient(scores), sel_cfg.k,
                                              sel_cfg.slice_mode, patch_depth)
    return {"volume": volume, "images": slices}, indices


def _with_cls(cls: Array, tokens: Array) -> Array:
    return jnp.concatenate([cls[:, None], tokens], axis=1)


def _distill_targets(model: UniMedI, teacher: dict, inputs: dict, mask_cfg, rng: Array) -> dict:
    """Teacher pass on the full input -> the student's masked inputs and the DINO targets.

    Returns student_inputs, cls_target (B, K), patch_target (B, P, K) and patch_weights (B, P)
    at the student's loss positions (P = M kept tokens for `drop`, all N tokens for
    `mask_token` with weight 1 at the masked ones), patch_mean (B, K) (the token mean of the
    raw teacher patch outputs, for the centre) and the teacher attention entropy.
    """
    t_cls, t_out = model.encode_image(teacher, **inputs)
    logits = jax.lax.stop_gradient(model.dino(teacher, _with_cls(t_cls, t_out["tokens"])))
    attn = jax.lax.stop_gradient(t_out["cls_attn"])
    layout = masking.Layout.from_vit(t_out)
    keep = masking.keep_indices(masking.token_scores(mask_cfg.mode, attn, rng), layout,
                                mask_cfg.keep_ratio)
    patch = logits[:, 1:]
    if mask_cfg.style == "drop":
        student_inputs = dict(inputs, keep=keep)
        target = jnp.take_along_axis(patch, keep[..., None], axis=1)
        weights = jnp.ones(keep.shape, jnp.float32)
    elif mask_cfg.style == "mask_token":
        mask = masking.mask_from_keep(keep, layout.num_tokens)
        student_inputs, target, weights = dict(inputs, mask=mask), patch, mask.astype(jnp.float32)
    else:
        raise ValueError(f"objective.masking.style={mask_cfg.style!r}; expected one of "
                         f"{masking.STYLES}")
    return dict(student_inputs=student_inputs, cls_target=logits[:, 0], patch_target=target,
                patch_weights=weights, patch_mean=patch.mean(axis=1),
                attn_entropy=_normalized_entropy(attn))


def _stop_frozen(params: dict, config) -> dict:
    """Stops the gradient at frozen leaves, so the backward pass skips their weight gradients."""
    return jax.tree.map(lambda x, train: x if train else jax.lax.stop_gradient(x),
                        params, trainable_mask(params, config))


def pretrain_step(params: dict, teacher: dict, centers: dict, batch: dict, rng: Array,
                  step: Array, *, model: UniMedI, config) -> tuple[Array, dict, dict, dict]:
    """The UniMedI loss and its gradient for one step.

    params: student params (see `models.unimedi`); teacher: {"vision", "dino_head"};
    centers: {modality: {"cls": (K,), "patch": (K,)}} (`init_state`); batch: "xray" {image
    (B2, S, S), input_ids, attention_mask} and/or "ct" {volume (B3, D, H, W), input_ids,
    attention_mask} (docs/CONTRACTS.md; other keys are ignored), each optionally with
    TEXT_FEATURES (all sub-batches or none: the locked tower's report features replace running
    it); rng: a key for this step; step: int scalar.
    Returns (loss, grads with the structure of params, metrics, new centers). The teacher is not
    an argument of the differentiated function: it gets no gradient.
    """
    obj = config.objective
    sd = obj.sd
    kinds = [k for k in MODALITIES if k in batch]
    if not kinds:
        raise ValueError(f"batch has none of the sub-batches {MODALITIES}; keys: {sorted(batch)}")
    lengths = {batch[k]["input_ids"].shape[1] for k in kinds}
    if len(lengths) != 1:
        raise ValueError(f"input_ids lengths differ between sub-batches {kinds}: {sorted(lengths)} "
                         f"(tokenise both to model.text.max_length)")

    cached = [TEXT_FEATURES in batch[k] for k in kinds]
    if any(cached) and not all(cached):
        raise ValueError(f"{TEXT_FEATURES!r} is in some sub-batches of {kinds} only: give it "
                         "for all or none")
    if all(cached) and config.model.text.trainable_layers != 0:
        raise ValueError(f"{TEXT_FEATURES!r} replaces the text tower, which trains "
                         f"(model.text.trainable_layers={config.model.text.trainable_layers}); "
                         "precomputed report features need a locked tower (0)")
    width = model.text.config.hidden_size
    for k in kinds if all(cached) else ():
        shape, n = batch[k][TEXT_FEATURES].shape, batch[k]["input_ids"].shape[0]
        if shape != (n, width):
            raise ValueError(f"batch[{k!r}][{TEXT_FEATURES!r}] has shape {shape}, expected "
                             f"({n}, {width}): one text-tower feature per report")

    # The sub-batches that are masked and distilled; the others enter the student whole.
    distilled = distilled_modalities(config, kinds)
    pair_cfg = obj.pair if pair.enabled(obj) and "ct" in kinds else None
    if pair_cfg is not None and pair_cfg.loss not in pair.PAIR_LOSSES:
        raise ValueError(f"objective.pair.loss={pair_cfg.loss!r}; expected one of "
                         f"{pair.PAIR_LOSSES}")

    metrics, targets, inputs = {}, {}, {}
    for i, kind in enumerate(kinds):
        r_sel, r_mask = jax.random.split(jax.random.fold_in(rng, i))
        inputs[kind], indices = _vision_inputs(model, teacher, batch[kind], kind, obj.selection,
                                               r_sel)
        if indices is not None:
            metrics["slice_indices"] = indices
        if kind in distilled:
            targets[kind] = _distill_targets(model, teacher, inputs[kind], obj.masking, r_mask)
            inputs[kind] = targets[kind].pop("student_inputs")
            metrics[f"attn_entropy_{kind}"] = targets[kind].pop("attn_entropy")

    if pair_cfg is not None:
        drr_images = pair.drr_inputs(batch["ct"]["volume"], pair_cfg.drr,
                                     config.model.vit.image_size)[:, None]
        if pair_cfg.loss == "unimiss":  # the teacher's output on the full CT input
            if "ct" in distilled:
                drr_target = targets["ct"]["cls_target"]
            else:
                t_cls, _ = model.encode_image(teacher, **inputs["ct"])
                drr_target = jax.lax.stop_gradient(model.dino(teacher, t_cls))

    sizes = [batch[k]["input_ids"].shape[0] for k in kinds]
    n_distilled = {k: batch[k]["input_ids"].shape[0] for k in distilled}
    patch_temp = schedules.teacher_temp(step, sd.teacher_patch_temp_warmup, sd.teacher_patch_temp,
                                        sd.teacher_temp_warmup_steps)
    cat = lambda key: jnp.concatenate([targets[k][key] for k in distilled], axis=0)

    targets_mode = obj.clip.get("targets", "pairs")  # configs saved before the key: pairs
    if targets_mode not in CLIP_TARGETS:
        raise ValueError(f"objective.clip.targets={targets_mode!r}; expected one of "
                         f"{CLIP_TARGETS}")
    labels = (jnp.concatenate([batch[k]["labels"] for k in kinds], axis=0)
              if targets_mode == "findings" else None)

    def vl_loss(z_img, z_txt, scale, labels):
        if labels is None:
            return losses.clip_loss(z_img, z_txt, scale)
        return losses.clip_loss_soft(z_img, z_txt, scale, losses.same_findings_targets(labels))

    def loss_fn(p):
        p = _stop_frozen(p, config)
        if all(cached):
            reports = jnp.concatenate([batch[k][TEXT_FEATURES] for k in kinds], axis=0)
        else:
            ids = jnp.concatenate([batch[k]["input_ids"] for k in kinds], axis=0)
            att = jnp.concatenate([batch[k]["attention_mask"] for k in kinds], axis=0)
            reports = model.encode_text(p, ids, att)
        z_txt = model.project_text(p, reports)
        encoded = {k: model.encode_image(p, **inputs[k]) for k in kinds}
        z_img = jnp.concatenate([model.project_image(p, encoded[k][0]) for k in kinds], axis=0)
        scale = logit_scale(p, obj.clip)
        bounds = [0, *itertools.accumulate(sizes)]
        span = {k: slice(a, b) for k, a, b in zip(kinds, bounds[:-1], bounds[1:])}
        per_kind = {}
        if pair_cfg is not None:
            d_cls, _ = model.encode_image(p, images=drr_images)
            z_drr = model.project_image(p, d_cls)
            if pair_cfg.clip:  # the DRR's own matrix with its volume's reports
                ct = span["ct"]
                per_kind["loss_vl_drr"] = vl_loss(z_drr, z_txt[ct], scale,
                                                  None if labels is None else labels[ct])
        if obj.clip.joint:
            l_vl = vl_loss(z_img, z_txt, scale, labels)
            if per_kind:
                l_vl = (l_vl + per_kind["loss_vl_drr"]) / 2
        else:
            per_kind = {**{f"loss_vl_{k}": vl_loss(z_img[s], z_txt[s], scale,
                                                   None if labels is None else labels[s])
                           for k, s in span.items()}, **per_kind}
            l_vl = sum(per_kind.values()) / len(per_kind)
        terms = {"loss_vl": l_vl, **per_kind}  # and loss_vl_<modality> per matrix
        vl_weight = obj.clip.get("weight", 1.0)  # configs saved before the key: 1
        if vl_weight != 1.0:
            l_vl = vl_weight * l_vl
        if distilled:
            s_logits = {k: model.dino(p, _with_cls(encoded[k][0], encoded[k][1]["tokens"]))
                        for k in distilled}
            # Means over all samples of the per-sample losses (each loss is a batch mean).
            terms["loss_icl"] = sum(
                n * losses.dino_loss(s_logits[k][:, 0], targets[k]["cls_target"],
                                     centers[k]["cls"], sd.student_temp, sd.teacher_temp)
                for k, n in n_distilled.items()) / sum(n_distilled.values())
            terms["loss_pcl"] = sum(
                n * losses.patch_loss(s_logits[k][:, 1:], targets[k]["patch_target"],
                                      centers[k]["patch"], targets[k]["patch_weights"],
                                      sd.student_temp, patch_temp)
                for k, n in n_distilled.items()) / sum(n_distilled.values())
            loss = l_vl + sd.w_icl * terms["loss_icl"] + sd.w_pcl * terms["loss_pcl"]
        else:
            loss = l_vl
        if pair_cfg is not None:
            if pair_cfg.loss == "unimiss":
                terms["loss_pair"] = pair.unimiss_loss(
                    model.dino(p, d_cls), drr_target, centers["ct"]["cls"], sd.student_temp,
                    sd.teacher_temp)
            else:
                terms["loss_pair"] = pair.infonce_loss(z_img[span["ct"]], z_drr,
                                                       pair_cfg.temperature)
            loss = loss + pair_cfg.weight * terms["loss_pair"]
        return loss, (terms, scale)

    (loss, (terms, scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    new_centers = dict(centers)
    if distilled:
        # Per modality: each modality's centre follows its own teacher outputs. Shared (the
        # default): every centre follows the whole distilled batch, so they stay equal.
        per_modality = sd.get("center_per_modality", False)  # configs saved before the key
        for m in distilled if per_modality else centers:
            new_centers[m] = {
                key: losses.update_center(
                    centers[m][key], targets[m][src] if per_modality else cat(src),
                    sd.center_momentum)
                for key, src in (("cls", "cls_target"), ("patch", "patch_mean"))}
        metrics.update(teacher_temp=jnp.asarray(sd.teacher_temp, jnp.float32),
                       teacher_patch_temp=patch_temp)
    metrics.update(terms, loss=loss, logit_scale=scale)
    return loss, grads, metrics, new_centers


def init_state(model: UniMedI, params: dict, optimizer: optax.GradientTransformation) -> dict:
    """The train state {step, params, teacher, opt_state, centers}: the teacher starts as a copy
    of the student (DINO); centers {modality: {"cls": (K,), "patch": (K,)}} start at zero."""
    k = model.dino_head.out_dim
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "teacher": jax.tree.map(jnp.copy, teacher_params(params)),  # own buffers (donation)
        "opt_state": optimizer.init(params),
        "centers": {m: {"cls": jnp.zeros((k,), jnp.float32),
                        "patch": jnp.zeros((k,), jnp.float32)} for m in MODALITIES},
    }


def make_train_step(model: UniMedI, config, optimizer: optax.GradientTransformation
                    ) -> Callable[[dict, dict, Array], tuple[dict, dict]]:
    """A pure `(state, batch, rng) -> (new_state, metrics)` for `jax.jit`.

    Applies the optimiser, then the EMA teacher update with the scheduled momentum (from the
    updated student, as DINO), and the new centres (`update.apply_gradients`, which also skips
    a non-finite step under config.on_nonfinite == "skip"). `rng` is a base key: the step
    number is folded in here. metrics add grad_norm, lr, ema_momentum and `finite`.
    """
    update.check_on_nonfinite(config)
    sd = config.objective.sd

    def train_step(state: dict, batch: dict, rng: Array) -> tuple[dict, dict]:
        step = state["step"]
        loss, grads, metrics, centers = pretrain_step(
            state["params"], state["teacher"], state["centers"], batch,
            jax.random.fold_in(rng, step), step, model=model, config=config)
        momentum = schedules.ema_momentum(step, config.total_steps, sd.ema_start, sd.ema_end)
        new_state, applied = update.apply_gradients(
            state, loss, grads, optimizer, config,
            after=lambda params: {"teacher": ema_update(state["teacher"], params, momentum),
                                  "centers": centers})
        metrics.update(applied, ema_momentum=momentum)
        return new_state, metrics

    return train_step


class Setup(NamedTuple):
    """What the trainer needs: the model, the optimiser, the text weights (host numpy, or None
    for a random-init text encoder), `init(rng, text_params) -> state` (jittable; the weights
    enter as an argument, not as constants) and `train_step(state, batch, rng) -> (state,
    metrics)`."""

    model: UniMedI
    optimizer: optax.GradientTransformation
    text_params: dict | None
    init: Callable[[Array, dict | None], dict]
    train_step: Callable[[dict, dict, Array], tuple[dict, dict]]


def make_setup(config, random_text: bool = False) -> Setup:
    """Builds the model and optimiser and loads the text checkpoint once (host memory).

    random_text: initialise the text encoder randomly instead (its config.json still comes from
    config.model.text.checkpoint), e.g. to benchmark BioClinicalBERT shapes without weights.
    """
    model = UniMedI.from_config(config)
    optimizer = make_optimizer(config)

    def init(rng: Array, text_params: dict | None = None) -> dict:
        r_model, r_text = jax.random.split(rng)
        if text_params is None:
            ids = jnp.ones((1, 1), jnp.int32)
            text_params = model.text.init(r_text, ids, ids)["params"]
        return init_state(model, {**model.init_random(r_model), "text": text_params}, optimizer)

    text_params = None if random_text else model.load_text_params()
    return Setup(model, optimizer, text_params, init, make_train_step(model, config, optimizer))
