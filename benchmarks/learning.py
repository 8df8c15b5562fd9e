"""The learning ladder: what the pretrained encoder learns, arm by arm, on one data stream.

    python -m benchmarks.learning --workdir=DIR [--config=configs/pretrain.py[:test]]
        [--arms=random,supervised,clip,clip_sd,clip_sd_random,unimedi] [--seeds=0]
        [--fractions=1.0,0.1] [--probe_lr=...] [--probe_max_epochs=...]
        [--config.total_steps=...]

Arms (each trained on the config's training stream for config.total_steps steps, one after
another; seed N sets config.seed, hence the initial weights and the data order):
- random: the initial weights, untrained (the floor; the same init every trained arm starts from).
- supervised: the same ViT with one linear head per modality (X-ray, CT: their label sets may
  differ) trained with sigmoid cross-entropy on the training stream's labels, AdamW at
  config.optim (the pretraining schedule, weight decay, clipping): the ceiling. No text tower is
  trained, so zero-shot, retrieval, selection and CLIP-space collapse are n/a (null) for it.
- clip: CLIP only (objective.sd.enabled=False, objective.selection.mode="none").
- clip_sd: CLIP + self-distillation, selection "none".
- clip_sd_random: CLIP + SD + random slice selection.
- unimedi: CLIP + SD + attentive slice selection (the full method).
- clip_random (not in the default list): CLIP + random slice selection, no SD.
- unimedi_pair (not in the default list): unimedi + the DRR bridge (`objective.pair.enabled`,
  its configured loss; docs/DESIGN.md §4.7): both bridges, language and DRR.
- pair_only (not in the default list): SD + attentive selection + the DRR bridge without the
  CLIP loss (`objective.clip.weight=0`): the DRR bridge alone, UniMiSS+-style, no text.
- joint, drasclr (not in the default list): the other methods on the same ViT
  (`config.method`; docs/DESIGN.md §4.8-4.9): the base config (its optimiser too, overrides
  included) with the `method`, `objective.<method>` and `objective.views` of
  configs/pretrain_<method>.py at the base config's
  size (the `:test` of --config passes on). No text: zero-shot, retrieval and selection are n/a
  (null), the backbone collapse (`cls_*`) is measured as for every arm.
The trained arms set those two keys (and objective.pair.enabled, on for the DRR-bridge arms
only) themselves, whatever the base config says. Paper Table 7
names: `vl` = clip_random, `vl_sd` = clip_sd_random, `vl_sd_attn` = unimedi (aliases of
--arms; the paper's VL and VL+SD select slices at random).
Trained arms run `trainer.train_and_evaluate` in WORKDIR/<arm> (seed 0) or WORKDIR/<arm>_seed<N>
(its metrics.jsonl, checkpoints, and evaluations on the validation split during training).

Every arm is then measured on the TEST split (the validation split serves early stopping):
- linear probes (`linear_probe.extract` / `train_probe`, the settings of
  configs/linear_probe_2d.py and linear_probe_3d.py unless --probe_lr / --probe_max_epochs say
  otherwise) on the frozen backbone [CLS] of X-rays and volumes, per label fraction: AUROC per
  label and their mean, `probe_<xray|ct>_<P>pct_*`. A fraction's subset is repeated to the size
  of the whole training split, so every probe takes the same optimiser steps per epoch (the
  paper's 1% of a large dataset is still many batches; 1% of the phantom's 600 X-rays, 6, would
  otherwise train for one step an epoch);
- `pretrain_eval.evaluate` on the test split: zero-shot AUROC, findings-level R@1 and its
  most-common-label-set baseline, slice precision and its random and prior baselines, and the
  collapse of the CLIP-space image embeddings (mean pairwise cosine, effective rank);
- the collapse of the backbone [CLS] itself, `cls_mean_cosine_<m>`, `cls_effective_rank_<m>`
  (defined for every arm, the supervised one included).

Outputs in WORKDIR: `ladder.json` (every arm, seed and metric; per arm and metric the mean and
spread over seeds; the targets below), `ladder.md` (headline and per-finding tables),
`curves.png` (training loss and validation evaluations per arm, from metrics.jsonl) and
`findings.png` (per-finding probe and zero-shot AUROC per arm). An arm whose
WORKDIR/<arm>[_seed<N>]/ladder_arm.json exists is not run again (an interrupted pretraining arm
resumes from its checkpoint; the supervised arm starts over).

Targets, checked for the unimedi arm (means over seeds): slice precision >= max(random, prior)
+ 0.10; linear probe at 100% (else the largest fraction), 2D and 3D: pretrained - random >=
0.5 (supervised - random), averaged over the labels where the supervised probe reaches 0.8
AUROC; zero-shot AUROC averaged over those labels (of 2D or 3D) >= 0.70; findings-level R@1 >
its baseline; mean cosine of the image embeddings <= 0.5. A target whose inputs are missing
(an arm not run, no label reaching 0.8) is null.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

from configs import linear_probe_2d, linear_probe_3d, pretrain_drasclr, pretrain_joint
from unimedi_jax import files
from unimedi_jax.data import pipeline
from unimedi_jax.eval import features, linear_probe, losses, metrics, pretrain_eval, tasks
from unimedi_jax.models import layout
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.objective import methods, optim
from unimedi_jax.train import checkpoint
from unimedi_jax.train import sharding as shd
from unimedi_jax.train import trainer, validation, writers

ROOT = Path(__file__).resolve().parents[1]

ARMS = ("random", "supervised", "clip", "clip_sd", "clip_sd_random", "unimedi")  # the default
# Every known arm: the default ones, clip_random (CLIP + random slices, no SD: Table 7's VL) and
# the DRR-bridge arms.
KNOWN_ARMS = ARMS + ("clip_random", "unimedi_pair", "pair_only", "joint", "drasclr")
# Trained arms: (objective.sd.enabled, objective.selection.mode).
OBJECTIVES = {"clip": (False, "none"), "clip_random": (False, "random"),
              "clip_sd": (True, "none"), "clip_sd_random": (True, "random"),
              "unimedi": (True, "attentive"), "unimedi_pair": (True, "attentive"),
              "pair_only": (True, "attentive")}
# The DRR-bridge arms: objective.pair.enabled, with objective.clip.weight (0: no text).
PAIR_ARMS = {"unimedi_pair": 1.0, "pair_only": 0.0}
# Other methods on the same backbone, by their config files (configs/pretrain_<arm>.py).
METHOD_ARMS = {"joint": pretrain_joint, "drasclr": pretrain_drasclr}
# The paper's Table 7 rows: VL is L_vl "with random slices selection", SD adds L_icl + L_pcl,
# Attn makes the selection attentive.
ALIASES = {"vl": "clip_random", "vl_sd": "clip_sd_random", "vl_sd_attn": "unimedi"}
MODALITIES = ("xray", "ct")
DIMS = {"xray": "2D", "ct": "3D"}
SPLITS = ("train", "validation", "test")
ARM_RESULTS = "ladder_arm.json"
TARGET_ARM = "unimedi"
SUPERVISED_GOOD = 0.8  # labels the supervised probe reaches this AUROC on enter the targets

@dataclasses.dataclass(frozen=True)
class Probing:
    """How the arms are probed: label fractions (descending), and optimiser overrides of the
    probe configs (0 = keep theirs)."""

    fractions: tuple[float, ...]
    lr: float = 0.0
    max_epochs: int = 0

    def __post_init__(self):
        if self.lr < 0 or self.max_epochs < 0:
            raise ValueError(f"--probe_lr={self.lr} and --probe_max_epochs={self.max_epochs} "
                             "must be >= 0 (0: the probe configs' value)")

    def as_dict(self) -> dict:
        return {"fractions": list(self.fractions), "lr": self.lr, "max_epochs": self.max_epochs}


# ---------------------------------------------------------------- arguments


def resolve_arms(names: Sequence[str]) -> list[str]:
    """Canonical arm names (aliases resolved, duplicates dropped, order kept)."""
    out = []
    for name in names:
        arm = ALIASES.get(name.strip(), name.strip())
        if arm not in KNOWN_ARMS:
            raise ValueError(f"--arms: unknown arm {name!r}; known: {', '.join(KNOWN_ARMS)}; "
                             "aliases: "
                             + ", ".join(f"{a} (= {c})" for a, c in ALIASES.items()))
        if arm not in out:
            out.append(arm)
    if not out:
        raise ValueError("--arms is empty")
    return out


def parse_seeds(values: Sequence[str]) -> list[int]:
    try:
        seeds = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--seeds={','.join(values)}: needs integers, e.g. --seeds=0,1") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds={','.join(values)}: needs distinct integers >= 0")
    return seeds


def parse_fractions(values: Sequence[str]) -> list[float]:
    try:
        fractions = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--fractions={','.join(values)}: needs numbers in (0, 1]") from None
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"--fractions={','.join(values)}: every label fraction must lie in (0, 1]")
    return sorted(set(fractions), reverse=True)


def pct(fraction: float) -> str:
    """1.0 -> "100pct", 0.1 -> "10pct" (metric-name part)."""
    return f"{100 * fraction:g}pct"


def arm_dir(workdir: str, arm: str, seed: int) -> str:
    return os.path.join(workdir, arm if seed == 0 else f"{arm}_seed{seed}")


def arm_config(config, arm: str, seed: int, config_arg: str = ""):
    """A copy of the base config for one arm and seed (config.seed also seeds the data).

    config_arg: the base config file's argument ("test" for the seconds-long size), which a
    method arm passes to its own config file."""
    cfg = copy.deepcopy(config)
    cfg.seed = seed
    if arm in METHOD_ARMS:
        method = METHOD_ARMS[arm].get_config(config_arg)
        with cfg.unlocked():
            cfg.method = method.method  # the base config's optimiser, as every arm's
            cfg.objective[arm] = copy.deepcopy(method.objective[arm])
            cfg.objective.views = copy.deepcopy(method.objective.views)
    if arm in OBJECTIVES:
        cfg.objective.sd.enabled, cfg.objective.selection.mode = OBJECTIVES[arm]
        cfg.objective.pair.enabled = arm in PAIR_ARMS
        cfg.objective.clip.weight = PAIR_ARMS.get(arm, cfg.objective.clip.weight)
    return cfg


# ---------------------------------------------------------------- the arms' encoders


def initial_params(cfg) -> dict:
    """The trainer's initial student params (host numpy) for cfg.seed: the random arm, and the
    start of every other arm (trainer.train_and_evaluate derives init_rng the same way)."""
    setup = methods.make_setup(cfg)
    init_rng, _ = jax.random.split(jax.random.key(cfg.seed))
    state = jax.jit(setup.init)(init_rng, setup.text_params)
    return jax.tree.map(np.asarray, state["params"])


def supervised_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW of config.optim as pretraining uses it (`optim.make_optimizer` without its text
    and logit-scale freezing): clipping, warm-up + cosine schedule, decay mask."""
    return optim.adamw_chain(cfg)


