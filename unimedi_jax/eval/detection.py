"""2D object detection on the frozen encoder (paper §4.3 Table 5; docs/DESIGN.md §7.1).

The ViT's last feature map (stride = patch size) becomes ViTDet's simple feature pyramid (Li et
al. 2022): strides 4, 8, 16, 32 from the one map by transposed convolutions (up) and max pooling
(down), each level then a 1x1 and a 3x3 convolution with channel LayerNorm. A single-stage FCOS
head (Tian et al. 2019; `config.head`), shared across levels, predicts per location the class
logits (sigmoid focal loss), the distances (l, t, r, b) to the box sides (exp of a per-level
scale times the stride; GIoU loss) and the centerness (BCE). Only the pyramid and the head
train; the encoder stays frozen.

Boxes are (x0, y0, x1, y1) pixels of the model input, padded to `config.max_boxes` per image with
a validity mask, so every step has one shape. They come from the records' `box` field when the
dataset stores boxes, else from the connected components of each class of the `mask` (the
phantom's finding masks on the X-ray, `boxes_from_masks`), after the crop and augmentation the
mask went through. Test detections are scored by pycocotools (mAP@[.5:.95] and mAP@.5).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

from unimedi_jax import files
from unimedi_jax.eval import decoders, features, segmentation, tasks

Array = jax.Array
HEADS = ("fcos",)
MAX_LOG_DISTANCE = 8.0  # exp(8) strides: far beyond any image, and no overflow
FIGURE_FILE = "detections.png"
BOX_FIELDS = ("boxes", "box_classes", "box_valid")


# ---------------------------------------------------------------- boxes


def boxes_from_masks(masks: np.ndarray, table: np.ndarray, num_classes: int,
                     max_boxes: int) -> dict[str, np.ndarray]:
    """Boxes of the connected components (8-connected) of each class of label maps (B, H, W).

    table (256,): stored mask value -> class 1..num_classes (0: background). Returns "boxes"
    (B, M, 4) float32 (x0, y0, x1, y1) pixel edges, "box_classes" (B, M) int32 in
    [0, num_classes), "box_valid" (B, M) float32; the largest `max_boxes` per image are kept.
    """
    masks = table[np.asarray(masks)]
    n = masks.shape[0]
    out = {"boxes": np.zeros((n, max_boxes, 4), np.float32),
           "box_classes": np.zeros((n, max_boxes), np.int32),
           "box_valid": np.zeros((n, max_boxes), np.float32)}
    structure = np.ones((3, 3), bool)
    for i in range(n):  # host-side target preparation, one label map at a time
        found = []
        for c in range(1, num_classes + 1):
            components, _ = ndimage.label(masks[i] == c, structure)
            for rows, cols in ndimage.find_objects(components):
                found.append(((cols.start, rows.start, cols.stop, rows.stop), c - 1))
        found.sort(key=lambda f: -(f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))
        for j, (box, c) in enumerate(found[:max_boxes]):
            out["boxes"][i, j], out["box_classes"][i, j], out["box_valid"][i, j] = box, c, 1.0
    return out


def box_area(boxes: Array) -> Array:
    """(..., 4) xyxy -> (...)."""
    return jnp.clip(boxes[..., 2] - boxes[..., 0], 0) * jnp.clip(boxes[..., 3] - boxes[..., 1], 0)


def pairwise_iou(a: Array, b: Array) -> Array:
    """IoU (..., N, M) of xyxy boxes a (..., N, 4) and b (..., M, 4)."""
    lo = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    hi = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = jnp.prod(jnp.clip(hi - lo, 0), axis=-1)
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter / jnp.maximum(union, 1e-9)


def encode(points: Array, boxes: Array) -> Array:
    """Distances (l, t, r, b) (..., 4) from points (..., 2) (x, y) to xyxy boxes (..., 4)."""
    return jnp.concatenate([points - boxes[..., :2], boxes[..., 2:] - points], axis=-1)


def decode(points: Array, distances: Array) -> Array:
    """xyxy boxes (..., 4) of points (..., 2) and distances (l, t, r, b) (..., 4)."""
    return jnp.concatenate([points - distances[..., :2], points + distances[..., 2:]], axis=-1)


def centerness(distances: Array) -> Array:
    """FCOS centerness sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)), (..., 4) -> (...)."""
    lr, tb = distances[..., 0::2], distances[..., 1::2]
    ratio = (lr.min(-1) / jnp.maximum(lr.max(-1), 1e-9)) * (tb.min(-1) / jnp.maximum(
        tb.max(-1), 1e-9))
    return jnp.sqrt(jnp.clip(ratio, 0.0, 1.0))


def giou_loss(pred: Array, target: Array) -> Array:
    """1 - GIoU of boxes given as distances (l, t, r, b) (..., 4) from one point each."""
    area = lambda d: (d[..., 0] + d[..., 2]) * (d[..., 1] + d[..., 3])
    inner = jnp.minimum(pred, target)
    outer = jnp.maximum(pred, target)
    inter = (inner[..., 0] + inner[..., 2]) * (inner[..., 1] + inner[..., 3])
    union = area(pred) + area(target) - inter
    enclosing = (outer[..., 0] + outer[..., 2]) * (outer[..., 1] + outer[..., 3])
    iou = inter / jnp.maximum(union, 1e-9)
    return 1.0 - (iou - (enclosing - union) / jnp.maximum(enclosing, 1e-9))


# ---------------------------------------------------------------- model


def level_points(image_size: Sequence[int], strides: Sequence[int]) -> tuple[np.ndarray, ...]:
    """(points (L, 2) (x, y) at the centres of every level's cells, stride (L,)), levels in
    order, each row-major, L = sum over levels of (H / s) * (W / s)."""
    points, stride = [], []
    for s in strides:
        h, w = image_size[0] // s, image_size[1] // s
        ys, xs = np.meshgrid((np.arange(h) + 0.5) * s, (np.arange(w) + 0.5) * s, indexing="ij")
        points.append(np.stack([xs.ravel(), ys.ravel()], -1))
        stride.append(np.full(h * w, s))
    return np.concatenate(points).astype(np.float32), np.concatenate(stride).astype(np.float32)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: (B, h, w, C) at stride `patch` -> one (B, H/s, W/s,
    channels) map per stride s in `strides` (up by x2 transposed convs with LayerNorm + GELU
    between them, down by x2 max pooling), each then conv1x1-LN, conv3x3-LN."""

    patch: int
    strides: Sequence[int] = (4, 8, 16, 32)
    channels: int = 256  # ViTDet: 256

    @nn.compact
    def __call__(self, x: Array) -> list[Array]:
        width = x.shape[-1]
        out = []
        for s in self.strides:
            y, scale = x, self.patch / s
            if scale != 2 ** round(math.log2(scale)):
                raise ValueError(f"pyramid stride {s} is not a power-of-2 step from the patch "
                                 f"size {self.patch}")
            ups = max(round(math.log2(scale)), 0)
            for u in range(ups):
                if u:
                    y = nn.gelu(nn.LayerNorm(name=f"s{s}_up_norm{u}")(y), approximate=False)
                y = nn.ConvTranspose(width // 2 ** (u + 1), (2, 2), strides=(2, 2),
                                     padding="VALID", name=f"s{s}_up{u}")(y)
            for _ in range(max(round(-math.log2(scale)), 0)):
                y = nn.max_pool(y, (2, 2), strides=(2, 2))
            y = nn.LayerNorm(name=f"s{s}_norm1")(
                nn.Conv(self.channels, (1, 1), use_bias=False, name=f"s{s}_lateral")(y))
            y = nn.LayerNorm(name=f"s{s}_norm2")(
                nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False,
                        name=f"s{s}_output")(y))
            out.append(y)
        return out


