"""3D segmentation: UNETR decoder, whole model trained (paper §4.3 Table 6, appendix 7.2).

    python -m unimedi_jax.main --config=configs/seg_3d.py --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR

Phantom default: the five findings as classes 1..5 (--config.data.name=bcv for the paper's
abdominal organs).
"""

import ml_collections

from configs import eval_base, seg_2d


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = seg_2d.get_config(arg)
    c.data = eval_base.get_base("segmentation", "ct").data
    c.decoder = "unetr"                 # paper appendix 7.2: UNETR
    c.unetr.feature_size = 4            # CPU: a 3D conv step costs seconds here (UNETR: 16)
    c.loss = "dice_ce"                  # paper appendix 7.2: Dice + CE
    c.train_encoder = True              # paper appendix 7.2: "We train the entire model"
    c.data.seg_classes = ()             # label names segmented; () = all
    c.data.seg_binary = False           # one class per finding (BCV: per organ)
    c.optim.update(
        lr=1e-4,                        # paper appendix 7.2
        weight_decay=1e-5,              # UNETR's BTCV recipe (AdamW, MONAI tutorial)
        batch_size=2,                   # paper appendix 7.2
        max_epochs=2,                   # CPU (paper: 25,000 iterations)
        steps_per_epoch=0,              # one pass over the training volumes
        patience=10)                    # as the 2D task
    c.fractions = (1.0,)                # CPU (paper: 1%, 10%, 100%)
    c.batch_size = 2                    # CPU: evaluation batch of volumes
    c.data.max_examples.update(train=8, validation=4, test=8)  # CPU
    return c