def supervised_loss_fn(vit, heads: dict):
    """(params {"vision", "heads": {m: Dense}}, batch {m: {"image" (B, H, W) | "volume"
    (B, D, H, W), "labels" (B, L_m)}}) -> (mean over modalities of the masked sigmoid
    cross-entropy, {"loss_<m>"})."""
    def loss_fn(params, batch):
        terms = {}
        for m, sub in batch.items():
            cls = features.backbone_features(vit, m)(params["vision"], sub)["features"]
            logits = heads[m].apply({"params": params["heads"][m]}, cls)
            terms[f"loss_{m}"] = losses.masked_bce(logits, sub["labels"])
        return sum(terms.values()) / len(terms), terms

    return loss_fn


def train_supervised(cfg, data, workdir: str, params: dict) -> dict:
    """Trains params["vision"] (from `initial_params`) and a linear head per modality on the
    labels of the pretraining arms' training stream (`pipeline.make_mixed`, without tokenising
    the reports) for cfg.total_steps steps, one jitted step over the config's mesh; writes
    WORKDIR/metrics.jsonl (afresh). Returns params with the trained "vision"."""
    mesh = shd.make_mesh(cfg.mesh)
    validation.check_batch_divisible(cfg, shd.data_parallel_size(mesh))
    vit = UniMedI.from_config(cfg).vit
    modalities = [m for m in MODALITIES if cfg.data[f"batch_size_{m}"]]
    keys = {m: (features.input_key(m), "labels") for m in modalities}
    strip = lambda b: {m: {k: b[m][k] for k in keys[m]} for m in modalities}
    heads = {m: nn.Dense(data.source(m, "train")[0]["labels"].shape[0]) for m in modalities}
    rngs = jax.random.split(jax.random.key(cfg.seed + 1), len(modalities))
    trained = {"vision": params["vision"], "heads": {
        m: heads[m].init(r, jnp.zeros((1, vit.width), jnp.float32))["params"]
        for m, r in zip(modalities, rngs)}}
    optimizer = supervised_optimizer(cfg)
    loss_fn = supervised_loss_fn(vit, heads)
    repl = shd.replicated(mesh)

    def step(state, batch):
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return ({"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state},
                {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)})

    update = jax.jit(step, in_shardings=(repl, shd.batch_sharding(mesh)), out_shardings=repl,
                     donate_argnums=(0,))
    state = jax.device_put({"params": trained, "opt_state": optimizer.init(trained)}, repl)
    writer = writers.Writer(workdir, resume_step=0)  # a rerun starts over
    stream = pipeline.make_mixed(cfg.data, tokenizer_folder=None)
    prefetch = trainer.Prefetcher(stream, lambda b: shd.put_batch(strip(b), mesh),
                                  cfg.data.prefetch)
    try:
        with tqdm(total=cfg.total_steps, desc="supervised", unit="step", dynamic_ncols=True) as bar:
            for i in range(1, cfg.total_steps + 1):
                batch, _ = next(prefetch)
                with jax.set_mesh(mesh):
                    state, metrics = update(state, batch)
                if i % cfg.log_every_steps == 0 or i == cfg.total_steps:
                    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not math.isfinite(host["loss"]):
                        raise FloatingPointError(f"supervised arm: non-finite loss at step {i}")
                    writer.write_scalars(i, host)
                    bar.set_postfix(loss=f"{host['loss']:.4f}", refresh=False)
                bar.update(1)
    finally:
        prefetch.close()
        writer.close()
    return {**params, "vision": jax.tree.map(np.asarray, jax.device_get(
        state["params"]["vision"]))}


