"""The UniMedI train step (unimedi_jax/objective/step.py) in PyTorch, for the benchmark only.

Same model, same step, same shapes: timm `VisionTransformer` blocks behind the same tokenizers
(Conv2d 2D patches, Conv3d 3D patches, per-tokenizer position tables, learned modality
embedding, one CLS token), Hugging Face `BertModel`, the CLIP projections and the DINO head;
per step

1. CT: the EMA teacher encodes the volume; its CLS attention row (Eq. 1, mean over layers and
   heads, computed on the side from each block's q and k while the tokens go through
   `scaled_dot_product_attention`) scores the slabs (Eq. 2); the top-k slabs' centre (or mean)
   slices join the volume's tokens;
2. the teacher encodes the full (mixed) input: DINO-head targets for CLS and patches, and its
   attention keeps the best `keep_ratio` of each modality block (`drop` style);
3. the student encodes the kept tokens and the reports: CLIP + DINO CLS + iBOT patch losses;
4. gradient clipping (per parameter or global, as `optim.grad_clip_mode`), AdamW (no decay on
   biases, norms, position/CLS/modality tables and embeddings; frozen text layers), the EMA
   teacher update and the DINO centres, with the JAX step's schedules.

`TorchStep(model, config, params)` copies the weights of a JAX state, so both steps start from
the same point and their losses can be compared. Implemented: selection `attentive` or `none`,
masking `attentive` + `drop`, joint or per-modality CLIP with pair targets, [CLS] or mean
report pooling; anything else raises. Which sub-batches are distilled is read from the config by
the step's own `distilled_modalities` (it only interprets config); every loss is computed here.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from unimedi_jax.export.torch_model import resize_pos_embed
from unimedi_jax.export.vision import timm_state_dict
from unimedi_jax.models import bert
from unimedi_jax.models.unimedi import UniMedI
from unimedi_jax.objective import masking, schedules
from unimedi_jax.objective.optim import NO_DECAY_NAMES
from unimedi_jax.objective.step import distilled_modalities

L2_EPS = 1e-12  # torch.nn.functional.normalize default, as the JAX losses and heads
ADAM_EPS = 1e-8  # optax.adamw default
CLIP_EPS = 1e-6  # optim.clip_per_parameter (and torch's clip_grad_norm_)
# Config values this reference implements (others raise in `TorchStep`).
SUPPORTED = {
    "selection.mode": ("attentive", "none"),
    "selection.slice_mode": ("center", "mean"),
    "masking.mode": ("attentive",),
    "masking.style": ("drop",),
    "clip.joint": (True, False),
    "clip.targets": ("pairs",),
    "sd.modalities": (("xray", "ct"), ("ct",), ("xray",)),
    "sd.center_per_modality": (False,),
}
CLIP_MODES = ("per_parameter", "global")


def _tensor(x: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(x, np.float32))


def _load(module: nn.Module, state: dict[str, Any]) -> None:
    module.load_state_dict({k: _tensor(v) for k, v in state.items()}, strict=True)


class VisionTorch(nn.Module):
    """The mixed-dimension ViT (models/vit.py) on timm blocks.

    forward(volume (B, D, H, W) | None, images (B, k, H, W) | None, keep (B, M) | None,
    attention: bool) -> cls (B, C), tokens (B, M|N, C), cls_attn (B, M|N) or None, layout.
    """

    def __init__(self, vit):
        super().__init__()
        self.backbone = VisionTransformer(
            img_size=vit.image_size, patch_size=vit.patch_size, in_chans=1, num_classes=0,
            global_pool="token", embed_dim=vit.width, depth=vit.depth, num_heads=vit.num_heads,
            mlp_ratio=vit.mlp_dim / vit.width, qkv_bias=True, class_token=True, pos_embed="none")
        self.patch_size_3d = tuple(vit.patch_size_3d)
        self.grid_2d, self.grid_3d = tuple(vit.grid_2d), tuple(vit.grid_3d)
        self.patch_embed_3d = nn.Conv3d(1, vit.width, self.patch_size_3d, self.patch_size_3d)
        self.pos_embed_2d = nn.Parameter(torch.zeros(1, math.prod(self.grid_2d), vit.width))
        self.pos_embed_3d = nn.Parameter(torch.zeros(1, math.prod(self.grid_3d), vit.width))
        if vit.modality_embed:
            self.modality_embed = nn.Parameter(torch.zeros(2, vit.width))
        else:
            self.register_buffer("modality_embed", torch.zeros(2, vit.width))

    def load_jax(self, params: dict) -> None:
        """Copies ViT params (models/vit.py layout)."""
        timm = timm_state_dict(params, len(self.backbone.blocks))
        state = {f"backbone.{k}": v for k, v in timm.items()
                 if k.startswith(("blocks.", "norm.", "patch_embed.proj.", "cls_token"))}
        state.update({k.replace(".proj", ""): v for k, v in timm.items()
                      if k.startswith("patch_embed_3d.")})
        names = ["pos_embed_2d", "pos_embed_3d"] + (
            ["modality_embed"] if isinstance(self.modality_embed, nn.Parameter) else [])
        state.update({k: params[k] for k in names})
        result = self.load_state_dict({k: _tensor(v) for k, v in state.items()}, strict=False)
        missing = set(result.missing_keys) - dict(self.named_buffers()).keys()
        if missing or result.unexpected_keys:
            raise KeyError(f"ViT weights not matched with the JAX params: missing {missing}, "
                           f"unexpected {result.unexpected_keys}")

    @staticmethod
    def _block(block: nn.Module, x: torch.Tensor, attention: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One timm block (pre-norm) and, with `attention`, its CLS row over patch keys."""
        b, n, d = x.shape
        attn = block.attn
        qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, n, head_dim)
        y = F.scaled_dot_product_attention(q, k, v)
        x = x + attn.proj(y.transpose(1, 2).reshape(b, n, d))
        x = x + block.mlp(block.norm2(x))
        row = None
        if attention:
            logits = (q[:, :, :1] @ k[:, :, 1:].transpose(-1, -2)).squeeze(2) * attn.scale
            row = logits.softmax(dim=-1).mean(dim=1)
        return x, row

    def forward(self, volume=None, images=None, keep=None, attention: bool = False):
        tokens, pos = [], []
        n3 = k = n2 = 0
        if volume is not None:
            t = self.patch_embed_3d(volume[:, None])
            tokens.append(t.flatten(2).transpose(1, 2))
            pos.append(resize_pos_embed(self.pos_embed_3d, self.grid_3d, t.shape[2:])
                       + self.modality_embed[1])
            n3 = tokens[-1].shape[1]
        if images is not None:
            b, k = images.shape[:2]
            t = self.backbone.patch_embed.proj(images.reshape(b * k, 1, *images.shape[2:]))
            n2 = math.prod(t.shape[2:])
            tokens.append(t.flatten(2).transpose(1, 2).reshape(b, k * n2, -1))
            pos.append((resize_pos_embed(self.pos_embed_2d, self.grid_2d, t.shape[2:])
                        + self.modality_embed[0]).repeat(1, k, 1))
        x = torch.cat(tokens, dim=1) + torch.cat(pos, dim=1)
        if keep is not None:
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([self.backbone.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        rows = []
        for block in self.backbone.blocks:
            x, row = self._block(block, x, attention)
            rows.append(row)
        x = self.backbone.norm(x)
        cls_attn = torch.stack(rows).mean(dim=0) if attention else None
        return x[:, 0], x[:, 1:], cls_attn, masking.Layout(n3, k, n2)


class DINOHeadTorch(nn.Module):
    """models/heads.DINOHead: MLP with GELU, L2 norm, weight-normalised last layer (no bias)."""

    def __init__(self, width: int, head):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, head.hidden_dim), nn.GELU(),
                                 nn.Linear(head.hidden_dim, head.hidden_dim), nn.GELU(),
                                 nn.Linear(head.hidden_dim, head.bottleneck_dim))
        self.last = nn.Parameter(torch.zeros(head.out_dim, head.bottleneck_dim))
        self.gain = None if head.norm_last_layer else nn.Parameter(torch.ones(head.out_dim))

    def load_jax(self, p: dict) -> None:
        state = {}
        for i, name in enumerate(("mlp_0", "mlp_1", "mlp_2")):
            state[f"mlp.{2 * i}.weight"] = np.asarray(p[name]["kernel"]).T
            state[f"mlp.{2 * i}.bias"] = p[name]["bias"]
        state["last"] = np.asarray(p["last_layer"]["kernel"]).T
        if self.gain is not None:
            state["gain"] = p["last_layer"]["scale"]
        _load(self, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.last, dim=1)
        if self.gain is not None:
            w = w * self.gain[:, None]
        return F.normalize(self.mlp(x), dim=-1, eps=L2_EPS) @ w.T


