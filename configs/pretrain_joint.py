"""Joint 2D/3D intra-inter contrastive clustering on the UniMedI backbone (docs/DESIGN.md §4.8).

    python -m unimedi_jax.main --config=configs/pretrain_joint.py --workdir=/tmp/joint

The base is configs/pretrain.py (model, data, optimiser, sizes) with `method = "joint"`. Sources:
"SwAV" = Caron et al. 2020 and its code (main_swav.py); "Deformable DETR" = Zhu et al. 2021;
"chosen" = this project's choice where the Joint paper's abstract is silent (DESIGN §4.8).
"""

import ml_collections

from configs import pretrain


def method_config(arg: str = "") -> ml_collections.ConfigDict:
    """The `objective.joint` section ("" default size, "test" the tests' size)."""
    if arg not in ("", "test"):
        raise ValueError(f"configs/pretrain_joint.py takes '' or 'test', not {arg!r}")
    j = ml_collections.ConfigDict(dict(
        num_slices=8,                   # chosen: every 4th of 32 slices, one per 3D patch depth
        proj_hidden=256,                # chosen: 2 x width (SwAV: 2048 hidden on 2048 features)
        proj_dim=128,                   # SwAV: output_dim 128
        head_norm="batch",              # SwAV: BatchNorm in the projection MLP (batch statistics;
                                        #   "layer": LayerNorm, which collapsed: RESULTS §9)
        num_prototypes_2d=128,          # chosen: about the 2D batch per view (32 X-rays + 16 x 8
                                        #   slices); SwAV: 3000 with a queue, none here
        num_prototypes_3d=16,           # chosen: the 16 volumes per view
        temperature=0.1,                # SwAV
        epsilon=0.05,                   # SwAV: Sinkhorn epsilon
        sinkhorn_iterations=3,          # SwAV
        freeze_prototypes_steps=6,      # chosen: 1% of the run (SwAV: freeze_prototypes_niters,
                                        #   the first epoch)
        attn_depth=2,                   # chosen: two deformable layers over the slices
        attn_heads=4,                   # chosen: width 128 / 4 = 32 per head, as the ViT
        attn_points=4,                  # Deformable DETR: n_points 4
        attn_mlp_dim=512,               # chosen: 4 x width, as the ViT
        mask_ratio=0.25,                # chosen: 2 of 8 slices (BERT masks 15% of tokens)
        mask_trains_encoder=False,      # chosen: L_mask trains the slice transformer and its
                                        #   head only (with the encoder in it the slice
                                        #   embeddings collapsed: RESULTS §9)
        w_2d=1.0, w_3d=1.0, w_volume=1.0, w_mask=1.0,  # chosen: equal weights
    ))
    if arg == "test":
        j.update(num_slices=4,          # 4 of the 8 test slices
                 proj_hidden=32, proj_dim=16, num_prototypes_2d=16, num_prototypes_3d=8,
                 freeze_prototypes_steps=2,  # the tests run through the freeze
                 attn_heads=2, attn_mlp_dim=64)  # width 32
    return j


def views_config() -> ml_collections.ConfigDict:
    """`objective.views` (ops/views.py)."""
    return ml_collections.ConfigDict(dict(
        crop_scale=(0.5, 1.0),          # chosen: 64-pixel phantoms (SwAV: (0.14, 1) on ImageNet)
        crop_depth=False,               # chosen: slice d of both views at the same depth, the
                                        #   2D positive pair
        flip=0.5,                       # SwAV: horizontal flip 0.5
        intensity=(0.2, 0.2),           # chosen: x * U(0.8, 1.2) + U(-0.2, 0.2), grey-level
                                        #   stand-in for SwAV's colour jitter
        noise_std=0.05,                 # chosen: small against unit-scale normalised inputs
    ))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """arg: "" for the default, "test" for the seconds-long size the test suite runs."""
    c = pretrain.get_config(arg)
    c.method = "joint"
    c.objective.joint = method_config(arg)
    c.objective.views = views_config()
    # Optimiser: configs/pretrain.py's AdamW unchanged (SwAV's LARS at batch 4096 does not
    # transfer to 2-core runs).
    return c