def pretrain(cfg, workdir: str) -> tuple:
    """Pretrains one arm (resuming from its checkpoint); returns (cfg, final student params) in
    the unscanned layout `checkpoint.load_pretrained` reads, cfg saying so (`layout.convert`)."""
    trainer.train_and_evaluate(cfg, workdir)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=None, asynchronous=False)
    step = ckpt.latest_step()
    ckpt.close()
    if step != cfg.total_steps:
        raise RuntimeError(f"{workdir}: training stopped at step {step} of "
                           f"config.total_steps={cfg.total_steps}; rerun to resume")
    _, params = checkpoint.load_pretrained(workdir, step)
    return layout.convert(cfg, params, scan=False)


# ---------------------------------------------------------------- measurements


def label_names(source, count: int) -> list[str]:
    """The dataset's label names (its TFDS metadata), else label_0 .. label_{count-1}."""
    info = getattr(source, "dataset_info", None)
    names = list((getattr(info, "metadata", None) or {}).get("label_names") or [])
    return names if len(names) == count else [f"label_{i}" for i in range(count)]


def probe_config(cfg, modality: str, seed: int, probing: Probing):
    """configs/linear_probe_{2d,3d}.py's probe (optimiser, example caps) with `probing`'s
    overrides, on the pretraining data's crop, dataset name and evaluation batch size."""
    probe = (linear_probe_2d if modality == "xray" else linear_probe_3d).get_config()
    probe.seed = seed
    probe.optim.lr = probing.lr or probe.optim.lr
    probe.optim.max_epochs = probing.max_epochs or probe.optim.max_epochs
    probe.batch_size = cfg.eval.batch_size
    probe.data.name = cfg.data[modality].dataset
    probe.data.crop_size = cfg.data[modality].crop_size
    return probe


