"""The EMA teacher update (DINO; paper §3.4)."""

from __future__ import annotations

from typing import Any, Mapping

import jax

PyTree = Any


def ema_update(teacher: Mapping[str, PyTree], student: Mapping[str, PyTree], m) -> dict:
    """m * teacher + (1 - m) * student over the teacher's subtrees.

    teacher: {"vision", "dino_head"} (any subset of the student's top-level keys); student: the
    full parameter dict, of which only the teacher's keys are read. m: scalar momentum.
    """
    missing = set(teacher) - set(student)
    if missing:
        raise KeyError(f"student params lack the teacher's subtrees {sorted(missing)}")
    return {k: jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, teacher[k], student[k])
            for k in teacher}
