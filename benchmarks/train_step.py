"""Times the full UniMedI train step in JAX, and optionally the same step in PyTorch.

    python -m benchmarks.train_step --preset=cpu --compare-torch [--steps=1] [--rounds=15]
        [--profile=30] [--breakdown]

The JAX step is the trainer's: `jax.jit(train_step)` with the state's shardings over the
config's mesh and the state donated. Both implementations start from the same weights
(`torch_reference.TorchStep` copies the JAX state) and take the same fixed synthetic batch.
The first PARITY_STEPS steps of each are not timed; their losses are reported
(`*_losses`), a check that both run the same computation. Then `--rounds` rounds, each
timing `--steps` steps of JAX, PyTorch eager and PyTorch `torch.compile` in turn (so a change
in machine load hits all three): per implementation the median and minimum step time, the
process CPU seconds per step, and `*_over_jax`, the median over rounds of its time divided by
the JAX time of the same round.

FLOPs per step: the analytic count (`common.step_flops`), cross-checked against the dots and
convolutions of the compiled HLO (`xla_matmul_flops`) and XLA's cost analysis (`xla_flops`,
which adds elementwise work). MFU = analytic FLOPs / median JAX step time / the peak float32
matmul rate measured in this run (best of the measurements before and after the steps).

The CLS token of the initial state is drawn from N(0, 1) instead of its near-zero init: the
teacher's attention, which picks the slices and the kept tokens, is then decided by the weights
rather than by rounding noise, so the JAX and PyTorch steps pick the same ones. Speed does not
depend on the values. The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import traceback

import jax
import numpy as np

from benchmarks import common
from unimedi_jax.models.vit import Block
from unimedi_jax.objective import step as step_lib
from unimedi_jax.train import sharding as shd

PARITY_STEPS = 3  # untimed first steps (warm-up) whose losses both implementations report
# Timed steps per round and rounds: one step per implementation per round interleaves them
# finely, so changes in machine load hit all of them alike.
DEFAULT_STEPS = {"tiny": 2, "cpu": 1, "vits16": 1, "vitb16": 1}
DEFAULT_ROUNDS = {"tiny": 1, "cpu": 15, "vits16": 4, "vitb16": 4}
SEED = 0
BREAKDOWN_REPEATS = 5
PROFILE_STEPS = 3  # traced steps of --profile


def _spread_cls_token(state: dict) -> dict:
    """Student and teacher CLS token drawn from N(0, 1) (same value in both)."""
    cls = state["params"]["vision"]["cls_token"]
    value = jax.device_get(jax.random.normal(jax.random.key(SEED), cls.shape, cls.dtype))
    for part in ("params", "teacher"):  # separate buffers: the state is donated
        state[part]["vision"]["cls_token"] = jax.device_put(value, cls.sharding)
    return state


def _median(times: list[float]) -> float | None:
    return statistics.median(times) if times else None


def _rate(samples: int, seconds: float | None) -> float | None:
    return samples / seconds if seconds else None


class JaxStep:
    """The trainer's jitted step: state shardings over the config's mesh, state donated."""

    def __init__(self, config, random_text: bool):
        self.setup = step_lib.make_setup(config, random_text)
        self.mesh = shd.make_mesh(config.mesh)
        init_rng, text = jax.random.key(config.seed), self.setup.text_params
        self.state_sharding = shd.state_shardings(
            self.mesh, jax.eval_shape(self.setup.init, init_rng, text))
        state = jax.jit(self.setup.init, out_shardings=self.state_sharding)(init_rng, text)
        self.state = _spread_cls_token(state)
        self.rng = jax.random.key(config.seed + 1)
        self.update = jax.jit(
            self.setup.train_step,
            in_shardings=(self.state_sharding, shd.batch_sharding(self.mesh),
                          shd.replicated(self.mesh)),
            out_shardings=(self.state_sharding, shd.replicated(self.mesh)), donate_argnums=(0,))

    def compile(self, batch: dict) -> float:
        """Lowers and compiles for `batch` (on the mesh); returns the seconds it took."""
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):  # the model's sharding constraints name its axes
            self.compiled = self.update.lower(self.state, batch, self.rng).compile()
        return time.perf_counter() - start

    def step(self, batch: dict) -> jax.Array:
        """One step (blocks until done); returns the loss before the update."""
        self.state, metrics = self.compiled(self.state, batch, self.rng)
        jax.block_until_ready(self.state)
        return metrics["loss"]


def _warm_up(run, label: str, result: dict) -> None:
    """The untimed first steps: their losses and total seconds go into result."""
    start = time.perf_counter()
    result[f"{label}_losses"] = [float(run()) for _ in range(PARITY_STEPS)]
    result[f"{label}_warmup_s"] = time.perf_counter() - start


def _torch_runner(make, batch, label: str, result: dict):
    """Builds a TorchStep (make()) and warms it up; returns its step callable, or None on
    failure (the error goes into result[label + "_error"])."""
    try:
        step = make()
        run = lambda: step.step(batch)
        _warm_up(run, label, result)
        return run
    except Exception as e:  # noqa: BLE001  reported, not raised: a failed compile is a result
        result[f"{label}_error"] = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
        return None


def _best(run, repeats: int) -> float:
    run()
    return min(common.time_calls(run, repeats)[0])


def block_breakdown(vit, batch: int, tokens: int, repeats: int, torch_too: bool
                    ) -> dict[str, dict]:
    """Best-of-`repeats` forward + backward seconds and GFLOP/s of one ViT block (float32,
    (batch, tokens, width)) and of its parts alone: the four dense layers, the attention core
    (softmax(q k^T) v), the exact GELU and one LayerNorm. The backward pass starts from a
    random cotangent (a constant one would let XLA simplify the weight-gradient matmuls away).
    JAX: models/vit.Block and jax.nn.dot_product_attention; with `torch_too` also timm's Block
    and PyTorch's scaled_dot_product_attention ("... (torch)")."""
    d, m, h = vit.width, vit.mlp_dim, vit.num_heads
    flops = {"block": common.vit_block_flops(tokens, d, m),
             "dense layers": 2.0 * tokens * d * (4 * d + 2 * m),
             "attention core": 4.0 * tokens * tokens * d}
    normal = lambda *shape: np.random.default_rng(len(shape)).standard_normal(shape, np.float32)
    x, hidden = normal(batch, tokens, d), normal(batch, tokens, m)
    heads = x.reshape(batch, tokens, h, d // h)
    weights = [normal(*s) / s[0] ** 0.5 for s in ((d, 3 * d), (d, d), (d, m), (m, d))]
    block = Block(h, m)

    def dense(ws, x, hid):
        return [(hid if w.shape[0] == m else x) @ w for w in ws]

    parts = {  # name: (function, differentiated arguments)
        "block": (lambda p, x: block.apply({"params": p}, x)[0],
                  (block.init(jax.random.key(0), x)["params"], x)),
        "dense layers": (dense, (weights, x, hidden)),
        "attention core": (jax.nn.dot_product_attention, (heads, heads, heads)),
        "exact GELU": (lambda y: jax.nn.gelu(y, approximate=False), (hidden,)),
        "LayerNorm": (lambda y: jax.nn.standardize(y, axis=-1), (x,)),
    }
    times = {}
    for name, (f, args) in parts.items():
        cotangent = jax.tree.map(lambda y: normal(*y.shape), jax.eval_shape(f, *args))
        def forward_backward(*a, f=f, c=cotangent):
            y, vjp = jax.vjp(f, *a)
            return y, vjp(c)  # y too: else XLA drops forward work the gradients do not need

        step = jax.jit(forward_backward)
        times[name] = _best(lambda step=step, args=args: jax.block_until_ready(step(*args)),
                            repeats)
    if torch_too:
        times.update({f"{k} (torch)": v for k, v in
                      _torch_block_times(vit, x, hidden, weights, repeats).items()})
    return {name: {"s": t, "gflops": 3 * batch * flops.get(name.removesuffix(" (torch)"), 0.0)
                   / t / 1e9} for name, t in times.items()}  # forward + backward = 3x forward


def _torch_block_times(vit, x, hidden, weights, repeats: int) -> dict[str, float]:
    """block_breakdown's block, dense layers and attention core in PyTorch (eager), from the
    same inputs; the cotangent is random as in JAX."""
    import functools

    import torch
    import torch.nn.functional as F
    from timm.models.vision_transformer import Block as TimmBlock

    d, m, h = vit.width, vit.mlp_dim, vit.num_heads
    block = TimmBlock(d, h, mlp_ratio=m / d, qkv_bias=True,
                      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))
    leaf = lambda a: torch.tensor(a, requires_grad=True)
    x_t, hid_t, ws = leaf(x), leaf(hidden), [leaf(w) for w in weights]
    q = leaf(x.reshape(*x.shape[:2], h, d // h).transpose(0, 2, 1, 3))
    parts = {
        "block": lambda: [block(x_t)],
        "dense layers": lambda: [(hid_t if w.shape[0] == m else x_t) @ w for w in ws],
        "attention core": lambda: [F.scaled_dot_product_attention(q, q, q)],
    }
    times = {}
    for name, f in parts.items():
        cotangents = [torch.randn_like(y) for y in f()]
        times[name] = _best(lambda f=f, c=cotangents: torch.autograd.backward(f(), c), repeats)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=common.PRESETS, default="cpu")
    parser.add_argument("--compare-torch", action="store_true", help="also time PyTorch")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds")
    parser.add_argument("--no-torch-compile", action="store_true",
                        help="with --compare-torch: PyTorch eager only")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time one ViT block and its parts at the CT sequence length")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also trace 3 JAX steps and print the N longest HLO instructions "
                             "and the time per part of the step (text, forward, backward, rest)")
    args = parser.parse_args(argv)
    steps = args.steps or DEFAULT_STEPS[args.preset]
    rounds = args.rounds or DEFAULT_ROUNDS[args.preset]

    result = {"preset": args.preset, "machine": common.machine(), "load_start": os.getloadavg()[0]}
    peaks = [common.matmul_peak_flops()]
    config, random_text = common.preset_config(args.preset)
    jax_step = JaxStep(config, random_text)
    model = jax_step.setup.model
    batch_np = common.synthetic_batch(config, model.text.config.vocab_size, SEED)
    samples = config.data.batch_size_xray + config.data.batch_size_ct
    batch = shd.put_batch(batch_np, jax_step.mesh)
    result.update(batch_xray=config.data.batch_size_xray, batch_ct=config.data.batch_size_ct,
                  devices=len(jax.devices()), compile_s=jax_step.compile(batch))

    flops = common.step_flops(model, config)
    compiled = jax_step.compiled
    result.update(flops_per_step=flops["total"], flops_by_part=flops,
                  xla_flops=common.xla_flops(compiled),
                  xla_matmul_flops=common.hlo_matmul_flops(compiled.as_text()),
                  **common.memory_bytes(compiled))
    print(f"FLOPs/step analytic {flops['total']:.4g}, XLA dots+convs "
          f"{result['xla_matmul_flops']:.4g}, XLA cost analysis (all ops) "
          f"{result['xla_flops']:.4g}", flush=True)

    runners = {"jax": lambda: jax_step.step(batch)}
    if args.compare_torch:
        from benchmarks import torch_reference  # here: PyTorch and timm, for this flag only
        params0 = jax.device_get(jax_step.state["params"])  # before the donated steps
    _warm_up(runners["jax"], "jax", result)
    if args.compare_torch:
        batch_t = torch_reference.to_torch(batch_np)
        variants = {"torch": False} if args.no_torch_compile else {"torch": False,
                                                                   "torch_compile": True}
        for label, compile_ in variants.items():
            run = _torch_runner(lambda c=compile_: torch_reference.TorchStep(
                model, config, params0, compile=c), batch_t, label, result)
            if run is not None:
                runners[label] = run
        del params0

    rounds_wall = {label: [] for label in runners}  # per round: that round's wall times
    cpu_times = {label: [] for label in runners}
    for _ in range(rounds):
        for label, run in runners.items():
            wall, cpu = common.time_calls(run, steps)
            rounds_wall[label].append(wall)
            cpu_times[label].extend(cpu)
    peaks.append(common.matmul_peak_flops())

    peak = max(peaks)
    for label in ("jax", "torch", "torch_compile"):
        wall = [t for r in rounds_wall.get(label, []) for t in r]
        result[f"{label}_step_s"] = _median(wall)
        result[f"{label}_step_min_s"] = min(wall) if wall else None
        result[f"{label}_step_times_s"] = wall or None
        result[f"{label}_cpu_s"] = _median(cpu_times.get(label, []))  # process CPU s per step
        result[f"{label}_samples_per_s"] = _rate(samples, _median(wall))
        if label != "jax":  # paired by round (same load): median of (time / JAX time)
            result[f"{label}_over_jax"] = _median([
                _median(r) / _median(j) for r, j in zip(rounds_wall.get(label, []),
                                                       rounds_wall["jax"])]) if wall else None
    result["torch_compile_s"] = None
    if result["torch_compile_step_s"]:  # the untimed first steps minus their run time
        result["torch_compile_s"] = (result["torch_compile_warmup_s"]
                                     - PARITY_STEPS * result["torch_compile_step_s"])
    result.update(peak_matmul_flops=peak, peak_matmul_flops_runs=peaks,
                  mfu=flops["total"] / result["jax_step_s"] / peak,
                  torch_mfu=(flops["total"] / result["torch_step_s"] / peak
                             if result.get("torch_step_s") else None),
                  steps=steps, rounds=rounds, load_end=os.getloadavg()[0])
    for label in runners:
        ratio = f", {result[f'{label}_over_jax']:.2f}x the JAX step time" if label != "jax" else ""
        print(f"{label:>14}: median {result[f'{label}_step_s']:.4f} s/step (min "
              f"{result[f'{label}_step_min_s']:.4f}), {result[f'{label}_samples_per_s']:.2f} "
              f"samples/s, {result[f'{label}_cpu_s']:.3f} CPU s/step{ratio}", flush=True)
    print(f"MFU {result['mfu']:.3f} of the measured {peak / 1e9:.1f} GFLOP/s matmul peak",
          flush=True)
    if args.profile:
        result["profile"] = common.op_profile(runners["jax"], PROFILE_STEPS, compiled.as_text(),
                                              top=args.profile)
        p = result["profile"]
        print(f"JAX step per HLO instruction ({PROFILE_STEPS} traced steps): "
              f"{p['ms_per_step']:.1f} ms summed; by part: "
              + ", ".join(f"{k} {v:.1f}" for k, v in p["parts"].items()), flush=True)
        for row in p["top"]:
            print(f"{row['ms']:8.2f} ms  {row['name']:<28} {row['type'][:36]:<36} "
                  f"{row['op_name'][-80:]}", flush=True)
    if args.breakdown:
        tokens = 1 + common.token_counts(model, config)["ct"].full
        result["breakdown"] = block_breakdown(model.vit, config.data.batch_size_ct, tokens,
                                              BREAKDOWN_REPEATS, args.compare_torch)
        print(f"one ViT block, forward + backward, {config.data.batch_size_ct} x {tokens} tokens:")
        for name, r in result["breakdown"].items():
            print(f"{name:>24}: {r['s'] * 1e3:8.1f} ms  {r['gflops']:7.1f} GFLOP/s", flush=True)
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
