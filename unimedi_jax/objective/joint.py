"""Joint 2D/3D intra-inter contrastive clustering on the mixed-dimension ViT (docs/DESIGN.md §4.8).

Per step, with two augmented views a, b of every sample (`ops.views`):

1. 2D clustering: the X-rays and `num_slices` slices of each CT view (evenly spaced at a random
   offset, the same depths in both views) go through the ViT's 2D path in one call; their
   [CLS] -> projection MLP -> l2 -> cosine scores with K2 unit prototypes. SwAV swapped
   prediction: the Sinkhorn-Knopp codes of one view (over the global batch, no gradient) are
   the targets of the other view's softmax(scores / temperature).
2. Holistic volume features: each CT view's slice [CLS]s (B3, n, width), in depth order, pass
   the deformable slice transformer (`models.slice_attention`); the mean over slices is h.
3. 3D clustering agreement: swapped prediction between h_a and h_b on K3 prototypes; and the
   ViT's own 3D [CLS] of each volume view, through the same 3D head, predicts the other view's
   holistic codes (`w_volume`: the downstream 3D tasks read that [CLS]).
4. Masked slice-embedding prediction: a fraction `mask_ratio` of slice embeddings is replaced
   by a learned mask embedding; a head predicts them from the transformer's output; loss
   1 - cos against the (stop-gradient) slice embeddings, mean over masked positions.

L = w_2d L_2d + w_3d L_3d + w_volume L_volume + w_mask L_mask. Params: {"vision": ViT,
"joint": {proj_2d, protos_2d, proj_3d, protos_3d, slices, mask_head}}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from unimedi_jax.models import layers
from unimedi_jax.models import vit as vit_lib
from unimedi_jax.models.slice_attention import SliceTransformer
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.objective import update
from unimedi_jax.objective.optim import make_optimizer
from unimedi_jax.objective.step import Setup
from unimedi_jax.ops import views

Array = jax.Array
MODALITIES = ("xray", "ct")
PROTOTYPES = ("protos_2d", "protos_3d")


# ---------------------------------------------------------------- losses

def sinkhorn(scores: Array, epsilon: float, iterations: int) -> Array:
    """SwAV's Sinkhorn-Knopp codes: scores (B, K) -> codes (B, K), each row sums to 1.

    Q = exp(scores / epsilon)^T (K, B) normalised to sum 1; then `iterations` times: rows
    (prototypes) to 1/K each, columns (samples) to 1/B each; finally times B. Over the whole
    (global) batch; no gradient. The global max is subtracted before exp (cancels in the first
    normalisation).
    """
    s = jax.lax.stop_gradient(scores.astype(jnp.float32))
    b, k = s.shape
    q = jnp.exp((s - s.max()) / epsilon).T
    q = q / q.sum()
    for _ in range(iterations):
        q = q / (q.sum(axis=1, keepdims=True) * k)
        q = q / (q.sum(axis=0, keepdims=True) * b)
    return (q * b).T


def swapped_prediction(codes: Array, scores: Array, temperature: float) -> Array:
    """-mean_i sum_k codes_ik log softmax(scores_i / temperature)_k: codes, scores (B, K)."""
    log_p = jax.nn.log_softmax(scores.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.mean(jnp.sum(jax.lax.stop_gradient(codes) * log_p, axis=-1))


def swav_loss(scores_a: Array, scores_b: Array, temperature: float, epsilon: float,
              iterations: int) -> tuple[Array, tuple[Array, Array]]:
    """Two-view SwAV loss (B, K) x 2 -> (scalar, (codes_a, codes_b)): the mean of b predicting
    a's codes and a predicting b's."""
    q_a = sinkhorn(scores_a, epsilon, iterations)
    q_b = sinkhorn(scores_b, epsilon, iterations)
    loss = 0.5 * (swapped_prediction(q_a, scores_b, temperature)
                  + swapped_prediction(q_b, scores_a, temperature))
    return loss, (q_a, q_b)


def masked_prediction_loss(pred: Array, target: Array, mask: Array) -> Array:
    """sum over masked positions of 1 - cos(pred, stop_gradient(target)) / their count.

    pred, target (B, n, C); mask (B, n) bool. 0 when nothing is masked.
    """
    cos = jnp.sum(layers.l2_normalize(pred)
                  * layers.l2_normalize(jax.lax.stop_gradient(target)), axis=-1)
    w = mask.astype(jnp.float32)
    return jnp.sum((1.0 - cos) * w) / jnp.maximum(w.sum(), 1.0)


def usage_entropy(scores: Array, temperature: float) -> Array:
    """Entropy of the batch-mean assignment softmax(scores / t) over K, / log K: 1 = every
    prototype used alike, 0 = one prototype for the whole batch (collapse)."""
    p = jax.nn.softmax(scores.astype(jnp.float32) / temperature, axis=-1).mean(axis=0)
    ent = -jnp.sum(p * jnp.log(jnp.maximum(p, jnp.finfo(jnp.float32).tiny)))
    return ent / math.log(scores.shape[-1])


# ---------------------------------------------------------------- sampling

def slice_indices(rng: Array, batch: int, depth: int, num: int) -> Array:
    """(batch, num) int32: slices stride = depth // num apart from a random offset in
    [0, stride) per sample, in depth order."""
    if not 1 <= num <= depth:
        raise ValueError(f"objective.joint.num_slices={num} must be in 1..{depth} (volume depth)")
    stride = depth // num
    offset = jax.random.randint(rng, (batch, 1), 0, stride)
    return offset + stride * jnp.arange(num, dtype=jnp.int32)[None]


def random_mask(rng: Array, batch: int, num: int, ratio: float) -> Array:
    """(batch, num) bool with exactly round(ratio * num) True per row (at least 1 when
    ratio > 0, at most num - 1), at random positions."""
    count = 0 if ratio <= 0 else min(max(1, round(ratio * num)), num - 1)
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, num)), axis=1), axis=1)
    return ranks < count


# ---------------------------------------------------------------- modules

NORMS = ("batch", "layer")  # objective.joint.head_norm


class BatchStatsNorm(nn.Module):
    """BatchNorm with the statistics of the batch it is given, always (no running averages:
    the heads are used in training only): x (N, D) -> (x - mean_N) / sqrt(var_N + eps) * scale
    + bias, per feature, over the global batch (under jit on a mesh the means span it)."""

    epsilon: float = 1e-5  # torch.nn.BatchNorm1d's

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=0)
        var = jnp.mean(jnp.square(x32 - mean), axis=0)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(x.dtype)


class ProjectionMLP(nn.Module):
    """(N, D) -> (N, out): Dense, norm, GELU, Dense. norm "batch": SwAV's head (BatchNorm over
    the batch, `BatchStatsNorm`); "layer": LayerNorm (per sample)."""

    hidden: int
    out: int
    dtype: Any = jnp.float32
    norm: str = "batch"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.norm not in NORMS:
            raise ValueError(f"objective.joint.head_norm={self.norm!r}; expected one of {NORMS}")
        x = layers.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        norm = BatchStatsNorm() if self.norm == "batch" else nn.LayerNorm(epsilon=1e-6)
        x = layers.gelu(norm(x))
        return layers.Dense(self.out, dtype=self.dtype, name="fc2")(x)


class Prototypes(nn.Module):
    """Cosine scores with K unit prototypes: z (N, d) -> (N, K) = l2(z) l2(W)^T, float32.

    The prototypes are normalised in the forward pass (SwAV renormalises them after each
    update; here the scores are the same and the step stays one pure function)."""

    num: int

    @nn.compact
    def __call__(self, z: Array) -> Array:
        w = self.param("kernel", nn.initializers.normal(1.0), (self.num, z.shape[-1]))
        return layers.l2_normalize(z) @ layers.l2_normalize(w).T


@dataclasses.dataclass(frozen=True)
class JointHeads:
    """The method's modules beside the ViT (definitions only), from `config.objective.joint`."""

    proj_2d: ProjectionMLP
    protos_2d: Prototypes
    proj_3d: ProjectionMLP
    protos_3d: Prototypes
    slices: SliceTransformer
    mask_head: ProjectionMLP
    num_slices: int
    width: int

    @classmethod
    def from_config(cls, config) -> JointHeads:
        jc, width = config.objective.joint, vit_lib.from_config(config.model.vit).width
        dtype = jnp.dtype(config.model.vit.dtype)
        norm = jc.get("head_norm", "layer")  # configs saved before the key: LayerNorm
        return cls(
            proj_2d=ProjectionMLP(jc.proj_hidden, jc.proj_dim, dtype, norm),
            protos_2d=Prototypes(jc.num_prototypes_2d),
            proj_3d=ProjectionMLP(jc.proj_hidden, jc.proj_dim, dtype, norm),
            protos_3d=Prototypes(jc.num_prototypes_3d),
            slices=SliceTransformer(jc.attn_depth, jc.attn_heads, jc.attn_points,
                                    jc.attn_mlp_dim, dtype),
            mask_head=ProjectionMLP(width, width, dtype, "layer"),  # per slice token
            num_slices=jc.num_slices, width=width)

    def init(self, rng: Array) -> dict:
        """params["joint"] (jittable)."""
        keys = dict(zip(("proj_2d", "protos_2d", "proj_3d", "protos_3d", "slices",
                         "mask_head"), jax.random.split(rng, 6)))
        x = jnp.zeros((1, self.width), jnp.float32)
        z = jnp.zeros((1, self.proj_2d.out), jnp.float32)
        seq = jnp.zeros((1, self.num_slices, self.width), jnp.float32)
        init = lambda name, *args: getattr(self, name).init(keys[name], *args)["params"]
        return {"proj_2d": init("proj_2d", x), "protos_2d": init("protos_2d", z),
                "proj_3d": init("proj_3d", x), "protos_3d": init("protos_3d", z),
                "slices": init("slices", seq, jnp.zeros((1, self.num_slices), bool)),
                "mask_head": init("mask_head", seq)}

    def apply(self, params: dict, name: str, *args) -> Any:
        return getattr(self, name).apply({"params": params[name]}, *args)

    def scores_2d(self, params: dict, cls: Array) -> Array:
        return self.apply(params, "protos_2d", self.apply(params, "proj_2d", cls))

    def scores_3d(self, params: dict, feat: Array) -> Array:
        return self.apply(params, "protos_3d", self.apply(params, "proj_3d", feat))


