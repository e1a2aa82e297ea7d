"""The DistilBERT triple loss for teachers with an MLM head: loss_ce (KL at temperature over the vocabulary,
through the streaming distillation head, never materialising the logits), loss_mlm (cross-entropy on the masked
tokens), loss_cos (last hidden states), and optionally loss_mse (mean-pooled embeddings)."""

from __future__ import annotations

from torch import Tensor, nn

from fastdistil.heads import MLMDistiller
from fastdistil.objectives.base import Needs, Objective, pooled_mse
from fastdistil.padding import row_mask as real_rows


class DistilBERTObjective(Objective):
    needs = Needs(mlm_labels=True, model_outputs=("last_hidden_state", "mlm_head_input"))

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        temperature: float = 2.0,
        alpha_ce: float = 5.0,
        alpha_mlm: float = 2.0,
        alpha_cos: float = 1.0,
        alpha_mse: float = 0.0,
        restrict_ce_to_mask: bool = False,
    ):
        weights = {"loss_ce": alpha_ce, "loss_mlm": alpha_mlm, "loss_cos": alpha_cos, "loss_mse": alpha_mse}
        super().__init__(student, teacher, weights)
        self.distiller = MLMDistiller(
            student,
            teacher,
            temperature=temperature,
            alpha_ce=alpha_ce,
            alpha_mlm=alpha_mlm,
            restrict_ce_to_mask=restrict_ce_to_mask,
            with_cos=alpha_cos > 0,
        )

    def terms(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
        out = self.distiller(input_ids, attention_mask, labels)
        terms = {"loss_ce": out.loss_ce, "loss_mlm": out.loss_mlm, "loss_cos": out.loss_cos}
        if self.weights["loss_mse"] > 0:
            terms["loss_mse"] = pooled_mse(out.student_hidden, out.teacher_hidden, real_rows(attention_mask))
        return terms
