"""The pretraining objectives: UniMedI (paper §3, DESIGN §4) and the other methods on its ViT.

selection: slice scores (Eq. 2) and top-k slice choice; masking: attentive token masks;
losses: CLIP, DINO and iBOT patch losses and the centres; ema: the teacher update;
schedules: temperatures, EMA momentum and learning rate; optim: the optimiser;
update: one step's gradients applied to a train state; pair: the DRR bridge (DESIGN §4.7);
step: one UniMedI step and the jittable train step; joint: Joint's intra-inter contrastive
clustering (DESIGN §4.8); drasclr: DrasCLR's anatomy-conditioned contrast (DESIGN §4.9);
methods: the method a config names (`config.method`).
"""