def probe_metrics(cfg, data, params: dict, modality: str, probing: Probing,
                  seed: int) -> tuple[dict, list[str]]:
    """Linear probes on the frozen backbone [CLS] of one modality: features of each split
    extracted once, a probe per label fraction scored on the test split, and the collapse of
    the test features. Returns (metrics, label names)."""
    probe = probe_config(cfg, modality, seed, probing)
    sources = {s: features.head(data.source(modality, s), probe.data.max_examples[s])
               for s in SPLITS}
    count = sources["test"][0]["labels"].shape[0]
    names = label_names(sources["test"].source, count)
    loaded = tasks.Loaded(UniMedI.from_config(cfg), params, cfg, {})
    feats = linear_probe.extract(probe, loaded, sources, list(range(count)))
    x_train, y_train = feats["train"]
    out = {}
    for fraction in probing.fractions:
        # the subset repeated to the split's size: as many steps per epoch as at 100%
        rows = np.resize(tasks.fraction_indices(len(x_train), fraction, seed), len(x_train))
        head, head_params, _ = linear_probe.train_probe(
            probe, (x_train[rows], y_train[rows]), feats["validation"], count, seed)
        logits = np.asarray(jax.jit(head.apply)({"params": head_params}, feats["test"][0]))
        got = linear_probe.classification_metrics(logits, feats["test"][1], probe.label_type,
                                                  names)
        prefix = f"probe_{modality}_{pct(fraction)}"
        out[f"{prefix}_mean_auroc"] = got["auroc_macro"]
        out.update({f"{prefix}_auroc_{n}": v for n, v in got["auroc_per_label"].items()})
    x_test = feats["test"][0]
    out[f"cls_mean_cosine_{modality}"] = metrics.mean_pairwise_cosine(x_test)
    out[f"cls_effective_rank_{modality}"] = metrics.effective_rank(x_test)
    return out, names


