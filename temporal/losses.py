"""Contrastive losses between video and text embeddings (both L2-normalised, ``[B, D]``).

Clips that share a caption are all positives of it (not false negatives), so a batch may repeat captions:
``groups[i]`` names clip i's caption. With all captions distinct both reduce to the published losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ALIGN_SMOOTHING = 0.1  # ALIGN's label smoothing


def _targets(groups: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` soft targets: row i spreads its mass over the clips with i's caption."""
    same = (groups[:, None] == groups[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def clip_loss(video: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              groups: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: cross-entropy video->text and text->video at ``logit_scale`` (a scalar)."""
    logits = logit_scale * video @ text.T  # [B, B]
    target = torch.eye(len(video)) if groups is None else _targets(groups)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def align_loss(video: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
               groups: torch.Tensor | None = None, smoothing: float = ALIGN_SMOOTHING) -> torch.Tensor:
    """ALIGN's normalised-softmax loss: the same symmetric cross-entropy with label smoothing (0.1)."""
    logits = logit_scale * video @ text.T
    target = torch.eye(len(video)) if groups is None else _targets(groups)
    target = target * (1 - smoothing) + smoothing / len(video)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


LOSSES = {"clip": clip_loss, "align": align_loss}


def vocabulary_loss(video: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor, groups: torch.Tensor,
                    smoothing: float = 0.0) -> torch.Tensor:
    """Contrast each clip with every text of a closed vocabulary ``texts [Q, D]`` (``groups[i]``: clip i's text),
    and each text present in the batch with the batch's clips. In-batch negatives rarely include the texts that
    differ from a clip's own in one word (2 of 72 SynthActions captions differ only in the shape), which is exactly
    what must be told apart; here every clip meets all of them at every step."""
    logits = logit_scale * video @ texts.T  # [B, Q]
    to_text = F.cross_entropy(logits, groups, label_smoothing=smoothing)
    present = groups.unique()
    target = (groups[None, :] == present[:, None]).float()
    target = target / target.sum(dim=1, keepdim=True)
    if smoothing:
        target = target * (1 - smoothing) + smoothing / len(video)
    to_video = F.cross_entropy(logits.T[present], target)
    return (to_text + to_video) / 2
