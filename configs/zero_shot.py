"""Zero-shot finding classification from report-style prompts, X-rays or CT volumes.

    python -m unimedi_jax.main --config=configs/zero_shot.py --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR [--config.data.modality=ct]

Prompts: a few positive and negative phrasings per finding (an ensemble), in the phantom reports'
wording (configs/prompts.py); for a real dataset give its label names and wording.
"""

import ml_collections

from configs import eval_base, prompts


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = eval_base.get_base("zero_shot", "xray")
    c.prompts = ml_collections.ConfigDict(prompts.PHANTOM)  # label -> (positives, negatives)
    c.data.max_examples.test = 400      # CPU
    return c
