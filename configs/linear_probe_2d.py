"""Linear probe on frozen X-ray features (paper §4.2 Table 1, appendix 7.1).

    python -m unimedi_jax.main --config=configs/linear_probe_2d.py --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR

Phantom default: the five findings as a multi-label task (macro AUROC), as CheXpert's.
For a real dataset: --config.data.name=chexpert (multilabel), rsna (binary), covidx
(multiclass, with --config.label_type=multiclass and --config.optim.lr=5e-3, paper).
"""

import ml_collections

from configs import eval_base


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = eval_base.get_base("linear_probe", "xray")
    # "multilabel" (macro AUROC) | "binary" (AUROC) | "multiclass" (accuracy); paper Tables 1, 3
    c.label_type = "multilabel"
    c.fractions = (0.01, 0.1, 1.0)      # paper: 1%, 10%, 100% of the training labels
    c.optim = ml_collections.ConfigDict(dict(
        lr=5e-4,                        # paper appendix 7.1 (COVIDx: 5e-3)
        weight_decay=1e-6,              # paper appendix 7.1
        batch_size=48,                  # paper appendix 7.1
        max_epochs=50,                  # paper appendix 7.1
        patience=10,                    # paper: stop after 10 epochs without a lower val. loss
    ))
    c.data.max_examples.update(train=600, validation=200, test=400)  # CPU
    return c
