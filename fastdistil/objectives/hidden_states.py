"""Hidden-state distillation for encoder teachers without an MLM head (sentence-embedding models): loss_cos on
the last hidden states and optionally loss_mse on the mean-pooled embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastdistil.objectives.base import Needs, Objective, pooled_mse
from fastdistil.ops import cosine_loss
from fastdistil.padding import row_mask as real_rows


class HiddenStateObjective(Objective):
    needs = Needs(mlm_labels=False, model_outputs=("last_hidden_state",))

    def __init__(self, student: nn.Module, teacher: nn.Module, *, alpha_cos: float = 1.0, alpha_mse: float = 0.0):
        super().__init__(student, teacher, {"loss_cos": alpha_cos, "loss_mse": alpha_mse})

    def terms(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
        rows = real_rows(attention_mask)
        with torch.no_grad():
            t_hidden = self.teacher(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        s_hidden = self.student(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        t_hidden = t_hidden.to(s_hidden.dtype)  # a half-precision teacher meets the student in its dtype
        use_cos = self.weights["loss_cos"] > 0
        terms = {"loss_cos": cosine_loss(s_hidden, t_hidden, rows) if use_cos else s_hidden.new_zeros(())}
        if self.weights["loss_mse"] > 0:
            terms["loss_mse"] = pooled_mse(s_hidden, t_hidden, rows)
        return terms
