"""Shared benchmark helpers: presets, synthetic batches, timing, the matmul peak, FLOP counts
(analytic and from the compiled HLO), memory and collective bytes.

A preset is a pretraining config sized for a benchmark:

    tiny     test-size model (the smoke test); random-init text encoder
    cpu      configs/pretrain.py unchanged (the embedded default; bundled MiniLM text encoder)
    vits16   the paper config (configs/pretrain_vitb16.py) with a ViT-S/16 backbone
    vitb16   the paper config

The paper presets run in float32 without remat (CPU has no fast bf16 path, and remat is a
memory knob the small batches here do not need) and use a random-init text encoder with
BioClinicalBERT's sizes (that checkpoint is not available offline); only its config.json is
written, to a temporary folder, because the model reads the text architecture from there.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from configs import pretrain, pretrain_vitb16
from unimedi_jax.models import bert
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.objective import masking
from unimedi_jax.objective import step as step_lib

# emilyalsentzer/Bio_ClinicalBERT config.json (DESIGN §3): cased BERT-base vocabulary.
BIOCLINICALBERT = bert.BertConfig(vocab_size=28996, hidden_size=768, num_hidden_layers=12,
                                  num_attention_heads=12, intermediate_size=3072,
                                  max_position_embeddings=512)
# The smoke-test text encoder (sizes of tests/test_step.py's tiny BERT).
TINY_BERT = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=32,
                            max_position_embeddings=16)
PRESETS = ("tiny", "cpu", "vits16", "vitb16")
PAPER_BATCH = (2, 2)  # (X-rays, CT volumes) per step for the paper presets on CPU
# Matmul size for the peak rate: large enough that a float32 matmul is compute bound on CPU
# (2 * 2048^3 = 17 GFLOP, ~0.1-0.2 s on 2 cores).
PEAK_MATMUL_SIZE = 2048
PEAK_MATMUL_REPEATS = 10
DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}


# ---------------------------------------------------------------- presets and setup

def write_text_config(text: bert.BertConfig) -> str:
    """A temporary folder holding only `text`'s config.json (removed at exit)."""
    folder = tempfile.mkdtemp(prefix="unimedi_bench_text_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with open(os.path.join(folder, bert.CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(text.to_hf_dict(), f)
    return folder


def paper_config(variant: str = "B/16"):
    """configs/pretrain_vitb16.py with the ViT `variant` and a random-init text encoder of
    BioClinicalBERT's sizes (the config takes its first model.text.num_layers layers)."""
    config = pretrain_vitb16.get_config()
    config.model.vit.variant = variant
    config.model.text.checkpoint = write_text_config(BIOCLINICALBERT)
    return config


def preset_config(name: str):
    """(config, random_text) of a preset: random_text = initialise the text encoder randomly
    (`objective.step.make_setup`), its config.json at config.model.text.checkpoint."""
    if name == "tiny":
        config = pretrain.get_config()
        config.model.vit.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
                                patch_size_3d=(2, 8, 8), image_size=16, volume_size=(8, 16, 16))
        config.data.xray.update(stored_size=16, crop_size=16)
        config.data.ct.update(stored_size=(8, 16, 16), crop_size=(8, 16, 16))
        config.model.text.update(checkpoint=write_text_config(TINY_BERT), max_length=8,
                                 num_layers=0, trainable_layers=1)  # both layers, one trained
        config.model.proj_dim = 16
        config.model.dino.update(hidden_dim=32, bottleneck_dim=16, out_dim=64)
        config.objective.selection.k = 2
        config.data.batch_size_xray, config.data.batch_size_ct = 4, 2
        # Full-size updates from the first step: the losses of the next steps then depend on
        # the optimiser, EMA and centre updates (the PyTorch reference is checked on them).
        config.optim.warmup_steps = 0
        return config, True
    if name == "cpu":
        return pretrain.get_config(), False
    if name in ("vits16", "vitb16"):
        config = paper_config("S/16" if name == "vits16" else "B/16")
        config.model.vit.update(dtype="float32", remat=False)
        config.model.text.dtype = "float32"
        config.data.batch_size_xray, config.data.batch_size_ct = PAPER_BATCH
        return config, True
    raise ValueError(f"--preset={name!r}; expected one of {PRESETS}")


