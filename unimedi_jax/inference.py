"""Inference with a pretrained UniMedI: encode X-rays, CT volumes and reports; select CT slices.

    from unimedi_jax import inference
    from unimedi_jax.data import preprocess

    enc = inference.load("/tmp/unimedi")       # a workdir, or WORKDIR/checkpoints/<step>
    x = preprocess.preprocess_xray(stored_uint8_images, enc.image_size)    # (B, S, S)
    probs = enc.zero_shot(x, ["no finding", "pleural effusion"])          # (B, 2)

Inputs are model inputs (float32, normalised by `data.preprocess`); outputs are numpy float32.
Every encoder runs jitted, in zero-padded chunks of `batch_size` samples (or of the power of two
at or above a smaller input's size), so few input shapes are ever compiled.

CT embeddings follow the run's training form: with slice selection on (`objective.selection.
mode` not "none") a volume is encoded as `[CLS, 3D tokens, 2D tokens of its top-k slices]`,
the k slices chosen by this encoder's own CLS attention (Eq. 1-2; `select_slices`). Pass
`slices=0` to encode the volume alone.

Files go in through `read` and the `*_files` methods, which preprocess them as the run's data
builders and evaluation pipeline did (`unimedi_jax.scans`, `Encoder.recipe`):

    z = enc.embed_files(["scan.nii.gz", "dicom_series/", "cxr.png"])   # (3, proj_dim)
    slabs = enc.select_slices_file("scan.nii.gz", k=4)    # slice ranges of the original file
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unimedi_jax import scans
from unimedi_jax.data import text as text_lib
from unimedi_jax.eval import zero_shot as zero_shot_lib
from unimedi_jax.models import bundle
from unimedi_jax.models.layers import l2_normalize
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.objective import methods, selection
from unimedi_jax.objective.step import logit_scale
from unimedi_jax.train import checkpoint

Array = jax.Array
DEFAULT_BATCH_SIZE = 32  # samples per jitted call: memory against per-call overhead
REQUIRED_PARAMS = ("vision", "text", "img_proj", "txt_proj", "logit_scale")
VISION_PARAMS = ("vision",)  # a method without language (`objective.methods.has_text`)


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[Path, int]:
    """(workdir, step) of a workdir (latest step unless `step`) or a WORKDIR/checkpoints/<step>."""
    path = Path(path).expanduser().absolute()
    expected = (f"expected a unimedi_jax workdir ({checkpoint.CONFIG_FILE} and "
                f"{checkpoint.CHECKPOINT_DIR}/ written by training) or one of its "
                f"{checkpoint.CHECKPOINT_DIR}/<step> folders")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist or is not a folder: {expected}")
    if path.parent.name == checkpoint.CHECKPOINT_DIR and path.name.isdigit():
        if step is not None and step != int(path.name):
            raise ValueError(f"step={step} contradicts the checkpoint folder {path}")
        path, step = path.parent.parent, int(path.name)
    if not (path / checkpoint.CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {checkpoint.CONFIG_FILE}: {expected}")
    folder = path / checkpoint.CHECKPOINT_DIR
    steps = sorted(int(p.name) for p in folder.iterdir()
                   if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{folder} holds no checkpoint: {expected}")
    if step is None:
        return path, steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"{folder} has no checkpoint of step {step}; it has {steps}")
    return path, step


def load(workdir_or_checkpoint: str | os.PathLike, step: int | None = None,
         batch_size: int = DEFAULT_BATCH_SIZE) -> Encoder:
    """The Encoder of a pretraining workdir's checkpoint (latest unless `step` or a step folder),
    or of a bundled checkpoint by name (`models.bundle.names()`, e.g. "phantom-default")."""
    if bundle.is_name(workdir_or_checkpoint):
        if step is not None:
            raise ValueError(f"step={step}: a bundled checkpoint ({workdir_or_checkpoint!r}) "
                             "holds one step")
        loaded = bundle.read(os.fspath(workdir_or_checkpoint))
        return Encoder.from_params(loaded.config, loaded.params, batch_size)
    workdir, step = resolve_checkpoint(workdir_or_checkpoint, step)
    config = checkpoint.load_config(str(workdir))
    if "model" not in config:
        raise ValueError(f"{workdir / checkpoint.CONFIG_FILE} has no 'model' section: not the "
                         "config of a pretraining run")
    config, params = checkpoint.load_pretrained(str(workdir), step)  # unscanned, as its config
    return Encoder.from_params(config, params, batch_size)


# Jitted bodies; `model` (a hashable UniMedI) is static, so encoders of one model share compiles.

@functools.partial(jax.jit, static_argnums=0, static_argnames=("k", "mode", "layers"))
def _choose_slices(model: UniMedI, params: dict, volume: Array, *, k: int, mode: str,
                   layers: int = 0) -> tuple[Array, Array, Array]:
    """Volumes (B, D, H, W) -> top-k slices (B, k, H, W), slab indices (B, k), scores (B, d)."""
    _, out = model.encode_image(params, volume=volume)
    scores = selection.volume_slab_scores(out, layers)
    slices, indices = selection.select_slices(volume, scores, k, mode, model.vit.patch_size_3d[0])
    return slices, indices, scores


@functools.partial(jax.jit, static_argnums=0, static_argnames=("slices", "mode", "layers"))
def _image_cls(model: UniMedI, params: dict, x: Array, *, slices: int, mode: str,
               layers: int = 0) -> Array:
    """X-rays (B, H, W), or volumes (B, D, H, W) joined by their top `slices` slices -> CLS."""
    if x.ndim == 3:
        inputs = {"images": x}
    elif slices:
        inputs = {"volume": x, "images": _choose_slices(model, params, x, k=slices, mode=mode,
                                                           layers=layers)[0]}
    else:
        inputs = {"volume": x}
    return model.encode_image(params, **inputs)[0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _image_embedding(model: UniMedI, params: dict, cls: Array) -> Array:
    return l2_normalize(model.project_image(params, cls))


@functools.partial(jax.jit, static_argnums=0)
def _text_embedding(model: UniMedI, params: dict, input_ids: Array, attention_mask: Array
                    ) -> Array:
    return l2_normalize(model.project_text(params, model.encode_text(params, input_ids,
                                                                      attention_mask)))


def _as_batch(x, ndim: int, name: str, layout: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != ndim:
        raise ValueError(f"{name} expects {layout}, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} got an empty batch")
    return x


class Encoder:
    """A pretrained UniMedI: image, volume and report encoders and the shared embedding space.

    Build with `load(workdir)` or `Encoder.from_params(config, params)`. `encode_*` give
    final-norm CLS features, `embed_*` and `encode_report` unit vectors of the shared space.
    The encoder of a method without language (config.method "joint", "drasclr") has the
    `encode_*` features and slice scores only: the shared space needs a UniMedI run.
    """

    def __init__(self, model: UniMedI, params: dict, tokenizer, config,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.config = config
        self.params = jax.device_put(params)
        self.max_length = int(config.model.text.max_length)
        self.method = methods.name(config)
        self.has_text = methods.has_text(config)
        sel = config.objective.selection
        self.slice_mode = sel.slice_mode
        self.slice_layers = int(sel.get("layers", 0))  # configs saved before the key: all
        # A CT's training form: joined with its selected slices in UniMedI only.
        self.default_slices = 0 if sel.mode == "none" or not self.has_text else int(sel.k)
        self.logit_scale = (float(logit_scale(self.params, config.objective.clip))
                            if self.has_text else None)

    @classmethod
    def from_params(cls, config, params: dict, batch_size: int = DEFAULT_BATCH_SIZE) -> Encoder:
        """From a run config and its student params (`models.unimedi` layout; {"vision", ...}
        for a method without language)."""
        required = REQUIRED_PARAMS if methods.has_text(config) else VISION_PARAMS
        missing = [k for k in required if k not in params]
        if missing:
            raise KeyError(f"params lack {missing}; the Encoder needs the student parameters "
                           f"{list(required)}")
        model = UniMedI.from_config(config)
        tokenizer = (text_lib.load_tokenizer(model.text_checkpoint)
                     if methods.has_text(config) else None)
        return cls(model, jax.tree.map(jnp.asarray, params), tokenizer, config, batch_size)

    @property
    def image_size(self) -> int:
        return self.model.vit.image_size

    @property
    def volume_size(self) -> tuple[int, ...]:
        return tuple(self.model.vit.volume_size)

    def _batched(self, fn: Callable, *arrays: np.ndarray, **static):
        """fn(model, params, *chunks, **static) over chunks of the leading axis -> numpy.

        Chunks hold batch_size samples, or the power of two >= n below that, zero-padded: at
        most log2(batch_size) + 1 shapes are ever compiled.
        """
        n = arrays[0].shape[0]
        size = min(self.batch_size, 1 << (n - 1).bit_length())
        outs = []
        for start in range(0, n, size):
            chunks = [a[start:start + size] for a in arrays]
            valid = chunks[0].shape[0]
            chunks = [np.concatenate([c, np.zeros((size - valid,) + c.shape[1:], c.dtype)])
                      for c in chunks]
            out = fn(self.model, self.params, *chunks, **static)
            outs.append(jax.tree.map(lambda a: np.asarray(a)[:valid], out))
        return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)

    def _check_k(self, k: int, depth: int, name: str) -> int:
        """k as an int, checked against the depth-wise slab count of a volume of depth `depth`."""
        slabs = depth // self.model.vit.patch_size_3d[0]
        if not 0 <= k <= slabs:
            raise ValueError(f"{name}={k} is outside 0..{slabs} (the slabs of a depth-{depth} "
                             "volume)")
        return int(k)

    def _ct_slices(self, slices: int | None, volumes: np.ndarray) -> int:
        k = self.default_slices if slices is None else slices
        return self._check_k(k, volumes.shape[1], "slices")

    # ---------------- public API ----------------

    def encode_xray(self, images) -> np.ndarray:
        """X-rays float32 (B, H, W) -> final-norm CLS features (B, width)."""
        images = _as_batch(images, 3, "encode_xray", "images (B, H, W)")
        return self._batched(_image_cls, images, slices=0, mode=self.slice_mode,
                             layers=self.slice_layers)

    def encode_ct(self, volumes, slices: int | None = None) -> np.ndarray:
        """CT volumes float32 (B, D, H, W) -> final-norm CLS features (B, width).

        slices: top-k slices joined to the volume (default: the run's training form; 0 = none).
        """
        volumes = _as_batch(volumes, 4, "encode_ct", "volumes (B, D, H, W)")
        return self._batched(_image_cls, volumes, slices=self._ct_slices(slices, volumes),
                             mode=self.slice_mode, layers=self.slice_layers)

    def _need_text(self, what: str) -> None:
        if not self.has_text:
            raise ValueError(f"{what} needs the image-report space, which a {self.method!r} run "
                             "(no language) does not train; encode_xray / encode_ct give its "
                             "backbone features")

    def _embed(self, cls: np.ndarray) -> np.ndarray:
        self._need_text("embed_xray / embed_ct")
        return self._batched(_image_embedding, cls)

    def embed_xray(self, images) -> np.ndarray:
        """X-rays (B, H, W) -> projected, L2-normalised embeddings (B, proj_dim)."""
        return self._embed(self.encode_xray(images))

    def embed_ct(self, volumes, slices: int | None = None) -> np.ndarray:
        """CT volumes (B, D, H, W) -> projected, L2-normalised embeddings (B, proj_dim)."""
        return self._embed(self.encode_ct(volumes, slices))

    def encode_report(self, texts: str | Sequence[str]) -> np.ndarray:
        """Reports -> projected, L2-normalised text embeddings (B, proj_dim) ((proj_dim,) for one).

        Tokenised with the run's tokenizer to `max_length` tokens (longer reports truncated).
        """
        self._need_text("encode_report")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if not texts:
            raise ValueError("encode_report got no texts")
        tokens = text_lib.tokenize(self.tokenizer, texts, self.max_length)
        emb = self._batched(_text_embedding, tokens["input_ids"], tokens["attention_mask"])
        return emb[0] if single else emb

    def similarity(self, image_emb, text_emb) -> np.ndarray:
        """Logit-scaled cosine similarity (B, P) of image (B, E) and text (P, E) embeddings."""
        a, b = (np.asarray(l2_normalize(x)) for x in (image_emb, text_emb))
        return np.float32(self.logit_scale) * a @ b.T

    def zero_shot(self, images_or_volumes, prompts: Sequence[str]) -> np.ndarray:
        """Class probabilities (B, P) of X-rays (B, H, W) or volumes (B, D, H, W) over prompts."""
        x = np.asarray(images_or_volumes, np.float32)
        if x.ndim not in (3, 4):
            raise ValueError(f"zero_shot expects X-rays (B, H, W) or volumes (B, D, H, W), got "
                             f"shape {x.shape}")
        image = self.embed_xray(x) if x.ndim == 3 else self.embed_ct(x)
        logits = self.similarity(image, self.encode_report(list(prompts)))
        logits = logits - logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        return probs / probs.sum(axis=-1, keepdims=True)

    def select_slices(self, volume, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k slabs of volumes (D, H, W) or (B, D, H, W) by CLS attention (paper Eq. 1-2).

        Returns slab indices ([B,] k) int32, best first, and the slab scores ([B,] d); slab i
        covers slices [i*pd, (i+1)*pd) of the volume, pd = the 3D patch depth.
        """
        x = np.asarray(volume, np.float32)
        single = x.ndim == 3
        x = _as_batch(x[None] if single else x, 4, "select_slices",
                      "a volume (D, H, W) or (B, D, H, W)")
        if k < 1:
            raise ValueError(f"select_slices needs k >= 1, got {k}")
        _, indices, scores = self._batched(_choose_slices, x, k=self._check_k(k, x.shape[1], "k"),
                                          mode=self.slice_mode, layers=self.slice_layers)
        return (indices[0], scores[0]) if single else (indices, scores)

    # ---------------- files ----------------

    @functools.cached_property
    def recipe(self) -> scans.Recipe:
        """The run's file preprocessing: its stored sizes and HU window, this model's sizes."""
        return scans.Recipe.from_config(self.config, self.image_size, self.volume_size)

    def read(self, path: str | os.PathLike, modality: str | None = None
             ) -> tuple[str, np.ndarray]:
        """(modality, model input) of a CT or X-ray file, preprocessed as the run's data
        (`scans.read`); `modality` None: told by the file type."""
        return scans.read(path, self.recipe, modality)

    def embed_inputs(self, inputs: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
        """(modality, model input) pairs, as `read` gives -> embeddings (N, proj_dim), in order."""
        if not inputs:
            raise ValueError("embed_inputs got no inputs")
        parts = {}
        for modality, embed in (("xray", self.embed_xray), ("ct", self.embed_ct)):
            rows = [i for i, (m, _) in enumerate(inputs) if m == modality]
            if rows:
                parts[modality] = (rows, embed(np.stack([inputs[i][1] for i in rows])))
        unknown = sorted({m for m, _ in inputs} - set(parts))
        if unknown:
            raise ValueError(f"embed_inputs: unknown modalities {unknown}; expected ct, xray")
        out = np.empty((len(inputs), next(iter(parts.values()))[1].shape[1]), np.float32)
        for rows, emb in parts.values():
            out[rows] = emb
        return out

    def embed_files(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """CT and X-ray files (any mix) -> embeddings (N, proj_dim), in the order given."""
        return self.embed_inputs([self.read(p) for p in paths])

    def score_findings(self, embeddings, prompts) -> np.ndarray:
        """Zero-shot scores (N, F) of image embeddings (N, proj_dim) for F findings.

        prompts: {finding: (positives, negatives)}, each side a sentence or a tuple of
        sentences (a prompt ensemble, configs/prompts.py); columns in the order of the keys.
        A score is the cosine with the mean positive embedding minus that with the mean
        negative one, as the run's zero-shot evaluation (`eval.zero_shot`).
        """
        self._need_text("score_findings")
        _, positive, negative = zero_shot_lib.prompt_embeddings(self.model, self.params, prompts,
                                                                self.max_length)
        return zero_shot_lib.prompt_scores(embeddings, positive, negative).astype(np.float32)

    def zero_shot_files(self, paths: Sequence[str | os.PathLike], prompts) -> np.ndarray:
        """Zero-shot scores (N, F) of files for the findings of `prompts` (`score_findings`)."""
        return self.score_findings(self.embed_files(paths), prompts)

    def select_slices_file(self, path: str | os.PathLike, k: int) -> list[scans.NativeSlab]:
        """The top-k slabs of a CT file (`select_slices`), best first, as slice ranges of the
        original file: native indices along its own voxel axis (`scans.NativeSlab`)."""
        volume, layout = scans.read_ct_layout(path, self.recipe)
        slabs, scores = self.select_slices(volume, k)
        return scans.native_slabs(layout, self.recipe, slabs, scores[slabs],
                                  self.model.vit.patch_size_3d[0])
