"""Task distillation: KD on the task logits plus hard-label cross-entropy (plus loss_cos on the last hidden states).

With p = softmax(teacher / T), q = softmax(student / T), each term a mean over its rows:
- loss_kd = T^2 * mean over the KD rows of KL(p || q) (fastdistil.kd_loss, reduction batchmean). The rows:
  classification, one per example (labelled or not); token classification, one per word, at its first sub-word;
  QA, one per window for the start and one for the end distribution, each over the window's context tokens
  only (other positions -inf), the two KL means averaged.
- loss_label = mean over the examples (words; QA windows, start and end averaged) that carry a hard label of the
  cross-entropy at T = 1 (over the context tokens for QA); 0 when the batch has none.
- loss_cos = mean over real tokens of 1 - cos(student, teacher) of the last hidden states (same width only).

Without a teacher the objective is the label-only baseline (and what fine-tuning a teacher trains): loss_label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdistil.objectives.base import Needs, Objective
from fastdistil.ops import cosine_loss, kd_loss
from fastdistil.padding import row_mask as real_rows
from fastdistil.tasks import QUESTION_ANSWERING, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION
from fastdistil.tasks.data import IGNORE


def labelled_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the rows whose label is not IGNORE; 0 (with zero gradient) when there is none
    (F.cross_entropy gives NaN there)."""
    logits, labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp_min(1)


def task_logits(output, task: str, targets: dict) -> list[tuple[Tensor, Tensor | None]]:
    """(logits, KD row mask) of each distribution the task predicts: one for classification and NER, the start
    and the end for QA (positions outside the context set to -inf)."""
    if task == SEQUENCE_CLASSIFICATION:
        return [(output.logits, None)]
    if task == TOKEN_CLASSIFICATION:
        return [(output.logits, targets["word_starts"])]
    span = targets["span_mask"]
    return [(x.masked_fill(~span, float("-inf")), None) for x in (output.start_logits, output.end_logits)]


def task_labels(task: str, targets: dict) -> list[Tensor]:
    if task == QUESTION_ANSWERING:
        return [targets["start_positions"], targets["end_positions"]]
    return [targets["labels"]]


def model_inputs(input_ids: Tensor, attention_mask: Tensor, targets: dict) -> dict:
    """The forward's keyword arguments; token_type_ids only where the encoding made them (fastdistil.tasks.data
    keeps them for tokenizers whose models take them)."""
    kw = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in targets:
        kw["token_type_ids"] = targets["token_type_ids"]
    return kw


class TaskObjective(Objective):
    needs = Needs(mlm_labels=False, model_outputs=("task_logits", "last_hidden_state"))

    def __init__(self, student: nn.Module, teacher: nn.Module | None, task: str, *, temperature: float = 2.0,
                 alpha_kd: float = 1.0, alpha_label: float = 1.0, alpha_cos: float = 0.0):  # fmt: skip
        if teacher is None:  # the label-only baseline: nothing to distil
            alpha_kd = alpha_cos = 0.0
        super().__init__(student, teacher, {"loss_kd": alpha_kd, "loss_label": alpha_label, "loss_cos": alpha_cos})
        self.task, self.temperature = task, temperature

    def terms(self, input_ids: Tensor, attention_mask: Tensor, targets: dict | None) -> dict[str, Tensor]:
        with_hidden = self.weights["loss_cos"] > 0
        inputs = model_inputs(input_ids, attention_mask, targets)
        s_out = self.student(**inputs, output_hidden_states=with_hidden)
        s_dists = task_logits(s_out, self.task, targets)
        labels = task_labels(self.task, targets)
        terms = {"loss_label": sum(labelled_cross_entropy(s, y) for (s, _), y in zip(s_dists, labels)) / len(labels)}
        if self.teacher is None:
            return terms
        with torch.no_grad():
            t_out = self.teacher(**inputs, output_hidden_states=with_hidden)
        t_dists = task_logits(t_out, self.task, targets)
        kd = [kd_loss(s, t.to(s.dtype).detach(), self.temperature, mask) for (s, mask), (t, _) in zip(s_dists, t_dists)]
        terms["loss_kd"] = sum(kd) / len(kd)
        if with_hidden:
            s_h, t_h = s_out.hidden_states[-1], t_out.hidden_states[-1].to(s_out.hidden_states[-1].dtype)
            terms["loss_cos"] = cosine_loss(s_h, t_h, real_rows(attention_mask))
        return terms
