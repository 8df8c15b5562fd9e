"""What every downstream-task config shares (imported by configs/linear_probe_2d.py etc.).

    python -m unimedi_jax.main --config=configs/TASK.py --workdir=DIR \
        --config.init_from=PRETRAIN_WORKDIR

`init_from` empty evaluates a randomly initialised encoder of `model` (the baseline); a
pretraining workdir brings its own model config and weights. Sources as configs/pretrain.py:
"paper" = UniMedI (He et al.) appendix 7; "CPU" = sized for a run of about a minute on 2 cores.
"""

import ml_collections

from configs import pretrain


def get_base(task: str, modality: str) -> ml_collections.ConfigDict:
    pre = pretrain.get_config()
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 0
    c.init_from = ""                    # pretraining workdir; "" = random-init encoder (baseline)
    c.init_params = "params"            # "params" (the student) | "teacher" (the EMA encoder)
    c.model = pre.model                 # the random baseline's architecture = the pretraining's
    c.objective = ml_collections.ConfigDict(dict(
        clip=pre.objective.clip,        # initial temperature of the random baseline
        selection=pre.objective.selection))  # CT encoding: volume + k selected slices
    c.batch_size = 32                   # CPU: encoding batch
    crop = pre.data.xray.crop_size if modality == "xray" else pre.data.ct.crop_size
    c.data = ml_collections.ConfigDict(dict(
        name="phantom",                 # a data_prep dataset (data_prep/build.py DATASETS)
        data_dir=pre.data.data_dir,     # built here on first use (shared with pretraining)
        manual_dir="",                  # raw files of a real dataset (not the phantom)
        modality=modality,              # "xray" (image) | "ct" (volume)
        crop_size=crop,                 # as pretraining: centre crop of the stored size
        # training augmentation of the tasks that train: transforms.AugmentOptions fields, the
        # ones left out off; None = the modality's DEFAULT_AUGMENT (data/transforms.py)
        augment=None,
        labels=(),                      # label names used; () = all of the dataset's
        procedural=False,               # phantom: generate records on the fly, no build
        # build_dataset options; None = the dataset's default (phantom: data/phantom.py
        # DEFAULT_EXAMPLES, the same build as pretraining's)
        build_options=dict(num_train=None, num_validation=None, num_test=None),
        max_examples=dict(train=0, validation=0, test=0),  # first n of each split; 0 = all
        # share of train held out for early stopping when a dataset has no validation split
        # (BCV: train/test only); 0.2 = 5 of its 24 training scans
        validation_from_train=0.2,
    ))
    return c
