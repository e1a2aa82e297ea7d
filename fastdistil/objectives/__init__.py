"""Distillation objectives, one module per recipe. Each declares what it needs (`needs`) and returns named loss
terms; `for_teacher` picks the recipe a teacher supports."""

from __future__ import annotations

from fastdistil.models import hidden_size, num_layers
from fastdistil.objectives.base import Losses, Needs, Objective, pooled_mse
from fastdistil.objectives.distilbert import DistilBERTObjective
from fastdistil.objectives.hidden_states import HiddenStateObjective
from fastdistil.objectives.layerwise import (
    LayerwiseObjective,
    LayerwiseSpec,
    parse_layer_map,
    parse_relation_layers,
    uniform_layer_map,
)

__all__ = [
    "DistilBERTObjective",
    "HiddenStateObjective",
    "LayerwiseObjective",
    "LayerwiseSpec",
    "Losses",
    "Needs",
    "Objective",
    "for_teacher",
    "pooled_mse",
]


def for_teacher(c, student, teacher_model, has_mlm_head: bool) -> Objective:
    """The objective of a resolved config: the DistilBERT triple loss for an MLM teacher, hidden states else, plus
    the layer-wise terms (hidden states through the layer map, attention maps, relations) when they have a weight.
    Across widths the last-hidden-state cosine goes through the layer-wise projection."""
    same_width = hidden_size(student) == hidden_size(teacher_model)
    base_cos = c.alpha_cos if same_width else 0.0
    if has_mlm_head:
        base = DistilBERTObjective(
            student,
            teacher_model,
            temperature=c.temperature,
            alpha_ce=c.alpha_ce,
            alpha_mlm=c.alpha_mlm,
            alpha_cos=base_cos,
            alpha_mse=c.alpha_mse,
            restrict_ce_to_mask=c.restrict_ce_to_mask,
        )
    else:
        base = HiddenStateObjective(student, teacher_model, alpha_cos=base_cos, alpha_mse=c.alpha_mse)
    spec = layerwise_spec(c, student, teacher_model, cos_through_projection=not same_width)
    return LayerwiseObjective(base, spec) if spec.active else base


def layerwise_spec(c, student, teacher_model, cos_through_projection: bool) -> LayerwiseSpec:
    n_s, n_t = num_layers(student), num_layers(teacher_model)
    layer_map = parse_layer_map(c.layer_map, n_s, n_t) if c.layer_map else uniform_layer_map(n_s, n_t)
    return LayerwiseSpec(
        layer_map=layer_map,
        alpha_hidden=c.alpha_hidden,
        hidden_loss=c.hidden_loss,
        alpha_attention=c.alpha_attention,
        alpha_relation=c.alpha_relation,
        relation_heads=c.relation_heads or default_relation_heads(student, teacher_model),
        relation_layers=parse_relation_layers(c.relation_layers),
        alpha_cos=c.alpha_cos if cos_through_projection else 0.0,
    )


def default_relation_heads(student, teacher_model) -> int:
    """The teacher's head count, or the largest number below it that divides both widths (256 and 384: 8)."""
    widths = hidden_size(student), hidden_size(teacher_model)
    return next(r for r in range(teacher_model.config.num_attention_heads, 0, -1) if not any(w % r for w in widths))
