"""Metric writing: always `WORKDIR/metrics.jsonl`, plus TensorBoard when available.

clu's metric writers import TensorFlow; with the `tensorboard` extra installed they add
TensorBoard event files under WORKDIR. Without it the run writes JSON lines and logs.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from unimedi_jax import files

METRICS_FILE = "metrics.jsonl"


def _scalar(v: Any) -> float | int:
    v = np.asarray(v)
    return v.item() if v.size == 1 else float(v.mean())


class Writer:
    """write_scalars(step, dict) to metrics.jsonl (+ TensorBoard); only process 0 writes."""

    def __init__(self, workdir: str, resume_step: int | None = None):
        """resume_step: drop rows after this step (written before a kill, about to be redone)."""
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            rows = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
            files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self._file = open(self.path, "a", buffering=1)
        try:
            from clu import metric_writers  # needs tensorflow
            self._tb = metric_writers.create_default_writer(workdir, asynchronous=True)
        except ImportError:
            logging.info("TensorBoard writer unavailable (pip install -e '.[tensorboard]'); "
                         "metrics go to %s", self.path)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step)}
        for k, v in scalars.items():
            x = _scalar(v)
            row[k] = x if isinstance(x, int) or math.isfinite(x) else str(x)
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            self._tb.write_scalars(step, {k: v for k, v in row.items()
                                          if k != "step" and not isinstance(v, str)})

    def flush(self) -> None:
        if self.active:
            self._file.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.active:
            self.flush()
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl (for plots and tests)."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]
