"""Config checks that run before anything compiles, each naming the config key to fix."""

from __future__ import annotations

import os

import ml_collections

from unimedi_jax.data import transforms
from unimedi_jax.models import layers
from unimedi_jax.objective import masking, methods, pair, selection, step, update

# The allowed values, as the modules that read them define them.
CHOICES = {
    "objective.selection.mode": step.SELECTION_MODES,
    "objective.selection.slice_mode": selection.SLICE_MODES,
    "objective.masking.mode": masking.MODES,
    "objective.masking.style": masking.STYLES,
    "objective.clip.targets": step.CLIP_TARGETS,
    "on_nonfinite": update.ON_NONFINITE,
    # "" picks by backend; the others name one of models/layers.py's attentions.
    "model.vit.attn_implementation": ("", *filter(None, layers.ATTENTION_IMPLEMENTATIONS)),
}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def validate_pretrain_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for values that would fail later (or silently do the wrong thing)."""
    method = config.get("method", "unimedi")  # configs saved before the key: UniMedI
    if method not in methods.METHODS:
        raise ConfigError(f"config.method={method!r}; choose one of {sorted(methods.METHODS)}")
    for section in (method, "views") if method != "unimedi" else ():
        if section not in config.objective:
            raise ConfigError(f"config.method={method!r} needs config.objective.{section}: start "
                              f"from configs/pretrain_{method}.py, which sets it")
    for key, allowed in CHOICES.items():
        if _get(config, key) not in allowed:
            raise ConfigError(f"config.{key}={_get(config, key)!r}; choose one of {allowed}")
    vit = config.model.vit
    p2, p3 = vit.patch_size, tuple(vit.patch_size_3d)
    if vit.image_size % p2:
        raise ConfigError(f"config.model.vit.image_size={vit.image_size} is not divisible by "
                          f"config.model.vit.patch_size={p2}")
    crop = config.data.xray.crop_size
    if crop % p2:
        raise ConfigError(f"config.data.xray.crop_size={crop} is not divisible by "
                          f"config.model.vit.patch_size={p2}")
    for name, size in (("model.vit.volume_size", vit.volume_size),
                       ("data.ct.crop_size", config.data.ct.crop_size)):
        if len(size) != 3 or any(s % p for s, p in zip(size, p3)):
            raise ConfigError(f"config.{name}={tuple(size)} is not divisible by "
                              f"config.model.vit.patch_size_3d={p3}")
        if size[1] % p2 or size[2] % p2:
            raise ConfigError(f"config.{name}={tuple(size)}: CT slices of {size[1:]} are not "
                              f"divisible by the 2D patch size {p2}")
    depth_tokens = vit.volume_size[0] // p3[0]
    k = config.objective.selection.k
    if config.objective.selection.mode != "none" and not 0 < k <= depth_tokens:
        raise ConfigError(f"config.objective.selection.k={k} must be in 1..{depth_tokens} "
                          f"(the depth of the 3D token grid)")
    if not 0.0 < config.objective.masking.keep_ratio <= 1.0:
        raise ConfigError(f"config.objective.masking.keep_ratio="
                          f"{config.objective.masking.keep_ratio} must be in (0, 1]")
    if not config.objective.clip.get("weight", 1.0) >= 0.0:
        raise ConfigError(f"config.objective.clip.weight={config.objective.clip.weight} must be "
                          ">= 0")
    if "pair" in config.objective:  # configs saved before the block have none
        _validate_pair(config.objective.pair)
    modalities = tuple(config.objective.sd.modalities)
    if not set(modalities) <= set(step.MODALITIES):
        raise ConfigError(f"config.objective.sd.modalities={modalities!r}: each must be one of "
                          f"{step.MODALITIES}")
    ckpt = config.model.text.checkpoint
    if ckpt and not os.path.isdir(os.path.expanduser(ckpt)):
        raise ConfigError(f"config.model.text.checkpoint={ckpt!r} is not a folder; it must hold "
                          "a Hugging Face BERT checkpoint (config.json, model.safetensors or "
                          "pytorch_model.bin, tokenizer files)")
    for key in ("total_steps", "log_every_steps", "checkpoint_every_steps"):
        if config[key] <= 0:
            raise ConfigError(f"config.{key}={config[key]} must be positive")
    for modality in ("xray", "ct"):
        if modality in config.data:
            _check_augment(config.data[modality].get("augment"), f"config.data.{modality}.augment")


def validate_task_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for a downstream task's values that would fail after it has loaded."""
    if "data" in config:
        _check_augment(config.data.get("augment"), "config.data.augment")


def _check_augment(fields, key: str) -> None:
    try:
        transforms.augment_options(fields, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _validate_pair(pair_cfg) -> None:
    """objective.pair (DESIGN §4.7), checked whether or not it is enabled."""
    for key, allowed in (("loss", pair.PAIR_LOSSES), ("drr.projection", pair.PROJECTIONS)):
        if _get(pair_cfg, key) not in allowed:
            raise ConfigError(f"config.objective.pair.{key}={_get(pair_cfg, key)!r}; choose one "
                              f"of {allowed}")
    for key in ("enabled", "clip"):
        if not isinstance(pair_cfg[key], bool):
            raise ConfigError(f"config.objective.pair.{key}={pair_cfg[key]!r} must be True or "
                              "False")
    if not pair_cfg.weight >= 0.0:
        raise ConfigError(f"config.objective.pair.weight={pair_cfg.weight} must be >= 0")
    for key in ("temperature", "drr.ray_length_mm", "drr.mu_water", "drr.window"):
        if not _get(pair_cfg, key) > 0.0:
            raise ConfigError(f"config.objective.pair.{key}={_get(pair_cfg, key)} must be > 0")


def check_batch_divisible(config: ml_collections.ConfigDict, data_parallel: int) -> None:
    """Each sub-batch, and the evaluation batch, splits evenly over the data-parallel devices."""
    for key in ("data.batch_size_xray", "data.batch_size_ct", "eval.batch_size"):
        size = _get(config, key)
        if size % data_parallel:
            raise ConfigError(f"config.{key}={size} is not divisible by the "
                              f"data-parallel size {data_parallel} (config.mesh={config.mesh})")
