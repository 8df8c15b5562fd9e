"""Writes a pretraining run's encoders as PyTorch-loadable files.

Layout of the output folder OUT:

    vision.safetensors  the ViT under timm `VisionTransformer` names (2D path; the learned 2D
                        modality embedding is folded into `pos_embed`, whose CLS row is zero),
                        plus the 3D tokenizer and the mask embedding:
                          patch_embed_3d.proj.weight (C, 1, pd, ph, pw), .bias (C,)
                          pos_embed_3d (1, d*h*w, C), depth-major, 3D modality embedding folded in
                          mask_token (1, 1, C) (training only)
    text/               Hugging Face BERT folder (config.json, model.safetensors, tokenizer files):
                        `transformers.BertModel.from_pretrained(OUT/text, add_pooling_layer=False)`
    heads.safetensors   img_proj.weight (proj_dim, C), txt_proj.weight (proj_dim, text width)
                        (torch `Linear` layout, no bias) and logit_scale () = log of the
                        similarity multiplier used at inference (clamp or fixed temperature applied)
    config.json         {"vision": {img_size, patch_size, in_chans, embed_dim, depth, num_heads,
                        mlp_ratio, patch_size_3d, volume_size, ...}, "text": {max_length, ...},
                        "heads": {proj_dim, ...}, "preprocessing": {...}, "source": {...},
                        "method": config.method}

A run of a method without language (config.method "joint", "drasclr") has no text tower and no
heads: its folder holds vision.safetensors and config.json ("text" and "heads" null).

The 2D path loads into `timm.models.vision_transformer.VisionTransformer(img_size, patch_size,
in_chans=1, num_classes=0, global_pool="token", embed_dim, depth, num_heads, mlp_ratio)` once the
keys of `vision.TIMM_3D_KEYS` are filtered out; `torch_model.UniMedIVisionTorch` loads everything.
The folder is written to a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from unimedi_jax import inference
from unimedi_jax.data import preprocess
from unimedi_jax.export import vision as vision_export
from unimedi_jax.models import bert
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.objective import methods
from unimedi_jax.objective.step import logit_scale
from unimedi_jax.train import checkpoint

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VISION_FILE = "vision.safetensors"
HEADS_FILE = "heads.safetensors"
TEXT_DIR = "text"
LAYER_NORM_EPS = 1e-6  # models/vit.py: LayerNorm epsilon of the blocks and the final norm
# safetensors metadata that tells Hugging Face / timm loaders the tensors use torch layouts.
SAFETENSORS_METADATA = {"format": "pt"}


def _mlp_ratio(vit) -> float:
    """vit.mlp_dim / vit.width, checked to give timm's `int(embed_dim * mlp_ratio)` back."""
    ratio = vit.mlp_dim / vit.width
    if int(vit.width * ratio) != vit.mlp_dim:
        raise ValueError(f"mlp_dim={vit.mlp_dim} is not expressible as a timm mlp_ratio of "
                         f"width={vit.width}")
    return ratio


def export_config(config, model: UniMedI, source: dict) -> dict:
    """The content of OUT/config.json for a run `config` and its `model`."""
    vit = model.vit
    text = methods.has_text(config)
    return {
        "format_version": FORMAT_VERSION,
        "vision": {
            "img_size": vit.image_size, "patch_size": vit.patch_size, "in_chans": 1,
            "embed_dim": vit.width, "depth": vit.depth, "num_heads": vit.num_heads,
            "mlp_ratio": _mlp_ratio(vit), "patch_size_3d": list(vit.patch_size_3d),
            "volume_size": list(vit.volume_size), "qkv_bias": True, "class_token": True,
            "global_pool": "token", "layer_norm_eps": LAYER_NORM_EPS,
            "extra_keys": list(vision_export.TIMM_3D_KEYS),
        },
        "method": methods.name(config),
        "text": None if not text else {
            "max_length": int(config.model.text.max_length),
            "hidden_size": model.text.config.hidden_size,
            "num_layers": model.text.config.num_hidden_layers,
            # the report feature: the final [CLS] state ("cls") or the mean of the final states
            # over the attended tokens ("mean"), as `UniMedI.encode_text`
            "pooling": model.text_pooling,
            "folder": TEXT_DIR,
        },
        "heads": {"proj_dim": int(config.model.proj_dim), "normalize": "l2"} if text else None,
        "preprocessing": {
            "xray": {"scale": preprocess.XRAY_FULL_SCALE, "mean": preprocess.XRAY_MEAN,
                     "std": preprocess.XRAY_STD, "crop": vit.image_size},
            "ct": {"hu_min": preprocess.CT_HU_MIN, "hu_max": preprocess.CT_HU_MAX,
                   "crop": list(vit.volume_size)},
        },
        "source": source,
    }