def measure(arm: str, cfg, data, params: dict, probing: Probing) -> dict:
    """Every test-split metric of one arm's params (see the module docstring)."""
    out, names = {}, {}
    for modality in MODALITIES:
        if cfg.data[f"batch_size_{modality}"]:
            got, names[modality] = probe_metrics(cfg, data, params, modality, probing, cfg.seed)
            out.update(got)
    # No text tower trained (supervised, joint, drasclr): CLIP-space metrics do not apply.
    if arm != "supervised" and methods.has_text(cfg):
        test = {m: data.source(m, "test") if cfg.data[f"batch_size_{m}"] else None
                for m in MODALITIES}
        out.update(pretrain_eval.evaluate(params, cfg, test["ct"], test["xray"], data.train_ct))
    return {"metrics": _finite_or_none(out), "labels": names}


def _finite_or_none(values: dict) -> dict:
    return {k: (float(v) if np.isfinite(v) else None) for k, v in values.items()
            if np.ndim(v) == 0}


def run_arm(config, arm: str, seed: int, probing: Probing, workdir: str,
            config_arg: str = "") -> dict:
    """Trains (unless random) and measures one arm; writes and returns its ladder_arm.json."""
    cfg = arm_config(config, arm, seed, config_arg)
    os.makedirs(workdir, exist_ok=True)
    data = pipeline.make_pretrain_data(cfg, UniMedI.from_config(cfg).text_checkpoint)
    start = time.perf_counter()
    if arm in OBJECTIVES or arm in METHOD_ARMS:
        cfg, params = pretrain(cfg, workdir)
    else:
        params = initial_params(cfg)
        if arm == "supervised":
            params = train_supervised(cfg, data, workdir, params)
    trained = time.perf_counter()
    result = measure(arm, cfg, data, params, probing)
    result.update(arm=arm, seed=seed, probing=probing.as_dict(),
                  steps=0 if arm == "random" else int(cfg.total_steps),
                  train_s=trained - start, measure_s=time.perf_counter() - trained)
    _write_json(os.path.join(workdir, ARM_RESULTS), result)
    return result


# ---------------------------------------------------------------- the ladder


def spread(values: Sequence[float | None]) -> dict:
    """{"mean", "std" (sample, null for one value), "min", "max", "n", "values"} over the
    defined values; mean null when none is."""
    defined = [v for v in values if v is not None]
    if not defined:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0,
                "values": list(values)}
    x = np.asarray(defined, np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else None,
            "min": float(x.min()), "max": float(x.max()), "n": len(x), "values": list(values)}


def summarise(runs: dict) -> dict:
    """runs {arm: {seed: result}} -> {arm: {metric: spread}} over the union of metric names
    (a metric an arm lacks, e.g. zero-shot for the supervised arm, is null)."""
    keys = sorted({k for seeds in runs.values() for r in seeds.values() for k in r["metrics"]})
    return {arm: {k: spread([r["metrics"].get(k) for r in seeds.values()]) for k in keys}
            for arm, seeds in runs.items()}


def _mean(summary: dict, arm: str, key: str) -> float | None:
    return summary.get(arm, {}).get(key, {}).get("mean")