def synthetic_batch(config, vocab_size: int, seed: int = 0) -> dict:
    """A random batch with the shapes of the config's pipelines (docs/CONTRACTS.md): normal
    pixels, random token ids, reports of random length between half and all of max_length."""
    rng = np.random.default_rng(seed)
    t = config.model.text.max_length

    def text(b: int) -> dict:
        lengths = rng.integers(t // 2, t + 1, size=b)
        return dict(input_ids=rng.integers(1, vocab_size, (b, t)).astype(np.int32),
                    attention_mask=(np.arange(t) < lengths[:, None]).astype(np.int32))

    s = config.data.xray.crop_size
    b2, b3 = config.data.batch_size_xray, config.data.batch_size_ct
    return {"xray": dict(image=rng.standard_normal((b2, s, s), np.float32), **text(b2)),
            "ct": dict(volume=rng.standard_normal((b3, *config.data.ct.crop_size), np.float32),
                       **text(b3))}


# ---------------------------------------------------------------- timing and the machine

def time_calls(fn: Callable[[], Any], count: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds (all threads) of each of `count` calls of fn (fn
    must block until its work is done). CPU / wall near the core count means the cores were
    ours; far below it, other processes had them."""
    wall, cpu = [], []
    for _ in range(count):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def matmul_peak_flops(size: int = PEAK_MATMUL_SIZE, repeats: int = PEAK_MATMUL_REPEATS) -> float:
    """FLOP/s of the fastest of `repeats` jitted float32 (size x size) matmuls on this device."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = min(time_calls(lambda: matmul(a, b).block_until_ready(), repeats)[0])
    return 2 * size ** 3 / best


def machine() -> dict:
    """CPU model, cores, memory (GiB), the 1-minute load average and library versions."""
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        pass
    mem_kb = 0
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo", encoding="utf-8") as f:
            mem_kb = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1))
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2 ** 20, 1),
            "load_1min": round(os.getloadavg()[0], 2), "jax": jax.__version__,
            "device": jax.devices()[0].device_kind}


def emit(result: dict) -> None:
    """Prints the result as the last output line, one JSON object."""
    print(json.dumps(result, sort_keys=True), flush=True)


# ---------------------------------------------------------------- compiled-step analysis

def xla_flops(compiled) -> float:
    """`compiled.cost_analysis()["flops"]` (every op: matmuls, elementwise, reductions)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0]
    return float(cost["flops"])


def memory_bytes(compiled) -> dict:
    """`compiled.memory_analysis()` sizes; peak = arguments + outputs + temporaries - aliased
    (donated arguments reused as outputs are counted once)."""
    m = compiled.memory_analysis()
    out = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
           "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes}
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                         - out["alias_bytes"])
    return out


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")


def _split_type(rest: str) -> tuple[str, str]:
    """'TYPE opcode(...)...' -> (TYPE, 'opcode(...)...'); TYPE may be a parenthesised tuple."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].strip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _shapes(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in
            _ARRAY.findall(type_str)]


def hlo_instructions(hlo_text: str) -> list[tuple[str, str, str, list[str], str]]:
    """(name, result type, opcode, operand names, attributes) of every HLO instruction."""
    out = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        type_str, op = _split_type(match.group(2))
        opcode, _, args = op.partition("(")
        operands, _, attrs = args.partition(")")
        out.append((match.group(1), type_str, opcode.strip(), re.findall(r"%([\w.\-]+)", operands),
                    attrs))
    return out


# Parts of the train step named by the HLO op_name metadata (first match wins): the text
# tower, the backward pass (transposed JVPs), the differentiated forward pass, the rest (the
# teacher's passes, the losses' targets, the optimiser).
PROFILE_PARTS = (("text", "BertModel"), ("backward", "transpose("), ("forward", "jvp("),
                 ("no gradient", ""))