# ---------------------------------------------------------------- the step

def _views(rng: Array, batch: dict, kinds: list[str], cfg, num_slices: int) -> dict:
    """Two augmented views: "images" (2, N, S, S) 2D samples [X-rays, CT slices (b3 * n)] per
    view, and for CTs "volumes" (2, B3, D, H, W)."""
    out, images = {}, [[], []]
    r_x, r_ct, r_idx = jax.random.split(rng, 3)
    if "xray" in kinds:
        x = batch["xray"]["image"]
        for v in range(2):
            images[v].append(views.augment_2d(jax.random.fold_in(r_x, v), x, cfg))
    if "ct" in kinds:
        vol = batch["ct"]["volume"]
        b3, d = vol.shape[:2]
        idx = slice_indices(r_idx, b3, d, num_slices)
        vols = [views.augment_3d(jax.random.fold_in(r_ct, v), vol, cfg) for v in range(2)]
        for v in range(2):
            slices = jnp.take_along_axis(vols[v], idx[:, :, None, None], axis=1)
            images[v].append(slices.reshape(b3 * num_slices, *vol.shape[2:]))
        out["volumes"] = jnp.stack(vols)
    sizes = {im.shape[1:] for v in images for im in v}
    if len(sizes) != 1:
        raise ValueError(f"X-ray images and CT slices differ in size {sorted(sizes)}: the 2D "
                         "task needs CT slices (H, W) equal to the X-ray size")
    out["images"] = jnp.stack([jnp.concatenate(v, axis=0) for v in images])
    return out


