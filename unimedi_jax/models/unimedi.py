"""The UniMedI model: the mixed-dimension ViT, the BERT text encoder and the heads (DESIGN §2-4).

Parameters form one dict

    {"vision": ViT, "text": BERT, "img_proj", "txt_proj": CLIP projections,
     "dino_head": DINO head, "logit_scale": log of the CLIP logit multiplier (scalar)}

and the EMA teacher is the view `teacher_params(params)` = {"vision", "dino_head"}; every method
taking `params` accepts the student dict or the teacher view where it needs only those keys.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from unimedi_jax.models import bert
from unimedi_jax.models import heads
from unimedi_jax.models import layout
from unimedi_jax.models import vit as vit_lib

Array = jax.Array
TEACHER_KEYS = ("vision", "dino_head")
TEXT_POOLING = ("cls", "mean")  # model.text.pooling: the report feature of the text encoder


def teacher_params(params: dict) -> dict:
    """The teacher's view of a parameter dict: {"vision", "dino_head"}."""
    return {k: params[k] for k in TEACHER_KEYS}


def _text_config(cfg) -> tuple[str, bert.BertConfig]:
    """(checkpoint folder, BertConfig) of `config.model.text`, without reading the weights.

    `scan` (configs saved before the key: off) scans the layers but the last in two stacks,
    split where `trainable_layers` starts (`layout.text_scan_split`), so that frozen and
    trained layers never share a leaf."""
    folder = str(Path(cfg.checkpoint).expanduser()) if cfg.checkpoint else bert.default_checkpoint()
    dtype = jnp.dtype(cfg.get("dtype", "float32"))  # configs saved before the key: float32
    text = bert.BertConfig.from_json(Path(folder) / bert.CONFIG_NAME, dtype=dtype)
    if cfg.num_layers:
        if not 1 <= cfg.num_layers <= text.num_hidden_layers:
            raise ValueError(f"model.text.num_layers={cfg.num_layers} is outside "
                             f"1..{text.num_hidden_layers} (the layers of {folder})")
        text = dataclasses.replace(text, num_hidden_layers=cfg.num_layers)
    if cfg.get("scan", False):
        split = layout.text_scan_split(text.num_hidden_layers, cfg.trainable_layers)
        text = dataclasses.replace(text, scan=True, scan_split=split)
    return folder, text


@dataclasses.dataclass(frozen=True)
class UniMedI:
    """Module definitions (no parameters): build with `UniMedI.from_config(config)`."""

    vit: vit_lib.ViT
    text: bert.BertModel
    img_proj: heads.Projection
    txt_proj: heads.Projection
    dino_head: heads.DINOHead
    text_checkpoint: str
    temperature: float  # initial CLIP temperature: logit_scale starts at log(1 / temperature)
    text_pooling: str = "cls"  # TEXT_POOLING: [CLS] output, or mean over the report's tokens

    @classmethod
    def from_config(cls, config) -> UniMedI:
        """Reads config.model (vit, text, proj_dim, dino) and objective.clip.temperature.

        The text encoder's architecture comes from the checkpoint's config.json; the heads
        compute in the ViT's dtype.
        """
        m = config.model
        pooling = m.text.get("pooling", "cls")  # configs saved before the key: [CLS]
        if pooling not in TEXT_POOLING:
            raise ValueError(f"model.text.pooling={pooling!r}; expected one of {TEXT_POOLING}")
        vit = vit_lib.from_config(m.vit)
        folder, text_cfg = _text_config(m.text)
        return cls(
            vit=vit, text=bert.BertModel(text_cfg),
            img_proj=heads.Projection(m.proj_dim, dtype=vit.dtype),
            txt_proj=heads.Projection(m.proj_dim, dtype=vit.dtype),
            dino_head=heads.DINOHead(m.dino.out_dim, m.dino.hidden_dim, m.dino.bottleneck_dim,
                                     m.dino.norm_last_layer, dtype=vit.dtype),
            text_checkpoint=folder, temperature=config.objective.clip.temperature,
            text_pooling=pooling)

    def init_random(self, rng: Array) -> dict:
        """Randomly initialised params for everything but the text encoder (jittable)."""
        r_vit, r_img, r_txt, r_head = jax.random.split(rng, 4)
        v = self.vit
        volume = jnp.zeros((1, *v.volume_size), jnp.float32)
        image = jnp.zeros((1, 1, v.image_size, v.image_size), jnp.float32)
        width = jnp.zeros((1, v.width), jnp.float32)
        text_width = jnp.zeros((1, self.text.config.hidden_size), jnp.float32)
        return {
            "vision": v.init(r_vit, volume=volume, images=image)["params"],
            "img_proj": self.img_proj.init(r_img, width)["params"],
            "txt_proj": self.txt_proj.init(r_txt, text_width)["params"],
            "dino_head": self.dino_head.init(r_head, width)["params"],
            "logit_scale": jnp.asarray(math.log(1.0 / self.temperature), jnp.float32),
        }

    def load_text_params(self) -> dict:
        """The text encoder's weights from the checkpoint folder."""
        c = self.text.config
        model, text_params = bert.from_pretrained(
            self.text_checkpoint, c.num_hidden_layers, dtype=c.dtype, scan=c.scan,
            scan_split=c.scan_split)
        if model.config != self.text.config:
            raise ValueError(f"{self.text_checkpoint} loads as {model.config}, expected "
                             f"{self.text.config}")
        return text_params

    def init(self, rng: Array) -> dict:
        """All params: random vision and heads, text weights from the checkpoint folder."""
        return {**jax.jit(self.init_random)(rng), "text": self.load_text_params()}

    def encode_image(self, params: dict, **inputs) -> tuple[Array, dict]:
        """ViT forward (volume=, images=, keep=, mask= as `vit.ViT`) -> (cls, out)."""
        return self.vit.apply({"params": params["vision"]}, **inputs)

    def encode_text(self, params: dict, input_ids: Array, attention_mask: Array) -> Array:
        """Report features (B, text width): the [CLS] output (`text_pooling="cls"`; the last
        layer runs at [CLS] alone), or the mean of the last layer over the attended tokens
        ("mean", as sentence-transformers pool all-MiniLM-L6-v2)."""
        if self.text_pooling == "cls":
            return self.text.apply({"params": params["text"]}, input_ids, attention_mask,
                                   cls_only=True)["cls"]
        hidden = self.text.apply({"params": params["text"]}, input_ids,
                                 attention_mask)["last_hidden_state"]
        weights = attention_mask.astype(hidden.dtype)[..., None]
        return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)

    def project_image(self, params: dict, cls: Array) -> Array:
        return self.img_proj.apply({"params": params["img_proj"]}, cls)

    def project_text(self, params: dict, cls: Array) -> Array:
        return self.txt_proj.apply({"params": params["txt_proj"]}, cls)

    def dino(self, params: dict, x: Array) -> Array:
        """DINO head logits (..., out_dim) float32 for features (..., width)."""
        return self.dino_head.apply({"params": params["dino_head"]}, x)
