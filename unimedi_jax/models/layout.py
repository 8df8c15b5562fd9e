"""The two parameter layouts of the encoders: one entry per layer, or layers stacked for `nn.scan`.

    ViT  (config.model.vit.scan):  blocks_0 .. blocks_{L-1}       <->  blocks (L, ...)
    BERT (config.model.text.scan): layer_0 .. layer_{L-1}         <->  layers_{a}_{b} (b - a, ...)
                                                                       + layer_{L-1}

`convert` turns a run's params and config from one layout into the other. Training runs in
the layout its config names (scan compiles one block body instead of L); a finished run's
params are read in the unscanned one (`train.checkpoint.load_pretrained`), which every consumer
expects (`ViT.intermediate_layers` needs scan=False).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from unimedi_jax.models import bert
from unimedi_jax.models import vit as vit_lib

VIT_STACK = "blocks"


def is_stacked(key: str) -> bool:
    """Whether a params key holds layers stacked along a leading axis (ViT or BERT)."""
    return key == VIT_STACK or bert.STACK_PATTERN.fullmatch(key) is not None


def text_scan_split(num_layers: int, trainable_layers: int) -> int:
    """`BertConfig.scan_split` keeping the frozen layers (all but the last `trainable_layers`;
    -1: none frozen) and the trained ones in separate stacks: the first trained layer, or 0
    where one stack holds only frozen or only trained layers."""
    first_trained = num_layers - trainable_layers if trainable_layers >= 0 else 0
    return first_trained if 0 < first_trained < num_layers - 1 else 0


def convert(config: ml_collections.ConfigDict, params: dict[str, Any], scan: bool
            ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(config, params) of a run -> (a copy of config with model.vit.scan and model.text.scan
    set to `scan`, params in that layout).

    params: the student {"vision", "text", ...} or any dict holding some of those (the teacher
    view {"vision", "dino_head"}); other entries pass through. Leaves are host (numpy) arrays or
    device arrays; stacking makes numpy. Converting there and back returns equal arrays.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.vit.scan = scan
    if "text" in config.model:
        config.model.text.scan = scan
    out = dict(params)
    if "vision" in out:
        out["vision"] = (vit_lib.stack_blocks if scan else vit_lib.unstack_blocks)(out["vision"])
    if "text" in out:
        text = bert.unstack_layers(out["text"])
        if scan:
            num_layers = len(bert.layer_ranges(text))
            split = text_scan_split(num_layers, config.model.text.trainable_layers)
            text = bert.stack_layers(text, bert.scan_ranges(num_layers, split))
        out["text"] = text
    return config, out
