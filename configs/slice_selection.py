"""Slice-selection precision@k against the phantom's finding slices, with the random and the
fixed-position (prior) baselines (DESIGN §7, §9.1).

    python -m unimedi_jax.main --config=configs/slice_selection.py --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR [--config.init_params=teacher]
"""

import ml_collections

from configs import eval_base


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = eval_base.get_base("slice_selection", "ct")
    c.ks = (1, 2, 4)                    # DESIGN §4.2: k = 4 in pretraining; §6.4 reports P@2
    c.data.max_examples.update(train=200, test=200)  # CPU: prior from 200 training volumes
    return c