def joint_loss(params: dict, batch: dict, rng: Array, *, model: UniMedI, heads: JointHeads,
               config) -> tuple[Array, dict]:
    """The Joint loss of one batch (docs/CONTRACTS.md; labels and reports are not read) ->
    (loss, metrics: loss, loss_2d, loss_3d, loss_volume, loss_mask, proto_usage_2d/3d)."""
    jc = config.objective.joint
    kinds = [k for k in MODALITIES if k in batch]
    if not kinds:
        raise ValueError(f"batch has none of the sub-batches {MODALITIES}; keys: {sorted(batch)}")
    r_views, r_mask = jax.random.split(rng)
    v = _views(r_views, batch, kinds, config.objective.views, heads.num_slices)
    hp = params["joint"]
    sk = dict(temperature=jc.temperature, epsilon=jc.epsilon, iterations=jc.sinkhorn_iterations)

    # 2D: both views in one ViT call.
    images = v["images"]
    n2 = images.shape[1]
    cls2d, _ = model.encode_image(params, images=images.reshape(2 * n2, 1, *images.shape[2:]))
    s2 = heads.scores_2d(hp, cls2d)
    loss_2d, _ = swav_loss(s2[:n2], s2[n2:], **sk)
    metrics = {"loss_2d": loss_2d, "proto_usage_2d": usage_entropy(s2[:n2], jc.temperature)}
    zero = jnp.zeros((), jnp.float32)
    loss_3d = loss_volume = loss_mask = zero
    if "ct" in kinds:
        vols = v["volumes"]
        b3, n = vols.shape[1], heads.num_slices
        width = cls2d.shape[-1]
        emb = cls2d.reshape(2, n2, width)[:, n2 - b3 * n:].reshape(2 * b3, n, width)
        _, hol = heads.apply(hp, "slices", emb)  # both views, unmasked
        s3 = heads.scores_3d(hp, hol)
        loss_3d, (q_a, q_b) = swav_loss(s3[:b3], s3[b3:], **sk)
        cls3d, _ = model.encode_image(params, volume=vols.reshape(2 * b3, *vols.shape[2:]))
        sv = heads.scores_3d(hp, cls3d)
        loss_volume = 0.5 * (swapped_prediction(q_b, sv[:b3], jc.temperature)
                             + swapped_prediction(q_a, sv[b3:], jc.temperature))
        mask = random_mask(r_mask, 2 * b3, n, jc.mask_ratio)
        # The encoder gets no gradient from L_mask unless `mask_trains_encoder`: predicting
        # slice embeddings from their neighbours is easiest when they are all alike, and with
        # the encoder in the loss it collapsed them (docs/RESULTS.md §9).
        context = emb if jc.get("mask_trains_encoder", True) else jax.lax.stop_gradient(emb)
        tokens, _ = heads.apply(hp, "slices", context, mask)
        loss_mask = masked_prediction_loss(heads.apply(hp, "mask_head", tokens), emb, mask)
        metrics["proto_usage_3d"] = usage_entropy(s3[:b3], jc.temperature)
    else:
        metrics["proto_usage_3d"] = zero
    loss = (jc.w_2d * loss_2d + jc.w_3d * loss_3d + jc.w_volume * loss_volume
            + jc.w_mask * loss_mask)
    metrics.update(loss=loss, loss_3d=loss_3d, loss_volume=loss_volume, loss_mask=loss_mask)
    return loss, metrics


