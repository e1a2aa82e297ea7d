"""What every objective is: a component that runs the student (and the teacher) on a batch and returns named loss
terms. The trainer weights, sums and logs those terms without knowing the recipe."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdistil.padding import mean_pool


@dataclass
class Losses:
    total: Tensor  # the weighted sum the trainer backpropagates (fp32 scalar)
    terms: dict  # name -> detached fp32 scalar, for logging


@dataclass(frozen=True)
class Needs:
    """What an objective declares it needs from the data and the models."""

    mlm_labels: bool = False  # batches carry DistilBERT's dynamic MLM masking (labels, -100 = none)
    model_outputs: tuple = field(default_factory=tuple)  # e.g. ("last_hidden_state", "mlm_head_input")


class Objective:
    """Base of the recipes. Subclasses set `needs` and `weights` (loss term -> weight) and implement `terms`.

    `student` is the model being trained (its parameters are the optimizer's); `teacher` runs without autograd.
    Calling the objective returns Losses: the weighted total and every term. Whether the fused kernels or the
    pure-PyTorch references compute the terms is decided by the ops (fastdistil.ops.use_kernels), not here."""

    needs = Needs()

    def __init__(self, student: nn.Module, teacher: nn.Module, weights: dict[str, float]):
        self.student, self.teacher, self.weights = student, teacher, dict(weights)

    def terms(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
        raise NotImplementedError

    def trainable(self) -> nn.Module | None:
        """What the objective trains besides the student (a projection between two widths, ...): optimised,
        clipped, checkpointed and resumed with the student, never saved as part of it. None: nothing."""
        return None

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None) -> Losses:
        return self.combine(self.terms(input_ids, attention_mask, labels))

    def combine(self, terms: dict[str, Tensor]) -> Losses:
        """The weighted sum of the terms with a non-zero weight, and every term detached for logging."""
        total = sum(self.weights[k] * v.float() for k, v in terms.items() if self.weights.get(k))
        if not isinstance(total, Tensor):
            total = next(iter(terms.values())).new_zeros((), dtype=torch.float32)
        return Losses(total, {k: v.detach().float() for k, v in terms.items()})


def pooled_mse(student_hidden: Tensor, teacher_hidden: Tensor, row_mask: Tensor) -> Tensor:
    """loss_mse: MSE between the mean-pooled sentence embeddings of student and teacher (fp32)."""
    return F.mse_loss(mean_pool(student_hidden.float(), row_mask), mean_pool(teacher_hidden.float(), row_mask))
