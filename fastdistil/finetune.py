"""python -m fastdistil.finetune: fine-tune a base encoder for one task, so that it can be the teacher of
`python -m fastdistil.train --task ...` when only a pretrained encoder is at hand (everything offline).

    python -m fastdistil.finetune --task sequence-classification --teacher encoder-dir --data reviews.csv \\
        --dump_path reviews-teacher --n_epoch 3
    python -m fastdistil.train --task sequence-classification --teacher reviews-teacher/model --data reviews.csv

The model gets transformers' standard head of the task (AutoModelForSequenceClassification,
AutoModelForTokenClassification, AutoModelForQuestionAnswering) with id2label / label2id from the data, is
trained with the hard-label cross-entropy, written to <dump_path>/model and scored on the test set. The data
flags and formats are train's (--data, --test_data or --test_fraction, --text_column, --label_column, ...).
"""

from __future__ import annotations

import sys

from fastdistil import config as fd_config
from fastdistil.errors import EXIT_USAGE, UsageError

PROG = "python -m fastdistil.finetune"


def main(argv=None) -> int:
    try:
        c = fd_config.resolve(argv=list(argv) if argv is not None else sys.argv[1:], description=__doc__, prog=PROG)
        if c.task is None:
            raise UsageError("give --task (sequence-classification, token-classification or question-answering)")
        from fastdistil.tasks import job as task_job

        return task_job.finetune_run(c).exit_code
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
