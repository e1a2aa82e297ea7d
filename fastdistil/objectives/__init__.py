"""Distillation objectives, one module per recipe. Each declares what it needs (`needs`) and returns named loss
terms; `for_teacher` picks the recipe a teacher supports."""

from __future__ import annotations

from fastdistil.objectives.base import Losses, Needs, Objective, pooled_mse
from fastdistil.objectives.distilbert import DistilBERTObjective
from fastdistil.objectives.hidden_states import HiddenStateObjective

__all__ = ["DistilBERTObjective", "HiddenStateObjective", "Losses", "Needs", "Objective", "for_teacher", "pooled_mse"]


def for_teacher(c, student, teacher_model, has_mlm_head: bool) -> Objective:
    """The objective of a resolved config: the DistilBERT triple loss for an MLM teacher, hidden states else."""
    if has_mlm_head:
        return DistilBERTObjective(
            student,
            teacher_model,
            temperature=c.temperature,
            alpha_ce=c.alpha_ce,
            alpha_mlm=c.alpha_mlm,
            alpha_cos=c.alpha_cos,
            alpha_mse=c.alpha_mse,
            restrict_ce_to_mask=c.restrict_ce_to_mask,
        )
    return HiddenStateObjective(student, teacher_model, alpha_cos=c.alpha_cos, alpha_mse=c.alpha_mse)
