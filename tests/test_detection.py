"""Detection (eval/detection.py): box coding, the feature pyramid, FCOS targets and loss against
float64 transcriptions, NMS, mAP by pycocotools, and a detector that learns planted boxes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import planted_squares
from configs import detection_2d
from unimedi_jax.eval import detection, tasks
from unimedi_jax.models import vit as vit_lib

IMAGE = 32


def test_encode_decode_round_trip_against_numpy():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 64, (50, 2))
    lo = rng.uniform(0, 64, (50, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(1, 30, (50, 2))], -1)
    d = np.asarray(detection.encode(jnp.asarray(points, jnp.float32), jnp.asarray(
        boxes, jnp.float32)))
    reference = np.stack([points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1],
                          boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]], -1)
    np.testing.assert_allclose(d, reference, rtol=1e-5, atol=1e-4)
    back = detection.decode(jnp.asarray(points, jnp.float32), jnp.asarray(d))
    np.testing.assert_allclose(np.asarray(back), boxes, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("patch,size", [(16, 64), (8, 32)])
def test_feature_pyramid_shapes_and_strides(patch, size):
    strides = (4, 8, 16, 32)
    pyramid = detection.SimpleFeaturePyramid(patch, strides, channels=8)
    grid = jnp.zeros((2, size // patch, size // patch, 16))
    levels, _ = pyramid.init_with_output(jax.random.key(0), grid)
    assert [lv.shape for lv in levels] == [(2, size // s, size // s, 8) for s in strides]
    points, stride = detection.level_points((size, size), strides)
    assert len(points) == sum((size // s) ** 2 for s in strides)
    first = points[stride == 4]
    np.testing.assert_array_equal(first[:2], [[2, 2], [6, 2]])  # cell centres, row-major (x, y)
    with pytest.raises(ValueError, match="power-of-2"):
        detection.SimpleFeaturePyramid(patch, (12,), 8).init(jax.random.key(0), grid)


def _assign_reference(points, ranges, boxes, classes, valid, k):
    n = len(points)
    onehot, target, pos = np.zeros((n, k)), np.zeros((n, 4)), np.zeros(n)
    for i, (x, y) in enumerate(points):  # float64 transcription of FCOS's assignment
        best, best_area = None, np.inf
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            d = np.array([x - x0, y - y0, x1 - x, y1 - y])
            area = (x1 - x0) * (y1 - y0)
            if valid[j] and d.min() > 0 and ranges[i, 0] < d.max() <= ranges[i, 1] \
                    and area < best_area:
                best, best_area, dist = j, area, d
        if best is not None:
            onehot[i, classes[best]], target[i], pos[i] = 1, dist, 1
    return onehot, target, pos


def _loss_reference(logits, dists, ctr, onehot, target, pos, w, alpha, gamma):
    p = 1 / (1 + np.exp(-logits))
    pt = np.where(onehot == 1, p, 1 - p)
    at = np.where(onehot == 1, alpha, 1 - alpha)
    focal = -at * (1 - pt) ** gamma * np.log(pt)
    posw = pos * w[:, None]
    norm = max(posw.sum(), 1)
    cls = (focal.sum(-1) * w[:, None]).sum() / norm
    reg = ctr_loss = 0.0
    for b, i in zip(*np.nonzero(posw)):
        pl, pt_, pr, pb = dists[b, i]
        tl, tt, tr, tb = target[b, i]
        inter = (min(pl, tl) + min(pr, tr)) * (min(pt_, tt) + min(pb, tb))
        union = (pl + pr) * (pt_ + pb) + (tl + tr) * (tt + tb) - inter
        encl = (max(pl, tl) + max(pr, tr)) * (max(pt_, tt) + max(pb, tb))
        reg += posw[b, i] * (1 - (inter / union - (encl - union) / encl))
        c = np.sqrt(min(tl, tr) / max(tl, tr) * min(tt, tb) / max(tt, tb))
        q = 1 / (1 + np.exp(-ctr[b, i]))
        ctr_loss += posw[b, i] * -(c * np.log(q) + (1 - c) * np.log(1 - q))
    return cls + reg / norm + ctr_loss / norm


def test_assign_and_loss_match_float64_transcription():
    rng = np.random.default_rng(1)
    strides = (4, 8, 16, 32)
    points, stride = detection.level_points((64, 64), strides)
    ranges = detection.level_ranges(stride, 4.0, strides)
    b, m, k = 3, 5, 3
    lo = rng.uniform(0, 50, (b, m, 2))
    boxes = np.concatenate([lo, np.minimum(lo + rng.uniform(2, 60, (b, m, 2)), 64)], -1)
    classes = rng.integers(0, k, (b, m))
    valid = (rng.random((b, m)) < 0.7).astype(np.float32)
    got = jax.vmap(detection.assign, (None, None, 0, 0, 0, None))(
        jnp.asarray(points), jnp.asarray(ranges), jnp.asarray(boxes, jnp.float32),
        jnp.asarray(classes), jnp.asarray(valid), k)
    want = [np.stack(x) for x in zip(*(_assign_reference(points, ranges, boxes[i], classes[i],
                                                         valid[i], k) for i in range(b)))]
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-3)
    onehot, target, pos = want
    assert 0 < pos.sum() < pos.size  # both kinds of location are exercised
    n = len(points)
    logits = rng.normal(-2, 2, (b, n, k))
    dists = rng.uniform(0.5, 30, (b, n, 4))
    ctr = rng.normal(0, 1, (b, n))
    w = np.array([1.0, 0.0, 1.0])
    loss = detection.fcos_loss(*(jnp.asarray(x, jnp.float32) for x in (
        logits, dists, ctr, onehot, target, pos, w)), alpha=0.25, gamma=2.0)
    reference = _loss_reference(logits, dists, ctr, onehot, target, pos, w, 0.25, 2.0)
    np.testing.assert_allclose(float(loss), reference, rtol=1e-4)


def test_boxes_from_masks_and_nms():
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 2:5, 3:9] = 2
    masks[0, 10:12, 10:16] = 2
    masks[0, 8:9, 0:1] = 1
    table = np.zeros(256, np.int32)
    table[2] = 1  # only stored class 2 is detected, as class 0
    out = detection.boxes_from_masks(masks, table, 1, max_boxes=3)
    np.testing.assert_array_equal(out["boxes"][0, :2], [[3, 2, 9, 5], [10, 10, 16, 12]])
    np.testing.assert_array_equal(out["box_valid"], [[1, 1, 0], [0, 0, 0]])
    boxes = jnp.asarray([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]],
                        jnp.float32)
    keep = detection.nms_keep(boxes, jnp.asarray([0.9, 0.8, 0.7, 0.6]),
                              jnp.asarray([0, 0, 1, 0]), 0.5)
    np.testing.assert_array_equal(np.asarray(keep), [True, False, True, True])


def test_map_of_perfect_and_shifted_boxes():
    truth = {"boxes": np.array([[[10, 10, 30, 30], [0, 0, 0, 0]], [[5, 5, 25, 45], [0, 0, 0, 0]]],
                               np.float32),
             "box_classes": np.zeros((2, 2), np.int32), "box_valid": np.array([[1, 0], [1, 0]])}
    perfect = {"boxes": truth["boxes"], "classes": truth["box_classes"],
               "scores": np.array([[0.9, 0], [0.8, 0]]), "valid": truth["box_valid"] > 0}
    assert detection.coco_map(perfect, truth, 1) == {"map": 1.0, "map50": 1.0}
    # Shifted right by 4 of 20 px: IoU 2/3, a match at 4 of the 10 thresholds 0.5, ..., 0.95.
    shifted = dict(perfect, boxes=truth["boxes"] + np.array([4, 0, 4, 0], np.float32))
    iou = np.asarray(detection.pairwise_iou(truth["boxes"][0, :1], shifted["boxes"][0, :1]))
    np.testing.assert_allclose(iou, [[2 / 3]], rtol=1e-6)
    out = detection.coco_map(shifted, truth, 1)
    assert out["map50"] == 1.0 and out["map"] == pytest.approx(0.4)
    none = dict(perfect, valid=np.zeros((2, 2), bool))
    assert detection.coco_map(none, truth, 1) == {"map": 0.0, "map50": 0.0}


def test_detector_learns_planted_boxes():
    """Bright squares on noise: the pyramid and head trained on a frozen random encoder by the
    path run() trains (make_model, fit, predict) reach a test mAP@.5 far above their init."""
    rng = np.random.default_rng(0)

    def batch(n):
        return detection.with_boxes(planted_squares(rng, n, IMAGE, (10, 16), 1), table, 1, 4)

    table = np.zeros(256, np.int32)
    table[1] = 1
    config = detection_2d.get_config()
    config.pyramid.update(channels=16, strides=(4, 8))
    config.fcos.update(num_convs=1, norm_groups=4, pre_nms_top_k=20, max_detections=5)
    vit = vit_lib.ViT(width=16, depth=1, num_heads=2, mlp_dim=32, image_size=IMAGE, patch_size=8)
    (pyramid, head), loss, predict = detection.make_model(config, vit, 1, (IMAGE, IMAGE))
    sample = batch(8)
    frozen = {"vision": jax.jit(vit.init)(jax.random.key(0), images=sample["image"][:, None])[
        "params"]}
    init = detection.init_params(pyramid, head, vit, (IMAGE, IMAGE), 0.01, 0)
    train = iter(lambda: batch(8), None)
    val = [(batch(8), 8)]
    trained, _ = tasks.fit(loss, init, frozen,
                           tasks.adamw(ml_collections.ConfigDict(dict(lr=3e-3, weight_decay=0))),
                           train, 30, lambda: val, max_epochs=2, patience=2)
    test = batch(16)
    predict = jax.jit(predict)
    before = detection.coco_map(jax.device_get(predict({**frozen, **init}, test)), test, 1)
    after = detection.coco_map(jax.device_get(predict({**frozen, **trained}, test)), test, 1)
    assert after["map50"] > 0.5 and after["map50"] > before["map50"] + 0.3, (before, after)
