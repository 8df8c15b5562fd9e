"""DrasCLR pretraining (docs/DESIGN.md §4.9) on the default backbone, data and optimiser.

    python -m unimedi_jax.main --config=configs/pretrain_drasclr.py --workdir=/tmp/drasclr

The base is configs/pretrain.py (same arg: "" or "test"). "DrasCLR" = the authors' code (the
defaults of its training script and run command, its encoder and data code); "chosen" = this
framework's choice (docs/DESIGN.md §4.9).
DrasCLR trains on the CT sub-batch only; the X-ray sub-batch still loads (the 2D evaluations
read its split) and the step ignores it.
"""

import ml_collections

from configs import pretrain


def method_config(arg: str = "") -> ml_collections.ConfigDict:
    """The `objective.drasclr` section alone (arg "" or "test")."""
    if arg not in ("", "test"):
        raise ValueError(f"configs/pretrain_drasclr.py takes '' or 'test', not {arg!r}")
    d = ml_collections.ConfigDict(dict(
        region=(2, 2, 2),               # chosen: tokens (d, h, w) per anatomical patch, 8 of the
                                        #   8x4x4 grid (DrasCLR: 32^3-voxel patches of a lung CT)
        num_patches=4,                  # chosen: regions per volume per step (DrasCLR: one
                                        #   location per batch, 581 over an epoch)
        num_neighbours=2,               # DrasCLR: --k-neighbors 2
        neighbour_shift=1,              # chosen: tokens between a region and its neighbour (half
                                        #   a region; DrasCLR: 26-voxel step of 32-voxel patches)
        roi="lung",                     # DrasCLR: patches and locations over the lung ROI
        threshold_hu=-500.0,            # chosen: body above, air and aerated lung below
        min_roi_fraction=0.1,           # DrasCLR: a patch is kept when > 10% is in the ROI
                                        #   (raised while an atlas gives over 1000 patches)
        num_experts=8,                  # DrasCLR: --num-experts 8 (CondConv)
        hidden_dim=0,                   # DrasCLR: MLP head hidden = the encoder's feature size
                                        #   (0 = the ViT width)
        dim=128,                        # DrasCLR: --moco-dim 128
        temperature=0.2,                # DrasCLR: --moco-t 0.2
        w_local=1.0,                    # DrasCLR: loss_pch weight 1
        w_neighbour=1.0,                # DrasCLR: --beta 1.0
        ema_start=0.99,                 # chosen: a teacher that follows within ~100 steps of a
        ema_end=1.0,                    #   600-step run (DrasCLR: 0.999 constant, MoCo); cosine
                                        #   to 1 (schedules.ema_momentum)
    ))
    if arg == "test":
        d.update(num_experts=4,         # chosen: tiny test sizes
                 hidden_dim=16, dim=16)
    return d


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """configs/pretrain.py:get_config(arg) with method "drasclr"."""
    c = pretrain.get_config(arg)
    c.method = "drasclr"
    c.objective.drasclr = method_config(arg)
    c.objective.views = ml_collections.ConfigDict(dict(
        crop_scale=(1.0, 1.0),          # DESIGN §4.9: no spatial transform, so a region is the
        flip=0.0,                       #   same anatomy in both views
        intensity=(0.1, 0.1),           # chosen: scale 1 +- 0.1, shift +- 0.1 (in place of
                                        #   DrasCLR's random contrast, p 0.25)
        noise_std=0.05,                 # DrasCLR: gaussian noise std 50 HU = 0.05 normalised
    ))
    # Optimiser: the base AdamW (DrasCLR's SGD lr 0.01, momentum 0.9, wd 1e-4 trains its CNN;
    # every method on this ViT shares one optimiser).
    return c