def freeze_prototypes(grads: dict, step: Array, steps: int) -> dict:
    """Zeroes the prototypes' gradients while step < steps (SwAV's freeze_prototypes_niters)."""
    if steps <= 0:
        return grads
    keep = (step >= steps).astype(jnp.float32)
    joint = {k: jax.tree.map(lambda g: g * keep.astype(g.dtype), g) if k in PROTOTYPES else g
             for k, g in grads["joint"].items()}
    return {**grads, "joint": joint}


def make_train_step(model: UniMedI, heads: JointHeads, config,
                    optimizer: optax.GradientTransformation
                    ) -> Callable[[dict, dict, Array], tuple[dict, dict]]:
    """A pure `(state, batch, rng) -> (new_state, metrics)` for `jax.jit`."""
    update.check_on_nonfinite(config)
    freeze = config.objective.joint.freeze_prototypes_steps

    def train_step(state: dict, batch: dict, rng: Array) -> tuple[dict, dict]:
        step = state["step"]
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: joint_loss(p, batch, jax.random.fold_in(rng, step), model=model,
                                 heads=heads, config=config), has_aux=True)(state["params"])
        grads = freeze_prototypes(grads, step, freeze)
        new_state, applied = update.apply_gradients(state, loss, grads, optimizer, config)
        metrics.update(applied)
        return new_state, metrics

    return train_step


def make_setup(config) -> Setup:
    """The Joint method's model, optimiser, init and train step (no text: text_params None)."""
    if config.get("method", "joint") != "joint":
        raise ValueError(f"config.method={config.method!r}; objective.joint needs 'joint'")
    model = UniMedI.from_config(config)
    heads = JointHeads.from_config(config)
    optimizer = make_optimizer(config)

    def init(rng: Array, text_params: dict | None = None) -> dict:
        del text_params
        r_model, r_heads = jax.random.split(rng)  # r_model: as UniMedI's init, same ViT
        params = {"vision": model.init_random(r_model)["vision"], "joint": heads.init(r_heads)}
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": optimizer.init(params)}

    return Setup(model, optimizer, None, init, make_train_step(model, heads, config, optimizer))
