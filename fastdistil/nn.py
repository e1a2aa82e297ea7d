"""nn.Module wrappers around fastdistil.ops, for training loops that hold losses as modules."""

from __future__ import annotations

from torch import Tensor, nn

from fastdistil.ops import cosine_loss, fused_distill_head, kd_loss
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


class DistillHead(nn.Module):
    """loss_ce and loss_mlm from the hidden states before two vocabulary projections, without ever holding
    (tokens x vocabulary) logits (fastdistil.ops.fused_distill_head).

    The projections are passed at call time (nn.Linear, or a (weight, bias) pair), so this module owns no
    parameters: the student's decoder stays in the student (and its optimizer), the teacher's in the teacher.
    Backpropagate alpha_ce * loss_ce + alpha_mlm * loss_mlm (times any factor) with the alphas given here."""

    def __init__(
        self, temperature: float = 2.0, alpha_ce: float = 1.0, alpha_mlm: float = 0.0, chunk_size: int | None = None
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.alpha_ce, self.alpha_mlm, self.chunk_size = float(alpha_ce), float(alpha_mlm), chunk_size

    def forward(
        self,
        student_hidden: Tensor,
        student_projection,
        teacher_hidden: Tensor,
        teacher_projection,
        kl_mask: Tensor | None = None,
        mlm_labels: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        sw, sb = _weight_bias(student_projection, "student_projection")
        tw, tb = _weight_bias(teacher_projection, "teacher_projection")
        return fused_distill_head(
            student_hidden,
            sw,
            sb,
            teacher_hidden,
            tw,
            tb,
            temperature=self.temperature,
            kl_mask=kl_mask,
            mlm_labels=mlm_labels,
            alpha_ce=self.alpha_ce,
            alpha_mlm=self.alpha_mlm,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha_ce={self.alpha_ce}, alpha_mlm={self.alpha_mlm}, "
            f"chunk_size={self.chunk_size}"
        )


def _weight_bias(projection, name: str):
    if isinstance(projection, nn.Linear):
        return projection.weight, projection.bias
    if isinstance(projection, (tuple, list)) and len(projection) == 2:
        return projection[0], projection[1]
    raise TypeError(f"{name} must be an nn.Linear or a (weight, bias) pair, got {type(projection).__name__}")