def text_cls(model: transformers.BertModel, input_ids: torch.Tensor,
             attention_mask: torch.Tensor) -> torch.Tensor:
    """The report [CLS] (B, D) with the last layer run for the [CLS] query only, as
    `bert.BertModel(cls_only=True)` does (the loss reads nothing else of that layer)."""
    *first, last = model.encoder.layer
    h = model.embeddings(input_ids=input_ids)
    additive = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
    for layer in first:
        h = layer(h, attention_mask=additive)
        h = h[0] if isinstance(h, tuple) else h
    att, b = last.attention, input_ids.shape[0]
    split = lambda x: x.view(b, x.shape[1], att.self.num_attention_heads, -1).transpose(1, 2)
    q, k, v = split(att.self.query(h[:, :1])), split(att.self.key(h)), split(att.self.value(h))
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask[:, None, None, :].bool())
    a = att.output(ctx.transpose(1, 2).reshape(b, 1, -1), h[:, :1])
    return last.output(last.intermediate(a), a)[:, 0]


def text_mean(model: transformers.BertModel, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the last hidden states over the attended tokens (B, D), as
    `UniMedI.encode_text` with `text_pooling="mean"` (sentence-transformers' pooling)."""
    h = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    w = attention_mask[..., None].to(h.dtype)
    return (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


class UniMedITorch(nn.Module):
    """Student: vision, text (Hugging Face BertModel), projections, DINO head, logit scale."""

    def __init__(self, model: UniMedI):
        super().__init__()
        t = model.text.config
        self.vision = VisionTorch(model.vit)
        hf = {k: v for k, v in t.to_hf_dict().items() if k not in ("architectures", "model_type")}
        # The Flax BERT has no dropout.
        self.text = transformers.BertModel(
            transformers.BertConfig(**hf, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            add_pooling_layer=False)
        proj = model.img_proj.dim
        self.img_proj = nn.Linear(model.vit.width, proj, bias=False)
        self.txt_proj = nn.Linear(t.hidden_size, proj, bias=False)
        self.dino_head = DINOHeadTorch(model.vit.width, model.dino_head)
        self.logit_scale = nn.Parameter(torch.zeros(()))

    def load_jax(self, params: dict, text_config: bert.BertConfig) -> None:
        self.vision.load_jax(params["vision"])
        _load(self.text, bert.to_hf_state_dict(params["text"], text_config))
        _load(self.img_proj, {"weight": np.asarray(params["img_proj"]["proj"]["kernel"]).T})
        _load(self.txt_proj, {"weight": np.asarray(params["txt_proj"]["proj"]["kernel"]).T})
        self.dino_head.load_jax(params["dino_head"])
        self.logit_scale.data.copy_(_tensor(params["logit_scale"]))


# ---------------------------------------------------------------- objective pieces

def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over (B, P) embeddings, row i of each a positive pair."""
    logits = scale * F.normalize(img, dim=-1, eps=L2_EPS) @ F.normalize(txt, dim=-1, eps=L2_EPS).T
    labels = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def distill_ce(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
               student_temp: float, teacher_temp) -> torch.Tensor:
    """-sum_k softmax((t - c) / tt) log_softmax(s / ts) over the last axis (..., K) -> (...)."""
    target = F.softmax((teacher - center) / teacher_temp, dim=-1)
    return -(target * F.log_softmax(student / student_temp, dim=-1)).sum(dim=-1)


def slice_scores(cls_attn: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Eq. 2: (B, d*h*w) attention over the 3D tokens -> (B, d) mean per depth index."""
    return cls_attn.reshape(cls_attn.shape[0], grid[0], -1).mean(dim=-1)


def select_slices(volume: torch.Tensor, scores: torch.Tensor, k: int, mode: str,
                  patch_depth: int) -> torch.Tensor:
    """The top-k slabs' centre slices ("center") or means ("mean"): (B, k, H, W)."""
    indices = scores.topk(k, dim=1).indices
    if mode == "center":
        slabs, at = volume, indices * patch_depth + patch_depth // 2
    else:
        b, d = volume.shape[:2]
        slabs, at = volume.reshape(b, d // patch_depth, patch_depth, *volume.shape[2:]).mean(2), indices
    return torch.gather(slabs, 1, at[:, :, None, None].expand(-1, -1, *volume.shape[2:]))


def _top_in_blocks(scores: torch.Tensor, keep: int, offset: int) -> torch.Tensor:
    """scores (B, g, n) -> the `keep` best per block, ascending, as flat indices (B, g*keep)."""
    b, g, n = scores.shape
    idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
    return (idx + offset + n * torch.arange(g)[:, None]).reshape(b, g * keep)


def keep_indices(scores: torch.Tensor, layout: masking.Layout, ratio: float) -> torch.Tensor:
    """Per modality block, the best `num_keep` tokens by score: (B, N) -> (B, M) ascending."""
    parts = []
    if layout.n3:
        parts.append(_top_in_blocks(scores[:, None, :layout.n3],
                                    masking.num_keep(layout.n3, ratio), 0))
    if layout.k:
        blocks = scores[:, layout.n3:].reshape(scores.shape[0], layout.k, layout.n2)
        parts.append(_top_in_blocks(blocks, masking.num_keep(layout.n2, ratio), layout.n3))
    return torch.cat(parts, dim=1)


def _decay(module: nn.Module, name: str, p: nn.Parameter) -> bool:
    """optim.decay_mask: no decay on rank <= 1, position/CLS/modality tables, embeddings."""
    return p.ndim > 1 and name not in NO_DECAY_NAMES and not isinstance(module, nn.Embedding)


class TorchStep:
    """The full train step; call `step(batch) -> loss` (a float tensor, before the update).

    batch: {"xray": {image, input_ids, attention_mask}, "ct": {volume, input_ids,
    attention_mask}} as torch tensors (`to_torch`). With `compile`, the losses (teacher
    passes, student passes, losses) run under `torch.compile`; the backward pass through its
    compiled graph, the optimiser and the EMA update run eagerly (foreach kernels).
    """

    def __init__(self, model: UniMedI, config, params: dict, compile: bool = False):
        obj = config.objective
        for key, allowed in SUPPORTED.items():
            section, name = key.split(".")
            value = obj[section].get(name, allowed[0])
            if (tuple(value) if isinstance(value, (list, tuple)) else value) not in allowed:
                raise ValueError(f"objective.{key}={obj[section][name]!r}: the PyTorch "
                                 f"reference implements {allowed}")
        self.text_pooling = model.text_pooling
        if config.optim.grad_clip_mode not in CLIP_MODES:
            raise ValueError(f"optim.grad_clip_mode={config.optim.grad_clip_mode!r}: the PyTorch "
                             f"reference implements {CLIP_MODES}")
        self.config, self.obj = config, obj
        self.patch_depth = model.vit.patch_size_3d[0]
        self.student = UniMedITorch(model)
        self.student.load_jax(params, model.text.config)
        self.teacher = nn.ModuleDict({"vision": copy.deepcopy(self.student.vision),
                                      "dino_head": copy.deepcopy(self.student.dino_head)})
        self.teacher.requires_grad_(False)
        self._freeze(config)
        groups = {True: [], False: []}
        for module in self.student.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    groups[_decay(module, name, p)].append(p)
        o = config.optim
        self.trainable = groups[True] + groups[False]
        self.optimizer = torch.optim.AdamW(
            [{"params": groups[True], "weight_decay": o.weight_decay},
             {"params": groups[False], "weight_decay": 0.0}],
            lr=o.lr, betas=(o.b1, o.b2), eps=ADAM_EPS, foreach=True)
        steps = jnp.arange(config.total_steps + 1)
        sd = obj.sd
        self.lr = np.asarray(schedules.learning_rate(o, config.total_steps)(steps))
        self.momentum = np.asarray(schedules.ema_momentum(steps, config.total_steps,
                                                          sd.ema_start, sd.ema_end))
        self.patch_temp = torch.from_numpy(np.array(schedules.teacher_temp(
            steps, sd.teacher_patch_temp_warmup, sd.teacher_patch_temp,
            sd.teacher_temp_warmup_steps), np.float32))
        k = model.dino_head.out_dim
        self.centers = {"cls": torch.zeros(k), "patch": torch.zeros(k)}
        self.count = 0
        self.losses = torch.compile(self._losses) if compile else self._losses

    def _freeze(self, config) -> None:
        """optim.trainable_mask: text layers outside trainable_layers, fixed logit scale."""
        n = config.model.text.trainable_layers
        if n != -1:
            text = self.student.text
            text.embeddings.requires_grad_(False)
            layers = text.encoder.layer
            for i, layer in enumerate(layers):
                layer.requires_grad_(i >= len(layers) - n)
        self.student.logit_scale.requires_grad_(bool(config.objective.clip.learnable))

    def _inputs(self, kind: str, sub: dict) -> dict:
        """The teacher-side full vision inputs of a sub-batch (slice selection for CT)."""
        if kind == "xray":
            return {"images": sub["image"][:, None]}
        volume = sub["volume"]
        if self.obj.selection.mode == "none":
            return {"volume": volume}
        _, _, attn, _ = self.teacher["vision"](volume=volume, attention=True)
        grid = tuple(s // p for s, p in zip(volume.shape[1:], self.teacher["vision"].patch_size_3d))
        scores = slice_scores(attn, grid)
        sel = self.obj.selection
        return {"volume": volume,
                "images": select_slices(volume, scores, sel.k, sel.slice_mode, self.patch_depth)}

    def _losses(self, batch: dict, patch_temp: torch.Tensor, center_cls: torch.Tensor,
                center_patch: torch.Tensor):
        """(loss, cls targets (B, K), per-sample patch means (B, K)) of one step."""
        obj, sd = self.obj, self.obj.sd
        kinds = [k for k in ("xray", "ct") if k in batch]
        distilled = distilled_modalities(self.config, kinds)
        inputs, targets = {}, {}
        with torch.no_grad():
            for kind in kinds:
                inputs[kind] = self._inputs(kind, batch[kind])
                if kind not in distilled:
                    continue
                cls, tokens, attn, layout = self.teacher["vision"](**inputs[kind], attention=True)
                logits = self.teacher["dino_head"](torch.cat([cls[:, None], tokens], dim=1))
                keep = keep_indices(attn, layout, obj.masking.keep_ratio)
                patch = logits[:, 1:]
                targets[kind] = (logits[:, 0], torch.gather(
                    patch, 1, keep[..., None].expand(-1, -1, patch.shape[-1])), patch.mean(1))
                inputs[kind]["keep"] = keep
        s = self.student
        ids = torch.cat([batch[k]["input_ids"] for k in kinds])
        mask = torch.cat([batch[k]["attention_mask"] for k in kinds])
        pool = text_mean if self.text_pooling == "mean" else text_cls
        z_txt = s.txt_proj(pool(s.text, ids, mask))
        encoded = {k: s.vision(**inputs[k]) for k in kinds}
        z_img = torch.cat([s.img_proj(encoded[k][0]) for k in kinds])
        if obj.clip.learnable:
            scale = s.logit_scale.clamp(max=math.log(obj.clip.max_logit_scale)).exp()
        else:
            scale = torch.tensor(1.0 / obj.clip.temperature)
        if obj.clip.joint:
            loss = clip_loss(z_img, z_txt, scale)
        else:
            bounds = np.cumsum([0] + [batch[k]["input_ids"].shape[0] for k in kinds]).tolist()
            loss = sum(clip_loss(z_img[a:b], z_txt[a:b], scale)
                       for a, b in zip(bounds[:-1], bounds[1:])) / len(kinds)
        if not distilled:
            return loss, None, None
        logits = {k: s.dino_head(torch.cat([encoded[k][0][:, None], encoded[k][1]], dim=1))
                  for k in distilled}
        cls_target = torch.cat([targets[k][0] for k in distilled])
        icl = distill_ce(torch.cat([logits[k][:, 0] for k in distilled]), cls_target, center_cls,
                         sd.student_temp, sd.teacher_temp).mean()
        # drop style: every kept position carries weight 1, so the per-sample weighted mean is
        # the plain mean; the loss is the mean over the distilled samples.
        pcl = sum(distill_ce(logits[k][:, 1:], targets[k][1], center_patch, sd.student_temp,
                             patch_temp).mean(dim=1).sum() for k in distilled) / len(cls_target)
        loss = loss + sd.w_icl * icl + sd.w_pcl * pcl
        return loss, cls_target, torch.cat([targets[k][2] for k in distilled])

    def _clip(self) -> None:
        """optim.make_optimizer's clipping: each gradient to norm <= grad_clip_norm on its own
        ("per_parameter", DINO) or all of them together ("global")."""
        o = self.config.optim
        if o.grad_clip_norm <= 0:
            return
        if o.grad_clip_mode == "global":
            torch.nn.utils.clip_grad_norm_(self.trainable, o.grad_clip_norm, foreach=True)
            return
        grads = [p.grad for p in self.trainable if p.grad is not None]
        scales = [torch.clamp(o.grad_clip_norm / (n + CLIP_EPS), max=1.0)
                  for n in torch._foreach_norm(grads)]
        torch._foreach_mul_(grads, scales)

    def step(self, batch: dict) -> torch.Tensor:
        t = min(self.count, len(self.lr) - 1)
        loss, cls_target, patch_mean = self.losses(batch, self.patch_temp[t],
                                                   self.centers["cls"], self.centers["patch"])
        loss.backward()
        self._clip()
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr[t])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            teacher = list(self.teacher.parameters())
            student = [p for k in self.teacher for p in getattr(self.student, k).parameters()]
            torch._foreach_lerp_(teacher, student, 1.0 - float(self.momentum[t]))
            if cls_target is not None:
                m = self.obj.sd.center_momentum
                self.centers["cls"] = self.centers["cls"] * m + cls_target.mean(0) * (1 - m)
                self.centers["patch"] = self.centers["patch"] * m + patch_mean.mean(0) * (1 - m)
        self.count += 1
        return loss.detach()


def to_torch(batch: dict) -> dict:
    """Numpy batch -> torch tensors (token ids and masks as int64)."""
    return {kind: {k: torch.from_numpy(np.asarray(v)).long() if k in ("input_ids", "attention_mask")
                   else torch.from_numpy(np.asarray(v)) for k, v in sub.items()}
            for kind, sub in batch.items()}
