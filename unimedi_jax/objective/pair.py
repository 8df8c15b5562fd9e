"""The DRR bridge (docs/DESIGN.md §4.7): each training CT paired with a radiograph of itself.

`drr_inputs` renders, inside the step, the X-ray model input of a CT model input: the volume
back to Hounsfield units, to attenuation, a parallel-beam ray sum (`ops/drr.py`), the displayed
intensity, then the X-ray normalisation of `data/preprocess.py`. The pair losses tie the CT
[CLS] to its DRR's [CLS]:

- "unimiss": cross-dimension distillation as UniMiSS+: the student's DINO-head output on the
  DRR against the EMA teacher's (centred, sharpened) output on the CT, a DINO cross-entropy;
- "infonce": symmetric InfoNCE between the projected CT and DRR embeddings of a batch.

Every function takes global arrays; under `jax.jit` the InfoNCE negatives span the global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unimedi_jax.data import preprocess
from unimedi_jax.objective import losses
from unimedi_jax.ops import drr as drr_lib

Array = jax.Array
PAIR_LOSSES = ("unimiss", "infonce")  # objective.pair.loss
PROJECTIONS = tuple(drr_lib.RAY_AXES)  # objective.pair.drr.projection


def enabled(objective_cfg) -> bool:
    """Whether `objective.pair` is on (False for configs saved before the block)."""
    pair_cfg = objective_cfg.get("pair")
    return bool(pair_cfg is not None and pair_cfg.enabled)


def drr_inputs(volume, drr_cfg, size: int, *, xp=jnp):
    """CT model input (B, D, H, W) in [-1, 1] -> DRR X-ray model input (B, size, size).

    HU = the inverse of `preprocess.normalize_ct` (the clipped window, so bone above its top
    counts as its top); mu = `drr.hu_to_mu(HU, drr_cfg.mu_water)`; intensity =
    `drr.radiograph(mu, drr_cfg.projection, drr_cfg.ray_length_mm, drr_cfg.window, (size,
    size))` in [0, 1]; then (intensity - XRAY_MEAN) / XRAY_STD, as `preprocess.normalize_xray`
    without its uint8 rounding. `xp`: `jax.numpy` (in the step) or `numpy` (the float64 twin).
    """
    half_width = (preprocess.CT_HU_MAX - preprocess.CT_HU_MIN) / 2
    centre = (preprocess.CT_HU_MAX + preprocess.CT_HU_MIN) / 2
    mu = drr_lib.hu_to_mu(volume * half_width + centre, drr_cfg.mu_water, xp=xp)
    shown = drr_lib.radiograph(mu, drr_cfg.projection, drr_cfg.ray_length_mm, drr_cfg.window,
                               (size, size), xp=xp)
    return (shown - preprocess.XRAY_MEAN) / preprocess.XRAY_STD


def unimiss_loss(student_drr_logits: Array, teacher_ct_logits: Array, center: Array,
                 student_temp: float, teacher_temp: float) -> Array:
    """UniMiSS+'s X-ray-to-CT term: the DINO cross-entropy of the student's DINO-head output on
    each DRR (B, K) against the teacher's on its CT (B, K), centred by the CT centre (K,);
    teacher stopped, mean over the batch."""
    return losses.dino_loss(student_drr_logits, teacher_ct_logits, center, student_temp,
                            teacher_temp)


def infonce_loss(z_ct: Array, z_drr: Array, temperature: float) -> Array:
    """Symmetric InfoNCE over (B, P) embeddings, CT i and DRR i the positive pair, logits
    cos / temperature (`losses.clip_loss` with the DRRs in place of the reports)."""
    return losses.clip_loss(z_ct, z_drr, 1.0 / temperature)
