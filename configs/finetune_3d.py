"""Full fine-tuning of the encoder for CT classification (paper §4.2 Table 3, appendix 7.1).

    python -m unimedi_jax.main --config=configs/finetune_3d.py --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR

Phantom default: the five findings, multi-label (macro AUROC). Paper datasets:
--config.data.name=cc_ccii --config.label_type=multiclass (accuracy) or
--config.data.name=luna16 --config.label_type=binary (AUROC; accuracy in the paper).
"""

import ml_collections

from configs import eval_base


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = eval_base.get_base("finetune", "ct")
    c.label_type = "multilabel"         # "multilabel" | "binary" | "multiclass"
    c.fractions = (1.0,)                # paper: fine-tuning with the full training data
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4,                        # not stated in the paper; a usual ViT fine-tuning rate
        weight_decay=0.05,              # not stated; the pretraining's (paper §4.1)
        batch_size=8,                   # paper appendix 7.1: CC-CCII batch 8
        max_epochs=4,                   # CPU (paper: 50 CC-CCII, 100 LUNA16)
        patience=2,                     # CPU (paper: 10 for the 2D tasks)
    ))
    c.data.max_examples.update(train=160, validation=48, test=96)  # CPU
    return c
