"""Entry point: `python -m unimedi_jax.main --config=configs/TASK.py --workdir=DIR`.

The config's `task` field names what runs (see `TASKS`); every config value can be overridden
on the command line, e.g. `--config.total_steps=100 --config.model.vit.dtype=bfloat16`.
"""

from __future__ import annotations

import importlib
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from unimedi_jax.train import checkpoint, sharding, validation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs; on clusters "
    "(SLURM, TPU pods) use --distributed instead and let JAX find its peers.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")

# task name -> "module:function(config, workdir)"
TASKS = {
    "pretrain": "unimedi_jax.train.trainer:train_and_evaluate",
    "linear_probe": "unimedi_jax.eval.linear_probe:run",
    "finetune": "unimedi_jax.eval.finetune:run",
    "segmentation": "unimedi_jax.eval.segmentation:run",
    "detection": "unimedi_jax.eval.detection:run",
    "retrieval": "unimedi_jax.eval.retrieval:run",
    "slice_selection": "unimedi_jax.eval.selection_eval:run",
    "zero_shot": "unimedi_jax.eval.zero_shot:run",
}


def run(config, workdir: str):
    """Runs the task named by `config.task`."""
    if config.task not in TASKS:
        raise ValueError(f"config.task={config.task!r} is unknown; known tasks: {sorted(TASKS)}")
    if config.task != "pretrain":  # pretraining validates its own config
        validation.validate_task_config(config)
    module, fn = TASKS[config.task].split(":")
    return getattr(importlib.import_module(module), fn)(config, workdir)


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
    """Joins a multi-process run (call before anything is compiled); CPU processes talk through
    gloo collectives."""
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    if _DISTRIBUTED.value or _COORDINATOR.value:
        initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    sharding.compile_cpu_collectives_afresh()
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except (checkpoint.CheckpointRestoreError, validation.ConfigError) as e:
        sys.exit(f"error: {e}")  # user errors: the message says what to fix


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
