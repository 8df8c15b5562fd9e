"""The pretraining job: data, sharded state, one jitted step, checkpoints, metrics, evaluation.

`train_and_evaluate(config, workdir)` is what `python -m unimedi_jax.main
--config=configs/pretrain.py --workdir=DIR` runs. Starting it again on the same workdir resumes
from the latest checkpoint (state, RNG, data iterator), so a killed run ends where an
uninterrupted one would; a damaged latest checkpoint is set aside for the newest intact one.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from unimedi_jax import files
from unimedi_jax.data import pipeline
from unimedi_jax.eval import pretrain_eval
from unimedi_jax.objective import methods, optim
from unimedi_jax.train import checkpoint as ckpt_lib
from unimedi_jax.train import report_cache
from unimedi_jax.train import sharding as shd
from unimedi_jax.train import validation
from unimedi_jax.train import writers

EVAL_SUMMARY = "eval_summary.json"
# Summary keys whose step-0 value the final summary repeats as `<key>_init` (did it learn?):
# these names and every key with one of these prefixes.
INIT_KEYS = ("slice_precision", "retrieval_r1", "retrieval_r1_findings")
INIT_PREFIXES = ("zero_shot_", "image_embedding_", "cls_")
EVAL_INIT = "eval_init.json"


class NonFiniteError(FloatingPointError):
    """Raised when the loss or the gradients stop being finite (config.on_nonfinite="stop")."""


class Prefetcher:
    """Reads batches on a thread and places them on the mesh, `size` steps ahead.

    Each item is (device batch, iterator state after that batch), so a checkpoint stores the
    state of exactly the batches the step consumed.
    """

    def __init__(self, iterator: Any, place: Callable[[Any], Any], size: int = 2):
        self._iterator, self._place = iterator, place
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                batch = next(self._iterator)
                self._offer((self._place(batch), self._iterator.get_state()))
        except BaseException as e:  # surfaced in the training thread
            self._offer(e)

    def _offer(self, item):
        """Queues item, giving up once the prefetcher is closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, timeout: float = 60.0):
        """Stops the thread and waits for it to finish the batch it is on, so the iterator can
        be closed afterwards without a read in flight."""
        self._stop.set()
        self._thread.join(timeout)


