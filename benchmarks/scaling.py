"""Train-step time on 1-8 simulated CPU devices, data vs FSDP sharding, and communication bytes.

    python -m benchmarks.scaling [--devices=1,2,4,8] [--modes=data,fsdp] [--preset=cpu]

Each (device count, mode) runs in its own process with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`: the trainer's jitted step (see
train_step.py) over the mesh [("data", N)] or [("fsdp", N)] at the preset's global batch.
Simulated devices share this machine's cores, so the times show the cost of partitioning and
collectives at a fixed amount of work, not a speed-up. Each worker also sums the bytes its
compiled collectives move per device (`common.hlo_collective_bytes`, ring algorithms).

The parent prints these next to the analytic estimate (`comm_bytes`) for the same preset, then
the estimate for the paper config (configs/pretrain_vitb16.py, batch 96 + 48) on 8 and 64
accelerators, with transfer times at the given link bandwidths. The last line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np

from benchmarks import common
from benchmarks.train_step import SEED, JaxStep
from unimedi_jax.models.unimedi import TEACHER_KEYS
from unimedi_jax.objective import step as step_lib
from unimedi_jax.objective.optim import trainable_mask
from unimedi_jax.train import sharding as shd

MODES = {"data": lambda n: [("data", n), ("fsdp", 1)], "fsdp": lambda n: [("data", 1), ("fsdp", n)]}
PAPER_DEVICES = (8, 64)
# One 8-GPU node's NVLink 4 (H100): 900 GB/s per GPU both directions, 450 GB/s each way.
INTRA_NODE_GBS = 450.0
# One 400 Gb/s NDR InfiniBand adapter per GPU across nodes: 50 GB/s each way.
INTER_NODE_GBS = 50.0
GPUS_PER_NODE = 8
PARAM_BYTES = 4  # float32 parameters and gradients (the compute dtype does not change them)


def _lookup_rows(path, config) -> int:
    """Rows a BERT embedding table serves per step: a token per report token (word, token
    type), or one per position."""
    batch = config.data.batch_size_xray + config.data.batch_size_ct
    table = getattr(path[-2], "key", "")
    return config.model.text.max_length * (1 if table == "position_embeddings" else batch)


def comm_bytes(params: dict, config, num_devices: int, mode: str) -> dict[str, float]:
    """Analytic per-device bytes per step over ring collectives (common.RING_FACTOR).

    data: the trainable gradients are all-reduced. fsdp: leaves that `sharding.param_spec`
    splits are all-gathered for the student (frozen text layers too) and for the teacher (its
    vision and DINO head) once per step, and their trainable gradients are reduce-scattered;
    the gradients of the leaves left whole are all-reduced. A split embedding table is not
    gathered: its lookups (rows x width) are all-reduced, and all-gathered again for the
    gradient when it trains (what XLA's partitioner does). Not counted: gathers repeated in
    the backward pass (remat) and the small batch-level reductions (CLIP embeddings, loss
    means, DINO centres: O(batch x proj_dim + K) floats).
    """
    n = num_devices
    ring = (n - 1) / n
    flags = jax.tree.leaves(trainable_mask(params, config))
    out = {"all-reduce": 0.0, "all-gather": 0.0, "reduce-scatter": 0.0}

    def add(kind: str, size: float) -> None:
        out[kind] += common.RING_FACTOR[kind] * ring * size

    for (path, leaf), trains in zip(jax.tree_util.tree_leaves_with_path(params), flags):
        shape = np.shape(leaf)
        size = PARAM_BYTES * int(np.prod(shape))
        if mode != "fsdp" or shd.param_spec(shape, n) == shd.P():
            if trains:
                add("all-reduce", size)
        elif getattr(path[-1], "key", "") == "embedding":
            lookups = PARAM_BYTES * _lookup_rows(path, config) * shape[-1]
            add("all-reduce", lookups)
            if trains:
                add("all-gather", lookups)
        else:
            add("all-gather", size * (2 if getattr(path[0], "key", "") in TEACHER_KEYS else 1))
            if trains:
                add("reduce-scatter", size)
    out["total"] = sum(out.values())
    return out


def worker(num_devices: int, mode: str, preset: str, steps: int) -> dict:
    """Runs in a process with `num_devices` simulated devices: compile and time the step."""
    if len(jax.devices()) != num_devices:
        raise RuntimeError(f"expected {num_devices} devices, jax sees {len(jax.devices())} "
                           "(XLA_FLAGS must be set before jax starts)")
    shd.compile_cpu_collectives_afresh()
    config, random_text = common.preset_config(preset)
    config.mesh = MODES[mode](num_devices)
    jax_step = JaxStep(config, random_text)
    batch_np = common.synthetic_batch(config, jax_step.setup.model.text.config.vocab_size, SEED)
    batch = shd.put_batch(batch_np, jax_step.mesh)
    compile_s = jax_step.compile(batch)
    for _ in range(2):  # warm-up
        jax_step.step(batch)
    times, _ = common.time_calls(lambda: jax_step.step(batch), steps)
    hlo = jax_step.compiled.as_text()
    collectives = common.hlo_collective_bytes(hlo, num_devices)
    predicted = comm_bytes(jax.device_get(jax_step.state["params"]), config, num_devices, mode)
    return {"devices": num_devices, "mode": mode, "compile_s": compile_s,
            "step_s": float(np.median(times)), "hlo_comm_bytes": collectives,
            "hlo_comm_total": sum(collectives.values()), "analytic_comm_bytes": predicted,
            "nested_collectives": common.hlo_nested_collectives(hlo),
            "load": os.getloadavg()[0]}


def _spawn(num_devices: int, mode: str, preset: str, steps: int) -> dict:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                   os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={num_devices}".strip())
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--worker", f"--devices={num_devices}",
           f"--modes={mode}", f"--preset={preset}", f"--steps={steps}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def paper_estimate() -> list[dict]:
    """Analytic communication of the paper config at PAPER_DEVICES accelerators."""
    config = common.paper_config()
    setup = step_lib.make_setup(config, random_text=True)
    params = jax.eval_shape(setup.init, jax.random.key(0), None)["params"]
    flops = common.step_flops(setup.model, config)["total"]
    rows = []
    for n in PAPER_DEVICES:
        gbs = INTRA_NODE_GBS if n <= GPUS_PER_NODE else INTER_NODE_GBS
        for mode in MODES:
            comm = comm_bytes(params, config, n, mode)
            rows.append({"devices": n, "mode": mode, "bytes_per_device": comm,
                         "link_GBps": gbs, "transfer_s": comm["total"] / (gbs * 1e9),
                         "flops_per_device": flops / n})
    return rows, common.param_count(params), common.param_count(
        jax.tree.map(lambda p, t: p if t else None, params, trainable_mask(params, config)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    parser.add_argument("--modes", default="data,fsdp", help="comma-separated: data, fsdp")
    parser.add_argument("--preset", choices=common.PRESETS, default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--no-paper", action="store_true", help="skip the paper-config estimate")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    devices = [int(d) for d in args.devices.split(",")]
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {sorted(MODES)}")
    if args.worker:
        result = worker(devices[0], modes[0], args.preset, args.steps)
        common.emit(result)
        return result

    runs = []
    print(f"{'devices':>7} {'mode':>5} {'step s':>8} {'compile s':>9} "
          f"{'HLO comm MB':>11} {'analytic MB':>11}", flush=True)
    for n in devices:
        for mode in modes if n > 1 else modes[:1]:
            r = _spawn(n, mode, args.preset, args.steps)
            runs.append(r)
            print(f"{n:>7} {mode:>5} {r['step_s']:>8.3f} {r['compile_s']:>9.1f} "
                  f"{r['hlo_comm_total'] / 1e6:>11.2f} "
                  f"{r['analytic_comm_bytes']['total'] / 1e6:>11.2f}", flush=True)
    result = {"preset": args.preset, "machine": common.machine(), "runs": runs}
    if not args.no_paper:
        rows, total, trained = paper_estimate()
        result.update(paper=rows, paper_params=total, paper_trainable_params=trained)
        print(f"\nPaper config ({total / 1e6:.1f}M parameters, {trained / 1e6:.1f}M trained), "
              f"batch 96 + 48, per device and step:")
        print(f"{'devices':>7} {'mode':>5} {'all-reduce':>10} {'all-gather':>10} "
              f"{'red-scat':>10} {'total GB':>9} {'link GB/s':>9} {'transfer s':>10}")
        for r in rows:
            b = r["bytes_per_device"]
            print(f"{r['devices']:>7} {r['mode']:>5} {b['all-reduce'] / 1e9:>10.3f} "
                  f"{b['all-gather'] / 1e9:>10.3f} {b['reduce-scatter'] / 1e9:>10.3f} "
                  f"{b['total'] / 1e9:>9.3f} {r['link_GBps']:>9.0f} {r['transfer_s']:>10.4f}")
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
