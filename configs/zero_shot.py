"""Zero-shot finding classification from report-style prompts, X-rays or CT volumes.

    python -m unimedi_jax.main --config=configs/zero_shot.py --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR [--config.data.modality=ct]

Prompts: one positive and one negative sentence per finding, in the phantom reports' wording
(unimedi_jax/data/phantom.py templates); for a real dataset give its label names and wording.
"""

import ml_collections

from configs import eval_base


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = eval_base.get_base("zero_shot", "xray")
    c.prompts = ml_collections.ConfigDict(dict(  # label name -> (positive, negative)
        nodule=("There is a pulmonary nodule.", "No pulmonary nodules."),
        consolidation=("There is consolidation.", "There is no consolidation."),
        ground_glass=("There are ground-glass opacities.", "There are no ground-glass opacities."),
        effusion=("There is a pleural effusion.", "There is no pleural effusion."),
        cardiomegaly=("The heart is enlarged.", "Heart size is normal."),
    ))
    c.data.max_examples.test = 400      # CPU
    return c
