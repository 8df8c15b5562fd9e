"""UniMedI pretraining, 4x the default's steps: the run the learning ladder measures arms with.

    python -m unimedi_jax.main --config=configs/pretrain_long.py --workdir=/tmp/unimedi_long

Paper Table 7 (VL, VL+SD, VL+SD+Attn; two seeds; label fractions 1/10/100%), six runs of
under an hour each:

    python -m benchmarks.learning --config=configs/pretrain_long.py \
        --arms=vl,vl_sd,vl_sd_attn --seeds=0,1 --fractions=0.01,0.1,1.0 --workdir=DIR

configs/pretrain.py with every step count scaled by SCALE; everything else (model, objective,
optimiser, data) is the default's. "CPU" = sized to finish in under 60 minutes on 2 cores: the
default's step takes 0.65 s there with the report cache (docs/RESULTS.md §4), so 2400 steps
take ~26 min, plus ~1 min for each of the 5 evaluations. `configs/pretrain_long.py:test` is
configs/pretrain.py:test unchanged (the seconds-long size).
"""

import ml_collections

from configs import pretrain

SCALE = 4  # CPU: the longest multiple of the default's 600 steps that fits 60 min on 2 cores


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """arg: "" for the long run, "test" for the seconds-long size the test suite runs."""
    c = pretrain.get_config(arg)
    if arg == "test":
        return c
    c.total_steps = 600 * SCALE                # 2400: configs/pretrain.py's 600 x SCALE
    c.eval_every_steps = 300 * SCALE // 2      # 600: the default's 300 x SCALE / 2, 4 points on
                                               #   the learning curves besides step 0 (2 at
                                               #   the full 1200)
    c.checkpoint_every_steps = 150 * SCALE     # 600: the default's 150 x SCALE (every 25%)
    c.optim.warmup_steps = 60 * SCALE          # 240: the default's 60 x SCALE (10% of the run)
    c.objective.sd.teacher_temp_warmup_steps = 100 * SCALE  # 400: the default's 100 x SCALE
    return c
