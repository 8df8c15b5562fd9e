"""Checkpoints: orbax `CheckpointManager` over the train state, data iterator state and run info.

Layout: `WORKDIR/config.json` (the run's config), `WORKDIR/checkpoints/<step>/{state,data,
meta}` and `WORKDIR/frozen/`: the state's subtrees the optimiser never updates (the locked
pretrained text layers, most of the default's bytes), written once per run and left out of every
step, which restores them from there. orbax writes each step to a temporary folder and renames it
when complete, so an interrupted save never looks like a checkpoint. A checkpoint damaged later
(truncated or missing files) is skipped for the newest one that restores
(`Checkpointer.restore_intact`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence, TypeVar

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from unimedi_jax import files
from unimedi_jax.models import layout

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"  # where a resumed run moves the damaged steps it skipped
FROZEN_DIR = "frozen"

T = TypeVar("T")
Path = tuple[str, ...]  # keys into nested dicts, e.g. ("params", "text", "embeddings")


def _get(tree: dict, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _has(tree: Any, path: Path) -> bool:
    for key in path:
        if not hasattr(tree, "keys") or key not in tree:
            return False
        tree = tree[key]
    return True


def _without(tree: dict, paths: Sequence[Path]) -> dict:
    """A copy of nested dicts `tree` without the subtrees at `paths` (those present)."""
    out = dict(tree)
    for key in {p[0] for p in paths if p[0] in tree}:
        rest = [p[1:] for p in paths if p[0] == key]
        if () in rest:
            del out[key]
        else:
            out[key] = _without(tree[key], rest)
    return out


def _with(tree: dict, parts: dict[Path, Any]) -> dict:
    """A copy of nested dicts `tree` with `parts` {path: subtree} put in."""
    out = dict(tree)
    for path, sub in parts.items():
        node = out
        for key in path[:-1]:
            node[key] = dict(node[key])
            node = node[key]
        node[path[-1]] = sub
    return out


def _key(path: Path) -> str:
    return "/".join(path)


def _host_abstract(metadata: Any) -> Any:
    """ShapeDtypeStructs on the first CPU device for an orbax metadata tree."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        metadata, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


class CheckpointRestoreError(ValueError):
    """The checkpoint asked for, or every checkpoint of a workdir, could not be restored."""


