"""nn.Module wrappers around fastdistil.ops, for training loops that hold losses as modules."""

from __future__ import annotations

from torch import Tensor, nn

from fastdistil.ops import cosine_loss, kd_loss
from fastdistil.ops._common import check_reduction, check_temperature


class KDLoss(nn.Module):
    """DistilBERT's loss_ce: KL(softmax(teacher / T) || softmax(student / T)) * T^2, batchmean over mask rows.
    See fastdistil.ops.kd_loss for shapes and semantics."""

    def __init__(self, temperature: float = 2.0, reduction: str = "batchmean", scale_t2: bool = True):
        super().__init__()
        self.temperature = check_temperature(temperature)
        check_reduction(reduction)
        self.reduction = reduction
        self.scale_t2 = scale_t2

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature, mask, self.reduction, self.scale_t2)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, scale_t2={self.scale_t2}"


class CosineLoss(nn.Module):
    """DistilBERT's loss_cos: mean over mask rows of 1 - cos(student_hidden, teacher_hidden).
    See fastdistil.ops.cosine_loss."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction, ("mean", "sum", "none"))
        self.reduction = reduction

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        return cosine_loss(student_hidden, teacher_hidden, mask, self.reduction)
