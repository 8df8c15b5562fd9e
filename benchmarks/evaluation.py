"""Wall time of the evaluation during pretraining, as the trainer runs it.

    python -m benchmarks.evaluation [--data_dir=DIR] [--repeats=3] [--placement=mesh|host]

`eval.pretrain_eval.evaluate` on configs/pretrain.py (the default run: 200 validation volumes
and X-rays, the slab prior from the training volumes), called `--repeats` times with different
weights, as at step 0, mid-run and at the end: the first call compiles the encoders, the later
ones reuse them. `--placement=mesh` passes the params on the training mesh (`config.mesh`) as
the trainer does; `host` passes them as numpy arrays without a mesh. The data are prepared in
`--data_dir` on first use (as the default run prepares them). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from configs import pretrain
from unimedi_jax.data import pipeline
from unimedi_jax.eval import pretrain_eval
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.train import sharding as shd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=None, help="prepared data (default: the config's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--placement", choices=("mesh", "host"), default="mesh")
    args = parser.parse_args()

    config = pretrain.get_config()
    if args.data_dir:
        config.data.data_dir = args.data_dir
    model = UniMedI.from_config(config)
    data = pipeline.make_pretrain_data(config, model.text_checkpoint)
    load_start = os.getloadavg()[0]
    tick = time.time()
    sources = (data.val_ct, data.val_xray, data.train_ct)
    open_s = time.time() - tick
    mesh = shd.make_mesh(config.mesh)
    init = jax.jit(model.init)
    seconds, results = [], []
    for i in range(args.repeats):
        params = init(jax.random.key(i))  # other weights each time, as training changes them
        if args.placement == "mesh":
            params = jax.device_put(params, shd.replicated(mesh))
            kwargs = {"mesh": mesh}
        else:
            params, kwargs = jax.device_get(params), {}
        tick = time.time()
        results.append(pretrain_eval.evaluate(params, config, *sources, **kwargs))
        seconds.append(time.time() - tick)
        print(f"evaluation {i}: {seconds[-1]:.1f} s", flush=True)
    print(json.dumps({
        "placement": args.placement, "devices": jax.device_count(),
        "eval_s": [round(s, 2) for s in seconds], "open_sources_s": round(open_s, 2),
        "examples": int(config.eval.max_examples), "batch_size": int(config.eval.batch_size),
        "zero_shot_mean_auroc": [float(np.round(r["zero_shot_mean_auroc"], 4))
                                 for r in results],
        "load_start": load_start, "load_end": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
