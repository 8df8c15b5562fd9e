"""2D detection: ViTDet's simple feature pyramid and an FCOS head on the frozen encoder
(paper §4.3 Table 5; docs/DESIGN.md §7.1).

    python -m unimedi_jax.main --config=configs/detection_2d.py --workdir=DIR \\
        --config.init_from=PRETRAIN_WORKDIR

Phantom default: boxes of the findings' masks on the X-ray, one class per finding
(--config.data.name=rsna for the paper's pneumonia boxes).
"""

import ml_collections

from configs import eval_base


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = eval_base.get_base("detection", "xray")
    c.head = "fcos"                     # single-stage head (docs/DESIGN.md §7.1); paper: ViTDet
    c.pyramid = ml_collections.ConfigDict(dict(
        strides=(4, 8, 16, 32),         # ViTDet simple feature pyramid
        channels=64,                    # CPU (ViTDet: 256)
    ))
    c.fcos = ml_collections.ConfigDict(dict(
        num_convs=2,                    # CPU (FCOS: 4 per tower)
        norm_groups=8,                  # GroupNorm groups (FCOS: 32 of 256 channels)
        prior_prob=0.01,                # FCOS / RetinaNet class-bias prior
        focal_alpha=0.25, focal_gamma=2.0,  # FCOS / RetinaNet focal loss
        # level of stride s regresses largest distances in (f s / 2, f s]; FCOS: f = 8 for
        # 800-px images; 4 spreads the phantom's 2-40 px boxes over the four levels
        range_factor=4.0,
        pre_nms_top_k=100,              # candidates per image before NMS
        nms_iou=0.6,                    # FCOS: 0.6
        max_detections=20,              # per image (FCOS: 100; the phantom has <= 10 boxes)
        score_threshold=0.05,           # FCOS: 0.05
    ))
    c.max_boxes = 16                    # true boxes per image, padded (the largest kept)
    c.train_encoder = False             # paper: frozen backbone, non-backbone layers fine-tuned
    c.fractions = (0.01, 0.1, 1.0)      # paper Table 5: 1%, 10%, 100%
    c.data.box_classes = ()             # label names detected, one class each; () = all
    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-3,                        # CPU (ViTDet: 1e-4 at batch 64 for 100 epochs)
        weight_decay=1e-4,              # CPU (ViTDet: 0.1)
        batch_size=16,
        max_epochs=6,                   # CPU
        patience=2,                     # CPU
        steps_per_epoch=20,             # CPU: every fraction trains up to 6 x 20 steps
    ))
    c.data.max_examples.update(validation=128, test=128)  # CPU
    c.figure_images = 4                 # test images drawn in detections.png
    c.figure_min_score = 0.3            # detections drawn
    return c
