"""fastdistil's objectives inside a `transformers.Trainer` (needs `accelerate`, as the Trainer does).

    from fastdistil.hf import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher=teacher, args=TrainingArguments(...),
                                  train_dataset=tokenised, data_collator=DataCollatorForLanguageModeling(tok))
    trainer.train()

compute_loss runs the recipe the teacher supports (the DistilBERT triple loss through the fused streaming head
for an MLM teacher; hidden-state distillation otherwise) with the weights given, on the batch's input_ids,
attention_mask and (MLM) labels; the loss terms are logged beside the Trainer's loss. Single process: for many
processes use `torchrun -m fastdistil.train`.
"""

from __future__ import annotations

import transformers

from fastdistil import objectives
from fastdistil.models import freeze, has_mlm_head
from fastdistil.ops import use_kernels


class DistillationTrainer(transformers.Trainer):
    def __init__(self, *args, teacher, objective: objectives.Objective | None = None, kernels: str = "fused",
                 temperature: float = 2.0, alpha_ce: float = 5.0, alpha_mlm: float = 2.0, alpha_cos: float = 1.0,
                 alpha_mse: float = 0.0, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.teacher = freeze(teacher).to(self.args.device)
        if objective is None and has_mlm_head(teacher):
            objective = objectives.DistilBERTObjective(self.model, self.teacher, temperature=temperature,
                                                       alpha_ce=alpha_ce, alpha_mlm=alpha_mlm, alpha_cos=alpha_cos,
                                                       alpha_mse=alpha_mse)  # fmt: skip
        elif objective is None:
            objective = objectives.HiddenStateObjective(self.model, self.teacher, alpha_cos=alpha_cos,
                                                        alpha_mse=alpha_mse)  # fmt: skip
        if objective.trainable() is not None:  # transformers.Trainer's optimizer would never see it
            raise ValueError("this objective trains state of its own (a projection between the two widths), which "
                             "transformers.Trainer does not optimise or checkpoint; use fastdistil.distil or "
                             "python -m fastdistil.train for students of another width")  # fmt: skip
        self.objective, self.kernels, self._terms = objective, kernels, {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels") if self.objective.needs.mlm_labels else None
        with use_kernels(self.kernels):
            losses = self.objective(inputs["input_ids"], inputs["attention_mask"], labels)
        self._terms = losses.terms
        return (losses.total, None) if return_outputs else losses.total

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._terms:
            logs = {**logs, **{k: round(float(v), 6) for k, v in self._terms.items()}}
        super().log(logs, *args, **kwargs)
