"""Step schedules (jittable in the step): teacher temperature, EMA momentum, learning rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def teacher_temp(step: Array | int, warmup_value: float, final_value: float,
                 warmup_steps: int) -> Array:
    """Linear warm-up from warmup_value (step 0) to final_value (step warmup_steps), then
    constant (iBOT's teacher-temperature warm-up, per step instead of per epoch)."""
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(warmup_steps, 1), 0.0, 1.0)
    return warmup_value + (final_value - warmup_value) * frac


def ema_momentum(step: Array | int, total_steps: int, start: float, end: float) -> Array:
    """DINO's cosine schedule: end - (end - start) * (cos(pi * step / total_steps) + 1) / 2,
    start at step 0, end at step total_steps (and after)."""
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return end - (end - start) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0


def learning_rate(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up from optim.warmup_init_lr to optim.lr over optim.warmup_steps, then cosine
    to optim.end_lr at total_steps (optax.warmup_cosine_decay_schedule)."""
    if not 0 <= optim_cfg.warmup_steps < total_steps:
        raise ValueError(f"optim.warmup_steps={optim_cfg.warmup_steps} must lie in "
                         f"[0, total_steps={total_steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=optim_cfg.warmup_init_lr, peak_value=optim_cfg.lr,
        warmup_steps=optim_cfg.warmup_steps, decay_steps=total_steps, end_value=optim_cfg.end_lr)
