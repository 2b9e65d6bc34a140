"""Training objectives: CLIP's InfoNCE, DALIP's distribution alignment and the DINO branch, as one object.

The token features come from transformers' own CLIP outputs, without forking the model:
``vision_model_output.last_hidden_state`` through ``post_layernorm`` and ``visual_projection`` (open_clip's
``ln_post`` then ``proj`` on every token, which is where DALIP takes them), and
``text_model_output.last_hidden_state`` (already after ``final_layer_norm``) through ``text_projection``.

DALIP (Wu et al. 2025; github XavierHeart/DALIP, ``src/open_clip/loss.py`` ``ClipLoss.forward``): the
contrastive loss of the pooled embeddings plus the same InfoNCE, with the same temperature, over the
image and text distributions' statistics — first order: the mean of the projected tokens (the patch
tokens of an image, the real tokens of a caption); second order: the MBDC embedding
(:mod:`pipeline.train.bdc`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bdc import MBDC
from .dino import DinoBranch, Teacher, align_loss, dino_loss, local_side, teacher_momentum, teacher_temp

Pair = tuple[torch.Tensor, torch.Tensor]


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (matching pairs on the diagonal)."""
    logits = scale * img @ txt.t()
    labels = torch.arange(img.shape[0], device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def token_features(model: Any, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected token features of both towers: image [B, 1 + patches, D] ([CLS] first), text [B, L, D]."""
    vis = out.vision_model_output.last_hidden_state
    img_tok = model.visual_projection(model.vision_model.post_layernorm(vis))
    txt_tok = model.text_projection(out.text_model_output.last_hidden_state)
    return img_tok, txt_tok


def masked_mean(tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the token axis, counting only ``mask`` (True) tokens when given."""
    if mask is None:
        return tokens.mean(dim=1)
    m = mask[..., None].to(tokens.dtype)
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class Objective:
    """Everything the step's loss needs beyond the CLIP model: extra heads, the teacher, schedules.

    ``heads`` (an ``nn.ModuleDict``) holds the trainable extras (optimised with the model and saved in
    each checkpoint); ``teacher`` is DINO's EMA teacher and its centre (saved too, never optimised).
    Set :attr:`step` before each optimizer step: the teacher temperature, the EMA momentum and the
    per-step random seed (dropout masks) depend on it, so a resumed run repeats the same draws.

    Args:
        cfg: The recipe's ``train`` section.
        model: The transformers CLIPModel being trained.
        total_steps: Optimizer steps of the run (the EMA momentum's cosine runs over them).
    """

    def __init__(self, cfg: Any, model: Any, total_steps: int):
        self.cfg, self.total_steps, self.step = cfg, total_steps, 0
        dim = int(model.config.projection_dim)
        heads: dict[str, nn.Module] = {}
        if cfg.loss == "dalip":
            d = cfg.dalip
            heads["mbdc_image"] = MBDC(dim, d.heads, d.mbdc_dim, d.dropout, d.eps)
            heads["mbdc_text"] = MBDC(dim, d.heads, d.mbdc_dim, d.dropout, d.eps)
        self.teacher: Optional[Teacher] = None
        self._teacher_out: list[torch.Tensor] = []
        if cfg.ssl == "dino":
            vc = model.config.vision_config
            heads["dino"] = DinoBranch(int(vc.hidden_size), dim, cfg.dino)
            self.teacher = Teacher(model.vision_model, heads["dino"].head, cfg.dino.out_dim)
            self.local_size = local_side(int(vc.image_size), int(vc.patch_size), cfg.dino.local_size)
        self.heads = nn.ModuleDict(heads)
        self.last_terms: dict[str, float] = {}

    @property
    def plain(self) -> bool:
        """Plain CLIP: no extra heads, no teacher (the original step, bit for bit)."""
        return self.cfg.loss == "clip" and self.cfg.ssl == "none"

    def to(self, device: torch.device) -> "Objective":
        self.heads.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def train(self, mode: bool = True) -> None:
        self.heads.train(mode)

    def seed_for(self, micro: int) -> int:
        return (self.cfg.seed * 1_000_003 + self.step) * 64 + micro

    # ------------------------------------------------------------------ contrastive part

    def weights(self) -> dict[str, float]:
        if self.cfg.loss == "clip":
            return {"clip": 1.0}
        d = self.cfg.dalip
        return {k: w for k, w in (("clip", d.clip_weight), ("mean", d.mean_weight), ("mbdc", d.mbdc_weight))
                if w > 0}

    def embed(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Pair]:
        """L2-normalised (image, text) embeddings of every contrastive term, float32."""
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"])
        img, txt = out.image_embeds, out.text_embeds
        pairs = {"clip": (img.float(), txt.float())}
        if self.cfg.loss != "dalip":
            return pairs
        w = self.weights()
        img_tok, txt_tok = token_features(model, out)
        mask = batch["attention_mask"].bool()
        if "mean" in w:
            pairs["mean"] = (F.normalize(img_tok[:, 1:].mean(dim=1).float(), dim=-1),
                             F.normalize(masked_mean(txt_tok, mask).float(), dim=-1))
        if "mbdc" in w:
            # the pooled embedding is the query; its scale does not matter (cosine after a linear map)
            vi = self.heads["mbdc_image"](img_tok[:, 1:], img)
            vt = self.heads["mbdc_text"](txt_tok, txt, mask)
            pairs["mbdc"] = (F.normalize(vi.float(), dim=-1), F.normalize(vt.float(), dim=-1))
        return pairs

    def contrastive(self, pairs: dict[str, Pair], scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted sum of InfoNCE over each term (one shared temperature, as DALIP's loss)."""
        total, terms = 0.0, {}
        for k, w in self.weights().items():
            lk = clip_loss(pairs[k][0], pairs[k][1], scale)
            terms[f"loss_{k}"] = float(lk.detach())
            total = total + w * lk
        return total, terms

    # ------------------------------------------------------------------ DINO part

    def ssl(self, model: Any, views: list[torch.Tensor], img_embeds: torch.Tensor
            ) -> tuple[torch.Tensor, dict[str, float]]:
        """DINO loss of one micro-batch's views plus AgriCLIP's alignment term (weighted)."""
        cfg = self.cfg.dino
        branch = self.heads["dino"]
        glob = torch.cat(views[:2])
        feat_g = model.vision_model(pixel_values=glob).pooler_output
        student = list(branch.head(feat_g).chunk(2))
        if len(views) > 2:
            loc = torch.cat(views[2:])
            interp = loc.shape[-1] != glob.shape[-1]
            feat_l = model.vision_model(pixel_values=loc, interpolate_pos_encoding=interp).pooler_output
            student += list(branch.head(feat_l).chunk(len(views) - 2))
        teacher = list(self.teacher(glob).chunk(2))
        self._teacher_out += teacher
        ld = dino_loss(student, teacher, self.teacher.center, cfg.student_temp, teacher_temp(cfg, self.step))
        la = align_loss(branch.aligner(feat_g), img_embeds.detach().repeat(2, 1))  # both global crops
        terms = {"loss_dino": float(ld.detach()), "loss_align": float(la.detach())}
        return cfg.weight * ld + cfg.align_weight * la, terms

    def end_of_step(self) -> None:
        """Fold this step's teacher outputs into the centre (before the optimizer step; DINO's order)."""
        if self.teacher is not None and self._teacher_out:
            self.teacher.update_center(self._teacher_out, self.cfg.dino.center_momentum)
        self._teacher_out = []

    def cancel_last_layer_grad(self, freeze_steps: int) -> None:
        """DINO's ``cancel_gradients_last_layer``: no update of the prototypes during the first steps."""
        if self.teacher is not None and self.step < freeze_steps:
            self.heads["dino"].head.last.grad = None

    def after_optimizer_step(self, model: Any) -> None:
        """DINO's EMA update of the teacher from the student just stepped."""
        if self.teacher is not None:
            m = teacher_momentum(self.cfg.dino.momentum_teacher, self.step, self.total_steps)
            self.teacher.update(model.vision_model, self.heads["dino"].head, m)