def op_profile(run: Callable[[], Any], steps: int, hlo_text: str, top: int = 30) -> dict:
    """Where the time of `steps` calls of `run` goes, per HLO instruction of `hlo_text` (the
    compiled program `run` executes), from a `jax.profiler` trace.

    Returns {"ms_per_step": the instructions' summed durations, "parts": {part: ms} by
    PROFILE_PARTS, "top": [{"name", "ms", "type", "op_name"}] the `top` longest}. Each
    duration is the instruction's own wall time; XLA:CPU runs independent instructions side by
    side, so the sum can exceed the step time. Trace events not named after an instruction
    (the executor, thread-pool waits) are left out.
    """
    info = {name: (type_str, (re.search(r'op_name="([^"]*)"', attrs) or [None, ""])[1])
            for name, type_str, _, _, attrs in hlo_instructions(hlo_text)}
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(steps):
                run()
        trace = next(iter(sorted(Path(folder).rglob("*.xplane.pb"))), None)
        if trace is None:
            raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {folder}")
        data = jax.profiler.ProfileData.from_file(str(trace))
    ns: dict[str, float] = {}
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in info:
                    ns[event.name] = ns.get(event.name, 0.0) + event.duration_ns
    ms = {name: t / 1e6 / steps for name, t in ns.items()}
    parts = {part: 0.0 for part, _ in PROFILE_PARTS}
    for name, t in ms.items():
        op_name = info[name][1]
        parts[next(part for part, key in PROFILE_PARTS if key in op_name)] += t
    rows = sorted(ms.items(), key=lambda item: -item[1])[:top]
    return {"ms_per_step": sum(ms.values()), "parts": parts,
            "top": [{"name": n, "ms": t, "type": info[n][0], "op_name": info[n][1]}
                    for n, t in rows]}


def hlo_matmul_flops(hlo_text: str) -> float:
    """FLOPs of the dots and convolutions in an (optimised) HLO module, each counted once
    (right for the train step: it has no loops). dot: 2 * |out| * prod(lhs contracting dims);
    convolution: 2 * |out| * |kernel| / kernel output features."""
    instructions = hlo_instructions(hlo_text)
    shapes = {name: _shapes(t) for name, t, *_ in instructions}
    total = 0.0
    for name, type_str, opcode, operands, attrs in instructions:
        if opcode not in ("dot", "convolution"):
            continue
        out = math.prod(_shapes(type_str)[0][1])
        if opcode == "dot":
            lhs = shapes[operands[0]][0][1]
            dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs).group(1)
            total += 2 * out * math.prod(lhs[int(d)] for d in dims.split(",") if d)
        else:
            kernel = shapes[operands[1]][0][1]
            labels = re.search(r"dim_labels=\w+_(\w+)->", attrs).group(1)
            total += 2 * out * math.prod(kernel) / kernel[labels.index("o")]
    return total


# Per-device bytes a ring collective moves, in units of its full (unsharded) buffer S over N
# devices: all-reduce 2 (N-1)/N S; all-gather and reduce-scatter (N-1)/N S.
RING_FACTOR = {"all-reduce": 2.0, "all-gather": 1.0, "reduce-scatter": 1.0}