def _describe(error: BaseException, step_dir: str) -> str:
    """One line on `error`: the innermost message of its chain that names a file of `step_dir`
    (TensorStore's spec cut off), else its own first line."""
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    first = lambda e: (str(e).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
    e = next((e for e in reversed(chain) if step_dir + os.sep in first(e)), error)
    line = first(e)
    return f"{type(e).__name__}: {line[:400] + '...' if len(line) > 400 else line}"


class Checkpointer:
    """Saves and restores `(state pytree, data iterator state, meta)` by step.

    `frozen`: paths of state subtrees that never change (`optim.frozen_paths` under "params"):
    `save_frozen` writes them once to WORKDIR/frozen/, `save` leaves them out, and restoring a
    step that lacks them takes them from there (older steps that hold them restore as saved).
    """

    def __init__(self, workdir: str, max_to_keep: int | None = 2, asynchronous: bool = True,
                 frozen: Sequence[Path] = ()):
        workdir = os.path.abspath(os.path.expanduser(workdir))
        self.directory = os.path.join(workdir, CHECKPOINT_DIR)
        self.frozen_dir = os.path.join(workdir, FROZEN_DIR)
        self.frozen = [tuple(p) for p in frozen]
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save_frozen(self, state: dict) -> None:
        """Writes the `frozen` subtrees of `state` to WORKDIR/frozen/ unless they are there
        (every process calls it; orbax writes a temporary folder and renames it when done)."""
        if not self.frozen or os.path.exists(self.frozen_dir):
            return
        saver = ocp.StandardCheckpointer()
        saver.save(self.frozen_dir, {_key(p): _get(state, p) for p in self.frozen})
        saver.wait_until_finished()

    def _stored_frozen(self) -> list[Path]:
        if not os.path.exists(self.frozen_dir):
            return []
        tree = ocp.StandardCheckpointer().metadata(self.frozen_dir).item_metadata.tree
        return [tuple(k.split("/")) for k in tree]

    def _restore_frozen(self, paths: Sequence[Path], abstract_state: Any | None) -> dict:
        """{path: subtree} of WORKDIR/frozen/ for `paths`, in the shardings of `abstract_state`
        (None: numpy on the host)."""
        if not paths:
            return {}
        stored = self._stored_frozen()
        lacking = [p for p in paths if p not in stored]
        if lacking:
            raise FileNotFoundError(
                f"{self.frozen_dir} does not hold {[_key(p) for p in lacking]}, which the "
                "checkpoints leave out (the weights the optimiser never updates, written there "
                "once per run): copy that folder back from the run's original workdir")
        reader = ocp.StandardCheckpointer()
        if abstract_state is None:
            target = _host_abstract(reader.metadata(self.frozen_dir).item_metadata.tree)
        else:
            target = {_key(p): _get(abstract_state, p) for p in stored}
        out = reader.restore(self.frozen_dir, target)
        if abstract_state is None:
            out = jax.tree.map(np.asarray, out)
        return {p: out[_key(p)] for p in paths}

    def _left_out(self, step: int) -> list[Path]:
        """The frozen paths the checkpoint of `step` does not hold."""
        saved = self.manager.item_metadata(step)["state"]
        wanted = self.frozen or self._stored_frozen()
        return [p for p in wanted if not _has(saved, p)]

    def save(self, step: int, state: Any, data_state: dict | None = None,
             meta: dict | None = None) -> None:
        """Starts an (asynchronous) save of step `step` without the `frozen` subtrees (call
        `save_frozen` first); `wait()` blocks until it is on disk."""
        if self.frozen and not os.path.exists(self.frozen_dir):
            raise RuntimeError("Checkpointer.save_frozen must run before the first save")
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_without(state, self.frozen)),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta or {})), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores step `step` into the shapes, dtypes and shardings of `abstract_state`
        (its frozen subtrees from WORKDIR/frozen/ when the step leaves them out)."""
        left_out = self._left_out(step)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_without(abstract_state, left_out)),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        state = _with(out["state"], self._restore_frozen(left_out, abstract_state))
        return state, dict(out["data"] or {}), dict(out["meta"] or {})

    def restore_host(self, step: int | None = None) -> dict:
        """Restores the state pytree of `step` (default: the newest intact one) as host numpy
        arrays."""
        return self.restore_intact(self._restore_host, step)[1]

    def _restore_host(self, step: int) -> dict:
        abstract = _host_abstract(self.manager.item_metadata(step)["state"])
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        state = jax.tree.map(np.asarray, state)
        return _with(state, self._restore_frozen(self._left_out(step), None))

    def restore_intact(self, restore: Callable[[int], T], step: int | None = None,
                       set_aside: bool = False) -> tuple[int, T]:
        """`(step, restore(step))` for `step`, or by default for the newest step that restores.

        orbax and TensorStore raise plain Exception/ValueError for unreadable files and for a
        mismatched structure alike, so the exception type cannot tell them apart. Instead any
        exception from `restore` of a step counts as damage only once an older step restores
        with the same `restore`: an error that every step shares (a state structure that
        changed with the config, say) skips nothing and starts nothing afresh, it raises. A
        `step` asked for is never replaced by another one. `set_aside`: move the damaged steps
        to WORKDIR/damaged_checkpoints/ (a resumed run would otherwise save over them, or keep
        them as its latest).

        Raises FileNotFoundError when there is no such checkpoint, CheckpointRestoreError when
        the step asked for, or every step, fails to restore.
        """
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"No checkpoint of step {step} in {self.directory}; "
                                    f"it has steps {steps}")
        failed: list[tuple[int, str]] = []
        first_error = None
        for s in [step] if step is not None else steps[::-1]:
            try:
                result = restore(s)
            except Exception as e:  # damage only if an older step restores (docstring)
                failed.append((s, _describe(e, self.step_dir(s))))
                first_error = first_error or e
                logging.warning("The checkpoint of step %d in %s could not be restored (%s)",
                                s, self.step_dir(s), failed[-1][1])
                continue
            if failed:
                logging.warning(
                    "The checkpoint of step %d in %s is damaged: falling back to step %d, %d "
                    "steps earlier (training from it repeats them)", failed[0][0],
                    self.step_dir(failed[0][0]), s, failed[0][0] - s)
                if set_aside:
                    self._set_aside([f for f, _ in failed])
            return s, result
        workdir = os.path.dirname(self.directory)
        errors = "; ".join(f"step {s}: {d}" for s, d in failed)
        if step is not None:
            raise CheckpointRestoreError(
                f"The checkpoint of step {step} in {self.step_dir(step)} could not be restored "
                f"({errors}). If the config changed since it was saved, use the config it was "
                "saved with; if its files are damaged, choose another step (the workdir has "
                f"steps {steps}) or delete that directory.") from first_error
        raise CheckpointRestoreError(
            f"No checkpoint in {workdir} could be restored (steps tried: "
            f"{', '.join(str(s) for s, _ in failed)}; {errors}). If the config changed since "
            "they were saved, use the config they were saved with; if their files are damaged, "
            f"delete those step directories in {self.directory} or choose another workdir."
        ) from first_error

    def _set_aside(self, steps: list[int]) -> None:
        """Moves the folders of `steps` to WORKDIR/damaged_checkpoints/ (process 0) and
        re-reads the steps (every process)."""
        if jax.process_index() == 0:
            target = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
            os.makedirs(target, exist_ok=True)
            for step in steps:
                path, n = os.path.join(target, str(step)), 0
                while os.path.exists(path):
                    n += 1
                    path = os.path.join(target, f"{step}.{n}")
                os.rename(self.step_dir(step), path)
                logging.warning("Moved the damaged checkpoint of step %d to %s", step, path)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("unimedi_jax.checkpoint.set_aside")
        self.manager.reload()

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
    return ml_collections.ConfigDict(files.read_json(path, what="run config"))


def load_pretrained(workdir: str, step: int | None = None, which: str = "params"
                    ) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of a pretraining workdir: the student ("params") or the "teacher".

    params = {"vision", "text", "img_proj", "txt_proj", "dino_head", "logit_scale"} as numpy
    arrays (the teacher has "vision" and "dino_head" only). `step` None: the newest checkpoint
    that restores (a warning names the damaged ones skipped); a damaged `step` raises
    CheckpointRestoreError. A run trained with scanned layers comes back unscanned, its config
    with model.vit.scan and model.text.scan off (`models.layout.convert`): the layout every
    consumer (downstream tasks, inference, export) reads.
    """
    config = load_config(workdir)
    state = Checkpointer(workdir, max_to_keep=None, asynchronous=False).restore_host(step)
    if which not in state:
        raise KeyError(f"checkpoint in {workdir} has no {which!r}; it has {sorted(state)}")
    if "model" not in config:  # not a pretraining run: nothing to convert
        return config, state[which]
    return layout.convert(config, state[which], scan=False)
