"""The fused distillation head inside transformers masked-LM models.

    distiller = MLMDistiller(student, teacher, temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0)
    out = distiller(input_ids, attention_mask, mlm_labels)
    (5.0 * out.loss_ce + 2.0 * out.loss_mlm + out.loss_cos).backward()

Each model runs its encoder and the part of its MLM head BEFORE the vocabulary projection (dense, activation,
LayerNorm); the projections themselves run inside fastdistil.ops.fused_distill_head, chunk by chunk, so
neither model's (tokens x vocabulary) logits ever exist. Supported: BertForMaskedLM, DistilBertForMaskedLM,
RobertaForMaskedLM (and models built like them); mlm_parts() says clearly when a model is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fastdistil.nn import DistillHead
from fastdistil.ops import cosine_loss


@dataclass
class MLMParts:
    encoder: nn.Module  # input_ids, attention_mask -> last_hidden_state
    transform: Callable[[Tensor], Tensor]  # last hidden state -> the input of the vocabulary projection
    projection: nn.Linear  # (V, H) weight (tied to the word embeddings), (V,) bias


def mlm_parts(model: nn.Module) -> MLMParts:
    """Split a transformers masked-LM model into encoder, pre-projection transform and vocabulary projection."""
    if hasattr(model, "cls") and hasattr(model.cls, "predictions"):  # BertForMaskedLM and friends
        head = model.cls.predictions
        return MLMParts(model.base_model, head.transform, head.decoder)
    if hasattr(model, "vocab_projector"):  # DistilBertForMaskedLM

        def transform(h):
            return model.vocab_layer_norm(model.activation(model.vocab_transform(h)))

        return MLMParts(model.base_model, transform, model.vocab_projector)
    if hasattr(model, "lm_head") and hasattr(model.lm_head, "decoder"):  # RobertaForMaskedLM and friends
        head = model.lm_head

        def transform(h):
            return head.layer_norm(torch.nn.functional.gelu(head.dense(h)))

        return MLMParts(model.base_model, transform, head.decoder)
    raise TypeError(
        f"{type(model).__name__} has no masked-LM head that fastdistil knows (BertForMaskedLM, DistilBertForMaskedLM, "
        "RobertaForMaskedLM); distil its hidden states instead"
    )


@dataclass
class DistillOutput:
    loss_ce: Tensor  # KL at temperature over the vocabulary, T^2, mean over the KL rows
    loss_mlm: Tensor  # cross-entropy on the labelled rows (0 without labels)
    loss_cos: Tensor  # 1 - cos of the last hidden states, mean over attention rows
    student_hidden: Tensor  # (B, L, H) last hidden states
    teacher_hidden: Tensor


class MLMDistiller(nn.Module):
    """The DistilBERT objective for a transformers (student, teacher) masked-LM pair, through the fused head.

    The student is a submodule (its parameters are this module's); the teacher is held aside, in eval mode,
    and runs without autograd. KL rows: the attention mask, or the labelled rows with restrict_ce_to_mask."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        temperature: float = 2.0,
        alpha_ce: float = 5.0,
        alpha_mlm: float = 2.0,
        restrict_ce_to_mask: bool = False,
        chunk_size: int | None = None,
        with_cos: bool = True,
    ):
        super().__init__()
        self.student = student
        self._teacher = (teacher.eval(),)  # a tuple: not registered, so never in the student's optimizer
        self.student_parts, self.teacher_parts = mlm_parts(student), mlm_parts(teacher)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.head = DistillHead(temperature, alpha_ce, alpha_mlm, chunk_size)
        self.restrict_ce_to_mask = restrict_ce_to_mask
        self.with_cos = with_cos  # False: loss_cos is 0 (e.g. a student of another width, where it is undefined)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, mlm_labels: Tensor | None = None) -> DistillOutput:
        with torch.no_grad():
            t_hidden = self.teacher_parts.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            t_pre = self.teacher_parts.transform(t_hidden)
        s_hidden = self.student_parts.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        s_pre = self.student_parts.transform(s_hidden)
        # A teacher computing in another dtype (fp16 / bf16 checkpoints) meets the student in the student's dtype.
        t_hidden, t_pre = t_hidden.to(s_hidden.dtype), t_pre.to(s_pre.dtype)
        rows = attention_mask.bool()
        if self.restrict_ce_to_mask:
            if mlm_labels is None:
                raise ValueError("restrict_ce_to_mask needs mlm_labels (the KL rows are the labelled rows)")
            kl_mask = mlm_labels != -100
        else:
            kl_mask = rows
        loss_ce, loss_mlm = self.head(
            s_pre, self.student_parts.projection, t_pre, self.teacher_parts.projection, kl_mask, mlm_labels
        )
        if self.with_cos:
            loss_cos = cosine_loss(s_hidden, t_hidden, rows)
        else:
            loss_cos = s_hidden.new_zeros((), dtype=torch.float32)
        return DistillOutput(loss_ce, loss_mlm, loss_cos, s_hidden, t_hidden)