def heads_state_dict(params: dict, config) -> dict[str, np.ndarray]:
    """Projection heads in torch `Linear` layout and the inference log logit scale."""
    scale = np.log(np.asarray(logit_scale(params, config.objective.clip), np.float32))
    return {
        "img_proj.weight": np.ascontiguousarray(np.asarray(params["img_proj"]["proj"]["kernel"]).T),
        "txt_proj.weight": np.ascontiguousarray(np.asarray(params["txt_proj"]["proj"]["kernel"]).T),
        "logit_scale": np.asarray(scale, np.float32),
    }


def check_output(output: str | os.PathLike, overwrite: bool) -> Path:
    """The output folder as a Path; an error if it is a file, or non-empty without overwrite."""
    output = Path(output).expanduser().absolute()
    if output.exists():
        if not output.is_dir():
            raise FileExistsError(f"--output={output} exists and is not a folder")
        if any(output.iterdir()) and not overwrite:
            raise FileExistsError(f"--output={output} is not empty; pass --overwrite to replace it")
    return output


def _write_folder(folder: Path, config, model: UniMedI, params: dict, source: dict) -> None:
    vit_params = params["vision"]
    save_file(vision_export.timm_state_dict(vit_params, model.vit.depth),
              str(folder / VISION_FILE), metadata=SAFETENSORS_METADATA)
    if methods.has_text(config):
        bert.save_pretrained(params["text"], model.text.config, folder / TEXT_DIR,
                             tokenizer_folder=model.text_checkpoint)
        save_file(heads_state_dict(params, config), str(folder / HEADS_FILE),
                  metadata=SAFETENSORS_METADATA)
    text = json.dumps(export_config(config, model, source), indent=2) + "\n"
    (folder / CONFIG_FILE).write_text(text, encoding="utf-8")


def write_export(config, params: dict, output: str | os.PathLike, overwrite: bool = False,
                 source: dict | None = None) -> Path:
    """Writes the export of (run config, params) to `output` atomically; returns its path.

    params: the student dict of `models.unimedi` (numpy or jax arrays). An existing non-empty
    `output` is replaced only with `overwrite`, and only once the new folder is complete.
    """
    output = check_output(output, overwrite)
    required = (inference.REQUIRED_PARAMS if methods.has_text(config)
                else inference.VISION_PARAMS)
    missing = [k for k in required if k not in params]
    if missing:
        raise KeyError(f"params lack {missing} (the export needs the student parameters)")
    params = jax.tree.map(np.asarray, params)
    model = UniMedI.from_config(config)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        _write_folder(tmp, config, model, params, source or {})
        check_output(output, overwrite)  # nothing appeared meanwhile
        if output.exists() and any(output.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old)
        else:
            os.replace(tmp, output)  # replaces an empty folder too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def export(workdir: str | os.PathLike, output: str | os.PathLike, step: int | None = None,
           overwrite: bool = False) -> Path:
    """Exports checkpoint `step` (default: the latest) of a pretraining `workdir` to `output`."""
    check_output(output, overwrite)  # fail before the (slow) restore
    workdir, step = inference.resolve_checkpoint(workdir, step)
    config, params = checkpoint.load_pretrained(str(workdir), step)
    return write_export(config, params, output, overwrite,
                        source={"workdir": str(workdir), "step": step})
