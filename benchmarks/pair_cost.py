"""What the DRR bridge (docs/DESIGN.md §4.7) adds to a train step: times, no assertions.

    python -m benchmarks.pair_cost [--preset=cpu] [--rounds=5] [--steps=3]
        [--variants=off,unimiss,infonce_clip]

Times the trainer's jitted step (`train_step.JaxStep`: the config's mesh, the state donated) on
one synthetic batch of the preset's shapes, with the step's report features precomputed as the
default training run has them (`step.TEXT_FEATURES`: a locked text tower runs once per report,
not in the step), for each variant: `off` (objective.pair disabled: the UniMedI step), `unimiss`
and `infonce_clip` (the InfoNCE pair loss and the DRR's CLIP matrix), plus the DRR render alone
(`pair.drr_inputs` on the CT sub-batch, jitted). Rounds time `--steps` steps of every variant in
turn, so a change in machine load hits all of them; per variant the median and minimum step
time and the median over rounds of (variant - off) / off (for the render, its share of the
off step is 1 + that). The last output line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.train_step import JaxStep
from unimedi_jax.objective import pair
from unimedi_jax.objective import step as step_lib

VARIANTS = {"off": None, "unimiss": dict(loss="unimiss", clip=False),
            "infonce_clip": dict(loss="infonce", clip=True)}
SEED = 0


def _config(preset: str, variant: dict | None):
    config, random_text = common.preset_config(preset)
    config.objective.pair.enabled = variant is not None
    config.objective.pair.update(variant or {})
    return config, random_text


def _with_text_features(batch: dict, width: int, seed: int) -> dict:
    """The batch with random report features (B, width) for each sub-batch."""
    rng = np.random.default_rng(seed)
    return {k: {**v, step_lib.TEXT_FEATURES: rng.normal(
        size=(v["input_ids"].shape[0], width)).astype(np.float32)} for k, v in batch.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=common.PRESETS, default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)} (off always runs)")
    args = parser.parse_args(argv)
    chosen = ["off", *(v for v in args.variants.split(",") if v and v != "off")]
    if not set(chosen) <= set(VARIANTS):
        parser.error(f"--variants={args.variants}: each must be one of {', '.join(VARIANTS)}")
    result = {"preset": args.preset, "machine": common.machine(),
              "load_start": os.getloadavg()[0]}

    steps, batch = {}, None
    for name in chosen:
        variant = VARIANTS[name]
        config, random_text = _config(args.preset, variant)
        config.model.text.trainable_layers = 0  # a locked tower: features come precomputed
        steps[name] = JaxStep(config, random_text)
        if batch is None:
            width = steps[name].setup.model.text.config.hidden_size
            batch_np = _with_text_features(
                common.synthetic_batch(config, steps[name].setup.model.text.config.vocab_size,
                                       SEED), width, SEED)
            batch = jax.device_put(batch_np)
            result.update(batch_xray=config.data.batch_size_xray,
                          batch_ct=config.data.batch_size_ct,
                          volume=list(config.data.ct.crop_size),
                          image_size=config.model.vit.image_size)
        result[f"{name}_compile_s"] = steps[name].compile(batch)
        for _ in range(2):  # untimed
            steps[name].step(batch)

    drr_cfg = _config(args.preset, VARIANTS["unimiss"])[0].objective.pair.drr
    render = jax.jit(lambda v: pair.drr_inputs(v, drr_cfg, result["image_size"]))
    volume = jnp.asarray(batch_np["ct"]["volume"])
    jax.block_until_ready(render(volume))

    times = {name: [] for name in [*chosen, "drr_render"]}
    for _ in range(args.rounds):
        for name, runner in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                runner.step(batch)
            times[name].append((time.perf_counter() - start) / args.steps)
        start = time.perf_counter()
        for _ in range(args.steps):
            jax.block_until_ready(render(volume))
        times["drr_render"].append((time.perf_counter() - start) / args.steps)

    for name, values in times.items():
        result[f"{name}_median_s"] = statistics.median(values)
        result[f"{name}_min_s"] = min(values)
        if name != "off":
            result[f"{name}_over_off"] = statistics.median(
                v / o - 1.0 for v, o in zip(values, times["off"]))
    result["load_end"] = os.getloadavg()[0]
    for name in times:
        extra = "" if name == "off" else (
            f", {100 * result[f'{name}_over_off']:+.1f}% vs off" if name != "drr_render" else
            f", {100 * (1 + result[f'{name}_over_off']):.1f}% of the off step")
        print(f"{name}: median {1e3 * result[f'{name}_median_s']:.1f} ms, "
              f"min {1e3 * result[f'{name}_min_s']:.1f} ms{extra}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
