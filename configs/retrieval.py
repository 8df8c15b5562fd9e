"""Image-report retrieval in the CLIP space: R@1/5/10 both ways, exact pair and findings level.

    python -m unimedi_jax.main --config=configs/retrieval.py --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR [--config.data.modality=ct]

The random-init baseline (init_from empty) pairs a random vision encoder with the text
checkpoint and random projections: its scores are chance.
"""

import ml_collections

from configs import eval_base


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = eval_base.get_base("retrieval", "xray")
    c.ks = (1, 5, 10)                   # paper / MGCA: R@1, R@5, R@10
    c.data.max_examples.test = 400      # CPU: candidates per query (the phantom's test split)
    return c
