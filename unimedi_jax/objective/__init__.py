"""The UniMedI pretraining objective (paper §3, DESIGN §4).

selection: slice scores (Eq. 2) and top-k slice choice; masking: attentive token masks;
losses: CLIP, DINO and iBOT patch losses and the centres; ema: the teacher update;
schedules: temperatures, EMA momentum and learning rate; optim: the optimiser;
step: one pretraining step and the jittable train step.
"""