class _Preemption:
    """SIGTERM -> finish the current step, save a checkpoint, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _scalars(metrics: dict) -> dict:
    """The scalar entries of a metrics dict (vectors such as slice indices are dropped)."""
    return {k: v for k, v in metrics.items() if np.ndim(v) == 0}


def _check_finite(step: int, metrics: dict, on_nonfinite: str) -> None:
    if bool(metrics.get("finite", True)):
        return
    terms = ", ".join(f"{k}={float(v):.6g}" for k, v in _scalars(metrics).items()
                      if k.startswith("loss") or k.endswith("norm"))
    message = f"Non-finite loss or gradient at step {step}: {terms}"
    if on_nonfinite == "stop":
        raise NonFiniteError(message + " (set config.on_nonfinite='skip' to skip such updates)")
    logging.warning("%s: update skipped", message)


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) and evaluates; returns the final evaluation summary."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    validation.validate_pretrain_config(config)
    mesh = shd.make_mesh(config.mesh)
    validation.check_batch_divisible(config, shd.data_parallel_size(mesh))
    ckpt_lib.save_config(config, workdir) if jax.process_index() == 0 else None

    setup = methods.make_setup(config)      # config.method's model, optimizer, init, step fn
    # builds the phantom when missing
    data = pipeline.make_pretrain_data(config, setup.model.text_checkpoint)
    rng = jax.random.key(config.seed)
    init_rng, train_rng = jax.random.split(rng)

    abstract = jax.eval_shape(setup.init, init_rng, setup.text_params)
    state_sharding = shd.state_shardings(mesh, abstract)
    batch_sharding = shd.batch_sharding(mesh)
    repl = shd.replicated(mesh)

    # The locked text layers never change: written once (WORKDIR/frozen/), not in every step.
    frozen = [("params", *p) for p in optim.frozen_paths(abstract["params"], config)]
    checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                         frozen=frozen)
    if checkpointer.latest_step() is None:
        state = jax.jit(setup.init, out_shardings=state_sharding)(init_rng, setup.text_params)
        start, data_state = 0, None
    else:
        abstract_sharded = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
            state_sharding)
        # The newest checkpoint that restores; damaged newer ones are moved aside.
        start, (state, data_state, _) = checkpointer.restore_intact(
            lambda step: checkpointer.restore(step, abstract_sharded), set_aside=True)
        logging.info("Resuming from the checkpoint of step %d in %s", start, workdir)
    checkpointer.save_frozen(state)
    train_iter = data.train_iterator()
    if data_state is not None:
        train_iter.set_state(data_state)

    update = jax.jit(setup.train_step, in_shardings=(state_sharding, batch_sharding, repl),
                     out_shardings=(state_sharding, repl), donate_argnums=(0,))
    writer = writers.Writer(workdir, resume_step=start)
    # The evaluators are compiled once (`eval.features`) and run on the training mesh: the
    # params where training left them, each evaluation batch split over the data axes.
    def evaluate(s) -> dict:
        tick = time.time()
        out = pretrain_eval.evaluate(s["params"], config, data.val_ct, data.val_xray,
                                     data.train_ct, mesh=mesh)
        return {**out, "eval_wall_s": time.time() - tick}

    summary_init = _initial_eval(workdir, start, state, evaluate, writer)
    # The locked text tower's features of every training report, once (from the state's text
    # params, so a resumed run uses what it trained with).
    cache = (report_cache.for_training(config, setup.model,
                                       shd.to_host(state["params"]["text"]), data)
             if methods.has_text(config) else None)
    if cache is not None:
        logging.info("Report cache: %d distinct training reports encoded once", len(cache))
    attach = cache.attach if cache is not None else (lambda b: b)
    prefetch = Prefetcher(train_iter, lambda b: shd.put_batch(attach(b), mesh),
                          config.data.prefetch)
    preemption = _Preemption()
    progress = _progress(config.total_steps, start)
    t0, steps_timed, compile_s = time.time(), 0, None
    previous = None  # (step, metrics) of the previous step, checked one step late: no stall
    step = start
    try:
        while step < config.total_steps and not preemption.requested:
            batch, data_state = next(prefetch)
            tick = time.time()
            with jax.set_mesh(mesh):  # the model's activation sharding constraints name it
                state, metrics = update(state, batch, jax.random.fold_in(train_rng, step))
            step += 1
            if compile_s is None:
                jax.block_until_ready(metrics)
                compile_s = time.time() - tick
                t0, steps_timed = time.time(), 0
            steps_timed += 1
            # One step late (no stall), and one device scalar unless it says non-finite.
            if previous is not None and not bool(shd.to_host(previous[1]["finite"])):
                _check_finite(previous[0], shd.to_host(previous[1]), config.on_nonfinite)
            previous = (step, metrics)
            if step % config.log_every_steps == 0 or step == config.total_steps:
                host = shd.to_host(metrics)
                _check_finite(step, host, config.on_nonfinite)
                rate = steps_timed / max(time.time() - t0, 1e-9)
                writer.write_scalars(step, {**_scalars(host), "steps_per_s": rate,
                                            "compile_s": compile_s})
                progress.set_postfix(loss=f"{float(host['loss']):.4f}", refresh=False)
            progress.update(1)
            if step % config.checkpoint_every_steps == 0 or step == config.total_steps:
                _check_finite(step, shd.to_host(metrics), config.on_nonfinite)
                checkpointer.save(step, state, data_state, {"compile_s": compile_s})
            if config.eval_every_steps and step % config.eval_every_steps == 0 \
                    and step < config.total_steps:
                writer.write_scalars(step, {f"eval/{k}": v for k, v in evaluate(state).items()})
        if preemption.requested and step < config.total_steps:
            if step > start:  # else nothing new since the checkpoint (or start) it resumes from
                _check_finite(step, shd.to_host(metrics), config.on_nonfinite)
                checkpointer.save(step, state, data_state, {"compile_s": compile_s})
                checkpointer.wait()
            logging.warning("Stopped at step %d after SIGTERM; rerun the command to resume", step)
            return {}
    finally:
        progress.close()
        prefetch.close()
        getattr(train_iter, "close", lambda: None)()  # stops Grain worker processes
        preemption.restore()
        checkpointer.wait()
        writer.flush()

    summary = {}
    if config.eval_at_end:
        summary = evaluate(state)
        summary.update({f"{k}_init": v for k, v in summary_init.items()
                        if k in INIT_KEYS or k.startswith(INIT_PREFIXES)})
        summary["final_step"] = step
        writer.write_scalars(step, {f"eval/{k}": v for k, v in summary.items()})
        if jax.process_index() == 0:
            _write_json(os.path.join(workdir, EVAL_SUMMARY), summary)
            print(format_summary(summary))
    writer.close()
    checkpointer.close()
    return summary


def _initial_eval(workdir, start, state, evaluate, writer) -> dict:
    """Evaluates the model before training (kept on disk so a resumed run still has it)."""
    path = os.path.join(workdir, EVAL_INIT)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if start != 0:
        return {}
    summary = evaluate(state)
    writer.write_scalars(0, {f"eval/{k}": v for k, v in summary.items()})
    if jax.process_index() == 0:
        _write_json(path, summary)
    return summary


def _write_json(path: str, obj: dict) -> None:
    files.write_text(path, json.dumps({k: (float(v) if np.ndim(v) == 0 else
                                          np.asarray(v).tolist()) for k, v in obj.items()},
                                      indent=2))


def format_summary(summary: dict) -> str:
    """A short table of the evaluation summary."""
    width = max(len(k) for k in summary)
    rows = [f"{k:<{width}}  {float(v):.4f}" for k, v in summary.items() if np.ndim(v) == 0]
    line = "-" * (width + 10)
    return "\n".join([line, "evaluation", line, *rows, line])