def targets(summary: dict, labels: dict, fractions: Sequence[float]) -> dict:
    """The targets of the module docstring for the unimedi arm: {name: {"holds": bool | None,
    numbers}}; "holds" is None where an input is missing."""
    fraction = 1.0 if 1.0 in fractions else max(fractions)
    arm, out = TARGET_ARM, {}
    get = lambda a, k: _mean(summary, a, k)

    def check(name, holds, **numbers):
        out[name] = {"holds": holds, **numbers}

    sp = [get(arm, k) for k in ("slice_precision", "slice_precision_random",
                                "slice_precision_prior")]
    check("slice_precision", None if None in sp else bool(sp[0] >= max(sp[1], sp[2]) + 0.10),
          slice_precision=sp[0], random=sp[1], prior=sp[2], margin=0.10)
    good_all = set()
    for m in MODALITIES:
        key = lambda n: f"probe_{m}_{pct(fraction)}_auroc_{n}"
        names = labels.get(m, [])
        sup = {n: get("supervised", key(n)) for n in names}
        good = [n for n in names if sup[n] is not None and sup[n] >= SUPERVISED_GOOD]
        good_all.update(good)
        gap = {a: None for a in (arm, "supervised")}  # mean over `good` of arm - random
        if good and all(get(a, key(n)) is not None for a in (arm, "random") for n in good):
            gap = {a: float(np.mean([get(a, key(n)) - get("random", key(n)) for n in good]))
                   for a in gap}
        needed = None if gap[arm] is None else 0.5 * gap["supervised"]
        check(f"probe_{DIMS[m]}", None if needed is None else bool(gap[arm] >= needed),
              fraction=fraction, labels=good, pretrained_minus_random=gap[arm],
              supervised_minus_random=gap["supervised"], needed=needed)
    zs = [get(arm, f"zero_shot_auroc_{n}") for n in sorted(good_all)]
    zs = [v for v in zs if v is not None]
    zero_shot = float(np.mean(zs)) if zs else None
    check("zero_shot", None if zero_shot is None else bool(zero_shot >= 0.70),
          labels=sorted(good_all), zero_shot_mean_auroc=zero_shot, needed=0.70)
    r1 = [get(arm, "retrieval_r1_findings"), get(arm, "retrieval_r1_findings_baseline")]
    check("retrieval_r1_findings", None if None in r1 else bool(r1[0] > r1[1]),
          retrieval_r1_findings=r1[0], baseline=r1[1])
    cos = get(arm, "image_embedding_mean_cosine")
    check("collapse", None if cos is None else bool(cos <= 0.5), mean_cosine=cos, needed=0.5)
    return {"arm": arm, "present": arm in summary, "checks": out}


def read_curves(workdir: str, arms: Sequence[str], seeds: Sequence[int]) -> dict:
    """{arm: {seed: metrics.jsonl rows}} of the arms that trained."""
    out = {}
    for arm in arms:
        for seed in seeds:
            folder = arm_dir(workdir, arm, seed)
            if os.path.exists(os.path.join(folder, writers.METRICS_FILE)):
                out.setdefault(arm, {})[seed] = writers.read_metrics(folder)
    return out


CURVES = (("loss", "training loss (each arm's objective)"), ("loss_vl", "CLIP loss"),
          ("eval/retrieval_r1_findings", "validation R@1, findings level"),
          ("eval/zero_shot_mean_auroc", "validation zero-shot mean AUROC"),
          ("eval/slice_precision", "validation slice precision"),
          ("eval/image_embedding_mean_cosine", "validation embedding mean cosine"))


def plot_curves(curves: dict, path: str) -> None:
    """One panel per CURVES entry, a line per arm and seed (same colour per arm)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colours = {arm: f"C{i}" for i, arm in enumerate(KNOWN_ARMS)}
    for ax, (key, title) in zip(axes.ravel(), CURVES):
        for arm, seeds in curves.items():
            for j, (seed, rows) in enumerate(sorted(seeds.items())):
                points = [(r["step"], r[key]) for r in rows
                          if isinstance(r.get(key), (int, float))]
                if points:
                    ax.plot(*zip(*points), color=colours[arm], alpha=1.0 if j == 0 else 0.5,
                            marker="o" if key.startswith("eval/") else None, markersize=3,
                            label=arm if j == 0 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finding_panels(labels: dict, fraction: float) -> list[tuple[str, str, list[str]]]:
    """(title, metric-key pattern with {n}, label names) of the per-finding plots and tables."""
    panels = [(f"linear probe {DIMS[m]}, {pct(fraction).replace('pct', '%')} labels",
               f"probe_{m}_{pct(fraction)}_auroc_{{n}}", labels[m]) for m in MODALITIES
              if m in labels]
    names = labels.get("ct") or labels.get("xray") or []
    return panels + [("zero-shot (2D + 3D)", "zero_shot_auroc_{n}", names)]


def plot_findings(summary: dict, labels: dict, fraction: float, path: str) -> None:
    """Grouped bars per finding (an arm per bar, error bar = std over seeds), one panel per
    `finding_panels` entry; n/a values are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = finding_panels(labels, fraction)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    arms = list(summary)
    width = 0.8 / max(len(arms), 1)
    for ax, (title, pattern, names) in zip(axes[0], panels):
        x = np.arange(len(names))
        for i, arm in enumerate(arms):
            got = [summary[arm].get(pattern.format(n=n), {}) for n in names]
            means = np.array([np.nan if g.get("mean") is None else g["mean"] for g in got])
            errs = np.array([g.get("std") or 0.0 for g in got])
            shown = np.isfinite(means)
            if shown.any():
                ax.bar((x + (i - (len(arms) - 1) / 2) * width)[shown], means[shown], width,
                       yerr=errs[shown], label=arm, color=f"C{KNOWN_ARMS.index(arm)}")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("AUROC")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(s: dict | None, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if s.get("std") is not None else "")


