"""The accelerator suite: the paper config's train step on one device, as one JSON line.

    python -m benchmarks.device_suite [--preset=paper|tiny] [--steps=10] [--pipeline_examples=64]
        [--device_memory_gb=G]

For configs/pretrain_vitb16.py as it is (bfloat16 compute, remat per the config; a random-init
text encoder of BioClinicalBERT's sizes, `common.paper_config`) on the first device:
  batch      the largest (X-ray, CT) batch at the config's ratio whose compiled peak fits 90% of
             the device's memory (`compile_paper_config.largest_batch`: a linear memory model
             from two compiles), halved until a step runs;
  step       compile seconds, median step seconds, samples/s, the analytic FLOPs per step and
             MFU against the device's published dense bfloat16 peak (`PEAK_BF16`; null where
             the device is not in the table, e.g. a CPU);
  memory     peak bytes in use (`memory_stats`), else the compiled program's estimate;
  attention  step seconds with `model.vit.attn_implementation` "xla" and "cudnn" (the fused
             kernel; the error where the backend has none);
  pipeline   the Grain training pipeline's records/s per modality at the paper's sizes in one
             process, i.e. per CPU core (`input_pipeline.bench_size`, no worker processes).
On one current GPU it finishes in a few minutes. `--preset=tiny` runs the same on the test-size
model and tiny phantom records (how the suite is tested on CPU). The last line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time

import jax

from benchmarks import common, compile_paper_config, input_pipeline
from benchmarks.train_step import JaxStep
from unimedi_jax.models import bert
from unimedi_jax.train import sharding as shd

# Dense (no sparsity) bfloat16 matmul peaks in FLOP/s from the vendors' datasheets, matched
# against `device_kind` in order (the first substring that occurs wins).
PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("TPU v6 lite", 918e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)
MEMORY_FRACTION = 0.9  # of the device's bytes_limit the batch estimate may fill
ATTENTION = ("xla", "cudnn")
PRESETS = ("paper", "tiny")  # also input_pipeline.SIZES names


def peak_bf16(device_kind: str) -> float | None:
    """The published dense bfloat16 peak of a device kind, or None when unknown."""
    return next((peak for name, peak in PEAK_BF16 if name in device_kind), None)


def _config(preset: str):
    config = (common.paper_config() if preset == "paper"
              else common.preset_config("tiny")[0])
    config.mesh = [("data", 1)]
    return config


def _ratio(config) -> tuple[int, int]:
    g = math.gcd(config.data.batch_size_xray, config.data.batch_size_ct)
    return config.data.batch_size_xray // g, config.data.batch_size_ct // g


def choose_batch(config, device, memory_bytes: float | None = None) -> dict:
    """The largest batch at the config's ratio whose estimated peak fits the device's memory
    (`memory_bytes` instead when given; the config's own batch when neither is known, as on a
    CPU)."""
    limit = memory_bytes or (device.memory_stats() or {}).get("bytes_limit")
    b2, b3 = config.data.batch_size_xray, config.data.batch_size_ct
    if not limit:
        return {"batch_xray": b2, "batch_ct": b3, "device_memory_bytes": None}
    r2, r3 = _ratio(config)
    base = compile_paper_config.compile_step(config, r2, r3)
    more_xray = compile_paper_config.compile_step(config, 2 * r2, r3)
    more_ct = compile_paper_config.compile_step(config, r2, 2 * r3)
    est = compile_paper_config.largest_batch(base, more_xray, more_ct, (r2, r3),
                                             MEMORY_FRACTION * limit)
    return {"batch_xray": max(est["max_batch_xray"], r2), "batch_ct": max(est["max_batch_ct"], r3),
            "device_memory_bytes": limit, "estimate": est}


def time_step(config, b2: int, b3: int, steps: int) -> dict:
    """Compile and median step seconds of the trainer's step at batch (b2, b3)."""
    config = config.copy_and_resolve_references()
    config.data.batch_size_xray, config.data.batch_size_ct = b2, b3
    step = JaxStep(config, random_text=True)
    batch = shd.put_batch(common.synthetic_batch(
        config, step.setup.model.text.config.vocab_size), step.mesh)
    out = {"compile_s": step.compile(batch)}
    step.step(batch)  # the first run (allocations)
    wall, _ = common.time_calls(lambda: step.step(batch), steps)
    out["step_s"] = statistics.median(wall)
    out["samples_per_s"] = (b2 + b3) / out["step_s"]
    stats = jax.devices()[0].memory_stats() or {}
    out["peak_bytes"] = stats.get("peak_bytes_in_use") or common.memory_bytes(
        step.compiled)["peak_bytes"]
    out["flops_per_step"] = common.step_flops(step.setup.model, config)["total"]
    return out


def _is_out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="paper")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--device_memory_gb", type=float, default=None,
                        help="memory to fit the batch into (GB, 10^9 bytes); default: the "
                             "device's own limit")
    parser.add_argument("--pipeline_examples", type=int, default=64,
                        help="stored records per modality for the pipeline's records/s")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = jax.devices()[0]
    config = _config(args.preset)
    peak = peak_bf16(device.device_kind)
    result = {"preset": args.preset, "backend": jax.default_backend(),
              "device": device.device_kind, "peak_bf16_flops": peak,
              "machine": common.machine(), "dtype": config.model.vit.dtype,
              "remat": bool(config.model.vit.remat)}
    result.update(choose_batch(config, device, args.device_memory_gb and
                               args.device_memory_gb * 1e9))
    b2, b3 = result["batch_xray"], result["batch_ct"]
    while True:
        try:
            result.update(time_step(config, b2, b3, args.steps))
            break
        except Exception as e:  # an estimate too large for the device: halve the batch
            r2, r3 = _ratio(config)
            if not _is_out_of_memory(e) or (b2 <= r2 and b3 <= r3):
                raise
            b2, b3 = max(r2, b2 // 2), max(r3, b3 // 2)
            print(f"out of memory: retrying at batch {b2}+{b3}", flush=True)
    result.update(batch_xray=b2, batch_ct=b3)
    result["mfu"] = (result["flops_per_step"] / result["step_s"] / peak) if peak else None
    print(f"{device.device_kind}: batch {b2}+{b3}, step {result['step_s']:.4f} s, "
          f"{result['samples_per_s']:.1f} samples/s, MFU {result['mfu']}, "
          f"peak {result['peak_bytes'] / 2 ** 30:.2f} GiB, compile {result['compile_s']:.1f} s",
          flush=True)

    result["attention"] = {}
    for impl in ATTENTION:
        variant = config.copy_and_resolve_references()
        variant.model.vit.attn_implementation = impl
        try:
            got = time_step(variant, b2, b3, args.steps)
            result["attention"][impl] = {"step_s": got["step_s"], "compile_s": got["compile_s"]}
        except Exception as e:  # e.g. no cuDNN attention on this backend
            result["attention"][impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"attention {impl}: {result['attention'][impl]}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        rates = input_pipeline.bench_size(
            args.preset, tmp, bert.default_checkpoint(),
            num_examples=args.pipeline_examples, workers=(0,),
            max_length=config.model.text.max_length)
    result["pipeline_records_per_s_per_core"] = {m: r["pipeline_w0"] for m, r in rates.items()}
    result["wall_s"] = time.perf_counter() - start
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