def hlo_collective_bytes(hlo_text: str, num_devices: int) -> dict:
    """Per-device bytes moved by the collectives of an SPMD-partitioned HLO module, by kind,
    assuming ring algorithms (RING_FACTOR); the buffer S is the all-reduce operand, the
    all-gather result, and the reduce-scatter operand. Async start/done pairs count once."""
    instructions = hlo_instructions(hlo_text)
    types = {name: t for name, t, *_ in instructions}
    totals = {kind: 0.0 for kind in RING_FACTOR}
    for _, type_str, opcode, operands, _ in instructions:
        kind = opcode.removesuffix("-start")
        if kind not in RING_FACTOR or opcode.endswith("-done"):
            continue
        buffer = type_str if kind == "all-gather" else " ".join(types[o] for o in operands)
        size = sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in _shapes(buffer))
        if kind == "all-gather" and opcode.endswith("-start"):  # (operand, result) tuple type
            size -= sum(DTYPE_BYTES[dt] * math.prod(dims)
                        for dt, dims in _shapes(" ".join(types[o] for o in operands)))
        totals[kind] += RING_FACTOR[kind] * (num_devices - 1) / num_devices * size
    return totals


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def hlo_nested_collectives(hlo_text: str) -> list[str]:
    """Names of the collectives that sit outside the module's ENTRY computation (in a
    conditional's branch, a loop body, a called computation). XLA:CPU executables read back from
    the persistent compilation cache lose the order between those and the main sequence's
    collectives, and simulated devices can then deadlock
    (`train.sharding.compile_cpu_collectives_afresh`)."""
    nested, in_entry = [], False
    for line in hlo_text.splitlines():
        if line[:1] not in ("", " ", "}"):  # a computation's header
            in_entry = line.startswith("ENTRY")
        match = _INSTRUCTION.match(line)
        if match and not in_entry:
            opcode = _split_type(match.group(2))[1].partition("(")[0].strip()
            if opcode.removesuffix("-start") in COLLECTIVES:
                nested.append(match.group(1))
    return nested


# ---------------------------------------------------------------- analytic FLOP count

