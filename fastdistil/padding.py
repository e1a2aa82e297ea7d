"""Padding helpers shared by the trainer, the objectives and the evaluation.

Through the whole stack the boolean (B, L) mask of real (non-padding) tokens is called `row_mask`: each True
selects one row (token) of the (B, L, ...) tensors that losses and metrics average over."""

from __future__ import annotations

import torch


def row_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The rows that count: True at real tokens of a transformers attention mask (1 = token, 0 = padding)."""
    return attention_mask.bool()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: the mean of the hidden states (B, L, H) over the real tokens of mask (B, L)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
