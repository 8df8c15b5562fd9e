"""DrasCLR: anatomy-conditioned 3D contrastive learning on the mixed-dimension ViT (docs/DESIGN.md
§4.9). No text; the CT sub-batch only (X-rays in the batch are ignored).

Per step, for the volumes v (B, D, H, W) of batch["ct"]:

1. Anatomy (`ops.anatomy`, on v as given): the ROI mask (lung by default), its bounding box,
   and the share of each token-grid region (`region` tokens) inside the ROI.
2. `num_patches` distinct regions per volume, uniform over those at least `min_roi_fraction`
   in the ROI; for each, `num_neighbours` distinct neighbours, the region moved by
   `neighbour_shift` tokens along a random axis direction (on the grid, in the ROI).
   Each region's location: its centre normalised to [-1, 1] in the ROI box, (z, y, x).
3. Two views of v (`ops.views.augment_3d` with `objective.views`: intensity and noise only,
   so a region is the same anatomy in both).
4. A region's feature is the ViT [CLS] over its tokens alone (`keep` groups: one patch
   embedding per volume, one sequence per region), mapped by the location-conditioned head (`models.conditional`) and L2-normalised.
   Student: the regions and their neighbours in view 1 (q, r). Momentum teacher (EMA of the
   ViT and head): the regions in view 2 (k), no gradient.
5. L_local = InfoNCE(q, k); L_neighbour = InfoNCE(sum over neighbours of r, k), the
   negatives of both the other regions' keys of the global batch (no queue);
   L = w_local L_local + w_neighbour L_neighbour.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unimedi_jax.models.conditional import ConditionalHead
from unimedi_jax.models.layers import l2_normalize
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.objective import schedules, update
from unimedi_jax.objective.ema import ema_update
from unimedi_jax.objective.optim import make_optimizer
from unimedi_jax.objective.step import Setup
from unimedi_jax.ops import anatomy, views

Array = jax.Array
NAME = "drasclr"  # config.method, and the key of the method's params


def info_nce(query: Array, keys: Array, temperature: float) -> Array:
    """Mean over rows of -log softmax_j(query_i . keys_j / T)_i: query, keys (N, C) (row i of
    keys is query i's positive, the other rows its negatives). Float32."""
    query, keys = jnp.asarray(query, jnp.float32), jnp.asarray(keys, jnp.float32)
    logits = query @ keys.T / temperature
    positives = jnp.sum(query * keys, axis=-1) / temperature  # the diagonal (see clip_loss)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - positives)


def top1(query: Array, keys: Array) -> Array:
    """Share of rows whose most similar key is their own positive (the diagonal)."""
    hits = jnp.argmax(query @ keys.T, axis=1) == jnp.arange(query.shape[0])
    return hits.astype(jnp.float32).mean()


def check_config(config) -> None:
    """ValueError, naming the key, for a region or neighbour setting the token grid cannot hold."""
    d = config.objective.drasclr
    vit = config.model.vit
    grid = [s // p for s, p in zip(vit.volume_size, vit.patch_size_3d)]
    region = tuple(int(r) for r in d.region)
    if len(region) != 3 or not all(1 <= r <= g for r, g in zip(region, grid)):
        raise ValueError(f"objective.drasclr.region={tuple(d.region)} must be 3 token counts "
                         f"within the 3D token grid {tuple(grid)}")
    starts = anatomy.num_starts(grid, region)
    if not 1 <= d.num_patches <= starts[0] * starts[1] * starts[2]:
        raise ValueError(f"objective.drasclr.num_patches={d.num_patches} must lie in 1.."
                         f"{starts[0] * starts[1] * starts[2]} (regions on the grid)")
    if d.neighbour_shift < 1:
        raise ValueError(f"objective.drasclr.neighbour_shift={d.neighbour_shift} must be >= 1")
    most = anatomy.min_neighbours(grid, region, d.neighbour_shift)
    if not 1 <= d.num_neighbours <= most:
        raise ValueError(f"objective.drasclr.num_neighbours={d.num_neighbours} must lie in "
                         f"1..{most}: the fewest on-grid neighbours of a region of "
                         f"{region} tokens moved by {d.neighbour_shift} on the grid {tuple(grid)}")
    if d.roi not in anatomy.ROI_MASKS:
        raise ValueError(f"objective.drasclr.roi={d.roi!r}; expected one of {anatomy.ROI_MASKS}")
    views_cfg = config.objective.views
    if tuple(views_cfg.crop_scale) != (1.0, 1.0) or views_cfg.flip != 0:
        raise ValueError("objective.views.crop_scale must be (1, 1) and objective.views.flip 0 "
                         "for DrasCLR: a region must be the same anatomy in both views")


def sample_regions(volume: Array, rng: Array, d, patch, grid) -> dict:
    """Regions, neighbours and their locations for volumes (B, D, H, W) (steps 1-2 above).

    Returns tokens (B, P, M) and neighbour_tokens (B, P, K, M) int32 (M = rd*rh*rw), loc
    (B, P, 3) and neighbour_loc (B, P, K, 3) float32, roi_fraction (B, P).
    """
    region = tuple(int(r) for r in d.region)
    r_pick, r_ngb = jax.random.split(rng)
    roi = anatomy.roi_mask(volume, anatomy.hu_to_normalized(d.threshold_hu), d.roi)
    lo, hi = anatomy.bounding_box(roi)
    fractions = anatomy.region_fractions(roi, patch, region)
    starts = anatomy.sample_regions(r_pick, fractions, d.num_patches, d.min_roi_fraction)
    neighbours = anatomy.neighbour_regions(r_ngb, starts, fractions, d.neighbour_shift,
                                           d.num_neighbours, d.min_roi_fraction)
    locate = lambda s: anatomy.normalized_location(
        anatomy.region_centres(s, patch, region), lo, hi)
    nh, nw = fractions.shape[2:]
    flat = starts[..., 0] * nh * nw + starts[..., 1] * nw + starts[..., 2]
    return dict(tokens=anatomy.region_tokens(starts, grid, region),
                neighbour_tokens=anatomy.region_tokens(neighbours, grid, region),
                loc=locate(starts), neighbour_loc=locate(neighbours),
                roi_fraction=jnp.take_along_axis(fractions.reshape(fractions.shape[0], -1), flat,
                                                 axis=1))


def make_setup(config) -> Setup:
    """The DrasCLR model, optimiser, init and train step (`step.Setup`, text_params None)."""
    check_config(config)
    update.check_on_nonfinite(config)
    d = config.objective.drasclr
    model = UniMedI.from_config(config)
    vit = model.vit
    head = ConditionalHead(d.hidden_dim or vit.width, d.dim, d.num_experts, dtype=vit.dtype)
    optimizer = make_optimizer(config)
    patch, grid = tuple(vit.patch_size_3d), vit.grid_3d

    def init(rng: Array, text_params: dict | None = None) -> dict:
        # The same split as the UniMedI setup, so the ViT starts as UniMedI's for one seed.
        r_model, r_head = jax.random.split(rng)
        params = {"vision": model.init_random(r_model)["vision"],
                  NAME: {"head": head.init(r_head, jnp.zeros((1, vit.width), jnp.float32),
                                           jnp.zeros((1, 3), jnp.float32))["params"]}}
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "teacher": jax.tree.map(jnp.copy, params),  # own buffers (donation)
                "opt_state": optimizer.init(params)}

    def embed(p: dict, volume: Array, tokens: Array, loc: Array) -> Array:
        """Regions (B, R, M) of volumes (B, D, H, W) at loc (B, R, 3) -> (B, R, dim) unit."""
        b, r, m = tokens.shape
        cls, _ = model.encode_image(p, volume=volume, keep=tokens)  # (B * R, width)
        z = head.apply({"params": p[NAME]["head"]}, cls, loc.reshape(b * r, 3))
        return l2_normalize(z).reshape(b, r, -1)

    def loss_and_grads(params: dict, teacher: dict, batch: dict, rng: Array):
        if "ct" not in batch:
            raise ValueError(f"DrasCLR trains on CT volumes; the batch has no 'ct' sub-batch "
                             f"(keys: {sorted(batch)})")
        volume = batch["ct"]["volume"]
        b = volume.shape[0]
        r_regions, r_view1, r_view2 = jax.random.split(rng, 3)
        s = sample_regions(volume, r_regions, d, patch, grid)
        view1 = views.augment_3d(r_view1, volume, config.objective.views)
        view2 = views.augment_3d(r_view2, volume, config.objective.views)
        p_, k_ = d.num_patches, d.num_neighbours
        keys = jax.lax.stop_gradient(embed(teacher, view2, s["tokens"], s["loc"]))
        keys = keys.reshape(b * p_, -1)
        # Regions and neighbours in one student pass over view 1.
        tokens = jnp.concatenate([s["tokens"], s["neighbour_tokens"].reshape(b, p_ * k_, -1)], 1)
        loc = jnp.concatenate([s["loc"], s["neighbour_loc"].reshape(b, p_ * k_, 3)], 1)

        def loss_fn(p):
            z = embed(p, view1, tokens, loc)
            q = z[:, :p_].reshape(b * p_, -1)
            r = z[:, p_:].reshape(b * p_, k_, -1).sum(axis=1)
            terms = {"loss_local": info_nce(q, keys, d.temperature),
                     "loss_neighbour": info_nce(r, keys, d.temperature)}
            loss = d.w_local * terms["loss_local"] + d.w_neighbour * terms["loss_neighbour"]
            return loss, (terms, q, r)

        (loss, (terms, q, r)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        metrics = dict(terms, loss=loss, acc_local=top1(q, keys), acc_neighbour=top1(r, keys),
                       roi_fraction=s["roi_fraction"].mean())
        return loss, grads, metrics

    def train_step(state: dict, batch: dict, rng: Array) -> tuple[dict, dict]:
        step = state["step"]
        loss, grads, metrics = loss_and_grads(state["params"], state["teacher"], batch,
                                              jax.random.fold_in(rng, step))
        momentum = schedules.ema_momentum(step, config.total_steps, d.ema_start, d.ema_end)
        new_state, applied = update.apply_gradients(
            state, loss, grads, optimizer, config,
            after=lambda params: {"teacher": ema_update(state["teacher"], params, momentum)})
        metrics.update(applied, ema_momentum=momentum)
        return new_state, metrics

    return Setup(model, optimizer, None, init, train_step)