class Scale(nn.Module):
    """x times a learned scalar (initialised to 1): FCOS's per-level regression scale."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return x * self.param("scale", nn.initializers.ones, ())


class FCOSHead(nn.Module):
    """FCOS head shared by all levels: two towers of `num_convs` conv3x3-GroupNorm-ReLU; class
    logits from the first, distances (exp(scale_level * x) * stride, as FCOS: positive, with a
    gradient everywhere) and centerness from the second. Returns logits (B, L, K), distances
    (B, L, 4) in pixels, centerness logits (B, L)."""

    num_classes: int
    strides: Sequence[int]
    num_convs: int = 4  # FCOS: 4
    norm_groups: int = 32  # FCOS: GroupNorm(32)

    @nn.compact
    def __call__(self, levels: Sequence[Array]) -> tuple[Array, Array, Array]:
        conv = lambda f, name: nn.Conv(f, (3, 3), padding="SAME", name=name)
        towers = {t: [(conv(levels[0].shape[-1], f"{t}_conv{i}"),
                       nn.GroupNorm(num_groups=self.norm_groups, name=f"{t}_norm{i}"))
                      for i in range(self.num_convs)] for t in ("cls", "reg")}
        cls_out, reg_out = conv(self.num_classes, "cls_logits"), conv(4, "bbox_pred")
        ctr_out = conv(1, "centerness")
        logits, dists, ctr = [], [], []
        for level, (y, s) in enumerate(zip(levels, self.strides)):
            b = y.shape[0]
            c = r = y
            for layer, norm in towers["cls"]:
                c = nn.relu(norm(layer(c)))
            for layer, norm in towers["reg"]:
                r = nn.relu(norm(layer(r)))
            scaled = jnp.minimum(Scale(name=f"level{level}")(reg_out(r)), MAX_LOG_DISTANCE)
            logits.append(cls_out(c).reshape(b, -1, self.num_classes))
            dists.append((jnp.exp(scaled) * s).reshape(b, -1, 4))
            ctr.append(ctr_out(r).reshape(b, -1))
        return (jnp.concatenate(logits, 1), jnp.concatenate(dists, 1), jnp.concatenate(ctr, 1))


# ---------------------------------------------------------------- targets and loss


def assign(points: Array, ranges: Array, boxes: Array, classes: Array, valid: Array,
           num_classes: int) -> tuple[Array, Array, Array]:
    """FCOS targets of one image: a location is positive for the smallest valid box that holds it
    and whose largest distance lies in the location's range (lo, hi].

    points (L, 2), ranges (L, 2), boxes (M, 4), classes (M,), valid (M,) -> one-hot class
    targets (L, K), distances (L, 4), positive (L,) float; targets are 0 at negatives.
    """
    d = encode(points[:, None, :], boxes[None])  # (L, M, 4)
    largest = d.max(-1)
    candidate = ((d.min(-1) > 0) & (largest > ranges[:, :1]) & (largest <= ranges[:, 1:])
                 & (valid[None] > 0))
    area = jnp.where(candidate, box_area(boxes)[None], jnp.inf)
    best = area.argmin(-1)
    positive = candidate.any(-1)
    target = jnp.take_along_axis(d, best[:, None, None], axis=1)[:, 0] * positive[:, None]
    onehot = jax.nn.one_hot(classes[best], num_classes) * positive[:, None]
    return onehot, target, positive.astype(jnp.float32)


def level_ranges(strides: np.ndarray, range_factor: float, all_strides: Sequence[int]
                 ) -> np.ndarray:
    """(L, 2) regression ranges: level s takes largest distances in (f s / 2, f s] (f =
    range_factor; the finest from 0, the coarsest without bound)."""
    lo = np.where(strides == min(all_strides), 0.0, range_factor * strides / 2)
    hi = np.where(strides == max(all_strides), np.inf, range_factor * strides)
    return np.stack([lo, hi], -1).astype(np.float32)


def fcos_loss(logits: Array, distances: Array, ctr_logits: Array, cls_target: Array,
              reg_target: Array, positive: Array, weights: Array, alpha: float,
              gamma: float) -> Array:
    """Focal loss (summed over locations and classes) + GIoU + centerness BCE (over positives),
    each divided by the weighted number of positives (at least 1).

    logits (B, L, K), distances (B, L, 4), ctr_logits (B, L), targets as `assign` (batched),
    weights (B,) (0 removes a padding image).
    """
    w = weights.astype(jnp.float32)
    pos = positive * w[:, None]
    norm = jnp.maximum(pos.sum(), 1.0)
    x, t = logits.astype(jnp.float32), cls_target
    bce = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    p_t = jnp.exp(-bce)
    focal = (alpha * t + (1 - alpha) * (1 - t)) * (1 - p_t) ** gamma * bce
    cls = (focal.sum(-1) * w[:, None]).sum() / norm
    safe = jnp.where(pos[..., None] > 0, reg_target, 1.0)
    reg = (giou_loss(distances.astype(jnp.float32), safe) * pos).sum() / norm
    c, ct = ctr_logits.astype(jnp.float32), centerness(safe)
    ctr = ((jnp.maximum(c, 0) - c * ct + jnp.log1p(jnp.exp(-jnp.abs(c)))) * pos).sum() / norm
    return cls + reg + ctr


# ---------------------------------------------------------------- inference


def nms_keep(boxes: Array, scores: Array, classes: Array, iou: float) -> Array:
    """Greedy class-wise NMS of one image's candidates sorted by score descending: (k,) bool
    keep flags (boxes (k, 4), scores (k,), classes (k,))."""
    k = boxes.shape[0]
    overlap = (pairwise_iou(boxes, boxes) > iou) & (classes[:, None] == classes[None])
    later = jnp.arange(k)[None, :] > jnp.arange(k)[:, None]

    def body(i, keep):
        return keep & ~(keep[i] & overlap[i] & later[i])

    return jax.lax.fori_loop(0, k, body, scores > 0)


def postprocess(logits: Array, distances: Array, ctr_logits: Array, points: Array,
                image_size: Sequence[int], *, top_k: int, iou: float, max_detections: int,
                score_threshold: float) -> dict[str, Array]:
    """Detections of a batch: score sqrt(sigmoid(class) * sigmoid(centerness)), the `top_k`
    (location, class) pairs, boxes clipped to the image, class-wise NMS, the best
    `max_detections`. Returns "boxes" (B, D, 4), "scores" (B, D), "classes" (B, D), "valid"."""
    b, n, k = logits.shape
    scores = jnp.sqrt(jax.nn.sigmoid(logits) * jax.nn.sigmoid(ctr_logits)[..., None])
    top, idx = jax.lax.top_k(scores.reshape(b, n * k), min(top_k, n * k))
    loc, cls = idx // k, idx % k
    boxes = decode(points[loc], jnp.take_along_axis(distances, loc[..., None], axis=1))
    hi = jnp.asarray([image_size[1], image_size[0]] * 2, jnp.float32)
    boxes = jnp.clip(boxes, 0.0, hi)
    top = jnp.where(top >= score_threshold, top, 0.0)
    keep = jax.vmap(nms_keep, (0, 0, 0, None))(boxes, top, cls, iou)
    kept = jnp.where(keep, top, 0.0)
    best, order = jax.lax.top_k(kept, min(max_detections, kept.shape[1]))
    take = lambda a: jnp.take_along_axis(a, order if a.ndim == 2 else order[..., None], axis=1)
    return {"boxes": take(boxes), "scores": best, "classes": take(cls), "valid": best > 0}


# ---------------------------------------------------------------- mAP


def coco_map(detections: dict, truth: dict, num_classes: int) -> dict[str, float]:
    """pycocotools mAP@[.5:.95] and mAP@.5 of detections ("boxes" (N, D, 4) xyxy, "scores",
    "classes", "valid") against truth ("boxes" (N, M, 4), "box_classes", "box_valid");
    NaN without true boxes, 0 without detections."""
    def xywh(box):
        x0, y0, x1, y1 = (float(v) for v in box)
        return [x0, y0, x1 - x0, y1 - y0]

    n = len(truth["boxes"])
    true = [(i, b, c) for i in range(n) for b, c, v in zip(
        truth["boxes"][i], truth["box_classes"][i], truth["box_valid"][i]) if v > 0]
    annotations = [{"id": j + 1, "image_id": i, "category_id": int(c) + 1, "bbox": xywh(b),
                    "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0}
                   for j, (i, b, c) in enumerate(true)]
    if not annotations:
        return {"map": math.nan, "map50": math.nan}
    found = [{"image_id": i, "category_id": int(c) + 1, "bbox": xywh(b), "score": float(s)}
             for i in range(n) for b, c, s, v in zip(
                 detections["boxes"][i], detections["classes"][i], detections["scores"][i],
                 detections["valid"][i]) if v]
    if not found:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i} for i in range(n)], "annotations": annotations,
                      "categories": [{"id": c + 1} for c in range(num_classes)]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(found), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map": float(evaluator.stats[0]), "map50": float(evaluator.stats[1])}


# ---------------------------------------------------------------- task


def make_model(config, vit, num_classes: int, image_size: Sequence[int]):
    """(pyramid, head), loss(trainable, frozen, batch, weights) and predict(params, batch).

    params = {"vision", "pyramid", "head"}; batches hold "image" (B, H, W) and BOX_FIELDS.
    """
    if config.head not in HEADS:
        raise ValueError(f"config.head={config.head!r}; choose one of {HEADS}")
    strides = tuple(int(s) for s in config.pyramid.strides)
    pyramid = SimpleFeaturePyramid(vit.patch_size, strides, config.pyramid.channels)
    head = FCOSHead(num_classes, strides, config.fcos.num_convs, config.fcos.norm_groups)
    points_np, stride = level_points(image_size, strides)
    points = jnp.asarray(points_np)
    ranges = jnp.asarray(level_ranges(stride, config.fcos.range_factor, strides))
    fc = config.fcos

    def outputs(params, batch):
        _, out = vit.apply({"params": params["vision"]}, **features.vit_inputs(batch, "xray"))
        grid = decoders.tokens_to_grid(out["tokens"], out["grid_2d"])
        return head.apply({"params": params["head"]},
                          pyramid.apply({"params": params["pyramid"]}, grid))

    def loss(trainable, frozen, batch, weights):
        logits, distances, ctr = outputs({**frozen, **trainable}, batch)
        cls_t, reg_t, pos = jax.vmap(assign, (None, None, 0, 0, 0, None))(
            points, ranges, jnp.asarray(batch["boxes"]), jnp.asarray(batch["box_classes"]),
            jnp.asarray(batch["box_valid"]), num_classes)
        return fcos_loss(logits, distances, ctr, cls_t, reg_t, pos, weights, fc.focal_alpha,
                         fc.focal_gamma)

    def predict(params, batch):
        logits, distances, ctr = outputs(params, batch)
        return postprocess(logits, distances, ctr, points, image_size, top_k=fc.pre_nms_top_k,
                           iou=fc.nms_iou, max_detections=fc.max_detections,
                           score_threshold=fc.score_threshold)

    return (pyramid, head), loss, predict


def init_params(pyramid, head, vit, image_size, prior_prob: float, seed: int) -> dict:
    """{"pyramid", "head"} params (decoders.init_params), the class bias at the focal prior
    (`decoders.prior_logit`, FCOS, RetinaNet)."""
    grid = tuple(s // vit.patch_size for s in image_size)
    x = jnp.zeros((1, *grid, vit.width))
    levels = jax.eval_shape(lambda: pyramid.init_with_output(jax.random.key(0), x)[0])
    params = {"pyramid": decoders.init_params(pyramid, seed, x),
              "head": decoders.init_params(head, seed + 1, [
                  jnp.zeros(lv.shape, lv.dtype) for lv in levels])}
    bias = params["head"]["cls_logits"]["bias"]
    params["head"]["cls_logits"]["bias"] = jnp.full_like(bias, decoders.prior_logit(prior_prob))
    return params


def with_boxes(batch: dict, table: np.ndarray, num_classes: int, max_boxes: int) -> dict:
    """A batch with its `mask` replaced by BOX_FIELDS (`boxes_from_masks`)."""
    batch = dict(batch)
    return {**batch, **boxes_from_masks(batch.pop("mask"), table, num_classes, max_boxes)}


def draw(path: str, images: np.ndarray, truth: dict, found: dict, class_names, *,
         min_score: float) -> None:
    """PNG of images (N, H, W) with true boxes (green) and detections scoring >= min_score
    (red, with class and score)."""
    fig = Figure(figsize=(3 * len(images), 3.3))
    for i, image in enumerate(images):
        ax = fig.add_subplot(1, len(images), i + 1)
        ax.imshow(image, cmap="gray")
        ax.set_axis_off()
        for box, c, v in zip(truth["boxes"][i], truth["box_classes"][i], truth["box_valid"][i]):
            if v > 0:
                ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False,
                                       edgecolor="lime", linewidth=1.5))
        for box, c, s, v in zip(found["boxes"][i], found["classes"][i], found["scores"][i],
                                found["valid"][i]):
            if v and s >= min_score:
                ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False,
                                       edgecolor="red", linewidth=1, linestyle="--"))
                ax.text(box[0], box[1], f"{class_names[c]} {s:.2f}", color="red", fontsize=6)
    fig.suptitle("true (green) and detected (red) boxes", fontsize=9)
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def run(config, workdir: str) -> dict:
    """Trains the pyramid and head at every label fraction on the frozen encoder, scores the
    test split by mAP; writes WORKDIR/results.json and WORKDIR/detections.png."""
    if config.data.modality != "xray":
        raise ValueError(f"config.data.modality={config.data.modality!r}: detection is 2D "
                         "('xray')")
    sources, label_names = tasks.open_splits(config.data)
    table, class_names = segmentation.class_table(label_names, config.data.box_classes, False)
    class_names = class_names[1:]
    num_classes = len(class_names)
    loaded = tasks.load_model(config, with_text=False)
    vit = loaded.model.vit
    image_size = (config.data.crop_size,) * 2 if np.ndim(config.data.crop_size) == 0 else tuple(
        config.data.crop_size)
    (pyramid, head), loss, predict = make_model(config, vit, num_classes, image_size)
    predict = jax.jit(predict)
    boxed = lambda batch: with_boxes(batch, table, num_classes, config.max_boxes)
    split = {s: [(boxed(b), n) for b, n in tasks.split_batches(config, sources, s,
                                                                fields=("mask",))]
             for s in ("validation", "test")}
    truth = {k: np.concatenate([b[k][:n] for b, n in split["test"]]) for k in BOX_FIELDS}
    results, figure = {}, None
    for fraction in config.fractions:
        rows = tasks.fraction_indices(len(sources["train"]), fraction, config.seed)
        trainable = init_params(pyramid, head, vit, image_size, config.fcos.prior_prob,
                                config.seed)
        frozen = {"vision": loaded.params["vision"]}
        train = map(boxed, tasks.train_batches(config, sources["train"], rows, with_mask=True))
        trainable, history = tasks.fit(
            loss, trainable, frozen, tasks.adamw(config.optim), train,
            tasks.steps_per_epoch(len(rows), config.optim),
            lambda: split["validation"], max_epochs=config.optim.max_epochs,
            patience=config.optim.patience)
        found = features.apply_batched(predict, {**frozen, **trainable}, split["test"])
        scores = coco_map(found, truth, num_classes)
        results[f"{fraction:g}"] = {
            "num_train": int(len(rows)), **scores,
            "best_epoch": history["best_epoch"], "epochs_run": history["epochs_run"]}
        figure = found
    images = np.concatenate([b["image"][:n] for b, n in split["test"]])[:config.figure_images]
    path = os.path.join(os.path.expanduser(workdir), FIGURE_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    draw(path, images, {k: v[:len(images)] for k, v in truth.items()},
         {k: v[:len(images)] for k, v in figure.items()}, class_names,
         min_score=config.figure_min_score)
    return tasks.write_results(workdir, config, loaded, {
        "metrics": results, "classes": class_names, "head": config.head,
        "test_boxes": int(truth["box_valid"].sum()), "figure": FIGURE_FILE})
