"""Task-specific distillation: a teacher fine-tuned for one task (sequence classification, token classification,
extractive question answering) taught to a smaller student of the same task, on the labelled set plus any
unlabelled in-domain text. `data` reads and encodes the three formats, `metrics` scores them, `models` loads
task teachers and builds task students, `job` is the end-to-end run behind `fastdistil.train --task`."""

from __future__ import annotations

SEQUENCE_CLASSIFICATION = "sequence-classification"
TOKEN_CLASSIFICATION = "token-classification"
QUESTION_ANSWERING = "question-answering"
TASKS = (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, QUESTION_ANSWERING)

# transformers' Auto class of each task, and the architecture-name suffix that identifies a checkpoint's task.
AUTO_CLASS = {
    SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification",
    TOKEN_CLASSIFICATION: "AutoModelForTokenClassification",
    QUESTION_ANSWERING: "AutoModelForQuestionAnswering",
}
ARCHITECTURE_SUFFIX = {
    SEQUENCE_CLASSIFICATION: "ForSequenceClassification",
    TOKEN_CLASSIFICATION: "ForTokenClassification",
    QUESTION_ANSWERING: "ForQuestionAnswering",
}


def auto_class(task: str):
    import transformers

    return getattr(transformers, AUTO_CLASS[task])


def task_of_architectures(architectures) -> str | None:
    """The task a checkpoint was fine-tuned for, from its config's `architectures` (None: no task head)."""
    for arch in architectures or ():
        for task, suffix in ARCHITECTURE_SUFFIX.items():
            if arch.endswith(suffix):
                return task
    return None


def task_of_checkpoint(path: str) -> str | None:
    """The task a local fine-tuned checkpoint's config.json names (None: no task head, or not a local checkpoint;
    the loaders then say what is wrong with it)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(path) / "config.json").read_text())
        return task_of_architectures(config.get("architectures"))
    except (OSError, ValueError, AttributeError):
        return None
