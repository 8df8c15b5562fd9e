"""Linear probe on frozen CT volume features (paper §4.2 Table 3, appendix 7.1).

    python -m unimedi_jax.main --config=configs/linear_probe_3d.py --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR

Phantom default: the five findings as a multi-label task (macro AUROC). Paper: CC-CCII, three
classes (--config.data.name=cc_ccii --config.label_type=multiclass, accuracy), batch 8.
"""

import ml_collections

from configs import eval_base, linear_probe_2d


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = linear_probe_2d.get_config(arg)
    c.data = eval_base.get_base("linear_probe", "ct").data
    c.optim.batch_size = 8              # paper appendix 7.1: CC-CCII batch 8
    c.data.max_examples.update(train=300, validation=100, test=200)  # CPU
    return c
