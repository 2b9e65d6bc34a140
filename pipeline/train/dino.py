"""DINO self-distillation on the CLIP image tower, and AgriCLIP's alignment term.

DINO (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021;
facebookresearch/dino ``main_dino.py``, ``vision_transformer.py``, ``utils.py``):

- a projection head on the student's [CLS] feature: 3-layer MLP (GELU) -> bottleneck -> L2 norm ->
  weight-normalised linear layer to ``out_dim`` prototypes with its norm fixed at 1 (``norm_last_layer``);
- a teacher that is an exponential moving average of the student (tower and head), with a momentum
  going from ``momentum_teacher`` to 1 along a cosine (``cosine_scheduler``);
- multi-crop: the teacher sees the 2 global crops, the student all crops; the loss is the cross-entropy
  between the teacher's centred, sharpened softmax ``softmax((t - c) / τ_t)`` and the student's
  ``log_softmax(s / τ_s)``, summed over (teacher view, student view) pairs of different views and
  averaged; the centre ``c`` is an EMA (``center_momentum``) of the teacher's batch mean (``DINOLoss``).

AgriCLIP (Nawaz et al., COLING 2025; github umair1221/AgriCLIP ``AgriCLIP_alignment/LinearAligner.py``)
aligns its DINO encoder with CLIP's image space by a linear map (W, b) fitted with a squared error to
the CLIP image features. Here both branches share one image tower and train together, so the alignment
is a term of the joint loss: a linear map of the student's global-crop feature must match the
L2-normalised CLIP image embedding of the same image (held fixed, as AgriCLIP's targets are); the map is
trained with the model, and the gradient through the student's feature ties the two branches together.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


class DinoHead(nn.Module):
    """DINO's projection head (``DINOHead``, 3 layers, no batch norm, ``norm_last_layer=True``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight_norm with weight_g fixed to 1 == a row-normalised weight matrix
        self.last = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.last, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return F.linear(x, F.normalize(self.last, dim=1))


def teacher_momentum(base: float, step: int, total_steps: int) -> float:
    """DINO's cosine schedule of the EMA momentum from ``base`` at step 0 to 1 at the last step."""
    if total_steps <= 1:
        return base
    return 1 - (1 - base) * (math.cos(math.pi * step / (total_steps - 1)) + 1) / 2


def teacher_temp(cfg: Any, step: int) -> float:
    """Linear warmup ``warmup_teacher_temp`` -> ``teacher_temp`` over ``teacher_temp_warmup_steps``."""
    n = cfg.teacher_temp_warmup_steps
    if step >= n:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / n


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              student_temp: float, t_temp: float) -> torch.Tensor:
    """DINO's cross-entropy between teacher and student views (``DINOLoss.forward``).

    Args:
        student: Logits of every view [B, K] (the global views first).
        teacher: Teacher logits of the global views [B, K] (no gradient).
        center: [1, K] running centre of the teacher logits.
        student_temp: τ_s.
        t_temp: τ_t at this step.

    Returns:
        The mean over (teacher view, other student view) pairs of the batch-mean cross-entropy.
    """
    total, n = 0.0, 0
    for iq, t in enumerate(teacher):
        q = torch.softmax((t.float() - center) / t_temp, dim=-1)
        for v, s in enumerate(student):
            if v == iq:  # never the same view
                continue
            total = total + torch.sum(-q * F.log_softmax(s.float() / student_temp, dim=-1), dim=-1).mean()
            n += 1
    if n == 0:
        raise ValueError("DINO needs at least two views (2 global crops, or 1 global + local crops)")
    return total / n


class DinoBranch(nn.Module):
    """The trainable parts of the branch: the student head and AgriCLIP's linear aligner."""

    def __init__(self, vision_width: int, embed_dim: int, cfg: Any):
        super().__init__()
        self.head = DinoHead(vision_width, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
        self.aligner = nn.Linear(vision_width, embed_dim)  # AgriCLIP's (W, b)


class Teacher(nn.Module):
    """EMA copies of the image tower and the DINO head, and the centre of the teacher's outputs."""

    def __init__(self, vision_model: nn.Module, head: nn.Module, out_dim: int):
        super().__init__()
        self.vision_model = copy.deepcopy(vision_model)
        self.head = copy.deepcopy(head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feat = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.head(feat).float()

    @torch.no_grad()
    def update(self, vision_model: nn.Module, head: nn.Module, momentum: float) -> None:
        """θ_t <- m θ_t + (1 - m) θ_s for the tower and the head (DINO's EMA update)."""
        for mine, theirs in ((self.vision_model, vision_model), (self.head, head)):
            for pt, ps in zip(mine.parameters(), theirs.parameters()):
                pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)

    @torch.no_grad()
    def update_center(self, teacher_out: list[torch.Tensor], momentum: float) -> None:
        """c <- m c + (1 - m) mean of this step's teacher logits (DINO's ``update_center``)."""
        batch = torch.cat(teacher_out).mean(dim=0, keepdim=True)
        self.center.mul_(momentum).add_(batch, alpha=1 - momentum)


def align_loss(aligned: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error between the L2-normalised aligned feature and the fixed normalised CLIP embedding.

    AgriCLIP rescales both sides to a common variance before its squared error; normalising both
    sides plays that part here (the CLIP embedding is compared by cosine anyway).
    """
    return (F.normalize(aligned.float(), dim=-1) - target.detach().float()).pow(2).sum(dim=-1).mean()


def local_side(image_size: int, patch_size: int, local_size: Optional[int]) -> int:
    """The local-crop side: DINO's 96/224 of the input side, a whole number of patches, at least one."""
    if local_size is not None:
        side = local_size
    else:
        side = round(image_size * 96 / 224 / patch_size) * patch_size
    side = max(patch_size, side - side % patch_size)
    return side
