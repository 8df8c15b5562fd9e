"""The pretraining methods the trainer runs, by `config.method` (docs/DESIGN.md §4, §4.8-4.9).

Each method module exposes `make_setup(config) -> step.Setup` on the same mixed-dimension ViT
(params["vision"]), so every encoder loads in `inference`, the downstream tasks and the export
alike:
- "unimedi" (`objective.step`): language-guided slice selection and self-distillation (§4);
- "joint" (`objective.joint`): 2D/3D intra-inter contrastive clustering, no text (§4.8);
- "drasclr" (`objective.drasclr`): anatomy-conditioned 3D contrastive learning, no text (§4.9).
"""

from __future__ import annotations

from unimedi_jax.objective import drasclr, joint, step

METHODS = {"unimedi": step, "joint": joint, "drasclr": drasclr}
WITH_TEXT = ("unimedi",)  # the methods that train on reports (zero-shot and retrieval apply)


def name(config) -> str:
    """config.method ("unimedi" for configs saved before the key); ValueError when unknown."""
    method = config.get("method", "unimedi")
    if method not in METHODS:
        raise ValueError(f"config.method={method!r}; choose one of {sorted(METHODS)}")
    return method


def has_text(config) -> bool:
    """Whether the method trains a text tower and CLIP heads (zero-shot, retrieval)."""
    return name(config) in WITH_TEXT


def make_setup(config, random_text: bool = False) -> step.Setup:
    """The model, optimiser, init and train step of `config.method`."""
    method = name(config)
    if method == "unimedi":
        return step.make_setup(config, random_text)
    return METHODS[method].make_setup(config)
