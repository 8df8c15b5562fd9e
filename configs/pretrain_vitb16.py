"""UniMedI pretraining at the paper's scale: ViT-B/16, BioClinicalBERT, MIMIC-CXR + BIMCV.

    python -m unimedi_jax.main --config=configs/pretrain_vitb16.py --workdir=DIR \
        --config.data.data_dir=PREPARED_DATA --config.model.text.checkpoint=BIOCLINICALBERT_DIR

Sources: "paper" = UniMedI (He et al.) §4.1; "DESIGN" = choices fixed where the paper is silent;
"MGCA" = Wang et al. 2022, whose optimiser settings the paper reuses; "DINO"/"iBOT" = the
self-distillation recipes the paper adopts (§3.4).
"""

import ml_collections

from configs import pretrain


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = pretrain.get_config(arg)
    config.model.vit.variant = "B/16"                   # paper §4.1: ViT-B/16
    config.model.vit.update(width=0, depth=0, num_heads=0, mlp_dim=0)  # 0 = take the variant's
    config.model.vit.image_size = 224                   # paper §4.1: 2D input 224x224
    config.model.vit.volume_size = (32, 128, 128)       # paper §4.1: 3D input 32x128x128
    config.model.vit.patch_size_3d = (4, 16, 16)        # DESIGN §2: 8x8x8 token grid
    config.model.vit.dtype = "bfloat16"                 # compute dtype on accelerators
    config.model.vit.remat = True                       # fits batch 144 on 80 GB with room
    config.model.vit.scan = True                        # one block body to compile, not 12:
    config.model.text.scan = True                       #   compile time (docs/BENCHMARKS.md §3)
    config.model.text.checkpoint = ""                   # set to a local Bio_ClinicalBERT folder
    config.model.text.num_layers = 6                    # MGCA: first 6 of 12 layers
    config.model.text.trainable_layers = -1             # MGCA: freeze_bert=False, all of it trains
    config.model.text.dtype = "bfloat16"                # compute dtype on accelerators
    config.model.text.max_length = 112                  # DESIGN §3 (MGCA): 112 report tokens
    config.model.proj_dim = 256                         # MGCA: 128; A-CLIP/CLIP ViT-B: 512; DESIGN: 256
    config.objective.sd.modalities = ("xray", "ct")     # paper §3.4: both masked and distilled
    config.model.dino.update(hidden_dim=2048, bottleneck_dim=256, out_dim=8192)  # DESIGN §4.5

    config.data.xray = ml_collections.ConfigDict(dict(
        dataset="mimic_cxr", split="train", stored_size=256, crop_size=224))  # DESIGN §6
    config.data.ct = ml_collections.ConfigDict(dict(
        dataset="bimcv", split="train", stored_size=(32, 128, 128), crop_size=(32, 128, 128)))
    config.data.procedural = False
    config.data.batch_size_xray = 96                    # paper: batch 144 in all (2D:3D split
    config.data.batch_size_ct = 48                      #   ours, by dataset size ratio)
    config.data.worker_count = 8

    config.optim.lr = 2e-5                              # paper §4.1 (MGCA)
    config.optim.weight_decay = 0.05                    # paper §4.1
    config.optim.warmup_init_lr = 1e-8                  # paper §4.1
    epochs, warmup_epochs = 50, 20                      # paper §4.1
    steps_per_epoch = 2500                              # ~MIMIC-CXR frontal (~217k)/96 + BIMCV
    config.total_steps = epochs * steps_per_epoch
    config.optim.warmup_steps = warmup_epochs * steps_per_epoch
    config.log_every_steps = 50
    config.eval_every_steps = 5000
    config.checkpoint_every_steps = 2000
    return config
