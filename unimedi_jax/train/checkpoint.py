"""Checkpoints: orbax `CheckpointManager` over the train state, data iterator state and run info.

Layout: `WORKDIR/config.json` (the run's config) and `WORKDIR/checkpoints/<step>/{state,data,
meta}`. orbax writes each step to a temporary folder and renames it when complete, so an
interrupted save never looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from unimedi_jax import files

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
    """Saves and restores `(state pytree, data iterator state, meta)` by step."""

    def __init__(self, workdir: str, max_to_keep: int | None = 2, asynchronous: bool = True):
        self.directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_DIR)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None = None,
             meta: dict | None = None) -> None:
        """Starts an (asynchronous) save of step `step`; `wait()` blocks until it is on disk."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta or {})), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores step `step` into the shapes, dtypes and shardings of `abstract_state`."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["data"] or {}), dict(out["meta"] or {})

    def restore_host(self, step: int | None = None) -> dict:
        """Restores the state pytree of `step` (default latest) as host numpy arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        meta = self.manager.item_metadata(step)["state"]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta,
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        return jax.tree.map(np.asarray, state)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes WORKDIR/config.json (atomically)."""
    os.makedirs(workdir, exist_ok=True)
    files.write_text(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.expanduser(workdir), CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a unimedi_jax workdir "
                                "(expected config.json and checkpoints/ written by training)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_pretrained(workdir: str, step: int | None = None, which: str = "params"
                    ) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of a pretraining workdir: the student ("params") or the "teacher".

    params = {"vision", "text", "img_proj", "txt_proj", "dino_head", "logit_scale"} as numpy
    arrays (the teacher has "vision" and "dino_head" only).
    """
    config = load_config(workdir)
    state = Checkpointer(workdir, max_to_keep=None, asynchronous=False).restore_host(step)
    if which not in state:
        raise KeyError(f"checkpoint in {workdir} has no {which!r}; it has {sorted(state)}")
    return config, state[which]