def headline_columns(fractions: Sequence[float]) -> list[tuple[str, list[str]]]:
    """(column title, metric keys shown in it, the first one's value leading) of ladder.md."""
    cols = [(f"probe {DIMS[m]} {pct(f).replace('pct', '%')}", [f"probe_{m}_{pct(f)}_mean_auroc"])
            for m in MODALITIES for f in fractions]
    return cols + [
        ("zero-shot mean", ["zero_shot_mean_auroc"]),
        ("R@1 findings (baseline)", ["retrieval_r1_findings", "retrieval_r1_findings_baseline"]),
        ("slice prec. (random / prior)", ["slice_precision", "slice_precision_random",
                                          "slice_precision_prior"]),
        ("emb. mean cos", ["image_embedding_mean_cosine"]),
        ("emb. eff. rank", ["image_embedding_effective_rank"]),
        ("CLS cos 2D / 3D", ["cls_mean_cosine_xray", "cls_mean_cosine_ct"]),
    ]


def markdown(ladder: dict) -> str:
    """ladder.md: the headline table, per-finding tables, and the targets."""
    summary, fractions, labels = ladder["summary"], ladder["fractions"], ladder["labels"]
    arm_label = lambda a: a + (f" ({ladder['aliases'][a]})" if a in ladder["aliases"] else "")
    lines = [f"# Learning ladder: {len(ladder['seeds'])} seed(s) {ladder['seeds']}, "
             f"{ladder['steps']} steps, test split", "",
             "Mean ± std over seeds; n/a: not applicable (the supervised arm has no trained text "
             "tower) or undefined.", ""]
    cols = headline_columns(fractions)
    lines += ["| arm | " + " | ".join(c for c, _ in cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    for arm in summary:
        cells = []
        for _, keys in cols:
            first, *rest = [_cell(summary[arm].get(k)) for k in keys]
            cells.append(first + (f" ({' / '.join(rest)})" if rest and first != "n/a" else ""))
        lines.append(f"| {arm_label(arm)} | " + " | ".join(cells) + " |")
    for title, pattern, names in finding_panels(labels, max(fractions)):
        lines += ["", f"## {title}: AUROC per finding", "",
                  "| arm | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {arm_label(arm)} | " + " | ".join(
            _cell(summary[arm].get(pattern.format(n=n))) for n in names) + " |" for arm in summary]
    lines += ["", f"## Targets ({ladder['targets']['arm']} arm)", ""]
    for name, check in ladder["targets"]["checks"].items():
        numbers = ", ".join(f"{k}={_number(v)}" for k, v in check.items() if k != "holds")
        lines.append(f"- {name}: **{_verdict(check['holds'])}** ({numbers})")
    return "\n".join(lines) + "\n"


def _number(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _verdict(holds: bool | None) -> str:
    return {True: "holds", False: "fails", None: "n/a"}[holds]


def _write_json(path: str, obj: dict) -> None:
    files.write_text(path, json.dumps(obj, indent=2))


def run_ladder(config, arms: Sequence[str], seeds: Sequence[int], probing: Probing,
               workdir: str, config_arg: str = "") -> dict:
    """Runs (or reloads) every arm and seed, then writes ladder.json, ladder.md, curves.png and
    findings.png into workdir; returns the ladder.json dict. `arms` may hold aliases;
    config_arg: the argument of the base config file (`arm_config`)."""
    requested = list(arms)
    arms = resolve_arms(arms)
    aliases = {ALIASES[a]: a for a in requested if a in ALIASES}
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    runs, labels = {}, {}
    todo = [(arm, seed) for seed in seeds for arm in arms]
    for i, (arm, seed) in enumerate(todo, 1):
        folder = arm_dir(workdir, arm, seed)
        path = os.path.join(folder, ARM_RESULTS)
        if os.path.exists(path):
            logging.info("[ladder %d/%d] %s seed %d: done before (%s)", i, len(todo), arm, seed,
                         path)
            with open(path) as f:
                result = json.load(f)
        else:
            logging.info("[ladder %d/%d] %s seed %d: running in %s", i, len(todo), arm, seed,
                         folder)
            result = run_arm(config, arm, seed, probing, folder, config_arg)
            logging.info("[ladder %d/%d] %s seed %d: trained in %.0f s, measured in %.0f s",
                         i, len(todo), arm, seed, result["train_s"], result["measure_s"])
        if result["probing"] != probing.as_dict():
            raise ValueError(f"{path} was probed with {result['probing']}, not "
                             f"{probing.as_dict()} (--fractions, --probe_lr, --probe_max_epochs);"
                             " delete it to measure that arm again")
        runs.setdefault(arm, {})[seed] = result
        labels.update(result["labels"])
    summary = summarise(runs)
    ladder = {
        "arms": arms, "aliases": aliases, "seeds": list(seeds),
        "fractions": list(probing.fractions), "probing": probing.as_dict(),
        "steps": int(config.total_steps), "labels": labels,
        "runs": {a: {str(s): r for s, r in seeds_.items()} for a, seeds_ in runs.items()},
        "summary": summary, "targets": targets(summary, labels, probing.fractions),
        "config": json.loads(config.to_json_best_effort()),
    }
    _write_json(os.path.join(workdir, "ladder.json"), ladder)
    files.write_text(os.path.join(workdir, "ladder.md"), markdown(ladder))
    plot_curves(read_curves(workdir, arms, seeds), os.path.join(workdir, "curves.png"))
    plot_findings(summary, labels, max(probing.fractions), os.path.join(workdir, "findings.png"))
    return ladder


def format_targets(ladder: dict) -> str:
    t = ladder["targets"]
    if not t["present"]:
        return f"targets: the {t['arm']} arm was not run"
    rows = [f"targets ({t['arm']} arm):"]
    for name, check in t["checks"].items():
        numbers = ", ".join(f"{k}={_number(v)}" for k, v in check.items() if k != "holds")
        rows.append(f"  {name:<22} {_verdict(check['holds']):<6} {numbers}")
    return "\n".join(rows)


def define_flags() -> dict[str, flags.FlagHolder]:
    """The command line's flags; defined when run as a script only, so that importing this module
    (the tests do) leaves the process's flags alone."""
    aliases = ", ".join(f"{a}={c}" for a, c in ALIASES.items())
    return dict(
        config=config_flags.DEFINE_config_file(
            "config", str(ROOT / "configs" / "pretrain.py"),
            "Pretraining config file (PATH[:arg]).", lock_config=True),
        workdir=flags.DEFINE_string(
            "workdir", None, "Output folder (one subfolder per arm and seed)."),
        arms=flags.DEFINE_list(
            "arms", list(ARMS), f"Arms to run, in order: {', '.join(ARMS)} (aliases {aliases})."),
        seeds=flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed) to run every arm with."),
        fractions=flags.DEFINE_list(
            "fractions", ["1.0", "0.1"], "Label fractions of the linear probes' training split."),
        probe_lr=flags.DEFINE_float(
            "probe_lr", 0.0, "Linear-probe learning rate; 0: the probe configs' "
            "(configs/linear_probe_2d.py, _3d.py)."),
        probe_epochs=flags.DEFINE_integer(
            "probe_max_epochs", 0, "Linear-probe epochs at most (early stopping on the validation "
            "loss); 0: the probe configs'."))


_FLAGS: dict[str, flags.FlagHolder] = {}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    try:
        arms = [a.strip() for a in _FLAGS["arms"].value]
        resolve_arms(arms)
        seeds = parse_seeds(_FLAGS["seeds"].value)
        probing = Probing(tuple(parse_fractions(_FLAGS["fractions"].value)),
                          _FLAGS["probe_lr"].value, _FLAGS["probe_epochs"].value)
    except ValueError as error:
        raise app.UsageError(str(error))
    shd.compile_cpu_collectives_afresh()
    start = time.perf_counter()
    workdir = _FLAGS["workdir"].value
    config_arg = config_flags.get_config_filename(
        flags.FLAGS[_FLAGS["config"].name]).partition(":")[2]
    ladder = run_ladder(_FLAGS["config"].value, arms, seeds, probing, workdir, config_arg)
    print(Path(workdir, "ladder.md").expanduser().read_text())
    print(format_targets(ladder))
    print(f"ladder: {len(ladder['arms'])} arm(s) x {len(seeds)} seed(s) in "
          f"{time.perf_counter() - start:.0f} s; {os.path.abspath(workdir)}/ladder.json",
          flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # configs/ (the probe settings) whatever the working directory
    _FLAGS.update(define_flags())
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
