"""Downstream losses against float64 numpy / PyTorch transcriptions of the reference formulas."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unimedi_jax.eval import losses


def _torch_focal(x, t, gamma=2.0):
    """GLoRIA / MGCA FocalLoss.forward, verbatim in formula."""
    max_val = (-x).clamp(min=0)
    loss = x - x * t + max_val + ((-max_val).exp() + (-x - max_val).exp()).log()
    invprobs = F.logsigmoid(-x * (t * 2.0 - 1.0))
    return ((invprobs * gamma).exp() * loss).mean()


def _torch_dice_coefficient(x, t, smooth=1.0):
    """GLoRIA / MGCA dice_loss (their soft Dice coefficient)."""
    p = torch.sigmoid(x).view(-1)
    t = t.view(-1)
    return (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def _numpy_dice_ce(logits, labels, nr=0.0, dr=1e-6):
    """MONAI DiceCELoss(to_onehot_y, softmax, squared_pred, smooth_nr=nr, smooth_dr=dr)."""
    logits = logits.astype(np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    c = logits.shape[-1]
    t = np.eye(c)[labels]
    axes = tuple(range(1, logits.ndim - 1))
    dice = 1 - (2 * (p * t).sum(axes) + nr) / ((p ** 2).sum(axes) + (t ** 2).sum(axes) + dr)
    ce = -np.log(np.take_along_axis(p, labels[..., None], -1)).mean()
    return dice.mean() + ce


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_focal_dice_matches_torch_reference(rng):
    x = rng.normal(0, 2, (3, 8, 8)).astype(np.float32)
    t = (rng.random((3, 8, 8)) < 0.3).astype(np.float32)
    xt, tt = torch.tensor(x, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
    focal = _torch_focal(xt, tt).item()
    dice = 1.0 - _torch_dice_coefficient(xt, tt).item()
    np.testing.assert_allclose(losses.focal_loss(x, t), focal, rtol=1e-5)
    np.testing.assert_allclose(losses.binary_dice_loss(x, t), dice, rtol=1e-5)
    np.testing.assert_allclose(losses.focal_dice_loss(x, t, alpha=10.0), 10 * focal + dice,
                               rtol=1e-5)


def test_dice_ce_matches_numpy_reference(rng):
    logits = rng.normal(0, 2, (2, 4, 5, 6, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 4, 5, 6))
    labels[1][labels[1] == 2] = 0  # a class absent from sample 1
    np.testing.assert_allclose(losses.dice_ce_loss(logits, labels), _numpy_dice_ce(logits, labels),
                               rtol=1e-5)


def test_masked_bce_and_softmax_ce_match_numpy(rng):
    logits = rng.normal(0, 3, (6, 4)).astype(np.float32)
    labels = rng.integers(-1, 2, (6, 4)).astype(np.float32)  # -1: unknown, ignored
    x = logits.astype(np.float64)
    known = labels >= 0
    ce = -(labels * np.log(1 / (1 + np.exp(-x))) + (1 - labels) * np.log(1 / (1 + np.exp(x))))
    np.testing.assert_allclose(losses.masked_bce(logits, labels), ce[known].mean(), rtol=1e-5)
    cls = rng.integers(0, 4, 6)
    logp = x - np.log(np.exp(x).sum(1, keepdims=True))
    np.testing.assert_allclose(losses.softmax_ce(logits, cls), -logp[np.arange(6), cls].mean(),
                               rtol=1e-5)


@pytest.mark.parametrize("name", ["masked_bce", "softmax_ce", "focal", "dice", "dice_ce"])
def test_zero_weight_rows_are_ignored(rng, name):
    """A padded batch with weight 0 on the padding gives the loss of the real rows."""
    logits2 = rng.normal(size=(5, 4, 4, 3)).astype(np.float32)
    labels2 = rng.integers(0, 3, (5, 4, 4))
    fn = {
        "masked_bce": lambda x, y, w=None: losses.masked_bce(x[:, 0, 0], (y[:, 0, :3] > 0)
                                                             .astype(np.float32), w),
        "softmax_ce": lambda x, y, w=None: losses.softmax_ce(x[:, 0, 0], y[:, 0, 0], w),
        "focal": lambda x, y, w=None: losses.focal_loss(x[..., 0], (y > 0).astype(np.float32), w),
        "dice": lambda x, y, w=None: losses.binary_dice_loss(x[..., 0], (y > 0)
                                                             .astype(np.float32), w),
        "dice_ce": lambda x, y, w=None: losses.dice_ce_loss(x, y, w),
    }[name]
    weights = np.array([1, 1, 1, 0, 0], np.float32)
    np.testing.assert_allclose(fn(logits2, labels2, weights), fn(logits2[:3], labels2[:3]),
                               rtol=1e-5)
