"""Applying one step's gradients to a train state: shared by every pretraining method.

A train state is a dict {"step": int32 scalar, "params", "opt_state", ...}: each method adds its
own entries (UniMedI: the EMA teacher and the DINO centres; docs/DESIGN.md §4, §4.8-4.9).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from unimedi_jax.objective import schedules
from unimedi_jax.objective.optim import applied_updates

Array = jax.Array
ON_NONFINITE = ("stop", "skip")


def check_on_nonfinite(config) -> None:
    if config.on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite={config.on_nonfinite!r}; expected one of {ON_NONFINITE}")


def apply_gradients(state: dict, loss: Array, grads: dict, optimizer: optax.GradientTransformation,
                    config, after: Callable[[dict], dict] = lambda params: {}
                    ) -> tuple[dict, dict]:
    """The optimiser update of state["params"], then `after(new_params)`: the method's other
    state entries (e.g. {"teacher": EMA of the new params}), which replace those of `state`.

    Returns (new state with step + 1, metrics {grad_norm, finite, lr}). `finite` says the loss
    and gradient norm are finite; with config.on_nonfinite == "skip" a non-finite step leaves
    every entry as it was except `step` (selected with jnp.where, no host round trip; the
    optimiser's own count, hence its learning-rate schedule, does not advance). "stop" leaves
    the decision to the caller, which reads `finite`.
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt_state": opt_state, **after(params)}
    if config.on_nonfinite == "skip":
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, {k: state[k] for k in new})
    # The rate this update applied: the optimiser's count lags `step` after skipped steps.
    lr = schedules.learning_rate(config.optim, config.total_steps)(
        applied_updates(state["opt_state"]))
    return {**state, **new, "step": state["step"] + 1}, {"grad_norm": grad_norm,
                                                         "finite": finite, "lr": lr}
