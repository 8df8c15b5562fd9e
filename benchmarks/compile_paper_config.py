"""Lowers and compiles the paper config's train step on CPU: parameters, FLOPs, memory, time.

    python -m benchmarks.compile_paper_config [--batch_xray=2 --batch_ct=2] [--remat=both]
        [--scan=config] [--batch --device_memory_gb=80]

configs/pretrain_vitb16.py as it is (ViT-B/16, bfloat16 compute, 224x224 X-rays, 32x128x128 CT,
DINO head K=8192) with a random-init text encoder of BioClinicalBERT's sizes (first 6 of its 12
layers, as the config), at a small batch, once without and once with `model.vit.remat`, and
with `--scan=both` each of those with the layers of both towers unscanned and scanned
(`model.vit.scan`, `model.text.scan`; `--scan=config`: as the config). The
step is the trainer's (`jax.jit` with the state's shardings on a one-device mesh, state
donated), lowered from abstract shapes, so no parameter memory is allocated.

With `--batch`, two more compiles per remat setting (one more X-ray pair, one more CT pair)
give the memory per X-ray and per CT sample (linear fit of `memory_analysis()` peaks); the
largest batch at the config's X-ray:CT ratio whose estimate fits `--device_memory_gb` is
printed. CPU buffer sizes approximate an accelerator's: XLA fuses and schedules differently
there (and the CPU backend may keep bfloat16 intermediates in float32). The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from unimedi_jax.objective import step as step_lib
from unimedi_jax.objective.optim import trainable_mask
from unimedi_jax.train import sharding as shd

GIB = 2 ** 30


def abstract_batch(config, b2: int, b3: int) -> dict:
    """ShapeDtypeStructs of a batch with b2 X-rays and b3 CT volumes (docs/CONTRACTS.md)."""
    t = config.model.text.max_length
    s = config.data.xray.crop_size
    f32, i32 = jnp.float32, jnp.int32
    text = lambda b: dict(input_ids=jax.ShapeDtypeStruct((b, t), i32),
                          attention_mask=jax.ShapeDtypeStruct((b, t), i32))
    return {"xray": dict(image=jax.ShapeDtypeStruct((b2, s, s), f32), **text(b2)),
            "ct": dict(volume=jax.ShapeDtypeStruct((b3, *config.data.ct.crop_size), f32),
                       **text(b3))}


def compile_step(config, b2: int, b3: int) -> dict:
    """Lowers and compiles the train step for (b2, b3); parameters, FLOPs, memory, seconds."""
    config = config.copy_and_resolve_references()
    config.data.batch_size_xray, config.data.batch_size_ct = b2, b3
    setup = step_lib.make_setup(config, random_text=True)
    mesh = shd.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1])
    rng = jax.random.key(0)
    abstract = jax.eval_shape(setup.init, rng, None)
    state_sharding = shd.state_shardings(mesh, abstract)
    update = jax.jit(setup.train_step,
                     in_shardings=(state_sharding, shd.batch_sharding(mesh), shd.replicated(mesh)),
                     out_shardings=(state_sharding, shd.replicated(mesh)), donate_argnums=(0,))
    start = time.perf_counter()
    lowered = update.lower(abstract, abstract_batch(config, b2, b3), rng)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
    params = abstract["params"]
    trained = jax.tree.map(lambda p, t: p if t else None, params, trainable_mask(params, config))
    return {"batch_xray": b2, "batch_ct": b3, "remat": bool(config.model.vit.remat),
            "scan": bool(config.model.vit.scan), "text_scan": bool(config.model.text.scan),
            "params": common.param_count(params), "trainable_params": common.param_count(trained),
            "flops_per_step": common.step_flops(setup.model, config)["total"],
            "xla_flops": common.xla_flops(compiled),
            "xla_matmul_flops": common.hlo_matmul_flops(compiled.as_text()),
            "lower_s": lower_s, "compile_s": compile_s, **common.memory_bytes(compiled)}


def largest_batch(base: dict, more_xray: dict, more_ct: dict, ratio: tuple[int, int],
                  memory_bytes: float) -> dict:
    """Linear memory model peak = a + x * B2 + c * B3 from three compiles; the largest
    multiple s of `ratio` (B2, B3) = (s r2, s r3) whose peak fits `memory_bytes`."""
    per_xray = (more_xray["peak_bytes"] - base["peak_bytes"]) / (
        more_xray["batch_xray"] - base["batch_xray"])
    per_ct = (more_ct["peak_bytes"] - base["peak_bytes"]) / (more_ct["batch_ct"] - base["batch_ct"])
    fixed = base["peak_bytes"] - per_xray * base["batch_xray"] - per_ct * base["batch_ct"]
    per_unit = per_xray * ratio[0] + per_ct * ratio[1]
    s = max(0, math.floor((memory_bytes - fixed) / per_unit)) if per_unit > 0 else 0
    return {"fixed_bytes": fixed, "bytes_per_xray": per_xray, "bytes_per_ct": per_ct,
            "max_batch_xray": s * ratio[0], "max_batch_ct": s * ratio[1],
            "device_memory_bytes": memory_bytes}


def _report(r: dict) -> None:
    print(f"remat={r['remat']!s:5} scan={r['scan']!s:5}/{r['text_scan']!s:5} batch {r['batch_xray']}+{r['batch_ct']}: "
          f"{r['params'] / 1e6:.1f}M params ({r['trainable_params'] / 1e6:.1f}M trained), "
          f"FLOPs/step analytic {r['flops_per_step']:.4g} / XLA dots {r['xla_matmul_flops']:.4g}"
          f" / XLA all ops {r['xla_flops']:.4g}, peak {r['peak_bytes'] / GIB:.2f} GiB "
          f"(temp {r['temp_bytes'] / GIB:.2f}), lower {r['lower_s']:.1f} s, "
          f"compile {r['compile_s']:.1f} s", flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("paper", "tiny"), default="paper",
                        help="tiny: the smoke-test model (common.preset_config)")
    parser.add_argument("--batch_xray", type=int, default=common.PAPER_BATCH[0])
    parser.add_argument("--batch_ct", type=int, default=common.PAPER_BATCH[1])
    parser.add_argument("--remat", choices=("both", "on", "off"), default="both")
    parser.add_argument("--scan", choices=("config", "both", "on", "off"), default="config",
                        help="scan the layers of the ViT and BERT: as the config, or off/on")
    parser.add_argument("--batch", action="store_true",
                        help="estimate the largest batch that fits --device_memory_gb")
    parser.add_argument("--device_memory_gb", type=float, default=80.0,
                        help="accelerator memory in GB (10^9 bytes); 80 = H100/A100 80GB")
    args = parser.parse_args(argv)
    config = common.paper_config() if args.preset == "paper" else common.preset_config("tiny")[0]
    ratio_gcd = math.gcd(config.data.batch_size_xray, config.data.batch_size_ct)
    ratio = (config.data.batch_size_xray // ratio_gcd, config.data.batch_size_ct // ratio_gcd)
    result = {"preset": args.preset, "machine": common.machine(), "runs": [],
              "batch_estimates": []}
    settings = {"both": (False, True), "on": (True,), "off": (False,)}
    remats = settings[args.remat]
    scans = {"config": (None,), **settings}[args.scan]  # None: as the config
    for scan, remat in ((s, r) for s in scans for r in remats):
        config.model.vit.remat = remat
        if scan is not None:
            config.model.vit.scan = config.model.text.scan = scan
        base = compile_step(config, args.batch_xray, args.batch_ct)
        _report(base)
        result["runs"].append(base)
        if args.batch:
            more_xray = compile_step(config, args.batch_xray + ratio[0], args.batch_ct)
            more_ct = compile_step(config, args.batch_xray, args.batch_ct + ratio[1])
            est = dict(largest_batch(base, more_xray, more_ct, ratio,
                                     args.device_memory_gb * 1e9), remat=remat,
                       scan=bool(config.model.vit.scan))
            result["batch_estimates"].append(est)
            print(f"remat={remat!s:5} memory: {est['fixed_bytes'] / GIB:.2f} GiB fixed + "
                  f"{est['bytes_per_xray'] / 2 ** 20:.0f} MiB/X-ray + "
                  f"{est['bytes_per_ct'] / 2 ** 20:.0f} MiB/CT -> largest batch in "
                  f"{args.device_memory_gb:g} GB: {est['max_batch_xray']} X-rays + "
                  f"{est['max_batch_ct']} CT", flush=True)
    result["load_end"] = common.machine()["load_1min"]
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