def _dense(tokens: float, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def vit_block_flops(n: int, width: int, mlp_dim: int) -> float:
    """Forward matmul FLOPs of one pre-norm ViT block on n tokens (CLS included):
    qkv, q K^T, attention x V, output projection, MLP."""
    return (_dense(n, width, 3 * width) + 4.0 * n * n * width + _dense(n, width, width)
            + 2 * _dense(n, width, mlp_dim))


def bert_layer_flops(tokens: int, hidden: int, intermediate: int,
                     queries: int | None = None) -> float:
    """Forward matmul FLOPs of one BERT layer on `tokens` tokens, computed at the first
    `queries` positions (all when None; keys and values always span all tokens)."""
    q = tokens if queries is None else queries
    return (2 * _dense(tokens, hidden, hidden) + 2 * _dense(q, hidden, hidden)
            + 4.0 * q * tokens * hidden + 2 * _dense(q, hidden, intermediate))


def dino_head_flops(tokens: float, width: int, hidden: int, bottleneck: int, out: int) -> float:
    return (_dense(tokens, width, hidden) + _dense(tokens, hidden, hidden)
            + _dense(tokens, hidden, bottleneck) + _dense(tokens, bottleneck, out))


class Tokens(NamedTuple):
    """Patch tokens of one sample of a modality: the teacher sees `full`, the student `kept`;
    `embed_flops` is the patch embedding's forward cost."""

    full: int
    kept: int
    embed_flops: float


def token_counts(model: UniMedI, config) -> dict[str, Tokens]:
    """Per modality ("xray", "ct") the token counts of the step (CT: volume + k slices); the
    student sees all of them in a modality that is not distilled."""
    v, obj = model.vit, config.objective
    if obj.masking.style != "drop" and obj.sd.enabled:
        raise NotImplementedError("the benchmark counts the `drop` masking style only")
    distilled = step_lib.distilled_modalities(config, ("xray", "ct"))
    masked = {k: k in distilled for k in ("xray", "ct")}
    n_xray = (config.data.xray.crop_size // v.patch_size) ** 2
    volume = tuple(config.data.ct.crop_size)
    n3 = math.prod(s // p for s, p in zip(volume, v.patch_size_3d))
    n_slice = math.prod(s // v.patch_size for s in volume[1:])
    k = obj.selection.k if obj.selection.mode != "none" else 0
    p2 = v.patch_size ** 2
    keep = lambda kind, n: masking.num_keep(n, obj.masking.keep_ratio) if masked[kind] and n else n
    return {"xray": Tokens(n_xray, keep("xray", n_xray), _dense(n_xray, p2, v.width)),
            "ct": Tokens(n3 + k * n_slice, keep("ct", n3) + k * keep("ct", n_slice),
                         _dense(n3, math.prod(v.patch_size_3d), v.width)
                         + _dense(k * n_slice, p2, v.width))}


def step_flops(model: UniMedI, config) -> dict[str, float]:
    """Analytic matmul FLOPs of one train step (objective/step.py) by part, and "total".

    Counts what the step needs: backward = 2x forward for trained layers (input and weight
    gradients), 1x for the patch embedding (weight gradient only: its input is data) and for
    the lowest trained text layer's q/k/v inputs when the embeddings are frozen (no input
    gradient there); frozen text layers forward only; the last text layer at the [CLS]
    position only with [CLS] pooling (`bert.BertModel` with `cls_only`; XLA turns two of that one-query
    attention's backward products into elementwise ops, so the compiled HLO has 4 T D fewer
    dot FLOPs per report than counted here). The attentive-selection pass on the
    volume needs the last block only up to its q and k (Eq. 1), and the student's attention
    rows are unused (XLA removes both); the volume's teacher patch embedding serves both
    teacher passes (XLA computes it once) and is counted in "teacher_ct". Elementwise ops,
    softmaxes and the optimiser are not counted (they are in XLA's cost analysis).
    """
    v, obj, t = model.vit, config.objective, model.text.config
    dh = model.dino_head
    w, depth, mlp = v.width, v.depth, v.mlp_dim
    head = lambda n: dino_head_flops(n, w, dh.hidden_dim, dh.bottleneck_dim, dh.out_dim)
    blocks = lambda n: depth * vit_block_flops(n, w, mlp)
    attn_rows = lambda n: depth * 2.0 * (n - 1) * w  # q_cls . K_patch per layer
    b2, b3 = config.data.batch_size_xray, config.data.batch_size_ct
    samples = {"xray": b2, "ct": b3}
    parts = {}
    if obj.selection.mode == "attentive" and b3:
        n = 1 + math.prod(s // p for s, p in zip(config.data.ct.crop_size, v.patch_size_3d))
        parts["teacher_selection"] = b3 * ((depth - 1) * vit_block_flops(n, w, mlp)
                                           + _dense(n, w, 3 * w) + attn_rows(n))
    distilled = step_lib.distilled_modalities(config, ("xray", "ct"))
    for kind, tok in token_counts(model, config).items():
        b = samples[kind]
        if not b:
            continue
        if kind in distilled:
            parts[f"teacher_{kind}"] = b * (tok.embed_flops + blocks(1 + tok.full)
                                            + attn_rows(1 + tok.full) + head(1 + tok.full))
        student = blocks(1 + tok.kept) + _dense(1, w, config.model.proj_dim)
        if kind in distilled:
            student += head(1 + tok.kept)
        parts[f"student_{kind}"] = b * (2 * tok.embed_flops + 3 * student)

    b, tokens = b2 + b3, config.model.text.max_length
    d, inter, num_layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    last_queries = 1 if model.text_pooling == "cls" else tokens  # mean pooling: all of them
    layers = ([bert_layer_flops(tokens, d, inter)] * (num_layers - 1)
              + [bert_layer_flops(tokens, d, inter, queries=last_queries)])
    trained = config.model.text.trainable_layers
    trained = num_layers if trained == -1 else trained
    text = sum(layers) + 2 * sum(layers[num_layers - trained:])
    if trained and config.model.text.trainable_layers != -1:
        lowest_queries = last_queries if trained == 1 else tokens
        text -= _dense(lowest_queries, d, d) + 2 * _dense(tokens, d, d)
    parts["text"] = b * (text + 3 * _dense(1, t.hidden_size, config.model.proj_dim))
    parts["clip"] = 3 * 2.0 * b * b * config.model.proj_dim
    parts["total"] = sum(parts.values())
    return parts


def param_count(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
